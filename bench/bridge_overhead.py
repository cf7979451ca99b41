"""Requests/s through the REST bridge's /rerank vs the same calls made directly over gRPC.

`python -m bench.bridge_overhead [--model DIR] [--seconds 5] [--rounds 2] [--scenario 10x8 --scenario 1x16]`
Starts one `python -m server --rest-port` process on 127.0.0.1 (the tiny random-weight model from
tools/make_model.py unless --model is given), then for each scenario (candidates x concurrency) drives
gRPC `Rerank(normalize=True)` and REST `POST /rerank` with the same payload for --seconds each, and
prints requests/s and p50 latency of each, alternating the paths --rounds times. Loopback only; stops what it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import aiohttp
import grpc

from bench.one_request import passages
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from tools.make_model import build_model

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(call: Callable[[], Awaitable[None]], concurrency: int, seconds: float) -> tuple[int, list[float]]:
    """Run `call` from `concurrency` workers for `seconds`; returns completed calls and their latencies."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    latencies: list[float] = []

    async def worker() -> None:
        while loop.time() < stop_at:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), latencies


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    """Poll the bridge's /health until the server is SERVING (at most 2 minutes)."""
    async with asyncio.timeout(120):
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)


async def via_grpc(stub: pb_grpc.RerankerStub, request: pb.RerankRequest) -> None:
    await stub.Rerank(request, timeout=60)


async def via_rest(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> None:
    async with session.post(url, json=body) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"REST /rerank answered {resp.status}: {await resp.text()}")


async def bench(grpc_port: int, rest_port: int, scenarios: list[tuple[int, int]], seconds: float, rounds: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
    ):
        await wait_ready(session, f"http://127.0.0.1:{rest_port}/health")
        stub = pb_grpc.RerankerStub(channel)
        url = f"http://127.0.0.1:{rest_port}/rerank"
        print(f"{'scenario':<24}{'path':<8}{'req/s':>9}{'p50 ms':>9}")
        for candidates, concurrency in scenarios:
            query, docs = "what is panda?", passages(candidates)
            request = pb.RerankRequest(query=query, candidates=docs, normalize=True)
            body = {"query": query, "compare_to": docs}

            label = f"{candidates} cand x conc {concurrency}"
            paths = {"gRPC": partial(via_grpc, stub, request), "REST": partial(via_rest, session, url, body)}
            counts = {name: 0 for name in paths}
            latencies: dict[str, list[float]] = {name: [] for name in paths}
            for call in paths.values():
                await drive(call, concurrency, min(1.0, seconds))  # warm-up: connections, caches
            for _ in range(rounds):  # alternate the paths so drift in machine load hits both alike
                for name, call in paths.items():
                    count, lat = await drive(call, concurrency, seconds)
                    counts[name] += count
                    latencies[name] += lat
            rates = {name: counts[name] / (seconds * rounds) for name in paths}
            for name in paths:
                p50 = statistics.median(latencies[name]) * 1e3
                print(f"{label:<24}{name:<8}{rates[name]:>9.1f}{p50:>9.2f}")
            print(f"{'':<24}REST/gRPC throughput: {rates['REST'] / rates['gRPC']:.2f}")


def parse_scenario(text: str) -> tuple[int, int]:
    candidates, concurrency = text.lower().split("x")
    return int(candidates), int(concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: build the tiny random-weight model)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per path, round and scenario")
    parser.add_argument("--rounds", type=int, default=2, help="alternating gRPC/REST rounds per scenario")
    parser.add_argument(
        "--scenario", action="append", type=parse_scenario, help="CANDIDATESxCONCURRENCY (default: 10x8 and 1x16)"
    )
    args = parser.parse_args()
    scenarios = args.scenario or [(10, 8), (1, 16)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(tmp, "tiny")
        grpc_port, rest_port = free_port(), free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1"]
            + ["--port", str(grpc_port), "--rest-port", str(rest_port), "--log-level", "WARNING"],
            cwd=ROOT,
        )
        try:
            print(
                f"model={model_dir} server pid={server.pid}, {args.rounds} x {args.seconds:.0f} s per path and scenario"
            )
            asyncio.run(bench(grpc_port, rest_port, scenarios, args.seconds, args.rounds))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()
