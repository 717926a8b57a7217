"""Stage 3: retrieved passages + question -> generator input rows, as transformers' RagRetriever builds them."""

from __future__ import annotations

import numpy as np

from .artifact import RagSettings
from .retrieval import Retriever
from .tokenization import TextTokenizer


def contextualize(title: str, text: str, question: str, prefix: str | None, title_sep: str, doc_sep: str) -> str:
    """One generator input string, exactly as transformers' ``RagRetriever.postprocess_docs`` builds it."""
    title = title.removeprefix('"').removesuffix('"')
    return ((prefix or "") + title + title_sep + text + doc_sep + question).replace("  ", " ")


class Contextualizer:
    """Builds ``[batch * n_docs, len]`` generator inputs from question ids and retrieved doc ids."""

    def __init__(self, settings: RagSettings, question_tokenizer: TextTokenizer,
                 generator_tokenizer: TextTokenizer, retriever: Retriever):
        self._rag, self._questions, self._generator = settings, question_tokenizer, generator_tokenizer
        self._retriever = retriever

    def build(self, question_ids: np.ndarray, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Context ids and mask for retrieved passages, padded to the longest row, truncated at
        ``max_combined_length``. The reference decodes each question back from its ids, so the generator
        sees that text."""
        passages = [[self._retriever.passage(int(doc_id)) for doc_id in ids] for ids in doc_ids]
        return self.from_passages(question_ids, passages)

    def from_passages(self, question_ids: np.ndarray, passages: list[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
        """Context ids and mask for questions (as token ids) and passages given for each, built as for
        retrieved ones: the question text is what its tokenizer decodes, as the reference does."""
        questions = [self._questions.decode(row, skip_special_tokens=True) for row in question_ids]
        return self.encode(questions, passages)

    def encode(self, questions: list[str], passages: list[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
        """Context ids and mask for given passages (``{"title", "text"}`` per passage, a list per question)."""
        rag = self._rag
        texts = [contextualize(p["title"], p["text"], q, rag.prefix, rag.title_sep, rag.doc_sep)
                 for q, ps in zip(questions, passages, strict=True) for p in ps]
        return self._generator.encode(texts, max_length=rag.max_combined_length)
