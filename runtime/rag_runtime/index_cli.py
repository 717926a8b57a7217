"""``rag-index``: build, attach and search knowledge indexes (no torch needed).

    rag-index build PASSAGES OUT --context-encoder EXPORT_DIR [--index-type auto|flat|hnsw|ivfpq|FACTORY]
    rag-index build WIKI_DPR_FILES OUT --embeddings-column embeddings [--context-encoder EXPORT_DIR]
    rag-index attach EXPORT_DIR INDEX_DIR [--copy]
    rag-index search INDEX_DIR "question" --export EXPORT_DIR [-k 5]

Importing a transformers knowledge base, or exporting a DPR context encoder checkpoint to build with,
needs the exporter: ``rag-export-index import ...`` and ``rag-export-index context-encoder ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from . import constants as C
from .artifact import Manifest
from .commands import run_command, setup_logging
from .errors import ArtifactError, InvalidOptionError
from .files import dir_size_text, replace_dir
from .knowledge import BuildOptions, IndexMeta
from .results import retrieval_to_dict

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag-index", description="Build, attach and search knowledge indexes.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="embed a passage file and index it with faiss",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("passages", type=Path, help="JSONL, TSV, CSV, Parquet or Arrow file with id, title, text "
                   "(or a directory of such files, read in name order)")
    b.add_argument("out", type=Path, help="index directory to create")
    b.add_argument("--context-encoder", type=Path,
                   help="rag-export directory with a context encoder (rag-export MODEL OUT --context-encoder ..., "
                        "or rag-export-index context-encoder CHECKPOINT OUT); with --embeddings-column it checks "
                        "the stored embeddings on the first batch and is recorded as their encoder")
    b.add_argument("--embeddings-column", metavar="COLUMN", default=None,
                   help="take each passage's embedding from this column instead of embedding it (a released "
                        "corpus such as wiki_dpr: column 'embeddings')")
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
    setup_logging("rag-index")
    return run_command("rag-index", lambda: {"build": _build, "attach": _attach, "search": _search}[args.command](args))


def _build(args) -> int:
    from .knowledge import ContextEncoder, build_index

    if args.batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.context_encoder is None and not args.embeddings_column:
        raise InvalidOptionError("rag-index build needs --context-encoder EXPORT_DIR to embed the passages, or "
                                 "--embeddings-column COLUMN when the file carries their embeddings")
    if args.context_encoder is not None and not (args.context_encoder / C.MANIFEST_FILE).is_file():
        raise ArtifactError(f"{args.context_encoder} is not a rag-export directory; export the DPR context encoder "
                            f"first: rag-export-index context-encoder {args.context_encoder} ENCODER_DIR (needs "
                            "pip install 'rag-export[export]')")
    options = BuildOptions(index_type=args.index_type, batch_size=args.batch_size,
                           embeddings_dtype=args.embeddings_dtype, store_embeddings=not args.no_embeddings,
                           shards=args.shards, skip_bad_rows=args.skip_bad_rows,
                           embeddings_column=args.embeddings_column)
    t0 = time.perf_counter()
    encoder = (ContextEncoder(args.context_encoder, args.device, args.threads)
               if args.context_encoder is not None else None)
    try:
        meta = build_index(args.passages, args.out, encoder, options, force=args.force)
    except KeyboardInterrupt:
        logger.warning("interrupted: run the same command again to resume")
        raise
    logger.info("wrote %s: %s passages, dim %d, %s, %s in %.1fs", args.out, f"{meta.count:,}", meta.dim,
                meta.factory, dir_size_text(args.out), time.perf_counter() - t0)
    return 0


def _attach(args) -> int:
    export, index_dir = args.export, args.index
    manifest = Manifest.load(export, verify=False)
    meta = IndexMeta.load(index_dir)
    want = manifest.question_embedding_dim
    if want is not None and want != meta.dim:
        raise InvalidOptionError(f"index {index_dir} has {meta.dim}-dimensional embeddings but the export's "
                                 f"question encoder produces {want}: build the index with the matching context encoder")
    graph = manifest.graphs.get(C.CONTEXT_ENCODER)
    if meta.encoder and graph and meta.encoder.get("sha256") != graph.sha256 and not args.force:
        raise InvalidOptionError(f"index {index_dir} was embedded with context encoder {meta.encoder.get('source')}, "
                                 f"not this export's ({manifest.context_encoder_source}): rebuild it with the "
                                 "export's context encoder, or pass --force if they are the same model")
    if meta.encoder is None:
        logger.warning("the index does not record its context encoder (imported): make sure it pairs with the "
                       "export's question encoder")
    if manifest.index and not args.force:
        raise InvalidOptionError(f"{export} already has an index ({manifest.index.dir}); pass --force to replace it")
    if args.copy:
        staging = export / f".{C.INDEX_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(index_dir, staging)
        replace_dir(staging, export / C.INDEX_DIR)
        directory = C.INDEX_DIR
    else:
        resolved = index_dir.resolve()
        try:
            directory = str(resolved.relative_to(export.resolve()))
        except ValueError:
            directory = str(resolved)
    manifest.index = meta.manifest_entry(directory)
    manifest.save(export)
    logger.info("%s now retrieves from %s (%s passages, %s)", export, directory, f"{meta.count:,}", meta.factory)
    return 0


def _search(args) -> int:
    from .knowledge import KnowledgeIndex
    from .question_encoder import QuestionEncoder
    from .retrieval import Retriever

    if args.k < 1:
        raise InvalidOptionError(f"-k must be >= 1, got {args.k}")
    manifest = Manifest.load(args.export, verify=False)
    index = KnowledgeIndex(args.index, nprobe=args.nprobe, ef_search=args.ef_search)
    want = manifest.question_embedding_dim
    if want is not None and want != index.dim:
        raise InvalidOptionError(f"index {args.index} has {index.dim}-dimensional embeddings but the export's "
                                 f"question encoder produces {want}")
    encoder, retriever = QuestionEncoder.load(args.export, manifest), Retriever(index, args.export)
    t0 = time.perf_counter()
    _, emb = encoder.encode(args.question)
    doc_ids, scores = retriever.search(emb, args.k)
    ms = 1000 * (time.perf_counter() - t0)
    for question, ids, row in zip(args.question, doc_ids, scores, strict=True):
        docs = retriever.documents(ids, row)
        if args.json:
            print(json.dumps(retrieval_to_dict(question, docs), ensure_ascii=False))
            continue
        print(f"Q: {question}")
        for rank, d in enumerate(docs, 1):
            text = d.text if len(d.text) <= 100 else d.text[:100] + "..."
            print(f"  {rank}. [{d.id}{'' if d.pid is None else ' / ' + d.pid}] {d.title} ({d.score:.3f}): {text}")
    if not args.json:
        logger.info("%d question(s) in %.1f ms (%s, faiss on %s)", len(args.question), ms, index.meta.factory,
                    index.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
