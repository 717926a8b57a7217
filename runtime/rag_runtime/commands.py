"""What every command line tool shares: logging to stderr, and one way to end on an error.

A :class:`RagError` (bad input, missing or corrupted artifact, missing extra) becomes one line and exit
code 2; Ctrl-C becomes exit code 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import RagError

_PACKAGES = ("rag_runtime", "rag_export")


class _CommandHandler(logging.StreamHandler):
    """The stderr handler a command installs (replaced, not duplicated, when a command runs again in the
    same process). It writes to whatever ``sys.stderr`` is when a record comes, so a caller that swaps
    stderr (a test harness, a notebook) still gets the lines."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(prog: str, verbose: bool = False, progress: bool = True) -> None:
    """Send log records to stderr as ``prog: message``: the packages' progress (INFO) when ``progress``,
    else their warnings only; other libraries' warnings; ``verbose`` adds everyone's INFO and our DEBUG."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CommandHandler)]:
        root.removeHandler(old)
    handler = _CommandHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in _PACKAGES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO if progress else logging.WARNING)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body (which returns its exit code) and map user-facing failures to a one-line
    message and an exit code."""
    try:
        return body()
    except RagError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
