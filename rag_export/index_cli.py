"""``rag-export-index``: the knowledge-index chores that need the exporter (torch, transformers, datasets).

    rag-export-index context-encoder DPR_CHECKPOINT OUT     # then: rag-index build PASSAGES KB --context-encoder OUT
    rag-export-index import DATASET_DIR FAISS_FILE OUT      # a transformers custom knowledge base
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rag_runtime.commands import run_command, setup_logging
from rag_runtime.files import check_output_dir, dir_size_text

from .export import DEFAULT_ATOL, DEFAULT_RTOL, staging_dir

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag-export-index",
                                description="Export a DPR context encoder for rag-index build, or import a "
                                "transformers knowledge base as a knowledge index.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("context-encoder", help="export a DPR context encoder checkpoint (hub id or directory)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("checkpoint", help="DPR context encoder: hub id or local directory")
    c.add_argument("out", type=Path, help="directory to create (pass it to rag-index build --context-encoder)")
    c.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="validation: absolute part of the tolerance")
    c.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="validation: part relative to the magnitude")
    c.add_argument("--force", action="store_true", help="replace a non-empty OUT after success")

    i = sub.add_parser("import", help="import a transformers RagRetriever knowledge base (datasets + .faiss)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    i.add_argument("dataset", type=Path, help="directory written by datasets' save_to_disk (title, text, embeddings)")
    i.add_argument("faiss_index", type=Path, help="the knowledge base's .faiss file")
    i.add_argument("out", type=Path, help="index directory to create")
    i.add_argument("--embeddings-dtype", choices=["float32", "float16"], default="float32")
    i.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("rag-export-index")
    return run_command("rag-export-index", lambda: {"context-encoder": _context_encoder, "import": _import}
                       [args.command](args))


def _context_encoder(args) -> int:
    from .export import export_context_encoder
    from .hub import adopt_library_logging

    adopt_library_logging()

    export_context_encoder(args.checkpoint, args.out, force=args.force, atol=args.atol, rtol=args.rtol)
    return 0


def _import(args) -> int:
    from rag_runtime.errors import require

    require("datasets", "export", "rag-export-index import")
    from .knowledge import import_knowledge_base

    check_output_dir(args.out, args.force)
    logger.info("importing %s ...", args.dataset)
    with staging_dir(args.out) as tmp:
        meta = import_knowledge_base(args.dataset, args.faiss_index, tmp, embeddings_dtype=args.embeddings_dtype)
    logger.info("wrote %s: %s passages, dim %d, %s, %s", args.out, f"{meta.count:,}", meta.dim, meta.factory,
                dir_size_text(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
