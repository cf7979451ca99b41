"""RerankStream vs unary Rerank at the same concurrency: pairs/s and per-request latency.

`python -m bench.stream [--model DIR | --shape tiny|base] [--seconds 5] [--rounds 3] [--no-write]`
Starts one `python -m server` on 127.0.0.1 and sends 1 query x 20 candidates requests, 64 in flight:
- unary: 64 callers over 4 channels (16 each), each awaiting its Rerank before sending the next;
- stream: 4 RerankStreams (one per channel), each keeping 16 requests outstanding.
The paths alternate --rounds times; pairs/s counts to the last answer of each round, latency from handing a
request to gRPC to its answer. Results are printed and written into bench/README.md. Loopback only; the
server is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench.common import percentile
from bench.run import free_port, model_dir, process
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from tools.make_model import SENTENCES

ROOT = Path(__file__).resolve().parent.parent
CHANNELS, CONCURRENCY, CANDIDATES = 4, 64, 20
MARKER = "<!-- results:stream-1x{n}:{edge} -->"  # one section per request size


def requests(count: int) -> list[pb.RerankRequest]:
    """Distinct requests of 1 query x 20 passages of 10-40 words (about 20-60 tokens, as in bench.run)."""
    rng = random.Random(0)
    words = " ".join(SENTENCES).split()

    def passage() -> str:
        return " ".join(rng.choices(words, k=rng.randint(10, 40)))

    return [
        pb.RerankRequest(query=f"what is panda? {i}", candidates=[passage() for _ in range(CANDIDATES)])
        for i in range(count)
    ]


async def unary(stubs: list[Any], pool: list[pb.RerankRequest], seconds: float) -> list[float]:
    stop_at = time.monotonic() + seconds
    latencies: list[float] = []

    async def caller(i: int) -> None:
        stub, mine = stubs[i % CHANNELS], itertools.cycle(pool[i::CONCURRENCY])
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            resp = await stub.Rerank(next(mine), timeout=600)
            latencies.append(time.perf_counter() - start)
            assert len(resp.scores) == CANDIDATES

    await asyncio.gather(*(caller(i) for i in range(CONCURRENCY)))
    return latencies


async def stream(stubs: list[Any], pool: list[pb.RerankRequest], seconds: float) -> list[float]:
    stop_at = time.monotonic() + seconds
    latencies: list[float] = []
    window = CONCURRENCY // CHANNELS

    async def one(stub: Any, k: int) -> None:
        sent: dict[str, float] = {}
        credit = asyncio.Semaphore(window)  # 16 outstanding on this stream
        mine = itertools.cycle(pool[k::CHANNELS])
        numbers = itertools.count()

        async def feed() -> AsyncIterator[pb.RerankRequest]:
            while time.monotonic() < stop_at:
                await credit.acquire()
                request = pb.RerankRequest()
                request.CopyFrom(next(mine))
                request.request_id = str(next(numbers))
                sent[request.request_id] = time.perf_counter()
                yield request

        async for answer in stub.RerankStream(feed(), timeout=600):
            latencies.append(time.perf_counter() - sent.pop(answer.request_id))
            assert len(answer.response.scores) == CANDIDATES, answer.error
            credit.release()

    await asyncio.gather(*(one(stubs[k], k) for k in range(CHANNELS)))
    return latencies


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(target: str, pid: int, seconds: float, rounds: int) -> dict[str, dict[str, Any]]:
    pool = requests(CONCURRENCY * 4)
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    stubs = [pb_grpc.RerankerStub(ch) for ch in channels]
    paths = {"64 unary callers": unary, "4 streams x 16": stream}
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    wall: dict[str, float] = dict.fromkeys(paths, 0.0)
    per_round: dict[str, list[float]] = {name: [] for name in paths}
    server_cpu: dict[str, float] = dict.fromkeys(paths, 0.0)  # CPU cost is less disturbed by other load than speed
    client_cpu: dict[str, float] = dict.fromkeys(paths, 0.0)
    try:
        async with asyncio.timeout(600):
            while True:  # until the model has loaded
                try:
                    await stubs[0].Rerank(pool[0], timeout=5)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.5)
        for run in paths.values():
            await run(stubs, pool, min(1.0, seconds))  # warm-up: connections, allocator, caches
        for r in range(rounds):  # alternate, so drift in machine speed hits both alike
            for name, run in paths.items():
                start, server0, client0 = time.perf_counter(), cpu_s(pid), time.process_time()
                done = await run(stubs, pool, seconds)  # to the last answer: requests in flight at the end count
                elapsed = time.perf_counter() - start
                server_cpu[name] += cpu_s(pid) - server0
                client_cpu[name] += time.process_time() - client0
                latencies[name] += done
                wall[name] += elapsed
                per_round[name].append(len(done) * CANDIDATES / elapsed)
                print(f"round {r + 1} {name:<18} {per_round[name][-1]:8.1f} pairs/s", flush=True)
    finally:
        for ch in channels:
            await ch.close()
    return {
        name: {
            "requests": len(lat),
            "pairs_per_s": len(lat) * CANDIDATES / wall[name],
            "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "rounds": per_round[name],
            "server_cpu_ms": server_cpu[name] / len(lat) * 1e3,
            "client_cpu_ms": client_cpu[name] / len(lat) * 1e3,
        }
        for name, lat in latencies.items()
    }


def report(results: dict[str, dict[str, Any]], note: str) -> str:
    lines = [
        note,
        "",
        "| path | requests | pairs/s | pairs/s by round | p50 ms | p99 ms | server CPU ms/req | client CPU ms/req |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        by_round = ", ".join(f"{x:.0f}" for x in r["rounds"])
        lines.append(
            f"| {name} | {r['requests']} | {r['pairs_per_s']:.0f} | {by_round} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['server_cpu_ms']:.1f} | {r['client_cpu_ms']:.2f} |"
        )
    unary, streamed = results.values()
    lines.append("")
    lines.append(
        f"stream / unary: {streamed['pairs_per_s'] / unary['pairs_per_s']:.2f}x pairs/s, "
        f"p99 {streamed['p99_ms'] / unary['p99_ms']:.2f}x, server CPU per request "
        f"{streamed['server_cpu_ms'] / unary['server_cpu_ms']:.2f}x, client CPU per request "
        f"{streamed['client_cpu_ms'] / unary['client_cpu_ms']:.2f}x"
    )
    return "\n".join(lines)


def write_readme(text: str) -> None:
    """Replace this request size's section of bench/README.md, or add it at the end (the stream part is last)."""
    path = ROOT / "bench" / "README.md"
    readme = path.read_text()
    start, end = (MARKER.format(n=CANDIDATES, edge=edge) for edge in ("start", "end"))
    block = f"{start}\n{text}\n{end}"
    if start in readme:
        readme = readme[: readme.index(start)] + block + readme[readme.index(end) + len(end) :]
    else:
        heading = "## RerankStream vs unary Rerank"
        readme = readme.rstrip() + ("\n\n" if heading in readme else f"\n\n{heading}\n\n") + block + "\n"
    path.write_text(readme)


