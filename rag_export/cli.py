"""``rag-export MODEL OUT``: thin CLI over :func:`rag_export.export`."""

from __future__ import annotations

import argparse
import os
import sys

from rag_runtime.commands import run_command, setup_logging

from .export import DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_RTOL, export
from .hub import adopt_library_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rag-export",
        description="Export a Hugging Face RAG checkpoint (hub id or local directory) to ONNX graphs, "
        "tokenizers, a manifest and its knowledge index, for rag_runtime.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="hub id (e.g. facebook/rag-token-nq) or local checkpoint directory; a hub id "
                   "loads from the Hugging Face cache when the hub cannot be reached (HF_HUB_OFFLINE=1: without "
                   "asking it)")
    p.add_argument("output", help="artifact directory to create")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory after success")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help="validation: absolute part of each output's tolerance")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help="validation: part of the tolerance proportional to the output's largest magnitude")
    p.add_argument("--strict", action="store_true",
                   help="validation: fail on any excess over the tolerance or any changed top-k decision "
                   "(default: only decisions changed beyond near-ties, or a gross excess, fail)")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip validation")
    p.add_argument("--context-encoder", metavar="PATH_OR_ID", help="also export this DPR context encoder")
    p.add_argument("--no-index", dest="include_index", action="store_false",
                   help="do not export the checkpoint's knowledge index")
    p.add_argument("--quantize", choices=["int8"],
                   help="dynamic int8 weights for CPU (reports drift vs fp32); the question encoder stays fp32")
    p.add_argument("--quantize-retrieval", action="store_true",
                   help="with --quantize int8: quantize the question and context encoders too (retrieves "
                   "other passages than fp32 on some questions)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: half-precision graphs for GPUs, LayerNorm/softmax/logits kept in fp32 "
                   "(reports drift vs fp32)")
    p.add_argument("--optimize", action="store_true",
                   help="fuse with onnxruntime's transformer optimizer (validated like the unfused graphs)")
    p.add_argument("-v", "--verbose", action="store_true", help="log transformers' messages too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("rag-export", args.verbose)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

    def run() -> int:
        adopt_library_logging()
        export(args.model, args.output, force=args.force, opset=args.opset, validate=args.validate, atol=args.atol,
               rtol=args.rtol, strict=args.strict,
               context_encoder=args.context_encoder, include_index=args.include_index, quantize=args.quantize,
               precision=args.precision, optimize=args.optimize, quantize_retrieval=args.quantize_retrieval)
        return 0

    return run_command("rag-export", run)


if __name__ == "__main__":
    sys.exit(main())
