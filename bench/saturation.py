"""The autoscaler's target: how busy a replica can run before its callers wait.

`python -m bench.saturation [--model DIR] [--shape tiny|base] [--step-s 30]`: starts `python -m server` on
127.0.0.1, measures its capacity (16 closed-loop clients, 1 x 10 requests), then offers Poisson arrivals of the same
requests, one step after another, each step's rate aimed at the next busy share of LEVELS from what the step before
measured (so the steps cover the range even when the machine's speed drifts under them). Per step: the busy share
(`reranker_busy_seconds_total` from /metrics over the step: the saturation signal), the achieved rate, the callers'
latency, and the time their pairs queued before their first forward pass (`usage.queue_ms`). The target is the
highest busy share whose p90 latency stays within LATENCY_FACTOR (2) times the least busy step's: past it the slowest
tenth of callers wait about as long again as they are scored. Rounded down to 0.05. The server is stopped by pid.
Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from bench.common import QUERY, percentile, text_of_tokens
from bench.drive import wait_ready
from bench.run import free_port, model_dir, process
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # busy shares the steps aim at
HEADER = ("offered (aimed at)", "busy share", "answered/s", "calls", "p50 ms", "p90 ms", "p99 ms")
HEADER += ("queue p50 ms", "queue p90 ms", "fails")
LATENCY_FACTOR = 2.0  # "callers wait": the p90 caller takes twice as long as when the replica is nearly idle


def requests(model: str, count: int = 64, seed: int = 0) -> list[pb.RerankRequest]:
    """1 x 10 requests, passages of 20-60 tokens (the 16-client workload of bench.run)."""
    from transformers import AutoTokenizer

    tok, rng = AutoTokenizer.from_pretrained(model), random.Random(seed)
    return [
        pb.RerankRequest(
            query=f"{QUERY} {i}", candidates=[text_of_tokens(tok, rng.randint(20, 60), rng) for _ in range(10)]
        )
        for i in range(count)
    ]


def busy_seconds(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("reranker_busy_seconds_total{"))


async def capacity(stub: pb_grpc.RerankerStub, reqs: list[pb.RerankRequest], seconds: float) -> float:
    """Requests per second that 16 closed-loop clients get answered: what the replica does flat out."""
    done, end = 0, time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done
        while time.monotonic() < end:
            await stub.Rerank(reqs[(i + done) % len(reqs)], timeout=120)
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(16)))
    return done / (time.monotonic() - start)


async def step(stub: Any, reqs: list[pb.RerankRequest], rate: float, seconds: float, port: int) -> dict[str, float]:
    """Poisson arrivals at `rate` for `seconds`; every call is awaited (bounded by its deadline) before returning."""
    rng, latencies, queue_ms, failed = random.Random(1), [], [], 0

    async def call(req: pb.RerankRequest) -> None:
        nonlocal failed
        t = time.perf_counter()
        try:
            reply = await stub.Rerank(req, timeout=60)
        except grpc.aio.AioRpcError:
            failed += 1
            return
        latencies.append(time.perf_counter() - t)
        queue_ms.append(reply.usage.queue_ms)

    calls, busy0, start = [], busy_seconds(port), time.monotonic()
    while time.monotonic() - start < seconds:
        calls.append(asyncio.ensure_future(call(reqs[len(calls) % len(reqs)])))
        await asyncio.sleep(rng.expovariate(rate))
    sent_s = time.monotonic() - start
    busy = (busy_seconds(port) - busy0) / sent_s  # over the arrivals' window; calls still open add their part
    await asyncio.gather(*calls)
    return {
        "offered_rps": rate,
        "busy": busy,
        "answered_rps": len(latencies) / sent_s,
        "failed": failed,
        "calls": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p90_ms": percentile(latencies, 90) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "queue_p50_ms": percentile(queue_ms, 50),
        "queue_p90_ms": percentile(queue_ms, 90),
    }


def _line(level: float, row: dict[str, float]) -> str:
    cells = [f"{row['offered_rps']:.1f}/s (for {level:.2f})", f"{row['busy']:.2f}", f"{row['answered_rps']:.1f}"]
    cells += [f"{row[k]:.0f}" for k in ("calls", "p50_ms", "p90_ms", "p99_ms")]
    cells += [f"{row[k]:.0f}" for k in ("queue_p50_ms", "queue_p90_ms", "failed")]
    return "| " + " | ".join(cells) + " |"


def target(rows: list[dict[str, float]]) -> float:
    """The highest busy share whose p90 latency is within LATENCY_FACTOR x the least busy step's (to 0.05 below)."""
    bound = LATENCY_FACTOR * min(rows, key=lambda r: r["busy"])["p90_ms"]
    good = [r["busy"] for r in rows if r["p90_ms"] <= bound and not r["failed"]]
    return int(max(good, default=0.0) * 20) / 20


async def run(model: str, step_s: float, capacity_s: float) -> None:
    reqs = requests(model)
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(metrics_port), "--max-queue-pairs", "100000"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, process(cmd, Path(tmp) / "server.log") as proc:
        target_address = f"127.0.0.1:{port}"
        await wait_ready(target_address, proc)
        async with grpc.aio.insecure_channel(target_address) as channel:
            stub = pb_grpc.RerankerStub(channel)
            await capacity(stub, reqs, 3)  # warm
            full = await capacity(stub, reqs, capacity_s)
            print(f"capacity: {full:.1f} requests/s of 1 x 10 ({full * 10:.0f} pairs/s)", flush=True)
            print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
            rows = []
            rate = LEVELS[0] * full
            for level in LEVELS:
                row = await step(stub, reqs, rate, step_s, metrics_port)
                rows.append(row)
                print(_line(level, row), flush=True)
                following = LEVELS[min(LEVELS.index(level) + 1, len(LEVELS) - 1)]
                rate *= min(3.0, following / max(row["busy"], 0.05))  # busy share grows about linearly with the rate
    bound = LATENCY_FACTOR * min(rows, key=lambda r: r["busy"])["p90_ms"]
    print(f"target: busy share {target(rows):.2f} (the busiest step whose p90 latency is at most {bound:.0f} ms)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: a random-weight model of --shape, built once)")
    p.add_argument("--shape", default="tiny", choices=["tiny", "base"])
    p.add_argument("--step-s", type=float, default=30.0, help="seconds of arrivals per load step")
    p.add_argument("--capacity-s", type=float, default=15.0)
    args = p.parse_args()
    asyncio.run(run(model_dir(args.shape, args.model), args.step_s, args.capacity_s))


if __name__ == "__main__":
    main()
