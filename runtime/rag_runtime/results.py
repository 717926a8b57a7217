"""What ``RagPipeline`` returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Document:
    """A retrieved passage.

    Attributes:
        id: Row of the passage in the knowledge index (transformers' doc id).
        title: Passage title.
        text: Passage text.
        score: Inner product of the question and passage embeddings.
        pid: The passage's own id in the file the index was built from.
    """

    id: int
    title: str
    text: str
    score: float
    pid: str | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready data: ``{"id", "title", "text", "score", "pid"}``."""
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """A generated answer.

    Attributes:
        text: Decoded answer, special tokens removed.
        token_ids: The row transformers' generate returns, without its trailing padding; it starts with
            the decoder start token.
        score: The score the reference ranks by (beam: length-normalized log-probability; RAG-Sequence:
            marginal log-likelihood over the passages; greedy: summed log-probabilities).
    """

    text: str
    token_ids: list[int]
    score: float


@dataclass
class RagOutput:
    """Answers to one question with the passages they were generated from.

    Attributes:
        question: The question as given.
        answers: ``num_return_sequences`` answers, best first.
        docs: The ``n_docs`` passages used, in retrieval order.
    """

    question: str
    answers: list[Answer] = field(default_factory=list)
    docs: list[Document] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-ready data: ``{"question", "answers": [...], "docs": [...]}`` (docs as
        :meth:`Document.to_dict` writes them). Every command and endpoint answers with this."""
        return asdict(self)


def retrieval_to_dict(question: str, docs: list[Document]) -> dict:
    """One question's retrieved passages as JSON-ready data: ``{"question", "docs": [...]}``, each doc as
    :meth:`Document.to_dict` writes it (``rag-index search --json`` and ``/v1/retrieve``)."""
    return {"question": question, "docs": [d.to_dict() for d in docs]}
