"""Passage files: JSONL, TSV, CSV, Parquet or Arrow rows with ``id`` (optional), ``title`` and ``text``,
and optionally each passage's embedding (``embeddings_column``: the vectors a released corpus such as
wiki_dpr comes with). A directory stands for its files of one format, read in name order (a dataset
split into shards).

Rows stream in order; a malformed row raises :class:`PassageError` naming the file and line, or is
skipped and counted when the reader is lenient.
"""

from __future__ import annotations

import bisect
import csv
import json
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RagError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".csv": "csv", ".parquet": "parquet",
           ".arrow": "arrow"}
VECTOR_FORMATS = ("jsonl", "parquet", "arrow")
# What datasets' save_to_disk writes beside its Arrow files (not passages).
DATASETS_METADATA = ("dataset_info.json", "state.json")


class PassageError(RagError, ValueError):
    """A passage file or one of its rows cannot be used."""


@dataclass(frozen=True)
class Passage:
    """One row: its line (row number in a table; counted across a directory's files), id, title, text,
    and its stored embedding when the reader was asked for one."""

    line: int
    pid: str
    title: str
    text: str
    vector: np.ndarray | None = None


def detect_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PassageError(f"{path}: unknown passage format {path.suffix!r}; use one of "
                           f"{', '.join(sorted(FORMATS))} (rows with id, title, text)")
    return fmt


class PassageReader:
    """Iterate the valid passages of a file, or of a directory's files.

    Args:
        path: The passage file, or a directory of passage files of one format (read in name order).
        skip_bad_rows: Skip malformed rows (counted in ``skipped``, first few reported in ``problems``)
            instead of raising.
        embeddings_column: Also read each passage's embedding from this column (JSONL, Parquet, Arrow);
            every row must have one, all of the same length (checked while iterating).
    """

    def __init__(self, path: str | Path, skip_bad_rows: bool = False, embeddings_column: str | None = None):
        self.path = Path(path)
        self.files = _files(self.path)
        self.format = self.files[0][1]
        if embeddings_column and self.format not in VECTOR_FORMATS:
            raise PassageError(f"{self.path}: stored embeddings are read from JSONL, Parquet or Arrow files, not "
                               f"{self.format.upper()}")
        self.embeddings_column = embeddings_column
        self.skip_bad_rows = skip_bad_rows
        self.skipped = 0
        self.problems: list[str] = []
        self._bad_lines: set[int] = set()
        self._starts: list[int] = []  # first global line of each file (filled by _rows)
        self.dim: int | None = None  # length of the stored embeddings, once one was read

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
        for line, row in self._rows(vectors=self.embeddings_column is not None):
            if line in self._bad_lines:
                continue
            try:
                passage = self._passage(line, row)
            except PassageError:
                continue  # counted by scan()
            if self.embeddings_column is not None:
                passage = Passage(passage.line, passage.pid, passage.title, passage.text, self._vector(line, row))
            yield passage

    def _vector(self, line: int, row: dict) -> np.ndarray:
        """A row's stored embedding; a missing, ragged or non-finite one is an error (scan does not read
        vectors, so it cannot be skipped)."""
        value = row.get(self.embeddings_column)
        problem = None
        if value is None:
            problem = f"no {self.embeddings_column!r} value"
        else:
            try:
                value = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError):
                problem = f"{self.embeddings_column!r} is not a list of numbers"
        if problem is None and value.ndim != 1:
            problem = f"{self.embeddings_column!r} is not a flat list of numbers"
        if problem is None:
            self.dim = self.dim or len(value)
            if len(value) != self.dim:
                problem = f"{self.embeddings_column!r} has {len(value)} values, the first row has {self.dim}"
            elif not np.isfinite(value).all():
                problem = f"{self.embeddings_column!r} holds NaN or infinite values"
        if problem:
            raise PassageError(f"{self._where(line)}: {problem} (every passage needs an embedding of one length)")
        return value

    def _where(self, line: int) -> str:
        """``file:line`` of a global line number."""
        index = max(0, bisect.bisect_right(self._starts, line) - 1)
        if len(self.files) == 1 or not self._starts:
            return f"{self.files[index][0]}:{line}"
        return f"{self.files[index][0]}:{line - self._starts[index] + 1}"

    def _bad(self, line: int, message: str) -> None:
        where = f"{self._where(line)}: {message}"
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

    def _rows(self, vectors: bool = False) -> Iterator[tuple[int, object]]:
        """``(line, row)`` over every file; lines count on across files (each file starts after the last
        line of the one before), so they stay unique."""
        self._starts, offset = [], 0
        for path, _ in self.files:
            self._starts.append(offset + 1)
            last = offset
            for line, row in self._file_rows(path, vectors):
                last = offset + line
                yield last, row
            offset = last

    def _file_rows(self, path: Path, vectors: bool) -> Iterator[tuple[int, object]]:
        if self.format == "jsonl":
            with open(path, encoding="utf-8") as f:
                for i, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        yield i, json.loads(raw)
                    except json.JSONDecodeError as e:
                        yield i, PassageError(f"not valid JSON ({e.msg} at column {e.colno})")
        elif self.format in ("tsv", "csv"):
            csv.field_size_limit(sys.maxsize)
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f, delimiter="\t" if self.format == "tsv" else ",")
                header = next(reader, None)
                if header is None or "text" not in header:
                    raise PassageError(f"{path}:1: the header must name the columns (id, title, text); "
                                       f"found {header}")
                for row in reader:
                    line = reader.line_num
                    if len(row) != len(header):
                        yield line, PassageError(f"{len(row)} fields, the header has {len(header)}")
                    else:
                        yield line, dict(zip(header, row, strict=True))
        else:
            yield from self._table_rows(path, vectors)

    def _table_rows(self, path: Path, vectors: bool) -> Iterator[tuple[int, object]]:
        """Rows of a Parquet or Arrow file, read in batches; stored embeddings come out as numpy rows of one
        flat array per batch (not as Python lists of floats)."""
        try:
            import pyarrow as pa
        except ImportError as e:
            raise PassageError(f"reading {self.format.capitalize()} needs pyarrow: pip install pyarrow") from e
        names, batches = _open_table(pa, path, self.format)
        if "text" not in names:
            raise PassageError(f"{path}: no 'text' column (columns: {names})")
        vector_column = self.embeddings_column if vectors else None
        if self.embeddings_column and self.embeddings_column not in names:
            raise PassageError(f"{path}: no {self.embeddings_column!r} column for the stored embeddings "
                               f"(columns: {names})")
        columns = [c for c in ("id", "title", "text") if c in names]
        row = 0
        for batch in batches(columns + ([vector_column] if vector_column else [])):
            stored = _batch_vectors(batch.column(vector_column)) if vector_column else None
            for i, item in enumerate(batch.select(columns).to_pylist()):
                row += 1
                if stored is not None:
                    item[vector_column] = stored[i]
                yield row, item


