"""One module per exported graph: its wrapper ``nn.Module`` and its export spec."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GraphSpec:
    """What an exported graph looks like from the outside.

    Attributes:
        name: Manifest key of the graph.
        file: File name inside the artifact directory.
        inputs: Input names with their symbolic shapes (a name per axis).
        outputs: Output names with their symbolic shapes.
        dtypes: ONNX element type name per input and output.
    """

    name: str
    file: str
    inputs: dict[str, list[str]]
    outputs: dict[str, list[str]]
    dtypes: dict[str, str] = field(default_factory=dict)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            io: {i: axis for i, axis in enumerate(axes) if not axis.isdigit()}
            for io, axes in {**self.inputs, **self.outputs}.items()
        }

    def to_manifest(self, sha256: str, dtypes: dict[str, str] | None = None) -> dict:
        """The manifest entry; ``dtypes`` (read from the file) override the spec's after a conversion."""
        dtypes = {**self.dtypes, **(dtypes or {})}

        def describe(ios: dict[str, list[str]]) -> list[dict]:
            return [{"name": n, "dtype": dtypes.get(n, "float32"), "shape": s} for n, s in ios.items()]

        return {"file": self.file, "sha256": sha256, "inputs": describe(self.inputs),
                "outputs": describe(self.outputs)}
