"""One question's RAG-Token or RAG-Sequence decoding as state plus a step (numpy; no onnxruntime needed).

A question owns decoder rows ordered (passage, beam), so the beams of a passage share its cross-attention
K/V, and one encoder row per passage. The decode engine (:mod:`rag_runtime.engine`) runs the rows of many
questions in each decoder call and hands every question its own rows' logits, or the candidates of the
fused RAG-Token head; a question answers with the rows its rows continue (the beam reorder), and says when
it is done. Its answer depends only on its own inputs and options, never on the questions beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import processors as P
from .sampling import Sampler
from .search import BeamSearch, GreedySearch, SearchSettings, host_candidates, log_softmax


class FusedHead(Protocol):
    """The fused head graph over one question's rows of the last decoder call (their logits stay where the
    decoder wrote them): the RAG-Token head, or RAG-Sequence's per-passage beam step."""

    vocab: int

    def __call__(self, doc_logprior: np.ndarray | None, beam_scores: np.ndarray, banned: np.ndarray,
                 keep: int) -> tuple[np.ndarray, np.ndarray]:
        """RAG-Token (``doc_logprior`` [1, n_docs]): marginalize over the passages and return the question's
        ``keep`` best (score, beam * vocab + token), [1, keep] each. RAG-Sequence (None): each passage's
        beams are a search of their own; [passages, keep] each. ``banned`` are flat indices into
        [rows, vocab] set to -inf first."""


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(x.dtype)
    return (np.log(np.exp(x - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)


@dataclass
class Decoded:
    """One question's answers, best first.

    Attributes:
        sequences: int64 [num_return_sequences, L], exactly the rows transformers returns for the question
            (before padding across questions).
        scores: float32 [num_return_sequences], what the rows are ranked by.
    """

    sequences: np.ndarray
    scores: np.ndarray


class QuestionDecode:
    """What the engine needs of a question's decoding, whatever its kind.

    Attributes:
        rows: Decoder rows (passages x beams), ordered (passage, beam).
        encoder_rows: Passages, one encoder row each.
        beams: Decoder rows per encoder row.
        searching: Still needs decoder steps.
    """

    rows: int
    encoder_rows: int
    beams: int
    searching: bool

    def tokens(self) -> np.ndarray:
        """The next input token of each row, [rows]."""
        raise NotImplementedError

    @property
    def past_length(self) -> int:
        """Tokens each row has in its cache (the position of its next token)."""
        raise NotImplementedError

    def advance(self, logits: np.ndarray | None, head: FusedHead | None = None) -> np.ndarray | None:
        """One step from this question's rows' logits [rows, vocab] (or its head, when :meth:`wants_head`):
        the row of this question each new row continues, or None when no row moves."""
        raise NotImplementedError

    def wants_head(self) -> bool:
        """Whether this step's candidates can come from the fused head (no logits needed on the host)."""
        return False

    @property
    def rescores(self) -> bool:
        """Its candidates are ranked by their likelihood over the passages once the search is over
        (:meth:`rescoring`, then :meth:`finish` with the label log-probabilities)."""
        return False

    @property
    def needs_rescoring(self) -> bool:
        """The search is over and the candidates await rescoring."""
        return self.rescores and not self.searching

    def finish(self, picked: np.ndarray | None = None, sums: np.ndarray | None = None, vocab: int = 0) -> Decoded:
        """The answers, once the search is over (and rescored, if it needs rescoring)."""
        raise NotImplementedError


class TokenDecode(QuestionDecode):
    """RAG-Token: per step, the next-token distributions of the passages are marginalized (log-softmax per
    passage plus the passage log-prior, logsumexp over passages), then greedy, sampling or beam search.

    Args:
        doc_scores: The question's passage scores [n_docs].
        start_id: Decoder start token.
        proc: Logits processors.
        search: Beams, returned sequences, length penalty, stopping.
        sampler: Draws tokens (do_sample), or None.
        fused: Beam search may take its candidates from the fused head, whenever no processor rewrites
            whole rows at that step (repetition_penalty, forced BOS/EOS) and nothing is sampled.
    """

    def __init__(self, doc_scores: np.ndarray, start_id: int, proc: P.ProcessorSettings, search: SearchSettings,
                 sampler: Sampler | None = None, fused: bool = False):
        self.encoder_rows = len(doc_scores)
        self.beams = k = search.num_beams
        self.rows = self.encoder_rows * k
        self._proc, self._sampler, self._fused = proc, sampler, fused and sampler is None and k > 1
        self._doc_logprior = log_softmax(np.asarray(doc_scores, dtype=np.float32)[None])  # [1, n_docs]
        start = np.full((k, 1), start_id, dtype=np.int64)
        self._search = (GreedySearch(search, proc.max_length, start, sampler) if k == 1
                        else BeamSearch(search, proc.max_length, start))
        self._n = 1 if k == 1 else search.num_return_sequences
        self.searching = True

    def tokens(self) -> np.ndarray:
        return np.tile(self._search.sequences[:, -1], self.encoder_rows)

    @property
    def past_length(self) -> int:
        return self._search.sequences.shape[1] - 1

    def wants_head(self) -> bool:
        return self._fused and not P.has_dense(self._proc, self._search.sequences.shape[1])

    def _marginal(self, logits: np.ndarray) -> np.ndarray:
        lp = log_softmax(logits.reshape(self.encoder_rows, self.beams, -1)) + self._doc_logprior[0, :, None, None]
        return logsumexp(lp, axis=0)

    def advance(self, logits: np.ndarray | None, head: FusedHead | None = None) -> np.ndarray | None:
        search, proc = self._search, self._proc
        seqs = search.sequences
        if logits is not None and P.forces(proc, seqs.shape[1]):
            # A forced token: the processors overwrite every score, so the marginal is not computed (and
            # host_candidates skips the log-softmax).
            marginal = np.zeros((self.beams, logits.shape[-1]), dtype=np.float32)
        else:
            marginal = None if logits is None else self._marginal(logits)
        if isinstance(search, GreedySearch):
            search.advance(P.apply(proc, seqs, marginal))
            self.searching = not search.done
            return None
        if logits is None:
            rows, tokens = P.bans(proc, seqs)
            vocab = head.vocab
            scores, ids = head(self._doc_logprior, search.running_scores, rows * vocab + tokens, search.keep)
            parents = search.advance(scores, ids // vocab, ids % vocab)
        else:
            candidates = host_candidates(lambda flat: marginal, proc, self._sampler)
            parents = search.advance(*candidates(seqs, search.running_scores, search.keep))
        self.searching = not search.done
        # Every passage's beams follow the same parents: row (passage, beam) continues (passage, parent).
        return (np.arange(self.encoder_rows)[:, None] * self.beams + parents[None, :]).reshape(-1)

    def finish(self, picked: np.ndarray | None = None, sums: np.ndarray | None = None, vocab: int = 0) -> Decoded:
        seqs, scores = self._search.result()
        return Decoded(seqs[: self._n], scores[: self._n])


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


class SequenceDecode(QuestionDecode):
    """RAG-Sequence thorough decoding: a beam search (or greedy, or sampling) per passage, then every
    candidate scored against every passage, marginalized, the best ``num_return_sequences`` kept.

    The searches run over ``generation_docs`` passages; rescoring uses ``doc_scores`` (all the passages the
    candidates are rescored against: transformers generates from ``n_docs`` passages and rescores with its
    configured ``n_docs``). After the search, :meth:`rescoring` says what to teacher-force and
    :meth:`finish` takes the label log-probabilities back.
    """

    def __init__(self, doc_scores: np.ndarray, generation_docs: int, start_id: int, proc: P.ProcessorSettings,
                 search: SearchSettings, rescore: RescoreSettings, num_return_sequences: int,
                 sampler: Sampler | None = None, fused: bool = False):
        self.encoder_rows, self.beams = generation_docs, search.num_beams
        k = self.beams
        self.rows = generation_docs * k
        self._doc_scores = np.asarray(doc_scores, dtype=np.float32)
        self._proc, self._rescore, self._n, self._sampler = proc, rescore, num_return_sequences, sampler
        self._fused = fused and sampler is None and k > 1
        per_doc = SearchSettings(k, k, search.length_penalty, search.early_stopping, search.pad_token_id,
                                 search.eos_token_ids)
        start = np.full((self.rows, 1), start_id, dtype=np.int64)
        self._search = (GreedySearch(per_doc, proc.max_length, start, sampler) if k == 1
                        else BeamSearch(per_doc, proc.max_length, start))
        self.searching = True
        self._cands = self._beam_scores = self._origin = None

    def tokens(self) -> np.ndarray:
        return self._search.sequences[:, -1].copy()

    @property
    def past_length(self) -> int:
        return self._search.sequences.shape[1] - 1

    def wants_head(self) -> bool:
        return self._fused and not P.has_dense(self._proc, self._search.sequences.shape[1])

    def advance(self, logits: np.ndarray | None, head: FusedHead | None = None) -> np.ndarray | None:
        search, seqs = self._search, self._search.sequences
        if isinstance(search, GreedySearch):
            search.advance(P.apply(self._proc, seqs, logits))
            parents = None
        elif logits is None:
            rows, tokens = P.bans(self._proc, seqs)
            vocab = head.vocab
            scores, ids = head(None, search.running_scores, rows * vocab + tokens, search.keep)
            parents = search.advance(scores, ids // vocab, ids % vocab)
        else:
            candidates = host_candidates(lambda flat: logits, self._proc, self._sampler)
            parents = search.advance(*candidates(seqs, search.running_scores, search.keep))
        if search.done:
            self.searching = False
            self._collect()
        return parents

    def _collect(self) -> None:
        cands, beam_scores = self._search.result()
        origin = np.repeat(np.arange(self.encoder_rows), self.beams)
        if self._rescore.do_deduplication:
            first = {}
            for i, row in enumerate(cands):
                first.setdefault(row.tobytes(), i)
            keep = np.fromiter(first.values(), dtype=np.int64)
            cands, beam_scores, origin = cands[keep], beam_scores[keep], origin[keep]
        self._cands, self._beam_scores, self._origin = cands, beam_scores, origin

    @property
    def rescores(self) -> bool:
        return not self._rescore.fast

    def rescoring(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidates [n, L] to teacher-force against each of the ``len(doc_scores)`` rescoring passages,
        and their labels (the candidates shifted left, padded), as transformers' ``get_nll`` builds them."""
        cands = self._cands
        labels = np.concatenate([cands[:, 1:], np.full((len(cands), 1), self._rescore.pad_token_id,
                                                        dtype=cands.dtype)], axis=1)
        return cands, labels

    def finish(self, picked: np.ndarray | None = None, sums: np.ndarray | None = None, vocab: int = 0) -> Decoded:
        """The answers, from the labels' log-probabilities per passage ``picked`` [n_docs, n, L] (and the
        sums of all log-probabilities ``sums``, for label smoothing), or without them in fast mode."""
        if self._rescore.fast:
            scores = log_softmax(self._doc_scores[: self.encoder_rows])[self._origin] + self._beam_scores
        else:
            scores = -sequence_nll(picked, sums, log_softmax(self._doc_scores), self.rescoring()[1], self._rescore,
                                   vocab)
        best = np.argsort(-scores, kind="stable")[: self._n]
        return Decoded(self._cands[best], scores[best].astype(np.float32))


def sequence_nll(picked: np.ndarray, sums: np.ndarray | None, doc_lp: np.ndarray, target: np.ndarray,
                 rescore: RescoreSettings, vocab: int) -> np.ndarray:
    """transformers' ``RagSequenceForGeneration.get_nll(..., exclude_bos_score=True)`` per candidate, from
    the teacher-forced log-probabilities of the labels ``picked`` [n_docs, n, L] (and ``sums`` of all
    log-probabilities, [n_docs, n, L], used by label smoothing)."""
    ll = picked.astype(np.float32, copy=True)
    length = target.shape[1]
    # The passage prior is added at the second position, before pads are masked.
    if length > 1:
        ll[:, :, 1] += doc_lp[:, None]
    pad = target == rescore.pad_token_id
    ll[:, pad] = 0.0
    use_bos = rescore.bos_token_id is not None and bool((target[:, 0] == rescore.bos_token_id).all())
    total = ll[:, :, 1:].sum(axis=2) if use_bos else ll.sum(axis=2)
    nll = -logsumexp(total, axis=0)
    if not rescore.label_smoothing:
        return nll
    smooth = sums.astype(np.float32, copy=True)
    if length > 1:
        smooth[:, :, 1] += doc_lp[:, None] * vocab
    smooth[:, pad] = 0.0
    smooth_loss = -logsumexp(smooth.sum(axis=2), axis=0)
    eps = rescore.label_smoothing
    return (1.0 - eps) * nll + (eps / vocab) * smooth_loss
