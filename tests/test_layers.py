"""Layers point one way: the runtime never imports the exporter (or torch, transformers, datasets), and no
product package imports the test and benchmark support code. The exporter's commands start without
torch and name the extra to install."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

RUNTIME = ROOT / "runtime" / "rag_runtime"
EXPORTER = ROOT / "rag_export"
SUPPORT = {"benchmarks", "tests", "conftest", "support", "rag_testing"}


def _imports(package: Path) -> dict[str, set[str]]:
    """Top-level module names each file of ``package`` imports (relative imports excluded)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_runtime_imports_neither_the_exporter_nor_torch():
    forbidden = {"rag_export", "torch", "transformers", "datasets"} | SUPPORT
    offenders = {f: sorted(names & forbidden) for f, names in _imports(RUNTIME).items() if names & forbidden}
    assert not offenders, f"rag_runtime must stay torch-free and below the exporter: {offenders}"


def test_the_exporter_does_not_import_support_code():
    offenders = {f: sorted(names & SUPPORT) for f, names in _imports(EXPORTER).items() if names & SUPPORT}
    assert not offenders, f"tests/benchmarks support code is not product code: {offenders}"
    assert _imports(EXPORTER), "the scan must see the exporter's files"


def _blocked(code: str, *blocked: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` fails, as when not installed."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError("No module named " + repr(name))
        sys.meta_path.insert(0, Block())
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("command", ["rag_export.cli", "rag_export.index_cli"])
def test_exporter_help_works_on_a_runtime_only_install(command):
    proc = _blocked(f"""
        from {command} import main
        try:
            main(["--help"])
        except SystemExit as e:
            sys.exit(e.code)
    """, "torch", "transformers", "datasets", "onnx")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_exporter_without_its_extra_names_the_install_command(tmp_path):
    proc = _blocked(f"""
        from rag_export.cli import main
        sys.exit(main(["some/checkpoint", {str(tmp_path / "out")!r}]))
    """, "torch", "transformers", "datasets", "onnx")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["rag-export: error: rag-export needs torch, which is not installed: "
                     "pip install 'rag-export[export]'"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_runtime_without_onnxruntime_names_the_install_command(bundles):
    proc = _blocked(f"""
        from rag_runtime.cli import main
        sys.exit(main([{str(bundles[("token", "bart")].export)!r}, "who wrote hamlet?"]))
    """, "onnxruntime", "torch")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'rag-export[cpu]'" in err[0] and err[0].startswith("rag-generate: error:")
