"""``rag-generate OUT "question" ...``: answer questions from an export, with their sources."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .commands import run_command, setup_logging
from .errors import InvalidOptionError
from .options import BOOLEAN, EARLY_STOPPING, INTEGER, NUMBER, OPTIONS, TOKEN_ID, TOKEN_IDS, TOKEN_SEQUENCES


def _bool_or_never(value: str):
    v = value.lower()
    if v == "never":
        return "never"
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")


def _token_sequences(value: str):
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not TOKEN_SEQUENCES.fits(parsed):
        raise argparse.ArgumentTypeError(f"expected a JSON list of lists of token ids such as [[5, 6], [9]], got "
                                         f"{value!r}")
    return parsed


# How each option type reads from the command line (the schema itself is in rag_runtime.options).
_FLAG_TYPES = {INTEGER: dict(type=int, metavar="N"), TOKEN_ID: dict(type=int, metavar="ID"),
               NUMBER: dict(type=float, metavar="X"), EARLY_STOPPING: dict(type=_bool_or_never, metavar="WHEN"),
               BOOLEAN: dict(action=argparse.BooleanOptionalAction),
               TOKEN_IDS: dict(type=int, nargs="+", metavar="ID"),
               TOKEN_SEQUENCES: dict(type=_token_sequences, metavar="JSON")}
# Spellings kept from before the schema.
_ALIASES = {"do_deduplication": ["--deduplication"]}


def add_generation_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """One flag per generation option (``--num-beams``, ``--do-sample/--no-do-sample``, ...); a flag left
    out leaves the export's default."""
    g = parser.add_argument_group("generation (default: the export's own settings)")
    for name, opt in OPTIONS.items():
        g.add_argument(f"--{name.replace('_', '-')}", *_ALIASES.get(name, []), dest=name, help=opt.help,
                       default=argparse.SUPPRESS, **_FLAG_TYPES[opt.type])
    return g


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
    add_generation_flags(p)
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
