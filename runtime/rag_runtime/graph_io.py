"""A graph's inputs and outputs as the manifest declares them.

The runtime binds every input and output by a name the manifest declares (never by position, never by a
name it rebuilds), so an export of another layout fails on load with the graph and the name it lacks.
"""

from __future__ import annotations

from .artifact import GraphFile
from .errors import ArtifactError

_REEXPORT = "re-export with this rag-export"


class GraphIO:
    """The declared input and output names of one graph.

    Args:
        name: The graph's manifest key (a :mod:`rag_runtime.constants` graph name).
        graph: Its manifest entry.
    """

    def __init__(self, name: str, graph: GraphFile):
        self.name = name
        self.inputs = [t.name for t in graph.inputs]
        self.outputs = [t.name for t in graph.outputs]

    def require(self, *names: str) -> None:
        """Raise :class:`ArtifactError` unless the graph declares every one of ``names``."""
        missing = [n for n in names if n not in self.inputs and n not in self.outputs]
        if missing:
            raise ArtifactError(f"the {self.name} graph lacks {', '.join(missing)} (declared: "
                                f"{', '.join(self.inputs + self.outputs)}); {_REEXPORT}")

    def per_layer(self, name: str, layers: int) -> list[str]:
        """The declared ``name.<layer>`` tensors in layer order, exactly one per layer of ``layers``.

        Raises:
            ArtifactError: A layer's tensor is missing, or the graph declares more layers.
        """
        found = {}
        for declared in self.inputs + self.outputs:
            stem, _, layer = declared.rpartition(".")
            if stem == name and layer.isdigit():
                found[int(layer)] = declared
        missing = [f"{name}.{i}" for i in range(layers) if i not in found]
        if missing:
            self.require(*missing)
        if len(found) != layers:
            raise ArtifactError(f"the {self.name} graph declares {name} for {len(found)} layers, the decoder has "
                                f"{layers}; {_REEXPORT}")
        return [found[i] for i in range(layers)]

    def run(self, session, feeds: dict, outputs: list[str]) -> dict:
        """``session.run`` of ``outputs`` on ``feeds``, by name (the caller has required both)."""
        return dict(zip(outputs, session.run(outputs, feeds), strict=True))
