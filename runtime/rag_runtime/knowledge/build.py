"""Build a knowledge index from a passage file: embed in batches (or take the embeddings the file
carries), stream to disk, then index with faiss.

The build runs in ``.OUT.partial`` next to OUT and is renamed at the end, so OUT is never half
written. The partial directory keeps the embedded rows and a state file; running the same build
again resumes after the last flushed batch.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import constants as C
from ..errors import ArtifactError, InvalidOptionError
from ..files import atomic_write_text, check_output_dir, replace_dir
from ..progress import progress_bar, step
from .sources import PassageReader
from .store import IndexMeta, PassageWriter

logger = logging.getLogger(__name__)

STATE_FILE = "build-state.json"
INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")


class Encoder(Protocol):
    dim: int
    identity: dict

    def embed(self, titles: list[str], texts: list[str]) -> np.ndarray: ...


# Stored embeddings against the context encoder's own, on the first batch: per passage, the largest
# difference relative to the largest magnitude. fp16 storage or arithmetic stays far below it; vectors of
# another encoder, or rows shifted against their passages, are far above it.
MAX_STORED_DIFF = 0.05


class StoredEmbeddings:
    """The embeddings a passage file carries (``BuildOptions.embeddings_column``), e.g. wiki_dpr's, used
    instead of embedding every passage again.

    Args:
        reader: The scanned passage reader (its first passage gives the dimension).
        check: The context encoder the embeddings were made with: its identity is recorded, and the first
            batch is embedded again and compared (see :data:`MAX_STORED_DIFF`).
            None records no encoder (``rag-index attach`` then warns).
    """

    def __init__(self, reader: PassageReader, check: Encoder | None = None):
        first = next(iter(reader), None)
        if first is None:
            raise ArtifactError(f"{reader.path} has no usable passages")
        self.dim = len(first.vector)
        if check is not None and check.dim != self.dim:
            raise InvalidOptionError(f"{reader.path} stores {self.dim}-dimensional embeddings but the context encoder "
                                     f"{check.identity.get('source')} makes {check.dim}-dimensional ones")
        self.identity = check.identity if check is not None else None
        self._check = check

    def take(self, batch: list) -> np.ndarray:
        vectors = np.stack([p.vector for p in batch]).astype(np.float32, copy=False)
        if self._check is not None:
            self._compare(batch, vectors)
            self._check = None
        return vectors

    def _compare(self, batch: list, stored: np.ndarray) -> None:
        fresh = self._check.embed([p.title for p in batch], [p.text for p in batch])
        relative = np.abs(stored - fresh).max(axis=1) / np.maximum(np.abs(fresh).max(axis=1), 1e-12)
        worst = int(np.argmax(relative))
        source = self._check.identity.get("source")
        logger.info(f"stored embeddings against {source} on the first {len(batch)} passages: largest difference "
                    f"{relative[worst]:.2e} of the vector's magnitude")
        if relative[worst] > MAX_STORED_DIFF:
            raise ArtifactError(
                f"the stored embeddings do not come from the context encoder {source}: passage {batch[worst].pid!r} "
                f"differs by {relative[worst]:.1%} of its magnitude (at most {MAX_STORED_DIFF:.0%} expected); pass the "
                "encoder they were made with, or build without --embeddings-column to embed every passage")


@dataclass
class BuildOptions:
    """How to build.

    Attributes:
        index_type: ``auto``, ``flat``, ``hnsw``, ``ivfpq`` or any faiss factory string.
        batch_size: Passages per encoder call.
        embeddings_dtype: ``float32`` or ``float16`` for the stored embeddings.
        store_embeddings: Keep ``embeddings.npy`` (exact doc scores); without it doc scores are faiss distances.
        shards: Split the faiss index into this many files (searched together; one per GPU on load).
        skip_bad_rows: Skip malformed rows instead of failing.
        embeddings_column: Take each passage's embedding from this column of the file (JSONL, Parquet,
            Arrow) instead of embedding it (see :class:`StoredEmbeddings`).
    """

    index_type: str = "auto"
    batch_size: int = 64
    embeddings_dtype: str = "float32"
    store_embeddings: bool = True
    shards: int = 1
    skip_bad_rows: bool = False
    embeddings_column: str | None = None


def resolve_factory(index_type: str, count: int, dim: int) -> tuple[str, dict]:
    """The faiss factory string and search parameters for an index type and corpus size.

    ``auto``: exact search (Flat) up to 200k passages, HNSW up to 5M, IVF-PQ beyond. IVF uses
    ~4*sqrt(N) lists (at least 39 training points each); PQ is 4-bit fast-scan with one byte per 8
    dimensions (8-bit PQ trains two orders of magnitude slower on CPU for similar memory).
    """
    kind = index_type.lower()
    if kind == "auto":
        kind = "flat" if count <= 200_000 else "hnsw" if count <= 5_000_000 else "ivfpq"
    if kind == "flat":
        return "Flat", {}
    if kind == "hnsw":
        return "HNSW32", {"efConstruction": 40, "efSearch": 128}
    if kind == "ivfpq":
        nlist = max(1, min(2 ** round(math.log2(max(1.0, 4 * math.sqrt(count)))), count // 39))
        m = next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)
        return f"IVF{nlist},PQ{m}x4fs", {"nprobe": min(nlist, 32)}
    return index_type, {}


def build_index(passages: str | Path, out: str | Path, encoder: Encoder | None, options: BuildOptions | None = None,
                *, force: bool = False, stop_after: int | None = None) -> IndexMeta | None:
    """Build ``out`` from a passage file (see :mod:`rag_runtime.knowledge.sources` for formats).

    Args:
        passages: JSONL, TSV, CSV, Parquet or Arrow file of id, title, text rows, or a directory of such files.
        out: Index directory to create; must not exist (or be empty) unless ``force``.
        encoder: Turns (titles, texts) into embeddings (e.g. :class:`ContextEncoder`). With
            ``options.embeddings_column`` it only checks the stored embeddings and is recorded as their
            encoder (None: nothing is checked or recorded).
        options: Index type, batch size, dtypes, shards, bad-row policy.
        force: Replace an existing ``out`` (only after the new index is complete).
        stop_after: Stop after this many embedded passages, leaving a resumable partial build (tests).

    Returns:
        The new index's metadata; None when ``stop_after`` stopped the build early.

    Raises:
        PassageError: Malformed passage file or row.
        ArtifactError: ``out`` exists, or the index cannot be built.
    """
    options = options or BuildOptions()
    out = Path(out)
    check_output_dir(out, force)
    if options.embeddings_dtype not in ("float32", "float16"):
        raise InvalidOptionError(f"embeddings dtype must be float32 or float16, got {options.embeddings_dtype!r}")
    if options.shards < 1:
        raise InvalidOptionError(f"shards must be >= 1, got {options.shards}")
    source = Path(passages)
    reader = PassageReader(source, skip_bad_rows=options.skip_bad_rows, embeddings_column=options.embeddings_column)
    with step(logger, f"checking {source}"):
        count = reader.scan()
    if reader.skipped:
        logger.warning(f"skipping {reader.skipped} malformed row(s), e.g. {reader.problems[0]}")
    if count == 0:
        raise ArtifactError(f"{source} has no usable passages")
    if options.shards > count:
        raise InvalidOptionError(f"{options.shards} shards for {count} passages: use at most {count}")
    if options.embeddings_column:
        encoder = StoredEmbeddings(reader, encoder)
    elif encoder is None:
        raise InvalidOptionError("building an index needs a context encoder to embed the passages, or "
                                 "embeddings_column naming the column that holds them")
    factory, params = resolve_factory(options.index_type, count, encoder.dim)

    partial = out.parent / f".{out.name}.partial"
    stats = [f.stat() for f, _ in reader.files]
    state = {"source": str(source.resolve()), "size": sum(st.st_size for st in stats),
             "mtime": max(st.st_mtime_ns for st in stats), "count": count,
             "encoder": encoder.identity, "options": asdict(options), "done": 0}
    done = _resume_point(partial, state)
    state["done"] = done
    if done == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    else:
        logger.info(f"resuming an interrupted build after {done:,} of {count:,} passages")

    _embed(reader, partial, encoder, options, state, stop_after)
    if state["done"] < count:
        return None  # stopped early on request: resumable
    with step(logger, f"building faiss index {factory} over {count:,} vectors"):
        shard_files, phi = _build_faiss(partial, factory, params, count, encoder.dim, options.shards)
    if not options.store_embeddings:
        (partial / C.INDEX_EMBEDDINGS_FILE).unlink()
    meta = IndexMeta(count=count, dim=encoder.dim, factory=factory, shards=shard_files,
                     embeddings=options.embeddings_dtype if options.store_embeddings else None,
                     encoder=encoder.identity, source=str(source), mips_phi=phi)
    meta.save(partial)
    (partial / STATE_FILE).unlink()
    replace_dir(partial, out)
    return meta


def _resume_point(partial: Path, state: dict) -> int:
    path = partial / STATE_FILE
    if not path.is_file():
        return 0
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return 0
    same = all(old.get(k) == state[k] for k in ("source", "size", "mtime", "count", "encoder", "options"))
    if not same:
        logger.warning(f"discarding an incomplete build in {partial}: it was for other input or options")
        return 0
    return int(old.get("done", 0))


def _save_state(partial: Path, state: dict) -> None:
    atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=2))


def _batches(reader: PassageReader, skip: int, size: int):
    batch = []
    for i, p in enumerate(reader):
        if i < skip:
            continue
        batch.append(p)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _embed(reader: PassageReader, partial: Path, encoder: Encoder, options: BuildOptions, state: dict,
           stop_after: int | None) -> None:
    count, done = state["count"], state["done"]
    if done >= count:
        return
    writer = PassageWriter(partial, count, encoder.dim, options.embeddings_dtype, resume_from=done)
    with progress_bar(logger, "embedding", count, "passages", initial=done) as progress:
        _embed_batches(reader, partial, encoder, options, state, stop_after, writer, progress)


def _embed_batches(reader: PassageReader, partial: Path, encoder: Encoder, options: BuildOptions, state: dict,
                   stop_after: int | None, writer: PassageWriter, progress) -> None:
    count = state["count"]
    last_flush = time.perf_counter()
    for batch in _batches(reader, state["done"], options.batch_size):
        titles, texts = [p.title for p in batch], [p.text for p in batch]
        vectors = encoder.take(batch) if isinstance(encoder, StoredEmbeddings) else encoder.embed(titles, texts)
        if vectors.shape != (len(batch), encoder.dim):
            raise ArtifactError(f"the context encoder returned {vectors.shape}, expected {(len(batch), encoder.dim)}")
        writer.add([p.pid for p in batch], titles, texts, vectors)
        progress.update(len(batch))
        stopping = stop_after is not None and writer.n >= stop_after
        if stopping or time.perf_counter() - last_flush > 30 or writer.n == count:
            writer.flush()
            state["done"] = writer.n
            _save_state(partial, state)
            last_flush = time.perf_counter()
        if stopping and writer.n < count:
            return
    writer.close()


def _build_faiss(partial: Path, factory: str, params: dict, count: int, dim: int, n_shards: int
                 ) -> tuple[list[str], float | None]:
    import faiss

    embeddings = np.load(partial / C.INDEX_EMBEDDINGS_FILE, mmap_mode="r")
    # Graph indexes navigate by a true metric: inner product search becomes L2 search over vectors
    # augmented with one coordinate (see IndexMeta.mips_phi).
    phi = _max_norm(embeddings) if factory.upper().startswith("HNSW") else None

    def vectors(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if phi is None:
            return x
        extra = np.sqrt(np.maximum(phi * phi - np.einsum("nd,nd->n", x, x), 0.0))
        return np.ascontiguousarray(np.hstack([x, extra[:, None].astype(np.float32)]))

    try:
        template = (faiss.index_factory(dim + 1, factory, faiss.METRIC_L2) if phi is not None
                    else faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
    except RuntimeError as e:
        raise InvalidOptionError(f"faiss cannot build index type {factory!r}: {str(e).splitlines()[0]}; use flat, hnsw, "
                         "ivfpq or a valid faiss factory string") from e
    if "efConstruction" in params:
        faiss.downcast_index(template).hnsw.efConstruction = params["efConstruction"]
    if not template.is_trained:
        rng = np.random.default_rng(0)
        n_train = min(count, max(100_000, 64 * getattr(faiss.try_extract_index_ivf(template), "nlist", 1)))
        picks = np.sort(rng.choice(count, size=n_train, replace=False))
        with step(logger, f"training on {n_train:,} vectors"):
            template.train(vectors(embeddings[picks]))
    bounds = np.linspace(0, count, n_shards + 1).astype(np.int64)
    names = [C.INDEX_FAISS_FILE] if n_shards == 1 else [f"index.{i}.faiss" for i in range(n_shards)]
    with progress_bar(logger, "indexing", count, "vectors") as progress:
        for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True):
            _add_shard(faiss, template, embeddings, vectors, lo, hi, params, partial / name, progress)
    return names, phi


def _add_shard(faiss, template, embeddings, vectors, lo: int, hi: int, params: dict, path: Path, progress) -> None:
    """Add rows ``lo:hi`` to a copy of the trained template and write it to ``path``."""
    index = faiss.clone_index(template)
    for start in range(lo, hi, 65536):
        stop = min(hi, start + 65536)
        index.add(vectors(embeddings[start:stop]))
        progress.update(stop - start)
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = params["efSearch"]
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    faiss.write_index(index, str(path))


def _max_norm(embeddings: np.ndarray) -> float:
    best = 0.0
    for start in range(0, len(embeddings), 65536):
        x = np.asarray(embeddings[start : start + 65536], dtype=np.float32)
        best = max(best, float(np.sqrt(np.einsum("nd,nd->n", x, x).max())))
    return best

