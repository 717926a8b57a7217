"""DPR question encoder (and, with the same shape, the optional DPR context encoder)."""

from __future__ import annotations

from torch import nn

from rag_runtime import constants as C

from . import GraphSpec

QUESTION_ENCODER_SPEC = GraphSpec(
    name=C.QUESTION_ENCODER,
    file=C.QUESTION_ENCODER_FILE,
    inputs={C.INPUT_IDS: ["batch", "seq_len"], C.ATTENTION_MASK: ["batch", "seq_len"]},
    outputs={C.QUESTION_EMBEDDING: ["batch", "dim"]},
    dtypes={C.INPUT_IDS: "int64", C.ATTENTION_MASK: "int64"},
)

CONTEXT_ENCODER_SPEC = GraphSpec(
    name=C.CONTEXT_ENCODER,
    file=C.CONTEXT_ENCODER_FILE,
    inputs={C.INPUT_IDS: ["batch", "seq_len"], C.ATTENTION_MASK: ["batch", "seq_len"]},
    outputs={C.PASSAGE_EMBEDDING: ["batch", "dim"]},
    dtypes={C.INPUT_IDS: "int64", C.ATTENTION_MASK: "int64"},
)


class DprEncoderGraph(nn.Module):
    """input_ids, attention_mask -> pooled vector, as RAG's retrieval uses it (``outputs[0]``)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask=attention_mask, return_dict=True)[0]
