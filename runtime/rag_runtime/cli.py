"""``rag-generate OUT "question" ...``: answer questions from an export, with their sources."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .commands import run_command, setup_logging
from .errors import InvalidOptionError


def _bool_or_never(value: str):
    v = value.lower()
    if v == "never":
        return "never"
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")


# --passages gives every question all the passages of the file: beyond this many, build an index instead.
MAX_GIVEN_PASSAGES = 100


def _read_passages(path: Path | None) -> list[dict] | None:
    """The passages of ``--passages FILE`` (checked like an index build's input), or None without one."""
    if path is None:
        return None
    from .knowledge import PassageReader

    reader = PassageReader(path)
    count = reader.scan()
    if count == 0:
        raise InvalidOptionError(f"--passages {path} has no passages")
    if count > MAX_GIVEN_PASSAGES:
        raise InvalidOptionError(f"--passages {path} has {count} passages and every question gets all of them: give "
                                 f"at most {MAX_GIVEN_PASSAGES}, or build a knowledge index from it (rag-index build)")
    return [{"id": p.pid, "title": p.title, "text": p.text} for p in reader]


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
    p.add_argument("--passages", metavar="FILE", type=Path, default=None,
                   help="answer from these passages instead of the knowledge index (JSONL, TSV, CSV or Parquet rows "
                   f"with title, text and optionally id; at most {MAX_GIVEN_PASSAGES}): every question gets all of "
                   "them, weighted equally; works on an export without an index")
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
    passages = _read_passages(args.pop("passages"))
    from .pipeline import RagPipeline

    pipe = RagPipeline.load(export, device=device, **search)
    results = (pipe.generate(questions, **args) if passages is None
               else pipe.generate_from_passages(questions, [passages] * len(questions), **args))
    for r in results:
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
