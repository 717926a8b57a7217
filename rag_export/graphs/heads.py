"""The fused RAG-Token head: one beam-search step's candidates from the decoder's logits.

Per (question, beam), the next-token distribution is marginalized over the passages
(``log_softmax`` per passage row + the passage log-prior, ``logsumexp`` over passages), renormalized
(transformers' beam search applies ``log_softmax`` to the marginalized scores), banned tokens set to
``-inf``, the beam's running score added, and the ``top_k`` best (beam, token) pairs of each question
returned. The decoder's ``[rows, vocab]`` logits never leave the device: only ``2 * beams`` scores and
ids per question do. Everything here is float32 whatever the decoder's precision.
"""

from __future__ import annotations

import torch
from torch import nn

from rag_runtime import constants as C

from . import GraphSpec

RAG_TOKEN_HEAD_SPEC = GraphSpec(
    name=C.RAG_TOKEN_HEAD,
    file=C.RAG_TOKEN_HEAD_FILE,
    inputs={
        C.LOGITS: ["rows", "new_len", "vocab"],
        C.DOC_LOGPRIOR: ["batch", "n_docs"],
        C.BEAM_SCORES: ["batch", "beams"],
        C.BANNED: ["n_banned"],
        C.TOP_K: ["1"],
    },
    outputs={C.TOP_SCORES: ["batch", "top_k"], C.TOP_IDS: ["batch", "top_k"]},
    dtypes={C.BANNED: "int64", C.TOP_K: "int64", C.TOP_IDS: "int64"},
)


class RagTokenHeadGraph(nn.Module):
    """logits [batch*n_docs*beams, t, vocab] (rows ordered (question, passage, beam); the last position is
    used), doc_logprior [batch, n_docs], beam_scores [batch, beams], banned: flat indices into
    [batch, beams, vocab], top_k [1] -> top_scores [batch, top_k], top_ids [batch, top_k] (beam * vocab + token).
    """

    def forward(self, logits, doc_logprior, beam_scores, banned, top_k):
        batch, n_docs = doc_logprior.shape
        beams = beam_scores.shape[1]
        last = logits[:, -1].float()
        lp = torch.log_softmax(last.reshape(batch, n_docs, beams, -1), dim=-1) + doc_logprior[:, :, None, None]
        # logsumexp over passages written out: onnxruntime's ReduceLogSumExp over a middle axis is several
        # times slower than ReduceMax + ReduceSum, which have fast paths for it.
        top = lp.amax(dim=1, keepdim=True)
        marginal = ((lp - top).exp().sum(dim=1, keepdim=True).log() + top).squeeze(1)
        acc = (torch.log_softmax(marginal, dim=-1) + beam_scores[:, :, None]).reshape(-1)
        acc = acc.scatter(0, banned, torch.full_like(banned, 0, dtype=acc.dtype) - float("inf"))
        return torch.topk(acc.reshape(batch, -1), top_k[0])


def export_args(vocab: int) -> tuple[torch.Tensor, ...]:
    """Sample inputs for tracing (2 questions, 3 passages, 2 beams)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(12, 1, vocab, generator=g), torch.randn(2, 3, generator=g), torch.zeros(2, 2),
            torch.tensor([1, vocab + 2], dtype=torch.int64), torch.tensor([4], dtype=torch.int64))


SEQUENCE_SCORER_SPEC = GraphSpec(
    name=C.SEQUENCE_SCORER,
    file=C.SEQUENCE_SCORER_FILE,
    inputs={C.LOGITS: ["rows", "length", "vocab"], C.LABELS: ["rows", "length"]},
    outputs={C.LABEL_LOGPROBS: ["rows", "length"], C.LOGPROB_SUMS: ["rows", "length"]},
    dtypes={C.LABELS: "int64"},
)


class SequenceScorerGraph(nn.Module):
    """RAG-Sequence rescoring's per-token numbers from teacher-forced logits, so that only ``[rows, L]``
    values leave the device instead of ``[rows, L, vocab]`` logits: the log-probability of each label
    (``log_softmax(logits)[label]``) and the sum of all log-probabilities at each position (what label
    smoothing mixes in). float32 whatever the decoder's precision."""

    def forward(self, logits, labels):
        x = logits.float()
        top = x.amax(dim=-1, keepdim=True)
        lse = ((x - top).exp().sum(dim=-1, keepdim=True).log() + top).squeeze(-1)
        picked = x.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
        return picked, x.sum(dim=-1) - x.shape[-1] * lse


def scorer_export_args(vocab: int) -> tuple[torch.Tensor, ...]:
    """Sample inputs for tracing (3 rows of 4 positions)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, vocab, generator=g), torch.randint(0, vocab, (3, 4), generator=g)
