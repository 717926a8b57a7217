"""The exported graphs: one module per graph or generator family, and the registries that list them.

``families``: generator families (BART, T5, mBART, Marian, Pegasus), each one entry. ``registry``: every
graph of an export, each with its module factory, sample inputs, IO spec and validator; the exporter
loops over it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rag_runtime import constants as C
from rag_runtime.artifact import GraphFile, TensorSpec


@dataclass(frozen=True)
class GraphSpec:
    """What an exported graph looks like from the outside.

    Attributes:
        name: Manifest key of the graph (a ``rag_runtime.constants`` graph name).
        file: File name inside the artifact directory.
        inputs: Input names with their symbolic shapes (a name per axis).
        outputs: Output names with their symbolic shapes.
        dtypes: ONNX element type name per input and output (float32 when absent).

    Per-layer IO (``constants.PER_LAYER`` names) is declared once, with the shape of one layer;
    :meth:`resolve` expands it for a generator's number of layers.
    """

    name: str
    file: str
    inputs: dict[str, list[str]]
    outputs: dict[str, list[str]]
    dtypes: dict[str, str] = field(default_factory=dict)

    def resolve(self, layers: int) -> GraphSpec:
        """The spec with every per-layer name expanded to ``layers`` names (``cross_keys.0``, ...), in order."""

        def expand(values: dict) -> dict:
            return {io: v for name, v in values.items()
                    for io in (C.per_layer(layers, name) if name in C.PER_LAYER else [name])}

        return dataclasses.replace(self, inputs=expand(self.inputs), outputs=expand(self.outputs),
                                   dtypes=expand(self.dtypes))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            io: {i: axis for i, axis in enumerate(axes) if not axis.isdigit()}
            for io, axes in {**self.inputs, **self.outputs}.items()
        }

    def to_manifest(self, sha256: str, dtypes: dict[str, str] | None = None) -> GraphFile:
        """The manifest entry; ``dtypes`` (read from the file) override the spec's after a conversion."""
        dtypes = {**self.dtypes, **(dtypes or {})}

        def describe(ios: dict[str, list[str]]) -> list[TensorSpec]:
            return [TensorSpec(n, dtypes.get(n, "float32"), list(s)) for n, s in ios.items()]

        return GraphFile(self.file, sha256, describe(self.inputs), describe(self.outputs))
