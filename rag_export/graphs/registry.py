"""Every graph an export can hold, as one entry each: module factory, sample inputs for tracing, IO spec,
validator and optimizer settings. The exporter loops over :data:`GRAPHS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rag_runtime import constants as C
from rag_runtime.artifact import DecoderDims

from .. import validate as V
from ..judge import Tolerance
from ..onnx_files import DEFAULT_EXTERNAL_DATA_THRESHOLD
from . import GraphSpec
from .families import GeneratorFamily
from .generator import DECODER_SPEC, ENCODER_SPEC, GeneratorEncoderGraph
from .heads import (
    BEAM_STEP_SPEC,
    RAG_TOKEN_HEAD_SPEC,
    SEQUENCE_SCORER_SPEC,
    BeamStepGraph,
    RagTokenHeadGraph,
    SequenceScorerGraph,
    beam_step_args,
    scorer_export_args,
)
from .heads import export_args as head_export_args
from .question_encoder import CONTEXT_ENCODER_SPEC, QUESTION_ENCODER_SPEC, DprEncoderGraph


@dataclass
class ContextEncoderSource:
    """A DPR context encoder loaded for export (it comes from its own checkpoint, not the RAG one)."""

    source: str
    model: Any
    tokenizer: Any


@dataclass
class ExportContext:
    """What the graph entries build from.

    Attributes:
        out: The directory the graphs are written into.
        checkpoint: The loaded RAG checkpoint (None when exporting a context encoder alone).
        family: The generator's family.
        dims: The generator decoder's dimensions.
        context_encoder: The DPR context encoder to export too, if any.
        external_data_threshold: Graphs whose weights exceed this many bytes keep them in external data.
    """

    out: Path
    checkpoint: Any = None
    family: GeneratorFamily | None = None
    dims: DecoderDims | None = None
    context_encoder: ContextEncoderSource | None = None
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD

    @property
    def generator(self) -> nn.Module:
        return self.checkpoint.model.generator

    @property
    def question_encoder(self) -> nn.Module:
        return self.checkpoint.model.question_encoder

    def path(self, spec: GraphSpec) -> Path:
        return self.out / spec.file

    def spec(self, entry: GraphEntry) -> GraphSpec:
        """The entry's spec with its per-layer IO expanded to this generator's decoder layers."""
        return entry.spec.resolve(self.dims.layers if self.dims else 0)


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph.

    Attributes:
        spec: Names, file and symbolic shapes of its IO.
        applies: Whether this export has the graph.
        module: The ``nn.Module`` traced into it.
        sample_inputs: Tracing inputs for the module.
        validate: Figures per output against PyTorch (:mod:`rag_export.judge`); raises ValidationError.
        optimizer: onnxruntime optimizer settings (model type, heads, hidden size), None to leave it as is.
        keep_fp32: Not converted by ``--precision fp16`` / ``--quantize int8`` (it has no weights, or its
            arithmetic must stay in fp32).
        retrieval: Embeds text for the search (question or passage encoder): ``--quantize int8`` leaves it
            fp32 unless asked (``quantize_retrieval``), since int8 embeddings change which passages are
            retrieved, and it runs once per question, so int8 would buy almost nothing.
    """

    spec: GraphSpec
    applies: Callable[[ExportContext], bool]
    module: Callable[[ExportContext], nn.Module]
    sample_inputs: Callable[[ExportContext, nn.Module], tuple]
    validate: Callable[[ExportContext, nn.Module, Tolerance], dict[str, dict]]
    optimizer: Callable[[ExportContext], tuple[str, int, int] | None] = lambda ctx: None
    keep_fp32: bool = False
    retrieval: bool = False


