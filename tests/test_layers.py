"""Layers point one way: the runtime never imports the exporter (or torch, transformers, datasets), no
product package imports the test and benchmark support code, and no module of either package imports
itself through others (no import cycles). The exporter's commands start without torch and name the extra
to install."""

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


def _modules(packages: list[Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` (a package is its ``__init__.py``)."""
    found = {}
    for package in packages:
        for path in sorted(package.rglob("*.py")):
            parts = path.relative_to(package.parent).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(packages: list[Path]) -> dict[str, set[str]]:
    """Which modules of ``packages`` each module of them imports.

    The rule: every ``import`` statement counts, at module level or inside a function, class or ``if``
    (an import deferred to a call still runs while both modules exist). ``from pkg import name`` imports
    ``pkg.name`` when that is a module, else ``pkg``; relative imports resolve against the file's package.
    Importing ``a.b`` does not count as importing its parent package ``a`` (Python runs ``a/__init__.py``
    first, but a package that imports its own submodules is not a cycle). Imports by computed name
    (``importlib.import_module``) are not seen.
    """
    modules = _modules(packages)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        edges.add(f"{base}.{alias.name}")
                    elif base in modules:
                        edges.add(base)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None when there is none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_in_the_exporter_or_the_runtime():
    graph = import_graph([EXPORTER, RUNTIME])
    assert "rag_export.build" in graph["rag_export.export"], "the scan must see function-level imports"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from pkg import a\n")
    assert find_cycle(import_graph([package])) == ["pkg.a", "pkg.sub.b", "pkg.a"]


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
