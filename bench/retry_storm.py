"""Goodput under a retry storm: requests completed per second unloaded, then with 64 clients retrying at once.

`python -m bench.retry_storm [--seconds 20] [--pin]`: a `python -m server` on the tiny random-weight model;
4 clients send 1 x 50 in a loop (the unloaded rate), then 64 clients send 1 x 50 and resend at once when refused,
with `--max-queue-pairs 200`, then again with `--max-concurrent-rpcs 8` added. The clients run in a child
process, so their CPU is measured apart from the server's (`/proc/PID/stat` utime + stime). `--pin` puts the
server on one core and the clients on the other: what is left of the collapse then is the server's own.
Loopback only; every process started is stopped by its pid. About a minute and a half.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from bench.run import ENV, ROOT, free_port, model_dir, process
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc

CANDIDATES = 50
QUEUE_FLAGS = ["--max-queue-pairs", "200", "--max-candidates", str(CANDIDATES)]
CAP_FLAGS = [*QUEUE_FLAGS, "--max-concurrent-rpcs", "8"]
TICK_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of `pid` (all its threads), or of one of its threads."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK_S  # utime, stime: fields 14 and 15 of stat(5)


def request(i: int) -> pb.RerankRequest:
    passages = [f"passage {j} of request {i}: pandas eat bamboo and sleep a lot in the forest" for j in range(50)]
    return pb.RerankRequest(query=f"what do pandas eat? ({i})", candidates=passages)


async def load(target: str, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` clients each send one request at a time for `seconds`, resending at once when refused."""
    counts = {"completed": 0, "refused": 0, "hinted": 0, "other": 0}
    errors: list[str] = []
    channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
    await asyncio.gather(*(ch.channel_ready() for ch in channels))
    stop = time.monotonic() + seconds

    async def client(i: int, stub: pb_grpc.RerankerStub) -> None:
        req = request(i)
        while time.monotonic() < stop:
            try:
                await stub.Rerank(req, timeout=60)
                counts["completed"] += 1
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    counts["other"] += 1
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                counts["refused"] += 1
                trailers = dict(exc.trailing_metadata() or ())
                counts["hinted"] += "retry-after-ms" in trailers

    start, cpu0 = time.monotonic(), time.process_time()
    try:
        await asyncio.gather(*(client(i, pb_grpc.RerankerStub(ch)) for i, ch in enumerate(channels)))
    finally:
        for ch in channels:
            await ch.close()
    return {
        **counts,
        "wall_s": time.monotonic() - start,
        "client_cpu_s": time.process_time() - cpu0,
        "errors": errors[:3],
    }


def _pinned(cpus: set[int] | None) -> Any:
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


@contextlib.contextmanager
def server(model: str, flags: list[str], log: Path, cpus: set[int] | None) -> Iterator[tuple[str, int]]:
    """A `python -m server` on a free loopback port; SIGTERM, then SIGKILL, by its pid on exit."""
    port = free_port()
    args = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port), *flags]
    with process(args, log, _pinned(cpus)) as proc:
        from bench.drive import wait_ready

        asyncio.run(wait_ready(f"127.0.0.1:{port}", proc, 300))
        yield f"127.0.0.1:{port}", proc.pid


def run_load(target: str, clients: int, seconds: float, cpus: set[int] | None, out: Path) -> dict[str, Any]:
    """The clients in a child process of their own (pinned to `cpus`), so their CPU is theirs alone."""
    args = [sys.executable, "-m", "bench.retry_storm", "--load", target, "--clients", str(clients)]
    args += ["--seconds", str(seconds), "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, env=os.environ | ENV, preexec_fn=_pinned(cpus))
    try:
        proc.wait(seconds + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the load process exited with {proc.returncode}")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def phase(name: str, model: str, flags: list[str], clients: int, seconds: float, pin: bool, tmp: Path) -> dict:
    server_cpus, client_cpus = ({1}, {0}) if pin else (None, None)
    with server(model, flags, tmp / f"{name}.server.log", server_cpus) as (target, pid):
        before, loop_before = cpu_s(pid), cpu_s(pid, pid)  # the main thread runs the event loop
        r = run_load(target, clients, seconds, client_cpus, tmp / f"{name}.json")
        r["server_cpu_s"], r["loop_cpu_s"] = cpu_s(pid) - before, cpu_s(pid, pid) - loop_before
    wall = r["wall_s"]
    r |= {
        "name": name,
        "clients": clients,
        "completed_per_s": r["completed"] / wall,
        "refused_per_s": r["refused"] / wall,
    }
    return r


def report(rows: list[dict[str, Any]], pin: bool) -> str:
    base = rows[0]
    per_completed = base["loop_cpu_s"] / max(1, base["completed"])  # the event loop's CPU for one answered request
    lines = [
        f"{'run':<28} {'done/s':>7} {'refused/s':>9} {'of unloaded':>11} {'server CPU':>10} {'its loop':>8} "
        f"{'client CPU':>10} {'loop ms/refusal':>15} {'hinted':>6}",
    ]
    for r in rows:
        refusal_ms = (r["loop_cpu_s"] - r["completed"] * per_completed) / r["refused"] * 1e3 if r["refused"] else 0
        lines.append(
            f"{r['name']:<28} {r['completed_per_s']:7.1f} {r['refused_per_s']:9.0f} "
            f"{r['completed_per_s'] / base['completed_per_s']:10.0%} {r['server_cpu_s'] / r['wall_s']:9.2f}c "
            f"{r['loop_cpu_s'] / r['wall_s']:7.2f}c {r['client_cpu_s'] / r['wall_s']:9.2f}c {refusal_ms:15.3f} "
            f"{r['hinted']:>6}"
        )
        if r["other"]:
            lines.append(f"  {r['other']} other errors, e.g. {r['errors']}")
    where = "server on CPU 1, clients on CPU 0" if pin else "server and clients share both cores"
    lines.append(
        f"({where}; c = cores busy on average; loop ms/refusal = the event loop's CPU beyond what the answered "
        "requests cost it unloaded, per refusal; hinted = refusals carrying retry-after-ms)"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="each storm's length (%(default)s)")
    p.add_argument("--unloaded-seconds", type=float, default=10.0, help="the 4-client run's length (%(default)s)")
    p.add_argument("--clients", type=int, default=64, help="storm clients (%(default)s)")
    p.add_argument("--pin", action="store_true", help="server on CPU 1, clients on CPU 0")
    p.add_argument("--model", help="a model directory (default: the tiny random-weight model, built once)")
    p.add_argument("--load", help=argparse.SUPPRESS)  # internal: be the load process against this target
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.load:
        Path(a.out).write_text(json.dumps(asyncio.run(load(a.load, a.clients, a.seconds))))
        return
    if a.pin and len(os.sched_getaffinity(0)) < 2:
        sys.exit("--pin needs two CPUs")
    model = model_dir("tiny", a.model)
    with tempfile.TemporaryDirectory(prefix="retry-storm-") as tmp:
        rows = [
            phase("unloaded, 4 clients", model, QUEUE_FLAGS, 4, a.unloaded_seconds, a.pin, Path(tmp)),
            phase(f"{a.clients} retrying, queue 200", model, QUEUE_FLAGS, a.clients, a.seconds, a.pin, Path(tmp)),
            phase(f"{a.clients} retrying, + 8 rpcs", model, CAP_FLAGS, a.clients, a.seconds, a.pin, Path(tmp)),
        ]
        print(report(rows, a.pin), flush=True)


if __name__ == "__main__":
    main()
