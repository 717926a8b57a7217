"""The bundled corpus and questions (``scripts/data/`` of the repository this package is installed from)."""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "scripts" / "data"
CORPUS = DATA_DIR / "corpus.jsonl"
QUESTIONS = DATA_DIR / "questions.txt"


def load_corpus(path: Path = CORPUS, min_passages: int = 0) -> list[dict]:
    """Read the JSONL corpus; if fewer than ``min_passages``, join neighbouring passages into longer ones."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    passages = [{"title": r["title"], "text": r["text"]} for r in rows]
    i = 0
    while len(passages) < min_passages:
        a, b = rows[i % len(rows)], rows[(i * 7 + 3) % len(rows)]
        passages.append({"title": a["title"], "text": f"{a['text']} {b['text']}"})
        i += 1
    return passages


def load_questions(path: Path = QUESTIONS) -> list[str]:
    """The bundled questions, one a line."""
    return [q for q in path.read_text(encoding="utf-8").splitlines() if q.strip()]
