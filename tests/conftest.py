"""Shared fixtures: tiny RAG checkpoints built offline once per session, their exports and references.

Set RAG_EXPORT_TEST_CACHE=DIR to keep the checkpoints and exports between runs (they are rebuilt when
the directory lacks them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rag_testing.corpus import load_questions

ROOT = Path(__file__).resolve().parents[1]
COMBOS = [("token", "bart"), ("token", "t5"), ("sequence", "bart"), ("sequence", "t5")]


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    cache = os.environ.get("RAG_EXPORT_TEST_CACHE")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        return Path(cache)
    return tmp_path_factory.mktemp("rag")


def build_checkpoint(work_dir: Path, kind: str, generator: str) -> Path:
    path = work_dir / f"ckpt-{kind}-{generator}"
    if not (path / "config.json").exists():
        from rag_testing.factory import make_checkpoint

        make_checkpoint(path, kind, generator)
    return path


def build_export(work_dir: Path, kind: str, generator: str) -> Path:
    from rag_export import export

    out = work_dir / f"export-{kind}-{generator}"
    if not (out / "manifest.json").exists():
        ckpt = build_checkpoint(work_dir, kind, generator)
        export(str(ckpt), out, force=True, context_encoder=str(ckpt / "context_encoder"))
    return out


class Bundle:
    """A tiny checkpoint, its export, the transformers reference and the runtime pipeline."""

    def __init__(self, work_dir: Path, kind: str, generator: str):
        self.kind, self.generator = kind, generator
        self.checkpoint = build_checkpoint(work_dir, kind, generator)
        self.export = build_export(work_dir, kind, generator)
        self._reference = self._pipeline = None

    @property
    def reference(self):
        if self._reference is None:
            from rag_testing.reference import Reference

            self._reference = Reference(str(self.checkpoint))
        return self._reference

    @property
    def pipeline(self):
        if self._pipeline is None:
            from rag_runtime import RagPipeline

            self._pipeline = RagPipeline.load(self.export)
        return self._pipeline


@pytest.fixture(scope="session")
def bundles(work_dir) -> dict[tuple[str, str], Bundle]:
    return {combo: Bundle(work_dir, *combo) for combo in COMBOS}


@pytest.fixture(scope="session")
def questions() -> list[str]:
    return load_questions()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need onnxruntime's CUDA provider: without it they are skipped, and -ra reports
    each one with the way to run it."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return
    skip = pytest.mark.skip(reason="needs onnxruntime-gpu and a GPU: run on an accelerator machine "
                                   "(README, 'Devices, IOBinding and fp16')")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
