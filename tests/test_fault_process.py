"""Faults only a real process meets (issue 23): SIGHUP while it starts, and its log output on a pipe nobody reads."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from tests.ops_helpers import free_port, sample, scrape
from tests.subprocess_server import ROOT

SERVING = health_pb2.HealthCheckResponse.SERVING
LOGGED_CALLS = 1500  # one INFO access line each: more than the pipe (4 KiB here) and the log queue (1000 lines) hold


def _handles(pid: int, sig: signal.Signals) -> bool:
    """Whether `pid` has a handler installed for `sig` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == SERVING


def _start_under_sighups(proc: subprocess.Popen[bytes], target: str) -> int:
    """SIGHUP every 0.2 s from shortly after the interpreter is up until the server is SERVING; returns how many."""
    deadline = time.monotonic() + 120
    while not _handles(proc.pid, signal.SIGINT):  # Python's own handler: the interpreter is initialised
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)  # python -m server is importing its modules: seconds, on which the handlers used to wait
    sent = 0
    while not _serving(target):
        assert proc.poll() is None, f"the server died of SIGHUP number {sent} (exit {proc.returncode})"
        assert time.monotonic() < deadline, "not SERVING within 120 s"
        proc.send_signal(signal.SIGHUP)
        sent += 1
        time.sleep(0.2)
    return sent


async def _calls_while_the_log_is_stalled(target: str) -> None:
    """Every call and health check is answered although no log line can be written."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub, health = pb_grpc.RerankerStub(ch), health_pb2_grpc.HealthStub(ch)
        pending = iter(range(LOGGED_CALLS))

        async def caller() -> None:
            for i in pending:
                await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
                if i % 100 == 0:
                    assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=30)).status == SERVING

        await asyncio.gather(*(caller() for _ in range(16)))


def test_sighup_while_starting_and_a_log_pipe_nobody_reads(model_dir: Path) -> None:
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # the smallest pipe: it fills after a few lines
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        + ["--metrics-port", str(metrics_port)],
        cwd=ROOT,
        stdout=write_end,
        stderr=write_end,
    )
    os.close(write_end)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: os.read(read_end, 65536), b"")), daemon=True)
    try:
        assert _start_under_sighups(proc, target) > 0
        asyncio.run(_calls_while_the_log_is_stalled(target))
        dropped = sample(scrape(metrics_port), "reranker_log_lines_dropped_total")
        assert dropped > 0
        reader.start()  # the log is read again: what was queued is written, then one line says how many were lost
        deadline = time.monotonic() + 60
        while (found := re.search(rb"(\d+) log lines were dropped", b"".join(out))) is None:
            assert time.monotonic() < deadline, b"".join(out)[-3000:].decode(errors="replace")
            time.sleep(0.05)
        assert 0 < int(found.group(1)) <= dropped
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        reader.join(30)
        log = b"".join(out).decode(errors="replace")
        assert "SIGHUP while the models load: they are checked for changed files once loaded" in log
        assert log.count("log lines were dropped") == 1 and "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)
