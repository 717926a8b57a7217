"""``rag-index``: build, import, attach and search knowledge indexes.

    rag-index build PASSAGES OUT --context-encoder EXPORT_DIR_OR_MODEL [--index-type auto|flat|hnsw|ivfpq|FACTORY]
    rag-index import DATASET_DIR FAISS_FILE OUT
    rag-index attach EXPORT_DIR INDEX_DIR [--copy]
    rag-index search INDEX_DIR "question" --export EXPORT_DIR [-k 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import constants as C
from .artifacts import load_manifest, replace_dir
from .errors import ArtifactError
from .knowledge import BuildOptions, IndexMeta, PassageError


class UsageError(Exception):
    """A problem with the command line's inputs, reported in one line."""


def _say(msg: str) -> None:
    print(f"rag-index: {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag-index", description="Build, import, attach and search knowledge indexes.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="embed a passage file and index it with faiss",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("passages", type=Path, help="JSONL, TSV, CSV or Parquet file with id, title, text")
    b.add_argument("out", type=Path, help="index directory to create")
    b.add_argument("--context-encoder", required=True,
                   help="rag-export directory with a context encoder, or a DPR context encoder checkpoint / hub id "
                        "(exported on the fly; needs the export extra)")
    b.add_argument("--index-type", default="auto",
                   help="auto, flat (exact), hnsw, ivfpq, or any faiss factory string")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--embeddings-dtype", choices=["float32", "float16"], default="float32")
    b.add_argument("--no-embeddings", action="store_true",
                   help="do not keep embeddings.npy; doc scores then come from faiss distances")
    b.add_argument("--shards", type=int, default=1, help="split the faiss index into this many files")
    b.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows (counted) instead of failing")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the context encoder runs")
    b.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    b.add_argument("--force", action="store_true", help="replace a non-empty OUT once the new index is built")

    i = sub.add_parser("import", help="import a transformers RagRetriever knowledge base (datasets + .faiss)")
    i.add_argument("dataset", type=Path, help="directory written by datasets' save_to_disk (title, text, embeddings)")
    i.add_argument("faiss_index", type=Path, help="the knowledge base's .faiss file")
    i.add_argument("out", type=Path, help="index directory to create")
    i.add_argument("--embeddings-dtype", choices=["float32", "float16"], default="float32")
    i.add_argument("--force", action="store_true", help="replace a non-empty OUT")

    a = sub.add_parser("attach", help="make an export retrieve from an index")
    a.add_argument("export", type=Path, help="directory written by rag-export")
    a.add_argument("index", type=Path, help="index directory")
    a.add_argument("--copy", action="store_true", help="copy the index into the export (self-contained)")
    a.add_argument("--force", action="store_true",
                   help="replace an attached index, and attach despite a context encoder mismatch")

    s = sub.add_parser("search", help="retrieve passages for a question")
    s.add_argument("index", type=Path, help="index directory")
    s.add_argument("question", nargs="+", help="one or more questions")
    s.add_argument("--export", type=Path, required=True, help="export whose question encoder embeds the question")
    s.add_argument("-k", type=int, default=5, help="passages per question")
    s.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit")
    s.add_argument("--ef-search", type=int, default=None, help="HNSW candidate list size")
    s.add_argument("--json", action="store_true", help="one JSON object per question")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"build": _build, "import": _import, "attach": _attach, "search": _search}[args.command](args)
    except (ArtifactError, PassageError, UsageError, ValueError) as e:
        print(f"rag-index: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rag-index: interrupted", file=sys.stderr)
        return 130


def _build(args) -> int:
    from .knowledge import build_index

    options = BuildOptions(index_type=args.index_type, batch_size=args.batch_size,
                           embeddings_dtype=args.embeddings_dtype, store_embeddings=not args.no_embeddings,
                           shards=args.shards, skip_bad_rows=args.skip_bad_rows)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rag-index-encoder-") as tmp:
        encoder = _context_encoder(args.context_encoder, Path(tmp) / "encoder", args.device, args.threads)
        try:
            meta = build_index(args.passages, args.out, encoder, options, force=args.force)
        except KeyboardInterrupt:
            _say("interrupted: run the same command again to resume")
            raise
    _say(f"wrote {args.out}: {meta.count:,} passages, dim {meta.dim}, {meta.factory}, "
         f"{_size(args.out)} in {time.perf_counter() - t0:.1f}s")
    return 0


