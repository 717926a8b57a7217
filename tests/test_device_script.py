"""The device run rehearsed on the CPU, end to end: the wheel hand-off survives a retried call, the parts are
checked against the sha256 given on the command line, and `measure --rehearse` goes through every stage the
device runs (ldd gate, provider gate, tiny parity, the large workload's stand-in) and writes its results.

The calls are the ones scripts/device_wheels.sh prints for the device session, with ``--rehearse`` added."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def _wheel(tmp_path: Path) -> Path:
    """A small pure-Python wheel standing in for onnxruntime-gpu (pip installs it offline like the real one)."""
    files = {"rehearsal_pkg/__init__.py": b"VALUE = 1\n",
             "rehearsal_pkg/payload.bin": os.urandom(200_000),
             "rehearsal_pkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: rehearsal-pkg\nVersion: 0.1\n",
             "rehearsal_pkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  b"Tag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for name, data in files.items()]
    files["rehearsal_pkg-0.1.dist-info/RECORD"] = ("\n".join([*record, "rehearsal_pkg-0.1.dist-info/RECORD,,"])
                                                   + "\n").encode()
    path = tmp_path / "rehearsal_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "RAG_DEVICE_PARTS": str(tmp_path / "parts"), "RAG_DEVICE_DIR": str(tmp_path / "device"),
            "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "LARGE_WORKLOAD": "tiny",
            "MEASURE_BUDGET_S": "700"}


def _calls(tmp_path: Path, env: dict) -> tuple[list[dict], str]:
    proc = subprocess.run(["bash", "scripts/device_wheels.sh", str(_wheel(tmp_path))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = [{"carry": json.loads(m[0]), "timeout_s": int(m[1]), "command": m[2]}
             for m in re.findall(r'^run\(carry=(\[.*?\]), timeout_s=(\d+), command="(.*)"\)$', proc.stdout, re.M)]
    rerun = re.search(r'run\(timeout_s=\d+, command="(.*)"\)', proc.stdout)[1]
    return calls, rerun


def _bash(command: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    command = re.sub(r"(device_bench\.sh (?:prepare|measure \w+))", r"\1 --rehearse", command)
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_parts_survive_a_retry_and_damage_is_caught(tmp_path):
    env = _env(tmp_path)
    calls, _ = _calls(tmp_path, env)
    assert len(calls) == 4 and all(len(c["carry"]) == 1 for c in calls)
    part = calls[1]["command"].split(" && ")[0]
    for _ in range(2):  # a retried call copies again: the part is there once, unchanged
        assert _bash(part, env, 60).returncode == 0
    copied = sorted((tmp_path / "device" / "parts").glob("*.part-*"))
    source = ROOT / calls[1]["carry"][0]
    assert len(copied) == 1 and copied[0].read_bytes() == source.read_bytes()
    damaged = _bash(part.rsplit(" ", 1)[0] + " " + "0" * 64, env, 60)
    assert damaged.returncode == 2 and "arrived damaged" in damaged.stderr
    incomplete = _bash("bash scripts/device_bench.sh measure " + "0" * 64, env, 60)
    assert incomplete.returncode == 2 and re.search(r"part \d of 4 missing", incomplete.stdout + incomplete.stderr)


def test_device_run_rehearsed_on_the_cpu(tmp_path):
    env = _env(tmp_path)
    calls, rerun = _calls(tmp_path, env)
    for call in calls[:-1]:
        proc = _bash(call["command"], env, 120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    sha = re.search(r"measure (\w{64})", calls[-1]["command"])[1]
    wrong = _bash(calls[-1]["command"].replace(sha, "f" * 64), env, 120)
    assert wrong.returncode == 2 and "does not match sha256" in wrong.stdout + wrong.stderr
    proc = _bash(calls[-1]["command"], env, 900)  # on 2 shared cores; the device call's own limit is 400 s
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = tmp_path / "out"
    site = tmp_path / "device" / "site"
    assert (site / "rehearsal_pkg" / "payload.bin").exists()
    assert not list(site.rglob("__pycache__"))  # installed with --no-compile
    gate = json.loads((out / "gate.json").read_text())
    assert gate["runs"]["cpu"]["providers"][0] == "CPUExecutionProvider"
    tiny = json.loads((out / "device-tiny-check.json").read_text())
    for run in tiny["runs"]:
        same = run["agreement"]["runtime-cpu-fp32 vs transformers-cpu-fp32-eager"]
        assert same["identical"] == same["compared"] > 0
        assert "runtime-cpu-fp16 vs transformers-cpu-fp16-eager" in run["agreement"]
    large = json.loads((out / "device-tiny-cpu.json").read_text())
    assert [r["batch"] for r in large["runs"]] == [1, 8] and all(r["calls"] >= 1 for r in large["runs"])
    assert {"device-run.log", "prepare.log", "device-tiny-check.md", "device-tiny-cpu.md"} <= {
        p.name for p in out.iterdir()}
    assert len(list(out.iterdir())) <= 8  # what one device call can bring back
    # The rerun: no part, no reinstall, no rebuild, the gates and the large workload again.
    assert f"measure {sha} large" in rerun
    again = _bash(rerun, env, 600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "installed rehearsal_pkg" not in again.stdout and "tiny check exit" not in again.stdout
    assert json.loads((out / "device-tiny-cpu.json").read_text())["runs"][-1]["batch"] == 8