def main() -> None:
    global CANDIDATES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: a random-weight model of --shape)")
    parser.add_argument("--shape", choices=["tiny", "base"], default="tiny", help="random-weight model shape")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per path and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating unary/stream rounds")
    parser.add_argument("--threads", type=int, default=0, help="the server's torch threads (0 = one per core)")
    parser.add_argument("--candidates", type=int, default=CANDIDATES, help="candidates per request (%(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/README.md as it is")
    args = parser.parse_args()
    CANDIDATES = args.candidates
    model = model_dir(args.shape, args.model)
    port = free_port()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        server_args = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        server_args += ["--log-level", "WARNING", "--threads", str(args.threads)]
        with process(server_args, Path(tmp) / "server.log") as proc:
            print(f"model={model} server pid={proc.pid}; {args.rounds} x {args.seconds:g} s per path", flush=True)
            results = asyncio.run(bench(f"127.0.0.1:{port}", proc.pid, args.seconds, args.rounds))
    shape = f"random-weight {args.shape} shape" if not args.model else args.model
    note = (
        f"`python -m bench.stream --shape {args.shape} --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--candidates {CANDIDATES}` on "
        f"{time.strftime('%Y-%m-%d')}: model {shape}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), "
        f"Python {platform.python_version()}; 1 query x {CANDIDATES} candidates per request, {CONCURRENCY} in flight; "
        f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after."
    )
    text = report(results, note)
    print(text)
    if not args.no_write:
        write_readme(text)


if __name__ == "__main__":
    main()