def _context_encoder(spec: str, scratch: Path, device: str, threads: int | None):
    from .knowledge import ContextEncoder

    path = Path(spec)
    if (path / C.MANIFEST_FILE).is_file():
        return ContextEncoder(path, device, threads)
    try:
        from rag_export.errors import ExportError
        from rag_export.export import export_context_encoder
    except ImportError as e:
        raise UsageError(f"{spec} is not a rag-export directory; exporting a context encoder checkpoint needs the "
                         "export extra (pip install 'rag-export[export]'), or pass an export made with "
                         "`rag-export MODEL OUT --context-encoder ...`") from e
    try:
        export_context_encoder(spec, scratch)
    except ExportError as e:
        raise UsageError(str(e)) from e
    encoder = ContextEncoder(scratch, device, threads)
    encoder.identity["source"] = spec
    return encoder


def _import(args) -> int:
    try:
        from rag_export.errors import ExportError
        from rag_export.knowledge import import_knowledge_base
    except ImportError as e:
        raise UsageError("rag-index import reads datasets' format: pip install 'rag-export[export]'") from e
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UsageError(f"output {out} exists and is not empty; pass --force to replace it")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _say(f"importing {args.dataset} ...")
    try:
        meta = import_knowledge_base(args.dataset, args.faiss_index, tmp, embeddings_dtype=args.embeddings_dtype)
    except ExportError as e:
        raise UsageError(str(e)) from e
    finally:
        if not (tmp / C.INDEX_META_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
    replace_dir(tmp, out)
    _say(f"wrote {out}: {meta.count:,} passages, dim {meta.dim}, {meta.factory}, {_size(out)}")
    return 0


def _attach(args) -> int:
    export, index_dir = args.export, args.index
    manifest = load_manifest(export, verify=False)
    meta = IndexMeta.load(index_dir)
    want = manifest.get("question_embedding_dim")
    if want is not None and want != meta.dim:
        raise UsageError(f"index {index_dir} has {meta.dim}-dimensional embeddings but the export's question "
                         f"encoder produces {want}: build the index with the matching context encoder")
    graph = manifest["graphs"].get("context_encoder")
    if meta.encoder and graph and meta.encoder.get("sha256") != graph["sha256"] and not args.force:
        raise UsageError(f"index {index_dir} was embedded with context encoder {meta.encoder.get('source')}, not "
                         f"this export's ({manifest.get('context_encoder_source')}): rebuild it with the export's "
                         "context encoder, or pass --force if they are the same model")
    if meta.encoder is None:
        _say("the index does not record its context encoder (imported): make sure it pairs with the export's "
             "question encoder")
    old = manifest.get("index")
    if old and not args.force:
        raise UsageError(f"{export} already has an index ({old['dir']}); pass --force to replace it")
    if args.copy:
        target = export / C.INDEX_DIR
        staging = export / f".{C.INDEX_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(index_dir, staging)
        replace_dir(staging, target)
        directory = C.INDEX_DIR
    else:
        resolved = index_dir.resolve()
        try:
            directory = str(resolved.relative_to(export.resolve()))
        except ValueError:
            directory = str(resolved)
    manifest["index"] = meta.manifest_entry(directory)
    tmp = export / (C.MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, export / C.MANIFEST_FILE)
    _say(f"{export} now retrieves from {directory} ({meta.count:,} passages, {meta.factory})")
    return 0


def _search(args) -> int:
    from .knowledge import KnowledgeIndex
    from .pipeline import RagPipeline

    if args.k < 1:
        raise UsageError(f"-k must be >= 1, got {args.k}")
    pipe = RagPipeline.load(args.export, verify=False)
    index = KnowledgeIndex(args.index, nprobe=args.nprobe, ef_search=args.ef_search)
    want = pipe.manifest.get("question_embedding_dim")
    if want is not None and want != index.dim:
        raise UsageError(f"index {args.index} has {index.dim}-dimensional embeddings but the export's question "
                         f"encoder produces {want}")
    pipe.index = index
    t0 = time.perf_counter()
    results = pipe.retrieve(args.question, n_docs=args.k)
    ms = 1000 * (time.perf_counter() - t0)
    for question, docs in zip(args.question, results, strict=True):
        if args.json:
            print(json.dumps({"question": question, "docs": [
                {"id": d.id, "pid": d.pid, "score": d.score, "title": d.title, "text": d.text} for d in docs]},
                ensure_ascii=False))
            continue
        print(f"Q: {question}")
        for rank, d in enumerate(docs, 1):
            text = d.text if len(d.text) <= 100 else d.text[:100] + "..."
            print(f"  {rank}. [{d.id}{'' if d.pid is None else ' / ' + d.pid}] {d.title} ({d.score:.3f}): {text}")
    if not args.json:
        _say(f"{len(args.question)} question(s) in {ms:.1f} ms ({index.meta.factory}, faiss on {index.device})")
    return 0


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    for unit in ("B", "KiB", "MiB", "GiB"):
        if total < 1024 or unit == "GiB":
            return f"{total:.1f} {unit}" if unit != "B" else f"{total} B"
        total /= 1024
    return ""


if __name__ == "__main__":
    sys.exit(main())
