"""RAG-Token and RAG-Sequence decoding over a generator backend (numpy; no onnxruntime needed).

Row layout: the generator encoder runs one row per (question, passage); decoder rows are ordered
(question, passage, beam), so the beams of a passage share its cross-attention K/V.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import processors as P
from .sampling import Sampler
from .search import SearchSettings, beam_search, greedy, host_candidates, log_softmax


class GeneratorBackend(Protocol):
    """What the decoders need from an (exported) generator."""

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Any:
        """Run the encoder once; the returned state holds cross K/V for ``input_ids.shape[0]`` rows."""

    def select(self, state: Any, rows: np.ndarray) -> Any:
        """The encoder state of a subset of its rows."""

    def start(self, state: Any, beams: int) -> Any:
        """A fresh decode session: ``beams`` decoder rows per encoder row, empty KV cache."""

    def step(self, session: Any, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per decoder row; returns logits [rows, vocab] float32."""

    def reorder(self, session: Any, rows: np.ndarray) -> None:
        """Decoder row i continues from old row ``rows[i]``."""

    vocab: int

    def label_logprobs(self, state: Any, sequences: np.ndarray, labels: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced ``n`` sequences against every encoder row: per position, the log-probability of
        ``labels`` and the sum of all log-probabilities, each [enc_rows * n, L]."""


class RagTokenHead(Protocol):
    """A backend that can also run the fused RAG-Token head (the logits stay where they are computed)."""

    vocab: int

    def rag_token_candidates(self, session: Any, tokens: np.ndarray, doc_logprior: np.ndarray,
                             beam_scores: np.ndarray, banned: np.ndarray, keep: int
                             ) -> tuple[np.ndarray, np.ndarray]:
        """Feed ``tokens`` like ``step``, then marginalize over passages and return the ``keep`` best
        (score, beam * vocab + token) per question; ``banned`` are flat indices into [batch, beams, vocab]."""


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(x.dtype)
    return (np.log(np.exp(x - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)


@dataclass
class Decoded:
    """Sequences for a batch, ``num_return_sequences`` rows per question, best first.

    Attributes:
        sequences: Per question, an int64 array [num_return_sequences, L] exactly as transformers returns
            the question's rows (before padding across questions).
        scores: Per question, float32 scores the rows are ranked by.
    """

    sequences: list[np.ndarray]
    scores: list[np.ndarray]


def rag_token(backend: GeneratorBackend, state: Any, doc_scores: np.ndarray, start_id: int,
              proc: P.ProcessorSettings, search: SearchSettings, fused: bool = False,
              sampler: Sampler | None = None) -> Decoded:
    """RAG-Token: next-token distributions marginalized over the passages at every step.

    With ``fused`` (the backend must implement :class:`RagTokenHead`), beam search steps run the fused
    head and only the ``2 * num_beams`` best candidates per question come back; steps where a processor
    rewrites whole rows (repetition_penalty, forced BOS/EOS) take the host path, and so does sampling
    (``sampler``, one generator per question), which draws from the whole distribution.
    """
    batch, n_docs = doc_scores.shape
    k = search.num_beams
    doc_logprior = log_softmax(doc_scores.astype(np.float32))
    doc_lp = doc_logprior[:, :, None, None]
    session = backend.start(state, beams=k)

    def tokens_of(seqs: np.ndarray) -> np.ndarray:
        last = seqs[:, -1].reshape(batch, 1, k)
        return np.broadcast_to(last, (batch, n_docs, k)).reshape(-1, 1)

    def step(seqs: np.ndarray) -> np.ndarray:
        logits = backend.step(session, tokens_of(seqs))
        lp = log_softmax(logits.reshape(batch, n_docs, k, -1)) + doc_lp
        return logsumexp(lp, axis=1).reshape(batch * k, -1)

    host = host_candidates(step, proc, sampler)

    def candidates(flat: np.ndarray, running_scores: np.ndarray, keep: int):
        if not fused or sampler is not None or P.has_dense(proc, flat.shape[1]):
            return host(flat, running_scores, keep)
        rows, tokens = P.bans(proc, flat)
        vocab = backend.vocab
        scores, ids = backend.rag_token_candidates(session, tokens_of(flat), doc_logprior, running_scores,
                                                   rows * vocab + tokens, keep)
        return scores, ids // vocab, ids % vocab

    start = np.full((batch * k, 1), start_id, dtype=np.int64)
    if k == 1:
        seqs, scores = greedy(step, start, proc, search, sampler)
        n = 1
    else:
        doc_base = (np.arange(batch)[:, None] * n_docs + np.arange(n_docs)[None, :])[:, :, None] * k

        def reorder(parents: np.ndarray) -> None:
            pb = parents.reshape(batch, 1, k)
            backend.reorder(session, (doc_base + pb % k).reshape(-1))

        seqs, scores = beam_search(candidates, reorder, start, proc, search)
        n = search.num_return_sequences
    return Decoded([seqs[i * n : (i + 1) * n] for i in range(batch)],
                   [scores[i * n : (i + 1) * n] for i in range(batch)])


@dataclass(frozen=True)
class RescoreSettings:
    """How RAG-Sequence ranks its candidates (transformers' ``get_nll`` with ``exclude_bos_score=True``).

    Attributes:
        pad_token_id: Generator pad id (masked out of the likelihood).
        bos_token_id: Resolved as transformers does (``config.bos_token_id or generator.bos_token_id``).
        label_smoothing: ``config.label_smoothing`` (mixes the sum of all log-probs into the loss).
        do_deduplication: Drop repeated candidates before rescoring.
        fast: Score candidates only with the passages whose beams produced them (approximation).
    """

    pad_token_id: int
    bos_token_id: int | None
    label_smoothing: float = 0.0
    do_deduplication: bool = True
    fast: bool = False


def rag_sequence(backend: GeneratorBackend, state: Any, doc_scores: np.ndarray, start_id: int,
                 proc: P.ProcessorSettings, search: SearchSettings, rescore: RescoreSettings,
                 num_return_sequences: int, generation_state: Any = None, generation_docs: int | None = None,
                 stage: Callable[[str], AbstractContextManager] | None = None,
                 samplers: list[Sampler] | None = None) -> Decoded:
    """RAG-Sequence thorough decoding: beam search per passage, then every candidate scored against
    every passage of its question, marginalized, best ``num_return_sequences`` kept.

    ``state`` holds the passages candidates are rescored against (``doc_scores.shape[1]`` rows per
    question); ``generation_state`` (default: ``state``) the ``generation_docs`` passages per question
    they are generated from. transformers generates from unmasked padded contexts, and rescores with the
    mask and its configured n_docs: passing both reproduces that. ``stage(name)`` (optional) times the
    rescoring as ``rescore``. ``samplers`` (one per question) make each passage's search sample, as the
    generator's own ``generate(do_sample=True)`` does.
    """
    stage = stage or (lambda name: nullcontext())
    generation_state = state if generation_state is None else generation_state
    gen_docs = generation_docs or doc_scores.shape[1]
    batch, n_docs = doc_scores.shape
    k = search.num_beams
    per_doc = SearchSettings(k, k, search.length_penalty, search.early_stopping, search.pad_token_id,
                             search.eos_token_ids)
    out_seqs, out_scores = [], []
    for q in range(batch):
        q_state = backend.select(state, np.arange(q * n_docs, (q + 1) * n_docs))
        session = backend.start(backend.select(generation_state, np.arange(q * gen_docs, (q + 1) * gen_docs)), beams=k)
        start = np.full((gen_docs * k, 1), start_id, dtype=np.int64)

        def step(seqs: np.ndarray, session=session) -> np.ndarray:
            return backend.step(session, seqs[:, -1:])

        sampler = samplers[q] if samplers else None
        if k == 1:
            cands, beam_scores = greedy(step, start, proc, per_doc, sampler)
        else:
            cands, beam_scores = beam_search(host_candidates(step, proc, sampler),
                                             lambda rows, s=session: backend.reorder(s, rows), start, proc, per_doc)
        origin = np.repeat(np.arange(gen_docs), k)
        if rescore.do_deduplication:
            first = {}
            for i, row in enumerate(cands):
                first.setdefault(row.tobytes(), i)
            keep = np.fromiter(first.values(), dtype=np.int64)
            cands, beam_scores, origin = cands[keep], beam_scores[keep], origin[keep]
        doc_lp = log_softmax(doc_scores[q].astype(np.float32))
        if rescore.fast:
            scores = log_softmax(doc_scores[q, :gen_docs].astype(np.float32))[origin] + beam_scores
        else:
            with stage("rescore"):
                scores = -_nll(backend, q_state, cands, doc_lp, rescore)
        best = np.argsort(-scores, kind="stable")[:num_return_sequences]
        out_seqs.append(cands[best])
        out_scores.append(scores[best].astype(np.float32))
    return Decoded(out_seqs, out_scores)


def _nll(backend: GeneratorBackend, state: Any, cands: np.ndarray, doc_lp: np.ndarray,
         rescore: RescoreSettings) -> np.ndarray:
    """transformers' RagSequenceForGeneration.get_nll(..., exclude_bos_score=True) per candidate."""
    n, length = cands.shape
    n_docs = doc_lp.shape[0]
    target = np.concatenate([cands[:, 1:], np.full((n, 1), rescore.pad_token_id, dtype=cands.dtype)], axis=1)
    ll = np.empty((n_docs, n, length), dtype=np.float32)
    smooth = np.empty((n_docs, n, length), dtype=np.float32) if rescore.label_smoothing else None
    for d in range(n_docs):  # one passage at a time bounds the device's logits to [n, L, vocab]
        picked, sums = backend.label_logprobs(backend.select(state, np.array([d])), cands, target)
        ll[d] = picked
        if smooth is not None:
            smooth[d] = sums
    vocab = backend.vocab
    # The passage prior is added at the second position, before pads are masked.
    ll[:, :, 1] += doc_lp[:, None] if length > 1 else 0
    pad = target == rescore.pad_token_id
    ll[:, pad] = 0.0
    use_bos = rescore.bos_token_id is not None and bool((target[:, 0] == rescore.bos_token_id).all())
    total = ll[:, :, 1:].sum(axis=2) if use_bos else ll.sum(axis=2)
    nll = -logsumexp(total, axis=0)
    if smooth is None:
        return nll
    smooth[:, :, 1] += doc_lp[:, None] * vocab if length > 1 else 0
    smooth[:, pad] = 0.0
    smooth_loss = -logsumexp(smooth.sum(axis=2), axis=0)
    eps = rescore.label_smoothing
    return (1.0 - eps) * nll + (eps / vocab) * smooth_loss
