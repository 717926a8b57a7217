"""Stage 4: generator inputs + doc scores -> answers (RAG-Token or RAG-Sequence decoding of the exported
generator, on the decode engine)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .artifact import GenerationDefaults, RagSettings
from .decoding import processors as P
from .decoding.rag import Decoded, QuestionDecode, RescoreSettings, SequenceDecode, TokenDecode
from .decoding.sampling import Sampler, SamplingSettings, generators
from .decoding.search import SearchSettings
from .engine import DecodeEngine
from .onnx_backend import OnnxGenerator
from .options import GenerationOptions
from .results import Answer
from .timing import NullTimer, StageTimer
from .tokenization import TextTokenizer


@dataclass
class DecodeRequest:
    """One question ready for the decode engine.

    Attributes:
        decode: Its decoding state.
        contexts: Generator encoder ids and mask of the passages it decodes from.
        rescore_contexts: RAG-Sequence: ids and mask of the passages its candidates are rescored against
            (None: the same rows as ``contexts``).
    """

    decode: QuestionDecode
    contexts: tuple[np.ndarray, np.ndarray]
    rescore_contexts: tuple[np.ndarray, np.ndarray] | None


class AnswerGenerator:
    """Decodes answers from contexts with the settings an export recorded.

    Attributes:
        kind: ``"token"`` (RAG-Token) or ``"sequence"`` (RAG-Sequence).
        backend: The onnxruntime generator (encoder, decoder, optional fused RAG-Token head and scorer).
        fused_head: Beam search ranks candidates in the export's head graph (RAG-Token head, RAG-Sequence
            beam step) where it has one.
    """

    def __init__(self, kind: str, backend: OnnxGenerator, settings: RagSettings, defaults: GenerationDefaults,
                 tokenizer: TextTokenizer, fused_head: bool = True, timer: StageTimer | NullTimer | None = None):
        self.kind, self.backend = kind, backend
        self.fused_head = fused_head and backend.head is not None  # exports before the beam step lack it
        self._rag, self._defaults, self._tokenizer = settings, defaults, tokenizer
        self._timer = timer or NullTimer()

    def options(self, kwargs: dict) -> GenerationOptions:
        """Validated options: ``kwargs`` over the export's defaults."""
        return GenerationOptions.resolve(kwargs, self._defaults, self._rag, self.kind, vocab=self.backend.vocab,
                                         max_positions=self.backend.dims.max_positions)

    def passages_needed(self, opts: GenerationOptions) -> int:
        """Passages to retrieve: RAG-Sequence rescoring, like the reference, uses the configured n_docs."""
        if self.kind == "sequence" and opts.reference_compatible:
            return max(opts.n_docs, self._rag.n_docs)
        return opts.n_docs

    def rows(self, opts: GenerationOptions) -> int:
        """Decoder rows one question with these options holds in a decode (passages x beams)."""
        return opts.n_docs * opts.num_beams

    def engine(self, max_rows: int, max_questions: int | None = None, listener=None) -> DecodeEngine:
        """A decode engine over this generator."""
        return DecodeEngine(self.backend, max_rows, max_questions, timer=self._timer, listener=listener)

    def run(self, requests: list[DecodeRequest]) -> list[Decoded]:
        """Decode a batch together: every question joins one engine before its first step."""
        if not requests:
            return []
        engine = self.engine(max_rows=sum(r.decode.rows for r in requests))
        try:
            tickets = [engine.add(r.decode, r.contexts, r.rescore_contexts) for r in requests]
            engine.run()
        finally:
            engine.close()
        for t in tickets:
            if t.error is not None:
                raise t.error
        return [t.result for t in tickets]

    def requests(self, ctx_ids: np.ndarray, ctx_mask: np.ndarray, doc_scores: np.ndarray, opts: GenerationOptions,
                 reference_width: int | None = None) -> list[DecodeRequest]:
        """One request per question from contexts ([batch * docs] rows, ``docs = doc_scores.shape[1]``).

        RAG-Token uses the first ``opts.n_docs`` passages. RAG-Sequence generates from those and, when
        ``reference_compatible``, rescores against the first ``config n_docs`` ones (so ``docs`` must cover
        both) and generates from contexts padded to ``reference_width`` without a mask, as transformers does.
        """
        batch, docs = doc_scores.shape
        compatible = self.kind == "sequence" and opts.reference_compatible
        # From supplied contexts there may be fewer passages than configured (the reference rejects that).
        used = min(self._rag.n_docs, docs) if compatible else opts.n_docs
        proc, search, sampling = self._settings(opts)
        start = opts.decoder_start_token_id
        rngs = generators(opts.seed, batch) if sampling is not None else [None] * batch
        rescore = RescoreSettings(
            pad_token_id=self._rag.generator_pad_token_id, bos_token_id=self._rag.rescoring_bos_token_id,
            label_smoothing=float(self._rag.label_smoothing or 0.0),
            do_deduplication=bool(opts.do_deduplication), fast=opts.fast_decoding,
        )
        out = []
        for q in range(batch):
            sampler = Sampler(sampling, [rngs[q]]) if sampling is not None else None
            rows = q * docs + np.arange(docs)
            if self.kind == "token":
                decode = TokenDecode(doc_scores[q, : opts.n_docs], start, proc, search, sampler, self.fused_head)
                out.append(DecodeRequest(decode, _trimmed(ctx_ids[rows[: opts.n_docs]], ctx_mask[rows[: opts.n_docs]]),
                                         None))
                continue
            decode = SequenceDecode(doc_scores[q, :used], opts.n_docs, start, proc, search, rescore,
                                    opts.num_return_sequences, sampler, self.fused_head)
            rescored = _trimmed(ctx_ids[rows[:used]], ctx_mask[rows[:used]])
            if compatible:
                generation = self._unmasked(ctx_ids[rows[: opts.n_docs]], reference_width)
                out.append(DecodeRequest(decode, generation, rescored))
            else:
                out.append(DecodeRequest(decode, rescored, None))
        return out

    def _unmasked(self, ids: np.ndarray, reference_width: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The reference generates RAG-Sequence candidates from contexts padded to ``max_combined_length``
        with the padding not masked: reproduce that input exactly."""
        wide = reference_width or ids.shape[1]
        padded = np.full((ids.shape[0], wide), self._rag.generator_pad_token_id, dtype=np.int64)
        padded[:, : min(wide, ids.shape[1])] = ids[:, :wide]
        return padded, np.ones_like(padded)

    def _settings(self, opts: GenerationOptions
                  ) -> tuple[P.ProcessorSettings, SearchSettings, SamplingSettings | None]:
        """What the processors, the search and the sampler (None: no sampling) read of the options."""
        d = self._defaults
        eos = tuple(d.eos_token_id or ())
        proc = P.ProcessorSettings(**opts.settings("processor"), eos_token_ids=eos)
        search = SearchSettings(**opts.settings("search"), pad_token_id=d.pad_token_id, eos_token_ids=eos)
        sampling = None
        if opts.do_sample:
            # transformers keeps one more token than there are EOS ids when beam sampling.
            keep = len(eos) + 1 if opts.num_beams > 1 else 1
            sampling = SamplingSettings(opts.temperature, opts.top_k, opts.top_p, min_tokens_to_keep=keep)
        return proc, search, sampling

    def answers(self, decoded: Decoded) -> list[Answer]:
        """One question's decoded rows as :class:`Answer` results."""
        return [Answer(self._tokenizer.decode(row, skip_special_tokens=True), self.trim(row), float(score))
                for row, score in zip(decoded.sequences, decoded.scores, strict=True)]

    def trim(self, row: np.ndarray) -> list[int]:
        """The row up to its first EOS (dropping the padding the reference writes after it)."""
        return trim_answer(row, self._defaults.eos_token_id or (), self._defaults.pad_token_id)

    def pad_rows(self, groups: list[np.ndarray]) -> np.ndarray:
        """Stack per-question rows, padding with the generator's pad id as RAG-Sequence's ``_cat_and_pad``
        does (RAG-Token rows come out of one search and already share a width)."""
        width = max((g.shape[1] for g in groups), default=0)
        out = np.full((sum(len(g) for g in groups), width), self._rag.generator_pad_token_id, dtype=np.int64)
        r = 0
        for g in groups:
            out[r : r + len(g), : g.shape[1]] = g
            r += len(g)
        return out


def trim_answer(row, eos_token_ids, pad_token_id: int | None) -> list[int]:
    """A generated row as token ids: up to and including its first EOS after the start token, else
    without trailing padding."""
    eos = set(eos_token_ids)
    tokens = [int(t) for t in row]
    for i in range(1, len(tokens)):
        if tokens[i] in eos:
            return tokens[: i + 1]
    while len(tokens) > 1 and tokens[-1] == pad_token_id:
        tokens.pop()
    return tokens


def _trimmed(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A question's context rows as int64, without the columns that are padding in all of them."""
    width = int(mask.sum(axis=1).max()) if mask.size else 0
    return (np.ascontiguousarray(ids[:, :width], dtype=np.int64),
            np.ascontiguousarray(mask[:, :width], dtype=np.int64))
