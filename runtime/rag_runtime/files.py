"""File chores shared by every writer (exporter, index builder, manifest edits): nothing is ever left
half-written, and a non-empty output is replaced only when asked."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import OutputExistsError

_T = TypeVar("_T")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse to write into ``path`` when it is a file, or a non-empty directory without ``force``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"output directory {path} is not empty; pass --force to replace it")


def replace_dir(new: Path, target: Path) -> None:
    """Move a finished directory into place, replacing ``target`` only once ``new`` is complete."""
    if target.exists():
        backup = target.with_name(f".{target.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        new.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        new.rename(target)


def unique_sibling(target: Path, create: Callable[[Path], _T]) -> tuple[Path, _T]:
    """A new, uniquely named ``.NAME.XXXXXXXX.tmp`` beside ``target``, made by ``create`` (which must fail
    with ``FileExistsError`` when the name is taken), and what ``create`` returned.

    Unlike ``tempfile``'s private (0600/0700) files, what ``create`` makes follows the umask, so a finished
    export reads like any other new file: a service running as another user can read it."""
    for _ in range(100):
        candidate = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            return candidate, create(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a part (a unique temporary
    file beside it, flushed to disk, then renamed; removed if anything fails). Its mode follows the umask."""
    tmp, fd = unique_sibling(path, lambda p: os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dir_size_text(path: Path) -> str:
    """Total size of the files under ``path``, for humans (``12.3 MiB``)."""
    total = float(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()))
    for unit in ("B", "KiB", "MiB"):
        if total < 1024:
            return f"{total:.0f} B" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return f"{total:.1f} GiB"
