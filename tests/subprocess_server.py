"""`python -m server` as a child process on a free loopback port, for tests that need a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port that was free a moment ago (bound to port 0, read, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for_line(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], log: Path, text: str, timeout: float = 60
) -> str:
    """The first line of `log` (the child's output, written to a file) containing `text`; fails if the child exits
    or `timeout` passes first. A file polled, not a pipe read line by line: a silent child cannot hang the test."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        found = next((line for line in lines if text in line), None)
        if found is not None:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before logging {text!r}:\n{chr(10).join(lines)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no line with {text!r} after {timeout} s:\n{chr(10).join(lines[-40:])}")
        time.sleep(0.1)


class ServerProcess:
    """Starts `python -m server` and waits until health says SERVING; `stop()` ends it by its pid."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *args: str,
        start_timeout: float = 120.0,
        credentials: grpc.ChannelCredentials | None = None,  # a TLS server: how to ask its health
        python: Sequence[str] = (sys.executable,),  # the interpreter and its flags
        env: Mapping[str, str] | None = None,  # added to this process's environment
    ) -> None:
        self._credentials = credentials
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")  # a file, not a pipe: a full pipe would stall the server's logging
        self.proc = subprocess.Popen(
            [*python, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1"]
            + ["--port", str(self.port), *args],
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_serving(start_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._credentials is None:
            channel = grpc.insecure_channel(self.target)
        else:
            channel = grpc.secure_channel(
                self.target, self._credentials, [("grpc.ssl_target_name_override", "localhost")]
            )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not SERVING after {timeout} s:\n{self.log()}")
                time.sleep(0.2)

    def terminate(self) -> None:
        """SIGTERM, as an orchestrator sends it."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
