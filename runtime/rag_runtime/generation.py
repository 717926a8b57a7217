"""Stage 4: generator inputs + doc scores -> answers (RAG-Token beam search or RAG-Sequence thorough
decoding over the exported generator)."""

from __future__ import annotations

import numpy as np

from .artifact import GenerationDefaults, RagSettings
from .decoding import processors as P
from .decoding.rag import Decoded, RescoreSettings, rag_sequence, rag_token
from .decoding.sampling import Sampler, SamplingSettings, generators
from .decoding.search import SearchSettings
from .onnx_backend import OnnxGenerator
from .options import GenerationOptions
from .results import Answer
from .timing import NullTimer, StageTimer
from .tokenization import TextTokenizer


class AnswerGenerator:
    """Decodes answers from contexts with the settings an export recorded.

    Attributes:
        kind: ``"token"`` (RAG-Token) or ``"sequence"`` (RAG-Sequence).
        backend: The onnxruntime generator (encoder, decoder, optional fused RAG-Token head).
        fused_head: RAG-Token beam search ranks candidates in the head graph.
    """

    def __init__(self, kind: str, backend: OnnxGenerator, settings: RagSettings, defaults: GenerationDefaults,
                 tokenizer: TextTokenizer, fused_head: bool = True, timer: StageTimer | NullTimer | None = None):
        self.kind, self.backend, self.fused_head = kind, backend, fused_head
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

    def decode(self, ctx_ids: np.ndarray, ctx_mask: np.ndarray, doc_scores: np.ndarray, opts: GenerationOptions,
               reference_width: int | None = None) -> Decoded:
        """Decode from contexts ([batch * docs] rows, ``docs = doc_scores.shape[1]``).

        RAG-Token uses the first ``opts.n_docs`` passages. RAG-Sequence generates from those and, when
        ``reference_compatible``, rescores against the first ``config n_docs`` ones (so ``docs`` must cover
        both) and generates from contexts padded to ``reference_width`` without a mask, as transformers does.
        """
        batch, docs = doc_scores.shape
        compatible = self.kind == "sequence" and opts.reference_compatible
        # From supplied contexts there may be fewer passages than configured (the reference rejects that).
        used = min(self._rag.n_docs, docs) if compatible else opts.n_docs
        ids, mask = _rows(ctx_ids, batch, docs, used), _rows(ctx_mask, batch, docs, used)
        # Columns that are padding in every row change nothing (they are masked): drop them.
        width = int(mask.sum(axis=1).max()) if mask.size else 0
        with self._timer.stage("generator_encode"):
            state = self.backend.encode(np.ascontiguousarray(ids[:, :width]), np.ascontiguousarray(mask[:, :width]))
            generation_state = None
            if compatible:
                generation_state = self._unmasked_state(_rows(ctx_ids, batch, docs, opts.n_docs), reference_width)
        doc_scores = np.ascontiguousarray(doc_scores[:, :used])
        proc, search, sampling = self._settings(opts)
        start = opts.decoder_start_token_id
        rngs = generators(opts.seed, batch) if sampling is not None else None
        with self._timer.stage("decode"):
            if self.kind == "token":
                sampler = Sampler(sampling, rngs) if rngs else None
                return rag_token(self.backend, state, doc_scores, start, proc, search, fused=self.fused_head,
                                 sampler=sampler)
            rescore = RescoreSettings(
                pad_token_id=self._rag.generator_pad_token_id, bos_token_id=self._rag.rescoring_bos_token_id,
                label_smoothing=float(self._rag.label_smoothing or 0.0),
                do_deduplication=bool(opts.do_deduplication), fast=opts.fast_decoding,
            )
            samplers = [Sampler(sampling, [rng]) for rng in rngs] if rngs else None
            return rag_sequence(self.backend, state, doc_scores, start, proc, search, rescore,
                                opts.num_return_sequences, generation_state, opts.n_docs, stage=self._timer.stage,
                                samplers=samplers)

    def _unmasked_state(self, ids: np.ndarray, reference_width: int | None):
        """The reference generates RAG-Sequence candidates from contexts padded to ``max_combined_length``
        with the padding not masked: reproduce that input exactly."""
        wide = reference_width or ids.shape[1]
        padded = np.full((ids.shape[0], wide), self._rag.generator_pad_token_id, dtype=np.int64)
        padded[:, : min(wide, ids.shape[1])] = ids[:, :wide]
        return self.backend.encode(padded, np.ones_like(padded))

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

    def answers(self, rows: np.ndarray, scores: np.ndarray) -> list[Answer]:
        """One question's decoded rows as :class:`Answer` results."""
        return [Answer(self._tokenizer.decode(row, skip_special_tokens=True), self.trim(row), float(score))
                for row, score in zip(rows, scores, strict=True)]

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


def _rows(array: np.ndarray, batch: int, docs: int, used: int) -> np.ndarray:
    """The first ``used`` of each question's ``docs`` rows, as int64."""
    rows = (np.arange(batch)[:, None] * docs + np.arange(used)[None, :]).reshape(-1)
    return array[rows].astype(np.int64)
