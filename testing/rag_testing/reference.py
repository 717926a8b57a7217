"""The PyTorch reference: transformers' RAG ``generate`` with its RagRetriever, for parity tests, the demo and
benchmarks (support code, not part of the product)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ReferenceResult:
    """One question's reference output.

    Attributes:
        sequences: int64 [num_return_sequences, L], the rows ``generate`` returned for the question.
        scores: What the rows are ranked by: beam ``sequences_scores`` (RAG-Token beam search), the
            marginal log-likelihood ``-loss`` (RAG-Sequence), None for greedy RAG-Token.
        doc_ids: Retrieved passage rows [n_docs].
        doc_scores: Their scores [n_docs].
    """

    sequences: np.ndarray
    scores: np.ndarray | None
    doc_ids: np.ndarray
    doc_scores: np.ndarray


class Reference:
    """A RAG checkpoint loaded with transformers, its retriever attached (the checkpoint's own, or
    ``retriever``: e.g. one over a stand-in of a hub index)."""

    def __init__(self, checkpoint: str, retriever=None):
        from transformers import RagRetriever, RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer

        from rag_export.checkpoint import detect_kind, read_config

        self.kind = detect_kind(read_config(checkpoint), checkpoint)
        cls = RagTokenForGeneration if self.kind == "token" else RagSequenceForGeneration
        self.retriever = retriever or RagRetriever.from_pretrained(checkpoint)
        # from_pretrained(..., retriever=) fails in transformers 5.23 when a generation_config.json exists
        # (it logs the kwargs as JSON), so the retriever is attached afterwards.
        self.model = cls.from_pretrained(checkpoint).eval()
        self.model.set_retriever(self.retriever)
        self.tokenizer = RagTokenizer.from_pretrained(checkpoint)

    def encode(self, questions: list[str]):
        return self.tokenizer.question_encoder(questions, padding=True, return_tensors="pt")

    @torch.no_grad()
    def retrieve(self, questions: list[str], n_docs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        enc = self.encode(questions)
        hidden = self.model.question_encoder(enc.input_ids, attention_mask=enc.attention_mask)[0]
        n_docs = n_docs or self.model.config.n_docs
        embeds, doc_ids, _ = self.retriever.retrieve(hidden.numpy().astype(np.float32), n_docs)
        scores = torch.bmm(hidden.unsqueeze(1), torch.as_tensor(embeds).to(hidden).transpose(1, 2)).squeeze(1)
        return doc_ids, scores.numpy()

    @torch.no_grad()
    def generate_ids(self, questions: list[str], **kwargs) -> torch.Tensor:
        """Exactly ``model.generate(input_ids, attention_mask, **kwargs)`` on the padded batch."""
        enc = self.encode(questions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, questions: list[str], **kwargs) -> list[ReferenceResult]:
        """Per-question reference results. RAG-Token runs the batch at once; RAG-Sequence runs each
        question alone, because its rescoring pass re-encodes a padded question without its mask."""
        n_docs = kwargs.get("n_docs")
        doc_ids, doc_scores = self.retrieve(questions, n_docs)
        if self.kind == "token":
            return self._token(questions, doc_ids, doc_scores, **kwargs)
        results = []
        for i, q in enumerate(questions):
            seqs = self.generate_ids([q], **kwargs)
            enc = self.encode([q])
            # Exactly the call generate() ranks its candidates with (it passes no n_docs).
            out = self.model(enc.input_ids.repeat(seqs.shape[0], 1), labels=seqs, exclude_bos_score=True)
            results.append(ReferenceResult(seqs.numpy(), (-out.loss).numpy(), doc_ids[i], doc_scores[i]))
        return results

    def _token(self, questions, doc_ids, doc_scores, **kwargs) -> list[ReferenceResult]:
        enc = self.encode(questions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                      return_dict_in_generate=True, output_scores=True, **kwargs)
        seqs = out.sequences.numpy()
        per_q = seqs.shape[0] // len(questions)
        scores = getattr(out, "sequences_scores", None)
        scores = scores.numpy() if scores is not None else None
        return [ReferenceResult(seqs[i * per_q : (i + 1) * per_q],
                                None if scores is None else scores[i * per_q : (i + 1) * per_q],
                                doc_ids[i], doc_scores[i]) for i in range(len(questions))]
