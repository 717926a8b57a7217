"""``RagPipeline``: questions in, answers with their sources out, from a rag-export directory.

The stages are modules of their own (question encoding, retrieval, contextualization, generation);
the pipeline loads them from the manifest and composes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import constants as C
from .artifact import Manifest
from .contexts import Contextualizer
from .decoding.rag import Decoded
from .engine import DecodeEngine
from .errors import ArtifactError, InvalidInputError, InvalidOptionError
from .generation import AnswerGenerator, DecodeRequest
from .knowledge import KnowledgeIndex
from .onnx_backend import OnnxGenerator
from .options import OPTIONS, GenerationOptions
from .question_encoder import QuestionEncoder
from .results import Document, RagOutput
from .retrieval import Retriever
from .sessions import create_session, providers_for
from .timing import NullTimer, StageTimer, TimedSession
from .tokenization import TextTokenizer


class RagPipeline:
    """A loaded export: question encoder, knowledge index, generator and decoding.

    Use :meth:`load`; then :meth:`generate`, :meth:`retrieve`, :meth:`generate_from_passages` or
    :meth:`generate_from_context`.

    Attributes:
        manifest: The export's typed manifest.
        kind: ``"token"`` (RAG-Token) or ``"sequence"`` (RAG-Sequence).
        device: ``"cpu"`` or ``"cuda"``.
        timer: The stage timer given to :meth:`load` (a no-op one otherwise).
    """

    def __init__(self, manifest: Manifest, device: str, question_encoder: QuestionEncoder, retriever: Retriever,
                 contextualizer: Contextualizer, generator: AnswerGenerator, timer: StageTimer | NullTimer):
        self.manifest, self.kind, self.device, self.timer = manifest, manifest.kind, device, timer
        self.question_encoder, self.retriever = question_encoder, retriever
        self.contextualizer, self.generator = contextualizer, generator
        self._sessions: dict = {}

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", *, threads: int | None = None, verify: bool = True,
             nprobe: int | None = None, ef_search: int | None = None, fused_head: bool = True,
             sequence_scorer: bool = True, timer: StageTimer | None = None,
             provider_options: Mapping[str, str | int | bool] | None = None,
             profile: str | Path | None = None) -> RagPipeline:
        """Load an export directory.

        Args:
            path: Directory written by ``rag-export``.
            device: ``"cpu"`` or ``"cuda"`` (needs onnxruntime-gpu).
            threads: onnxruntime intra-op threads (default: all cores).
            verify: Check every file against its sha256 in the manifest.
            nprobe: Inverted lists visited per query (IVF knowledge indexes).
            ef_search: Candidate list size (HNSW knowledge indexes).
            fused_head: Beam search runs the exported head graph (RAG-Token's marginalization, RAG-Sequence's
                per-passage step), so only the best candidates per step leave the device (False: the step's
                logits come back and the host ranks them).
            sequence_scorer: RAG-Sequence rescoring reads the labels' log-probabilities off the exported
                scorer graph (False: the logits come back and the host computes them, as for exports made
                before the scorer).
            timer: Accumulates wall time per stage and per graph (benchmarks, the service); None times
                nothing.
            provider_options: onnxruntime CUDA execution provider options over the runtime's defaults
                (``rag_runtime.sessions.CUDA_DEFAULTS``: ``use_tf32=0``, so fp32 is as exact as PyTorch's
                default), e.g. ``{"use_tf32": 1}``; device ``"cuda"`` only.
            profile: A directory for onnxruntime's per-node profile of every graph call (benchmarks);
                :meth:`end_profiling` writes the traces.

        Raises:
            ArtifactError: Missing, corrupted or mismatched export.
            InvalidOptionError: Unknown device, ``"cuda"`` without a CUDA provider, or provider options
                for the CPU.
            MissingDependencyError: ``"cuda"`` asked for and onnxruntime did not grant it (names the
                library that failed to load).
        """
        providers_for(device, provider_options)
        root = Path(path)
        manifest = Manifest.load(root, verify=verify)
        if manifest.kind is None or manifest.rag is None or manifest.generation_defaults is None:
            raise ArtifactError(f"{root} holds only a context encoder (for rag-index build), not a RAG export")
        clock = timer or NullTimer()
        sessions = {}

        def session(name: str, **kwargs):
            prefix = str(Path(profile) / name) if profile is not None else None
            s = sessions[name] = create_session(root / manifest.graph(name).file, device, threads,
                                                provider_options=provider_options, profile=prefix, **kwargs)
            return TimedSession(s, clock, name) if clock.enabled else s

        def tokenizer(name: str) -> TextTokenizer:
            entry = manifest.tokenizers[name]
            return TextTokenizer(root / entry.file, entry)

        q_tokenizer, g_tokenizer = tokenizer(C.QUESTION_TOKENIZER), tokenizer(C.GENERATOR_TOKENIZER)
        # The head runs between decoder steps: its idle threads must not spin on the decoder's cores.
        # RAG-Sequence's per-passage beam step likewise (exports made before that graph step on the host).
        head_graph = C.RAG_TOKEN_HEAD if manifest.kind == "token" else C.BEAM_STEP
        head = session(head_graph, spinning=False) if fused_head and head_graph in manifest.graphs else None
        # RAG-Sequence rescoring reads label log-probs off the device; exports made before the scorer
        # graph existed compute them on the host.
        scorer = (session(C.SEQUENCE_SCORER, spinning=False)
                  if sequence_scorer and C.SEQUENCE_SCORER in manifest.graphs else None)
        backend = OnnxGenerator(session(C.GENERATOR_ENCODER), session(C.GENERATOR_DECODER), manifest.decoder,
                                manifest.graphs, head=head, device=device, scorer=scorer)
        index = (KnowledgeIndex(root / manifest.index.dir, device, nprobe=nprobe, ef_search=ef_search)
                 if manifest.index else None)
        retriever = Retriever(index, root)
        pipe = cls(
            manifest, device, QuestionEncoder(session(C.QUESTION_ENCODER), q_tokenizer, manifest.graph(C.QUESTION_ENCODER)), retriever,
            Contextualizer(manifest.rag, q_tokenizer, g_tokenizer, retriever),
            AnswerGenerator(manifest.kind, backend, manifest.rag, manifest.generation_defaults, g_tokenizer,
                            fused_head=fused_head, timer=clock),
            clock,
        )
        pipe._sessions = sessions
        return pipe

    def end_profiling(self) -> dict[str, Path]:
        """Write the onnxruntime profiles of a pipeline loaded with ``profile=``: each graph's trace file."""
        return {name: Path(s.end_profiling()) for name, s in self._sessions.items()
                if s.get_session_options().enable_profiling}

    @property
    def index(self) -> KnowledgeIndex | None:
        """The knowledge index questions are answered from (None: only generate_from_context works)."""
        return self.retriever.index

    def options(self, **kwargs) -> GenerationOptions:
        """The options :meth:`generate` would use for these keywords: the export's defaults filled in,
        every value validated (so a service can reject a request before queueing it).

        Raises:
            UnknownOptionError: Unknown keyword (a ``TypeError``).
            InvalidOptionError: Invalid value (a ``ValueError``).
        """
        opts = self.generator.options(kwargs)
        index = self.retriever.index
        if index is not None and self.generator.passages_needed(opts) > index.count:
            raise InvalidOptionError(f"n_docs={opts.n_docs} needs {self.generator.passages_needed(opts)} passages; "
                                     f"the knowledge index has {index.count}", "n_docs")
        return opts

    def retrieve(self, questions: list[str], n_docs: int | None = None) -> list[list[Document]]:
        """The passages each question retrieves, in retrieval order, with their scores."""
        questions = _as_list(questions)
        if not questions:
            return []
        n_docs = OPTIONS["n_docs"].check(n_docs) if n_docs is not None else self.manifest.rag.n_docs
        _, doc_ids, doc_scores = self._search(questions, n_docs)
        return [self.retriever.documents(ids, scores) for ids, scores in zip(doc_ids, doc_scores, strict=True)]

    def generate(self, questions: list[str], **kwargs) -> list[RagOutput]:
        """Answer each question (one result per question, in order).

        Keyword arguments are transformers' generation parameters (see :class:`GenerationOptions`); omitted
        ones take the checkpoint's defaults recorded at export. The questions decode together on one
        :class:`~rag_runtime.engine.DecodeEngine`; each answer equals the one the question gets alone.

        Raises:
            UnknownOptionError: Unknown keyword (a ``TypeError``).
            InvalidOptionError: Invalid parameter value (a ``ValueError``).
            InvalidInputError: A question that is not a string (a ``TypeError``).
            IndexUnavailableError: The export has no knowledge index.
        """
        questions = _as_list(questions)
        opts = self.options(**kwargs)
        if not questions:
            return []
        prepared = self.prepare(questions, opts)
        decoded = self.generator.run([p.request for p in prepared])
        return [self.answer(p, d) for p, d in zip(prepared, decoded, strict=True)]

    def prepare(self, questions: list[str], opts: GenerationOptions) -> list[PreparedQuestion]:
        """Retrieve each question's passages and build its decode request (what a decode engine takes).

        Raises:
            IndexUnavailableError: The export has no knowledge index.
        """
        questions = _as_list(questions)
        self.retriever.require_index()
        q_ids, doc_ids, doc_scores = self._search(questions, self.generator.passages_needed(opts))
        with self.timer.stage("contextualize"):
            ctx_ids, ctx_mask = self.contextualizer.build(q_ids, doc_ids)
        requests = self.generator.requests(ctx_ids, ctx_mask, doc_scores, opts,
                                           reference_width=self.manifest.rag.max_combined_length)
        n = opts.n_docs
        return [PreparedQuestion(q, r, self.retriever.documents(doc_ids[i, :n], doc_scores[i, :n]))
                for i, (q, r) in enumerate(zip(questions, requests, strict=True))]

    def answer(self, prepared: PreparedQuestion, decoded: Decoded) -> RagOutput:
        """A prepared question's result from its decoded rows."""
        return RagOutput(prepared.question, self.generator.answers(decoded), prepared.docs)

    def engine(self, max_rows: int, max_questions: int | None = None, listener=None) -> DecodeEngine:
        """A decode engine over this export's generator, for questions that join and leave between steps
        (``rag-serve`` keeps one): ``engine.add(p.request.decode, p.request.contexts,
        p.request.rescore_contexts)`` for each :meth:`prepare`-d question, then ``engine.step()``.

        Args:
            max_rows: Decoder rows one step may hold (see ``DecodeEngine``).
            max_questions: Questions decoding at once at most.
            listener: Called after each phase of a step with its duration and rows.
        """
        return self.generator.engine(max_rows, max_questions, listener)

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
            raise InvalidOptionError("context_input_ids and context_attention_mask must be 2-D of the same shape "
                                     "and doc_scores 2-D [batch, n_docs]")
        n_docs = kwargs.pop("n_docs", None) or scores.shape[1]
        if scores.shape[1] != n_docs or ids.shape[0] != scores.shape[0] * n_docs:
            raise InvalidOptionError(f"context_input_ids has {ids.shape[0]} rows; expected batch ({scores.shape[0]})"
                                     f" x n_docs ({n_docs}) from doc_scores")
        opts = self.generator.options({**kwargs, "n_docs": n_docs})
        if scores.shape[0] == 0:
            return np.zeros((0, 0), dtype=np.int64)
        decoded = self.generator.run(self.generator.requests(ids.astype(np.int64), mask.astype(np.int64), scores, opts))
        return self.generator.pad_rows([d.sequences for d in decoded])

    def decoder_logits(self, context_input_ids, context_attention_mask, decoder_input_ids) -> np.ndarray:
        """Teacher forcing: the generator's logits [rows, L, vocab] for ``decoder_input_ids`` [rows, L] (start
        token first), row ``i`` reading context row ``i`` -- to score given answers, or compare exports.
        """
        ids, mask = np.asarray(context_input_ids, dtype=np.int64), np.asarray(context_attention_mask, dtype=np.int64)
        tokens = np.asarray(decoder_input_ids, dtype=np.int64)
        if ids.ndim != 2 or mask.shape != ids.shape or tokens.ndim != 2 or len(tokens) != len(ids):
            raise InvalidOptionError("context_input_ids and context_attention_mask must be 2-D of the same shape, "
                                     "and decoder_input_ids 2-D with one row per context row")
        backend = self.generator.backend
        state = backend.encode_rows(ids, mask)
        rows = [backend.select(state, np.array([i])) for i in range(len(ids))]
        return backend.teacher_forced(rows, [tokens[i : i + 1] for i in range(len(ids))])

    def generate_from_passages(self, questions: list[str], passages: list[list[dict]], doc_scores=None,
                               **kwargs) -> list[RagOutput]:
        """Answer each question from passages you give, instead of retrieved ones (an export without a
        knowledge index, or your own search).

        Contexts are built as retrieval builds them, so the answers are those of transformers'
        ``generate(context_input_ids=..., context_attention_mask=..., doc_scores=...)`` given
        ``RagRetriever.postprocess_docs`` of the same passages.

        Args:
            questions: The questions.
            passages: For each question its passages, in order: ``{"title", "text"}`` and optionally
                ``"id"`` (kept as the results' ``pid``). Every question gets the same number, which is
                the ``n_docs`` used.
            doc_scores: float array [batch, n_docs] (retrieval scores: RAG-Token's passage log-prior is
                their log-softmax); None: all equal, every passage weighs the same.
            **kwargs: Generation parameters as for :meth:`generate`; ``n_docs``, if given, must equal
                the number of passages.

        Returns:
            One result per question; its ``docs`` are the given passages (``id``: position in the list).

        Raises:
            InvalidOptionError: Passage lists of different lengths or none, mismatched ``doc_scores`` or
                ``n_docs``, or an invalid generation parameter.
        """
        questions = _as_list(questions)
        if len(passages) != len(questions):
            raise InvalidOptionError(f"{len(passages)} passage lists for {len(questions)} questions: give one list "
                                     "per question")
        if not questions:
            return []
        counts = sorted({len(p) for p in passages})
        if len(counts) != 1 or counts[0] == 0:
            raise InvalidOptionError(f"every question needs the same number of passages (at least 1), got {counts}")
        n = counts[0]
        scores = np.zeros((len(questions), n), np.float32) if doc_scores is None else np.asarray(doc_scores, np.float32)
        if scores.shape != (len(questions), n):
            raise InvalidOptionError(f"doc_scores has shape {scores.shape}, expected {(len(questions), n)}")
        if kwargs.get("n_docs", n) != n:
            raise InvalidOptionError(f"n_docs={kwargs['n_docs']} but {n} passages per question were given")
        opts = self.generator.options({**kwargs, "n_docs": n})
        q_ids, _ = self.question_encoder.tokenizer.encode(questions,
                                                          max_length=self.question_encoder.tokenizer.model_max_length)
        with self.timer.stage("contextualize"):
            ctx_ids, ctx_mask = self.contextualizer.from_passages(q_ids, passages)
        decoded = self.generator.run(self.generator.requests(ctx_ids, ctx_mask, scores, opts,
                                                             reference_width=self.manifest.rag.max_combined_length))
        return [RagOutput(question, self.generator.answers(decoded[i]),
                          [Document(j, p.get("title") or "", p["text"], float(scores[i, j]), p.get("id"))
                           for j, p in enumerate(passages[i])])
                for i, question in enumerate(questions)]

    def _search(self, questions: list[str], n_docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Question ids, then doc ids and scores [batch, n_docs]."""
        with self.timer.stage("question_encode"):
            q_ids, emb = self.question_encoder.encode(questions)
        with self.timer.stage("retrieve"):
            doc_ids, doc_scores = self.retriever.search(emb, n_docs)
        return q_ids, doc_ids, doc_scores


@dataclass
class PreparedQuestion:
    """A question with its passages retrieved and its decode request built.

    Attributes:
        question: The question as given.
        request: What the decode engine takes (its decoding state, contexts and rescoring contexts).
        docs: The passages it is answered from, in retrieval order.
    """

    question: str
    request: DecodeRequest
    docs: list[Document]


def _as_list(questions) -> list[str]:
    if isinstance(questions, str):
        return [questions]
    questions = list(questions)
    for q in questions:
        if not isinstance(q, str):
            raise InvalidInputError(f"questions must be strings, got {type(q).__name__}")
    return questions


__all__ = ["PreparedQuestion", "RagPipeline"]
