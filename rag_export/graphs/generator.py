"""The generator split into an encoder graph and a one-step decoder graph (the decoder of each family
lives in that family's module).

``generator_encoder``: context ids/mask -> encoder states and every decoder layer's cross-attention
K/V, computed once per query (cross K/V and the self-attention cache are one tensor per layer).
``generator_decoder``: ``t`` new tokens with self-attention past K/V in and present K/V out (``t`` = 1
per decode step; ``t`` = the whole answer for teacher-forced rescoring); the first step passes a
zero-length past, so one graph serves every step with no If node. ``beam_idx`` reorders the past rows
first (row ``i`` continues from past row ``beam_idx[i]``), so beam search reorders the cache where it
lives, inside the decoder call, instead of gathering it on the host.
"""

from __future__ import annotations

from torch import nn

from rag_runtime import constants as C

from . import GraphSpec
from .attention import split_heads
from .families import GeneratorFamily

ENCODER_SPEC = GraphSpec(
    name=C.GENERATOR_ENCODER,
    file=C.GENERATOR_ENCODER_FILE,
    inputs={C.INPUT_IDS: ["enc_rows", "src_len"], C.ATTENTION_MASK: ["enc_rows", "src_len"]},
    outputs={
        C.ENCODER_HIDDEN_STATES: ["enc_rows", "src_len", "d_model"],
        C.CROSS_KEYS: ["enc_rows", "heads", "src_len", "head_dim"],  # per layer, like every K/V below
        C.CROSS_VALUES: ["enc_rows", "heads", "src_len", "head_dim"],
    },
    dtypes={C.INPUT_IDS: "int64", C.ATTENTION_MASK: "int64"},
)

# The per-layer inputs come last, so that the graph module takes them as one ``*layer_tensors``.
DECODER_SPEC = GraphSpec(
    name=C.GENERATOR_DECODER,
    file=C.GENERATOR_DECODER_FILE,
    inputs={
        C.DECODER_INPUT_IDS: ["rows", "new_len"],
        C.BEAM_IDX: ["rows"],
        C.ENCODER_ATTENTION_MASK: ["enc_rows", "src_len"],
        C.PAST_KEYS: ["rows", "heads", "past_len", "head_dim"],
        C.PAST_VALUES: ["rows", "heads", "past_len", "head_dim"],
        C.CROSS_KEYS: ["enc_rows", "heads", "src_len", "head_dim"],
        C.CROSS_VALUES: ["enc_rows", "heads", "src_len", "head_dim"],
    },
    outputs={
        C.LOGITS: ["rows", "new_len", "vocab"],
        C.PRESENT_KEYS: ["rows", "heads", "total_len", "head_dim"],
        C.PRESENT_VALUES: ["rows", "heads", "total_len", "head_dim"],
    },
    dtypes={C.DECODER_INPUT_IDS: "int64", C.BEAM_IDX: "int64", C.ENCODER_ATTENTION_MASK: "int64"},
)


class GeneratorEncoderGraph(nn.Module):
    """Context ids/mask -> encoder states, then every decoder layer's cross-attention keys, then values."""

    def __init__(self, generator: nn.Module, family: GeneratorFamily):
        super().__init__()
        self.encoder = generator.get_encoder()
        self.heads = family.dims(generator.config).heads
        self.cross = nn.ModuleList(nn.ModuleList(kv) for kv in family.cross_projections(generator))

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)[0]
        keys = [split_heads(k(hidden), self.heads) for k, _ in self.cross]
        values = [split_heads(v(hidden), self.heads) for _, v in self.cross]
        return hidden, *keys, *values
