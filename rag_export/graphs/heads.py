"""The fused heads: one beam-search step's candidates from the decoder's logits, on the device.

RAG-Token: per (question, beam), the next-token distribution is marginalized over the passages,
``p(y) = sum_d prior_d * softmax(logits_d)(y)``, renormalized (transformers' beam search applies
``log_softmax`` to the marginalized log-probabilities), banned tokens set to ``-inf``, the beam's running
score added, and the ``top_k`` best (beam, token) pairs of each question returned. The decoder's
``[rows, vocab]`` logits never leave the device: only ``2 * beams`` scores and ids per question do.
RAG-Sequence's per-passage beam search takes the same step without the marginalization (:class:`BeamStepGraph`).
Everything here is float32 whatever the decoder's precision.
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
    """logits [batch*n_docs*beams, 1, vocab] (rows ordered (question, passage, beam); one decode step),
    doc_logprior [batch, n_docs], beam_scores [batch, beams], banned: flat indices into
    [batch, beams, vocab], top_k [1] -> top_scores [batch, top_k], top_ids [batch, top_k] (beam * vocab + token).
    """

    def forward(self, logits, doc_logprior, beam_scores, banned, top_k):
        batch, n_docs = doc_logprior.shape
        beams = beam_scores.shape[1]
        # One exponential per element (the softmax), then the passages' mixture as one batched product with
        # their priors: transformers' logsumexp of (log_softmax + log-prior) over passages, written as the
        # log of a weighted sum, which needs no second pass of exponentials. The priors are shifted by their
        # largest (it cancels in the renormalization below).
        probs = torch.softmax(_step_logits(logits), dim=-1).reshape(batch, n_docs, -1)
        weights = (doc_logprior - doc_logprior.amax(dim=1, keepdim=True)).exp()[:, None, :]  # [batch, 1, n_docs]
        mixture = torch.matmul(weights, probs).reshape(batch * beams, -1)
        total = mixture.sum(dim=-1, keepdim=True)  # before the bans: they come after the normalization
        # The log is monotone, so each beam's best tokens are those of its mixture: the marginal's log_softmax
        # (log mixture - log total) is taken of those only. A banned token's mixture is 0 (its log -inf).
        best, tokens = _top(mixture, banned, top_k, fill=0.0)  # per beam
        lp = best.log() - total.log()
        return _merge(lp.reshape(batch, beams, -1) + beam_scores[:, :, None], tokens, mixture.shape[-1], top_k)


def _step_logits(logits):
    """One decode step's logits [rows, 1, vocab] as float32 [rows, vocab]: a reshape, which onnxruntime
    does without a copy (taking position -1 copies the whole [rows, vocab], a millisecond at base size)."""
    return logits.reshape(logits.shape[0], logits.shape[2]).float()


def _merge(acc, tokens, vocab, top_k):
    """Each item's ``top_k`` best (score, beam * vocab + token) from its beams' own best: ``acc``
    [items, beams, k] (each beam's best first) and their ``tokens`` [items * beams, k]. An item's best are
    among its beams' best, so this is one top-k over [beams * vocab]; equal scores rank the lower beam first
    and, within a beam, the order its own top-k gave."""
    items, beams, k = acc.shape
    ids = tokens.reshape(items, beams, k) + torch.arange(beams)[None, :, None] * vocab
    scores, picked = torch.topk(acc.reshape(items, beams * k), top_k[0])
    return scores, ids.reshape(items, beams * k).gather(1, picked)


def _top(acc, banned, top_k, fill: float = float("-inf")):
    """The ``top_k`` best of each item's scores ``acc`` [items, ...] (values, flat indices into the item's
    scores), the flat indices ``banned`` into ``acc`` set to ``fill`` first."""
    items = acc.shape[0]
    flat = acc.reshape(-1)
    flat = flat.scatter(0, banned, torch.full_like(banned, 0, dtype=flat.dtype) + fill)
    return torch.topk(flat.reshape(items, -1), top_k[0])


BEAM_STEP_SPEC = GraphSpec(
    name=C.BEAM_STEP,
    file=C.BEAM_STEP_FILE,
    inputs={C.LOGITS: ["rows", "new_len", "vocab"], C.BEAM_SCORES: ["groups", "beams"], C.BANNED: ["n_banned"],
            C.TOP_K: ["1"]},
    outputs={C.TOP_SCORES: ["groups", "top_k"], C.TOP_IDS: ["groups", "top_k"]},
    dtypes={C.BANNED: "int64", C.TOP_K: "int64", C.TOP_IDS: "int64"},
)


class BeamStepGraph(nn.Module):
    """One beam-search step of independent searches (RAG-Sequence: one per passage): logits
    [groups*beams, 1, vocab] (rows ordered (group, beam)), beam_scores
    [groups, beams], banned: flat indices into [groups, beams, vocab], top_k [1] -> top_scores
    [groups, top_k], top_ids [groups, top_k] (beam * vocab + token): transformers' log_softmax, the
    running scores added, the best ``top_k`` per group."""

    def forward(self, logits, beam_scores, banned, top_k):
        groups, beams = beam_scores.shape
        lp = torch.log_softmax(_step_logits(logits), dim=-1).reshape(groups, beams, -1)
        return _top(lp + beam_scores[:, :, None], banned, top_k)


def beam_step_args(vocab: int) -> tuple[torch.Tensor, ...]:
    """Sample inputs for tracing (3 groups of 2 beams)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(6, 1, vocab, generator=g), torch.zeros(3, 2), torch.tensor([1, vocab + 2], dtype=torch.int64),
            torch.tensor([4], dtype=torch.int64))


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
