"""``RagPipeline``: questions in, answers with their sources out, from a rag-export directory."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import constants as C
from .artifacts import load_manifest
from .decoding import processors as P
from .decoding.rag import Decoded, RescoreSettings, rag_sequence, rag_token
from .decoding.search import SearchSettings
from .errors import IndexUnavailableError
from .knowledge import KnowledgeIndex
from .onnx_backend import OnnxGenerator, create_session, providers_for
from .options import GenerationOptions
from .results import Answer, Document, RagOutput
from .tokenization import TextTokenizer

logger = logging.getLogger(__name__)


class StageTimer:
    """Accumulated wall time per pipeline stage (for benchmarks and logging)."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.totals.clear()

    def __call__(self, stage: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.totals[stage] += time.perf_counter() - self.t0

        return _Ctx()


class _TimedSession:
    """An onnxruntime session whose run time is added to the timer's ``onnxruntime`` total and to
    ``onnxruntime/<graph>``."""

    def __init__(self, session, timer: StageTimer, graph: str):
        self._session, self._timer, self._stage = session, timer, f"onnxruntime/{graph}"

    def _timed(self, run, *args, **kwargs):
        with self._timer("onnxruntime"), self._timer(self._stage):
            return run(*args, **kwargs)

    def run(self, *args, **kwargs):
        return self._timed(self._session.run, *args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        return self._timed(self._session.run_with_iobinding, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


def contextualize(title: str, text: str, question: str, prefix: str | None, title_sep: str, doc_sep: str) -> str:
    """One generator input string, exactly as transformers' RagRetriever.postprocess_docs builds it."""
    title = title.removeprefix('"').removesuffix('"')
    return ((prefix or "") + title + title_sep + text + doc_sep + question).replace("  ", " ")


class RagPipeline:
    """A loaded export: question encoder, knowledge index, generator and decoding.

    Use :meth:`load`; then :meth:`generate`, :meth:`retrieve` or :meth:`generate_from_context`.
    """

    def __init__(self, root: Path, manifest: dict, device: str, threads: int | None,
                 index_params: dict | None = None, fused_head: bool = True):
        self.root, self.manifest, self.device = root, manifest, device
        self.fused_head = fused_head
        self.kind: str = manifest["kind"]
        self.rag: dict = manifest["rag"]
        self.defaults: dict = manifest["generation_defaults"]
        graphs = manifest["graphs"]
        self.timer = StageTimer()

        def session(name: str, **kwargs):
            return _TimedSession(create_session(root / graphs[name]["file"], device, threads, **kwargs), self.timer,
                                 name)

        self._q_session = session("question_encoder")
        # The head runs between decoder steps: its idle threads must not spin on the decoder's cores.
        head = session("rag_token_head", spinning=False) if self.kind == "token" and fused_head else None
        self.generator = OnnxGenerator(session("generator_encoder"), session("generator_decoder"),
                                       manifest["decoder"], head=head, device=device)
        toks = manifest["tokenizers"]
        self.question_tokenizer = TextTokenizer(root / toks["question_encoder"]["file"], toks["question_encoder"])
        self.generator_tokenizer = TextTokenizer(root / toks["generator"]["file"], toks["generator"])
        entry = manifest.get("index")
        self.index = KnowledgeIndex(root / entry["dir"], device, **(index_params or {})) if entry else None

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", *, threads: int | None = None,
             verify: bool = True, nprobe: int | None = None, ef_search: int | None = None,
             fused_head: bool = True) -> RagPipeline:
        """Load an export directory.

        Args:
            path: Directory written by ``rag-export``.
            device: ``"cpu"`` or ``"cuda"`` (needs onnxruntime-gpu).
            threads: onnxruntime intra-op threads (default: all cores).
            verify: Check every file against its sha256 in the manifest.
            nprobe: Inverted lists visited per query (IVF knowledge indexes).
            ef_search: Candidate list size (HNSW knowledge indexes).
            fused_head: RAG-Token beam search runs the exported head graph, so only the best candidates
                per step leave the device (False: the step's logits come back and the host ranks them).

        Raises:
            ArtifactError: Missing, corrupted or mismatched export.
            ValueError: Unknown device, or ``"cuda"`` without a CUDA provider.
        """
        providers_for(device)
        root = Path(path)
        return cls(root, load_manifest(root, verify=verify), device, threads,
                   {"nprobe": nprobe, "ef_search": ef_search}, fused_head=fused_head)

    # -- stages -------------------------------------------------------------------------------------

    def _require_index(self) -> KnowledgeIndex:
        if self.index is None:
            raise IndexUnavailableError(
                f"{self.root} has no knowledge index, so questions cannot be answered by retrieval; attach one "
                "with `rag-index attach`, or pass passages yourself with generate_from_context()")
        return self.index

    def _encode_questions(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tok = self.question_tokenizer
        with self.timer("question_encode"):
            ids, mask = tok.encode(questions)
            if ids.shape[1] > tok.model_max_length:
                logger.warning("question longer than %d tokens: truncated", tok.model_max_length)
                ids, mask = tok.encode(questions, max_length=tok.model_max_length)
            (emb,) = self._q_session.run(None, {C.INPUT_IDS: ids, C.ATTENTION_MASK: mask})
        return ids, emb

    def _retrieve(self, emb: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._require_index()
        with self.timer("retrieve"):
            return index.search(emb, n_docs)

    def _contexts(self, question_ids: np.ndarray, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = self._require_index()
        rag = self.rag
        with self.timer("contextualize"):
            texts = []
            for row, ids in zip(question_ids, doc_ids, strict=True):
                question = self.question_tokenizer.decode(row, skip_special_tokens=True)
                for doc_id in ids:
                    p = index.passage(int(doc_id))
                    texts.append(contextualize(p["title"], p["text"], question, rag["prefix"],
                                               rag["title_sep"], rag["doc_sep"]))
            return self.generator_tokenizer.encode(texts, max_length=rag["max_combined_length"])

    def _decode(self, ctx_ids: np.ndarray, ctx_mask: np.ndarray, doc_scores: np.ndarray,
                opts: GenerationOptions, reference_width: int | None = None) -> Decoded:
        """Decode from contexts ([batch * docs] rows, ``docs = doc_scores.shape[1]``).

        RAG-Token uses the first ``opts.n_docs`` passages. RAG-Sequence generates from those and, when
        ``reference_compatible``, rescores against the first ``config n_docs`` ones (so ``docs`` must cover
        both) and generates from contexts padded to ``reference_width`` without a mask, as transformers does.
        """
        d = self.defaults
        eos = tuple(d["eos_token_id"] or ())
        proc = P.ProcessorSettings(
            max_length=opts.max_length, min_length=opts.min_length, no_repeat_ngram_size=opts.no_repeat_ngram_size,
            repetition_penalty=float(opts.repetition_penalty), forced_bos_token_id=opts.forced_bos_token_id,
            forced_eos_token_id=opts.forced_eos_token_id,
            bad_words_ids=tuple(map(tuple, opts.bad_words_ids)) if opts.bad_words_ids else None, eos_token_ids=eos,
        )
        search = SearchSettings(opts.num_beams, opts.num_return_sequences, float(opts.length_penalty),
                                opts.early_stopping, d["pad_token_id"], eos)
        batch, docs = doc_scores.shape
        compatible = self.kind == "sequence" and opts.reference_compatible
        # From supplied contexts there may be fewer passages than configured (the reference rejects that).
        used = min(self.rag["n_docs"], docs) if compatible else opts.n_docs
        rows = (np.arange(batch)[:, None] * docs + np.arange(used)[None, :]).reshape(-1)
        ids, mask = ctx_ids[rows].astype(np.int64), ctx_mask[rows].astype(np.int64)
        # Columns that are padding in every row change nothing (they are masked): drop them.
        width = int(mask.sum(axis=1).max()) if mask.size else 0
        with self.timer("generator_encode"):
            state = self.generator.encode(np.ascontiguousarray(ids[:, :width]), np.ascontiguousarray(mask[:, :width]))
            generation_state = None
            if compatible:
                gen_rows = (np.arange(batch)[:, None] * docs + np.arange(opts.n_docs)[None, :]).reshape(-1)
                full = ctx_ids[gen_rows].astype(np.int64)
                wide = reference_width or full.shape[1]
                padded = np.full((full.shape[0], wide), self.rag["generator_pad_token_id"], dtype=np.int64)
                padded[:, : min(wide, full.shape[1])] = full[:, :wide]
                generation_state = self.generator.encode(padded, np.ones_like(padded))
        doc_scores = np.ascontiguousarray(doc_scores[:, :used])
        with self.timer("decode"):
            start = d["decoder_start_token_id"]
            if self.kind == "token":
                return rag_token(self.generator, state, doc_scores, start, proc, search, fused=self.fused_head)
            rescore = RescoreSettings(
                pad_token_id=self.rag["generator_pad_token_id"], bos_token_id=self.rag["rescoring_bos_token_id"],
                label_smoothing=float(self.rag.get("label_smoothing") or 0.0),
                do_deduplication=bool(opts.do_deduplication), fast=opts.fast_decoding,
            )
            return rag_sequence(self.generator, state, doc_scores, start, proc, search, rescore,
                                opts.num_return_sequences, generation_state, opts.n_docs)

    def _options(self, kwargs: dict) -> GenerationOptions:
        opts = GenerationOptions.from_kwargs(**kwargs).resolved(
            {**self.defaults, "do_deduplication": self.rag["do_deduplication"]}, self.rag["n_docs"], self.kind)
        if self.kind == "sequence" and opts.num_return_sequences > opts.n_docs * opts.num_beams:
            raise ValueError(f"num_return_sequences ({opts.num_return_sequences}) must be <= n_docs * num_beams "
                             f"({opts.n_docs * opts.num_beams})")
        return opts

    # -- public API ---------------------------------------------------------------------------------

    def retrieve(self, questions: list[str], n_docs: int | None = None) -> list[list[Document]]:
        """The passages each question retrieves, in retrieval order, with their scores."""
        questions = _as_list(questions)
        if not questions:
            return []
        n_docs = n_docs if n_docs is not None else self.rag["n_docs"]
        if not isinstance(n_docs, int) or n_docs < 1:
            raise ValueError(f"n_docs must be a positive integer, got {n_docs!r}")
        _, emb = self._encode_questions(questions)
        doc_ids, doc_scores = self._retrieve(emb, n_docs)
        return [self._documents(ids, scores) for ids, scores in zip(doc_ids, doc_scores, strict=True)]

    def _documents(self, ids: np.ndarray, scores: np.ndarray) -> list[Document]:
        index = self._require_index()
        docs = []
        for doc_id, score in zip(ids, scores, strict=True):
            p = index.passage(int(doc_id))
            docs.append(Document(int(doc_id), p["title"], p["text"], float(score), p.get("id")))
        return docs

    def generate(self, questions: list[str], **kwargs) -> list[RagOutput]:
        """Answer each question (one result per question, in order).

        Keyword arguments are transformers' generation parameters (see :class:`GenerationOptions`); omitted
        ones take the checkpoint's defaults recorded at export.

        Raises:
            TypeError: Unknown keyword.
            ValueError: Invalid parameter value.
            IndexUnavailableError: The export has no knowledge index.
        """
        questions = _as_list(questions)
        opts = self._options(kwargs)
        if not questions:
            return []
        self._require_index()
        q_ids, emb = self._encode_questions(questions)
        n_retrieve = opts.n_docs
        if self.kind == "sequence" and opts.reference_compatible:
            n_retrieve = max(n_retrieve, self.rag["n_docs"])  # rescoring uses the configured n_docs
        doc_ids, doc_scores = self._retrieve(emb, n_retrieve)
        ctx_ids, ctx_mask = self._contexts(q_ids, doc_ids)
        decoded = self._decode(ctx_ids, ctx_mask, doc_scores, opts, reference_width=self.rag["max_combined_length"])
        doc_ids, doc_scores = doc_ids[:, : opts.n_docs], doc_scores[:, : opts.n_docs]
        outputs = []
        for i, question in enumerate(questions):
            answers = [
                Answer(self.generator_tokenizer.decode(row, skip_special_tokens=True), self._trim(row), float(score))
                for row, score in zip(decoded.sequences[i], decoded.scores[i], strict=True)
            ]
            outputs.append(RagOutput(question, answers, self._documents(doc_ids[i], doc_scores[i])))
        return outputs

    def generate_from_context(self, context_input_ids, context_attention_mask, doc_scores, **kwargs) -> np.ndarray:
        """Generate from contexts you built (transformers' ``generate(context_input_ids=..., ...)``).

        Args:
            context_input_ids: int array [batch * n_docs, src_len].
            context_attention_mask: int array [batch * n_docs, src_len].
            doc_scores: float array [batch, n_docs].

        Returns:
            int64 array [batch * num_return_sequences, L]: the rows the reference returns.
        """
        ids, mask = np.asarray(context_input_ids), np.asarray(context_attention_mask)
        scores = np.asarray(doc_scores, dtype=np.float32)
        if ids.ndim != 2 or mask.shape != ids.shape or scores.ndim != 2:
            raise ValueError("context_input_ids and context_attention_mask must be 2-D of the same shape and "
                             "doc_scores 2-D [batch, n_docs]")
        n_docs = kwargs.pop("n_docs", None) or scores.shape[1]
        if scores.shape[1] != n_docs or ids.shape[0] != scores.shape[0] * n_docs:
            raise ValueError(f"context_input_ids has {ids.shape[0]} rows; expected batch ({scores.shape[0]}) x "
                             f"n_docs ({n_docs}) from doc_scores")
        opts = self._options({**kwargs, "n_docs": n_docs})
        if scores.shape[0] == 0:
            return np.zeros((0, 0), dtype=np.int64)
        decoded = self._decode(ids.astype(np.int64), mask.astype(np.int64), scores, opts)
        return self._pad_rows(decoded.sequences)

    # -- helpers ------------------------------------------------------------------------------------

    def _pad_rows(self, groups: list[np.ndarray]) -> np.ndarray:
        """Stack per-question rows, padding with the generator's pad id as RAG-Sequence's ``_cat_and_pad``
        does (RAG-Token rows come out of one search and already share a width)."""
        pad = self.rag["generator_pad_token_id"]
        width = max((g.shape[1] for g in groups), default=0)
        out = np.full((sum(len(g) for g in groups), width), pad, dtype=np.int64)
        r = 0
        for g in groups:
            out[r : r + len(g), : g.shape[1]] = g
            r += len(g)
        return out

    def _trim(self, row: np.ndarray) -> list[int]:
        """The row up to its first EOS (dropping the padding transformers writes after it)."""
        eos = set(self.defaults["eos_token_id"] or ())
        tokens = [int(t) for t in row]
        for i in range(1, len(tokens)):
            if tokens[i] in eos:
                return tokens[: i + 1]
        pad = self.defaults["pad_token_id"]
        while len(tokens) > 1 and tokens[-1] == pad:
            tokens.pop()
        return tokens


def _as_list(questions) -> list[str]:
    if isinstance(questions, str):
        return [questions]
    questions = list(questions)
    for q in questions:
        if not isinstance(q, str):
            raise TypeError(f"questions must be strings, got {type(q).__name__}")
    return questions


__all__ = ["RagPipeline", "contextualize"]
