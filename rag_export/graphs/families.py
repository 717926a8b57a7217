"""Generator families: everything the exporter needs to know about one kind of seq2seq generator.

Each family is one entry (BART, T5, mBART, Marian, Pegasus): its own module holds the decoder graph and
defines ``FAMILY``; ``_FAMILY_MODULES`` lists the modules. A generator whose ``model_type`` no family covers is refused with "supported are: ...".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from rag_runtime.artifact import DecoderDims

from ..errors import ExportError


@dataclass(frozen=True)
class GeneratorFamily:
    """One generator family.

    Attributes:
        name: Recorded as the manifest's ``generator_type``.
        model_types: The ``config.model_type`` values it covers.
        dims: Decoder dimensions from the generator's config.
        cross_projections: Each decoder layer's cross-attention (key, value) projections, computed once
            per query by the encoder graph.
        decoder_graph: The one-step decoder graph (self-attention cache in and out, folded cross-attention).
        optimizer_type: onnxruntime transformer optimizer's model type for the encoder and decoder graphs.
        check_config: Raises :class:`ExportError` for config variants the graphs do not reproduce.
    """

    name: str
    model_types: tuple[str, ...]
    dims: Callable[[object], DecoderDims]
    cross_projections: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]]
    decoder_graph: Callable[[nn.Module], nn.Module]
    optimizer_type: str
    check_config: Callable[[object], None] = lambda config: None


# One module per family, each defining ``FAMILY``; adding a family is its module plus its name here.
_FAMILY_MODULES = ("bart", "t5", "mbart", "marian", "pegasus")


def _families() -> list[GeneratorFamily]:
    # Imported on use: the family modules import this one for GeneratorFamily.
    return [importlib.import_module(f"{__package__}.{name}").FAMILY for name in _FAMILY_MODULES]


def family_names() -> tuple[str, ...]:
    """Every family's name (the manifest's ``generator_type``), in registry order."""
    return tuple(f.name for f in _families())


def supported_model_types() -> tuple[str, ...]:
    """Every generator ``model_type`` a family covers, in registry order."""
    return tuple(t for f in _families() for t in f.model_types)


def family_for(config) -> GeneratorFamily:
    """The family of a generator config (the model's ``.config``), its variant checked."""
    model_type = getattr(config, "model_type", None)
    for family in _families():
        if model_type in family.model_types:
            family.check_config(config)
            return family
    raise ExportError(f"unsupported generator {model_type!r}; supported are: {', '.join(supported_model_types())}")
