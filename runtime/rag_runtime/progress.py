"""The one way long work reports itself: log lines for steps, a tqdm bar for counted work.

Library code logs (``logging``); the commands decide what reaches the terminal (:mod:`rag_runtime.commands`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def step(logger: logging.Logger, message: str) -> Iterator[None]:
    """Log ``message ...`` now and ``message: done in Ns`` when the block ends without an error."""
    logger.info("%s ...", message)
    t0 = time.perf_counter()
    yield
    logger.info("%s: done in %.1fs", message, time.perf_counter() - t0)


def progress_bar(logger: logging.Logger, desc: str, total: int, unit: str, initial: int = 0) -> tqdm:
    """A progress bar on stderr, shown when ``logger`` reports INFO: redrawn in place on a terminal, a
    line every 10 s in a log file. Close it (or use it as a context manager) when the work ends."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}", unit_scale=False, file=sys.stderr,
                disable=not logger.isEnabledFor(logging.INFO), mininterval=0.2 if tty else 10.0,
                dynamic_ncols=tty, ascii=not tty, leave=True)
