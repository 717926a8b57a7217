"""Read and verify an export directory (``manifest.json`` plus the files it lists)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from . import constants as C
from .errors import ArtifactError


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def load_manifest(export_dir: str | Path, verify: bool = True) -> dict:
    """Load ``manifest.json``; with ``verify``, check every listed file exists and matches its sha256."""
    root = Path(export_dir)
    path = root / C.MANIFEST_FILE
    if not root.is_dir():
        raise ArtifactError(f"export directory {root} does not exist")
    if not path.is_file():
        raise ArtifactError(f"{root} has no {C.MANIFEST_FILE}: not a rag-export output (run rag-export first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is corrupted: {e}") from e
    version = manifest.get("format_version")
    if version != C.FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {version}; this runtime reads {C.FORMAT_VERSION} "
                            "(re-export with the matching rag-export)")
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            f = root / rel
            if not f.is_file():
                raise ArtifactError(f"{f} is missing (listed in the manifest); re-export or restore it")
            if sha256_file(f) != digest:
                raise ArtifactError(f"{f} does not match its sha256 in the manifest: corrupted or replaced; "
                                    "re-export it")
    return manifest
