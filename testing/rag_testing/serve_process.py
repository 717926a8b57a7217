"""A real ``rag-serve`` process on a free 127.0.0.1 port: the service tests and the load benchmark use it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m rag_runtime.serve.cli EXPORT --port P --threads 1 ARGS...``, its log in a file.

    ``startup`` holds the ``/health/ready`` statuses seen while waiting (None: not listening yet).
    """

    def __init__(self, export: Path, *args: str, env: dict | None = None, threads: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Outlives this call (the process writes to it until close()), hence no context manager.
        self._log = tempfile.NamedTemporaryFile("w+", prefix="rag-serve-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "-m", "rag_runtime.serve.cli", str(export), "--port", str(self.port),
               "--threads", str(threads), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.startup: list[int | None] = []

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rag-serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = httpx.get(self.url + "/health/ready", timeout=2).status_code
            except httpx.TransportError:
                status = None
            if not self.startup or self.startup[-1] != status:
                self.startup.append(status)
            if status == 200:
                return
            time.sleep(0.01)
        raise TimeoutError(f"rag-serve not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self._log.name).read_text()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        os.unlink(self._log.name)

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0
