"""The generator split into an encoder graph and a one-step decoder graph (the decoder of each family
lives in that family's module).

``generator_encoder``: context ids/mask -> encoder states and every decoder layer's cross-attention
K/V, computed once per query (cross K/V and the self-attention cache are one tensor per layer).
``generator_decoder`` (format 4): ``t`` new tokens per row (``t`` = 1 per decode step; the whole answer for
teacher-forced rescoring) over rows of different lengths and questions. Each row gives its cached length
(``positions``) and the row of the last call's cache it continues (``beam_idx``: the beam reorder, and the
rows that left or joined, in one gather, done where the cache lives); the past comes from the runtime's slot
buffer, masked past each row's length, and goes back gathered (``present_*``) beside the new tokens' keys
and values (``new_*``), which the runtime writes at each row's position. Decoder rows map onto encoder rows
through ``cross_query_rows``/``decoder_slots`` (any number of beams per passage). A zero-length past serves
a first step, so one graph serves every call with no If node.
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
        C.POSITIONS: ["rows"],
        C.BEAM_IDX: ["rows"],
        C.CROSS_QUERY_ROWS: ["enc_rows", "fold"],
        C.DECODER_SLOTS: ["rows"],
        C.ENCODER_ATTENTION_MASK: ["enc_rows", "src_len"],
        C.PAST_KEYS: ["past_rows", "heads", "past_len", "head_dim"],
        C.PAST_VALUES: ["past_rows", "heads", "past_len", "head_dim"],
        C.CROSS_KEYS: ["enc_rows", "heads", "src_len", "head_dim"],
        C.CROSS_VALUES: ["enc_rows", "heads", "src_len", "head_dim"],
    },
    outputs={
        C.LOGITS: ["rows", "new_len", "vocab"],
        C.PRESENT_KEYS: ["rows", "heads", "past_len", "head_dim"],
        C.PRESENT_VALUES: ["rows", "heads", "past_len", "head_dim"],
        C.NEW_KEYS: ["rows", "heads", "new_len", "head_dim"],
        C.NEW_VALUES: ["rows", "heads", "new_len", "head_dim"],
    },
    dtypes={name: "int64" for name in (C.DECODER_INPUT_IDS, C.POSITIONS, C.BEAM_IDX, C.CROSS_QUERY_ROWS,
                                       C.DECODER_SLOTS, C.ENCODER_ATTENTION_MASK)},
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
