"""Passage files: JSONL, TSV, CSV or Parquet rows with ``id`` (optional), ``title`` and ``text``.

Rows stream in order; a malformed row raises :class:`PassageError` naming the file and line, or is
skipped and counted when the reader is lenient.
"""

from __future__ import annotations

import csv
import json
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RagError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".csv": "csv", ".parquet": "parquet"}


class PassageError(RagError, ValueError):
    """A passage file or one of its rows cannot be used."""


@dataclass(frozen=True)
class Passage:
    line: int
    pid: str
    title: str
    text: str


def detect_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PassageError(f"{path}: unknown passage format {path.suffix!r}; use one of "
                           f"{', '.join(sorted(FORMATS))} (rows with id, title, text)")
    return fmt


class PassageReader:
    """Iterate the valid passages of a file.

    Args:
        path: The passage file.
        skip_bad_rows: Skip malformed rows (counted in ``skipped``, first few reported in ``problems``)
            instead of raising.
    """

    def __init__(self, path: str | Path, skip_bad_rows: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise PassageError(f"passage file {self.path} does not exist")
        self.format = detect_format(self.path)
        self.skip_bad_rows = skip_bad_rows
        self.skipped = 0
        self.problems: list[str] = []
        self._bad_lines: set[int] = set()

    def scan(self) -> int:
        """Check every row (format, text, duplicate ids) without keeping them; returns the valid count.

        Raises :class:`PassageError` on the first bad row unless skipping. Memory: 16 bytes per row.
        """
        self.skipped, self.problems, self._bad_lines = 0, [], set()
        lines, keys = array("q"), array("q")
        for line, row in self._rows():
            try:
                p = self._passage(line, row)
            except PassageError as e:
                self._bad(line, str(e))
                continue
            lines.append(line)
            keys.append(hash(p.pid))
        lines, keys = np.asarray(lines, dtype=np.int64), np.asarray(keys, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        suspects = set(lines[order[same]].tolist()) | set(lines[order[same + 1]].tolist())
        duplicates = 0
        if suspects:
            first: dict[str, int] = {}
            for line, row in self._rows():
                if line in suspects:
                    pid = self._passage(line, row).pid
                    if pid in first:
                        self._bad(line, f"duplicate passage id {pid!r} (first at line {first[pid]})")
                        duplicates += 1
                    else:
                        first[pid] = line
        return len(lines) - duplicates

    def __iter__(self) -> Iterator[Passage]:
        """The valid passages, in file order (call :meth:`scan` first)."""
        for line, row in self._rows():
            if line in self._bad_lines:
                continue
            try:
                yield self._passage(line, row)
            except PassageError:
                continue  # counted by scan()

    def _bad(self, line: int, message: str) -> None:
        where = f"{self.path}:{line}: {message}"
        self._bad_lines.add(line)
        if not self.skip_bad_rows:
            raise PassageError(f"{where} (fix the row, or pass --skip-bad-rows to skip such rows)")
        self.skipped += 1
        if len(self.problems) < 5:
            self.problems.append(where)

    @staticmethod
    def _passage(line: int, row) -> Passage:
        if isinstance(row, PassageError):
            raise row
        if not isinstance(row, dict):
            raise PassageError("row is not an object with id, title, text")
        text = row.get("text")
        if not isinstance(text, str):
            raise PassageError("no text field" if text is None else f"text is {type(text).__name__}, not a string")
        if not text.strip():
            raise PassageError("empty text")
        title = row.get("title") or ""
        if not isinstance(title, str):
            raise PassageError(f"title is {type(title).__name__}, not a string")
        pid = row.get("id")
        return Passage(line, str(line) if pid is None or pid == "" else str(pid), title, text)

    def _rows(self) -> Iterator[tuple[int, object]]:
        if self.format == "jsonl":
            with open(self.path, encoding="utf-8") as f:
                for i, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        yield i, json.loads(raw)
                    except json.JSONDecodeError as e:
                        yield i, PassageError(f"not valid JSON ({e.msg} at column {e.colno})")
        elif self.format in ("tsv", "csv"):
            csv.field_size_limit(sys.maxsize)
            with open(self.path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f, delimiter="\t" if self.format == "tsv" else ",")
                header = next(reader, None)
                if header is None or "text" not in header:
                    raise PassageError(f"{self.path}:1: the header must name the columns (id, title, text); "
                                       f"found {header}")
                for row in reader:
                    line = reader.line_num
                    if len(row) != len(header):
                        yield line, PassageError(f"{len(row)} fields, the header has {len(header)}")
                    else:
                        yield line, dict(zip(header, row, strict=True))
        else:
            yield from self._parquet_rows()

    def _parquet_rows(self) -> Iterator[tuple[int, object]]:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise PassageError("reading Parquet needs pyarrow: pip install pyarrow") from e
        pf = pq.ParquetFile(self.path)
        if "text" not in pf.schema_arrow.names:
            raise PassageError(f"{self.path}: no 'text' column (columns: {pf.schema_arrow.names})")
        columns = [c for c in ("id", "title", "text") if c in pf.schema_arrow.names]
        row = 0
        for batch in pf.iter_batches(batch_size=8192, columns=columns):
            for item in batch.to_pylist():
                row += 1
                yield row, item