def sample_ids(vocab: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with one right-padded row, for tracing."""
    ids = torch.randint(5, max(6, min(vocab, 30000)), (rows, length))
    mask = torch.ones_like(ids)
    mask[-1, length // 2 :] = 0
    return ids, mask


def _bert_optimizer(config) -> tuple[str, int, int]:
    return "bert", config.num_attention_heads, config.hidden_size


def _generator_optimizer(ctx: ExportContext) -> tuple[str, int, int]:
    return ctx.family.optimizer_type, ctx.dims.heads, ctx.dims.d_model


def _decoder_samples(ctx: ExportContext, module: nn.Module) -> tuple:
    d = ctx.dims
    ids, mask = sample_ids(d.vocab, 2, 9)
    with torch.no_grad():
        cross = GeneratorEncoderGraph(ctx.generator, ctx.family).eval()(ids, mask)[1:]
    past = [torch.zeros(4, d.heads, 3, d.head_dim) for _ in range(2 * d.layers)]
    # 2 contexts x 2 beams, rows of different lengths, beams swapped.
    return (torch.randint(5, 50, (4, 1)), torch.tensor([3, 2, 1, 3]), torch.tensor([1, 0, 3, 2]),
            torch.tensor([[0, 1], [2, 3]]), torch.arange(4), mask, *past, *cross)


QUESTION_ENCODER = GraphEntry(
    spec=QUESTION_ENCODER_SPEC,
    applies=lambda ctx: ctx.checkpoint is not None,
    module=lambda ctx: DprEncoderGraph(ctx.question_encoder),
    sample_inputs=lambda ctx, m: sample_ids(ctx.question_encoder.config.vocab_size, 2, 8),
    validate=lambda ctx, m, tol: V.validate_encoder(
        C.QUESTION_ENCODER, ctx.path(QUESTION_ENCODER_SPEC), m, [C.QUESTION_EMBEDDING],
        ctx.question_encoder.config.vocab_size, tol),
    optimizer=lambda ctx: _bert_optimizer(ctx.question_encoder.config),
    retrieval=True,
)

GENERATOR_ENCODER = GraphEntry(
    spec=ENCODER_SPEC,
    applies=lambda ctx: ctx.checkpoint is not None,
    module=lambda ctx: GeneratorEncoderGraph(ctx.generator, ctx.family),
    sample_inputs=lambda ctx, m: sample_ids(ctx.dims.vocab, 2, 9),
    validate=lambda ctx, m, tol: V.validate_generator_encoder(ctx.path(ENCODER_SPEC), ctx.generator, ctx.dims, tol),
    optimizer=_generator_optimizer,
)

GENERATOR_DECODER = GraphEntry(
    spec=DECODER_SPEC,
    applies=lambda ctx: ctx.checkpoint is not None,
    module=lambda ctx: ctx.family.decoder_graph(ctx.generator),
    sample_inputs=_decoder_samples,
    validate=lambda ctx, m, tol: V.validate_generator_decoder(
        ctx.path(ENCODER_SPEC), ctx.path(DECODER_SPEC), ctx.generator, ctx.dims,
        ctx.checkpoint.generation_defaults["decoder_start_token_id"], tol),
    optimizer=_generator_optimizer,
)

RAG_TOKEN_HEAD = GraphEntry(
    spec=RAG_TOKEN_HEAD_SPEC,
    applies=lambda ctx: ctx.checkpoint is not None and ctx.checkpoint.kind == "token",
    module=lambda ctx: RagTokenHeadGraph(),
    sample_inputs=lambda ctx, m: head_export_args(ctx.dims.vocab),
    validate=lambda ctx, m, tol: V.validate_rag_token_head(ctx.path(RAG_TOKEN_HEAD_SPEC), ctx.dims.vocab, tol),
    keep_fp32=True,  # the marginalization: exponentials and sums over the vocabulary
)

SEQUENCE_SCORER = GraphEntry(
    spec=SEQUENCE_SCORER_SPEC,
    applies=lambda ctx: ctx.checkpoint is not None and ctx.checkpoint.kind == "sequence",
    module=lambda ctx: SequenceScorerGraph(),
    sample_inputs=lambda ctx, m: scorer_export_args(ctx.dims.vocab),
    validate=lambda ctx, m, tol: V.validate_sequence_scorer(ctx.path(SEQUENCE_SCORER_SPEC), ctx.dims.vocab, tol),
    keep_fp32=True,  # a log-softmax over the vocabulary
)

BEAM_STEP = GraphEntry(
    spec=BEAM_STEP_SPEC,
    applies=lambda ctx: ctx.checkpoint is not None and ctx.checkpoint.kind == "sequence",
    module=lambda ctx: BeamStepGraph(),
    sample_inputs=lambda ctx, m: beam_step_args(ctx.dims.vocab),
    validate=lambda ctx, m, tol: V.validate_beam_step(ctx.path(BEAM_STEP_SPEC), ctx.dims.vocab, tol),
    keep_fp32=True,  # a log-softmax over the vocabulary
)

CONTEXT_ENCODER = GraphEntry(
    spec=CONTEXT_ENCODER_SPEC,
    applies=lambda ctx: ctx.context_encoder is not None,
    module=lambda ctx: DprEncoderGraph(ctx.context_encoder.model),
    sample_inputs=lambda ctx, m: sample_ids(ctx.context_encoder.model.config.vocab_size, 2, 8),
    validate=lambda ctx, m, tol: V.validate_encoder(
        C.CONTEXT_ENCODER, ctx.path(CONTEXT_ENCODER_SPEC), m, [C.PASSAGE_EMBEDDING],
        ctx.context_encoder.model.config.vocab_size, tol),
    retrieval=True,
)

# Export order: the decoder's validation runs the exported encoder.
GRAPHS: tuple[GraphEntry, ...] = (QUESTION_ENCODER, GENERATOR_ENCODER, GENERATOR_DECODER, RAG_TOKEN_HEAD,
                                  SEQUENCE_SCORER, BEAM_STEP, CONTEXT_ENCODER)
