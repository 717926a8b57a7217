"""The demo: its checkpoint is built, made to answer and cached (scripts/train_demo.py), and the demo run
retrieves the answering article first and answers like transformers. The real training (1000 steps, a
few minutes) is the demo's first run; here a short one, which the retrieval does not depend on."""

from __future__ import annotations

import importlib.util
import re

from conftest import ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_checkpoint_is_trained_once_and_retrieves_the_answering_article(tmp_path, capsys):
    from rag_export import export

    train_demo, demo = _script("train_demo"), _script("demo")
    ckpt = tmp_path / "checkpoint"
    record = train_demo.train(ckpt, steps=40, minutes=2)
    generator = record["generator"]
    assert generator["steps"] == 40 and generator["final_loss"] < generator["first_loss"] - 0.5, generator
    weights = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert train_demo.train(ckpt, steps=40, minutes=2) == record  # cached: nothing rebuilt or retrained
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == weights

    out = export(str(ckpt), tmp_path / "export", context_encoder=str(ckpt / "context_encoder"))
    assert demo.main(str(ckpt), str(out)) == 0  # token-identical to transformers, same passages
    printed = capsys.readouterr().out
    first = re.search(r"the answering article comes first for (\d+)/(\d+) questions", printed)
    assert first is not None, printed
    assert int(first.group(1)) >= int(first.group(2)) - 1, printed
