"""``rag-generate OUT "question" ...``: answer questions from an export, with their sources."""

from __future__ import annotations

import argparse
import json
import sys

from .commands import run_command, setup_logging


def _bool_or_never(value: str):
    v = value.lower()
    if v == "never":
        return "never"
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag-generate", description="Answer questions from a rag-export directory.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("export", help="directory written by rag-export")
    p.add_argument("questions", nargs="+", help="one or more questions")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object per question")
    p.add_argument("--show-docs", type=int, default=3, help="passages to print per question (text mode)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (IVF knowledge indexes)")
    p.add_argument("--ef-search", type=int, default=None, help="candidate list size (HNSW knowledge indexes)")
    g = p.add_argument_group("generation (default: the checkpoint's own settings)")
    for name, typ in (("num_beams", int), ("max_length", int), ("min_length", int), ("n_docs", int),
                      ("num_return_sequences", int), ("no_repeat_ngram_size", int), ("length_penalty", float),
                      ("repetition_penalty", float), ("forced_bos_token_id", int), ("forced_eos_token_id", int)):
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=argparse.SUPPRESS)
    g.add_argument("--early-stopping", dest="early_stopping", type=_bool_or_never, default=argparse.SUPPRESS)
    g.add_argument("--no-deduplication", dest="do_deduplication", action="store_false", default=argparse.SUPPRESS)
    g.add_argument("--fast-decoding", dest="fast_decoding", action="store_true", default=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    setup_logging("rag-generate", progress=False)
    return run_command("rag-generate", lambda: _generate(args))


def _generate(args: dict) -> int:
    export, questions, device = args.pop("export"), args.pop("questions"), args.pop("device")
    as_json, show_docs = args.pop("json"), args.pop("show_docs")
    search = {"nprobe": args.pop("nprobe"), "ef_search": args.pop("ef_search")}
    from .pipeline import RagPipeline

    pipe = RagPipeline.load(export, device=device, **search)
    for r in pipe.generate(questions, **args):
        if as_json:
            print(json.dumps(r.to_dict(), ensure_ascii=False))
            continue
        print(f"Q: {r.question}")
        for i, a in enumerate(r.answers, 1):
            print(f"  A{i}: {a.text!r}  (score {a.score:.3f})")
        for d in r.docs[:show_docs]:
            print(f"    [{d.id}] {d.title} ({d.score:.2f}): {d.text[:90]}{'...' if len(d.text) > 90 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