def _files(path: Path) -> list[tuple[Path, str]]:
    """The files a passage source stands for, with their format."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in FORMATS and p.name not in DATASETS_METADATA)
        formats = {detect_format(p) for p in files}
        if not files:
            raise PassageError(f"{path} holds no passage files ({', '.join(sorted(FORMATS))})")
        if len(formats) > 1:
            raise PassageError(f"{path} mixes passage formats ({', '.join(sorted(formats))}); keep one per directory")
        fmt = formats.pop()
        return [(p, fmt) for p in files]
    if not path.is_file():
        raise PassageError(f"passage file {path} does not exist")
    return [(path, detect_format(path))]


def _open_table(pa, path: Path, fmt: str):
    """Column names and a function giving record batches of the named columns. Arrow files are IPC
    streams as ``datasets`` writes them (``save_to_disk``, its cache), or IPC files."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        return pf.schema_arrow.names, lambda columns: pf.iter_batches(batch_size=8192, columns=columns)
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            return reader.schema.names, lambda columns: (b.select(columns) for b in reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            return reader.schema.names, lambda columns: (reader.get_batch(i).select(columns)
                                                         for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError) as e:
        raise PassageError(f"{path}: not an Arrow file ({str(e).splitlines()[0]})") from e


def _batch_vectors(column) -> list:
    """One embedding (a numpy row, or None) per row of a list-of-numbers column, without going through
    Python floats when the column has no nulls."""
    import pyarrow as pa

    kind = column.type
    if column.null_count == 0 and pa.types.is_fixed_size_list(kind):
        return list(column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), kind.list_size))
    if column.null_count == 0 and (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        if len(column) and (lengths == lengths[0]).all():
            return list(values[offsets[0] : offsets[-1]].reshape(len(column), int(lengths[0])))
        return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return [None if v is None else v for v in column.to_pylist()]
