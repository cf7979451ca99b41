"""Load generators: concurrent gRPC and REST clients, and the overload run."""

from __future__ import annotations

import asyncio
import random
import statistics
import subprocess
import time
from typing import Any

import grpc

from bench.common import Workload, percentile, rss_mib, summary
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc

DEADLINE_S = 900.0  # a bound on every call, far above what any request here needs


async def wait_ready(target: str, proc: subprocess.Popen[bytes], timeout_s: float = 600.0) -> None:
    """Until a one-pair Rerank succeeds (the model loaded and warmed up)."""
    request = pb.RerankRequest(query="ready?", candidates=["a short passage"])
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RerankerStub(channel)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode} before it was ready")
            try:
                await stub.Rerank(request, timeout=5)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
    raise TimeoutError(f"{target} not ready after {timeout_s} s")


async def _clients(workload: Workload, call: Any) -> dict[str, Any]:
    """Each of `workload.clients` clients sends its share of the requests, one after another."""
    latencies: list[float] = []

    async def client(i: int) -> None:
        for query, passages in workload.requests[i :: workload.clients]:
            t = time.perf_counter()
            await call(i, query, passages)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(workload.clients)))
    return summary(workload.pairs, time.perf_counter() - start, latencies)


async def grpc_workload(target: str, workload: Workload) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(target) for _ in range(workload.clients)]  # one per client, as in life
    stubs = [pb_grpc.RerankerStub(ch) for ch in channels]
    try:
        for stub in stubs:  # connect first; not timed
            await stub.Rerank(pb.RerankRequest(query="hi", candidates=["hello"]), timeout=DEADLINE_S)

        usage: list[tuple[float, float]] = []

        async def call(i: int, query: str, passages: list[str]) -> None:
            resp = await stubs[i].Rerank(pb.RerankRequest(query=query, candidates=passages), timeout=DEADLINE_S)
            assert len(resp.scores) == len(passages)
            usage.append((resp.usage.queue_ms, resp.usage.inference_ms))

        result = await _clients(workload, call)
        # Where a request's time went, by the server's own account (Usage): queued, in forward passes, and the rest.
        queue_ms, inference_ms = (statistics.fmean(u[k] for u in usage) for k in (0, 1))
        return result | {"mean_queue_ms": queue_ms, "mean_inference_ms": inference_ms}
    finally:
        for ch in channels:
            await ch.close()


async def wait_rest_ready(url: str, timeout_s: float = 120.0) -> None:
    import aiohttp

    end = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            try:
                async with session.post(url, json={"query": "ready?", "compare_to": ["a", "b"]}) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


async def rest_workload(url: str, workload: Workload, infinity_model: str = "") -> dict[str, Any]:
    """Legacy-2 shape: POST /rerank {"query", "compare_to"} -> {"data": [scores]}; with `infinity_model`, Infinity's:
    {"model", "query", "documents", "raw_scores"} -> {"results": [...]} (Infinity's server and our bridge speak it)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
    sessions = [aiohttp.ClientSession(timeout=timeout) for _ in range(workload.clients)]
    try:

        async def call(i: int, query: str, passages: list[str]) -> None:
            if infinity_model:
                body = {"model": infinity_model, "query": query, "documents": passages, "raw_scores": True}
            else:
                body = {"query": query, "compare_to": passages}
            async with sessions[i].post(url, json=body) as resp:
                answer = await resp.json()
                assert resp.status == 200 and len(answer["results" if infinity_model else "data"]) == len(passages), (
                    answer
                )

        return await _clients(workload, call)
    finally:
        for s in sessions:
            await s.close()


async def overload(target: str, pid: int, workload: Workload, clients: int, duration_s: float) -> dict[str, Any]:
    """`clients` clients send for `duration_s` (backing off 50-250 ms after a refusal); then in-flight ones finish."""
    refused: list[float] = []
    accepted: list[float] = []
    errors: list[str] = []
    rss: list[float] = [rss_mib(pid)]
    stop = 0.0

    async def sample() -> None:
        while True:
            rss.append(rss_mib(pid))
            await asyncio.sleep(0.2)

    async def client(i: int, stub: pb_grpc.RerankerStub) -> None:
        rng = random.Random(i)
        query, passages = workload.requests[i % len(workload.requests)]
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                await stub.Rerank(pb.RerankRequest(query=query, candidates=passages), timeout=DEADLINE_S)
                accepted.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                refused.append(time.perf_counter() - t)
                await asyncio.sleep(rng.uniform(0.05, 0.25))

    channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
    await asyncio.gather(*(ch.channel_ready() for ch in channels))  # connection set-up is not a refusal's latency
    stop = time.monotonic() + duration_s
    sampler = asyncio.ensure_future(sample())
    try:
        await asyncio.gather(*(client(i, pb_grpc.RerankerStub(ch)) for i, ch in enumerate(channels)))
    finally:
        sampler.cancel()
        for ch in channels:
            await ch.close()
    rss.append(rss_mib(pid))
    return {
        "requests": len(refused) + len(accepted) + len(errors),
        "accepted": len(accepted),
        "refused": len(refused),
        "errors": errors[:5],
        "error_count": len(errors),
        "refusal_p50_ms": percentile(refused, 50) * 1e3,
        "refusal_p99_ms": percentile(refused, 99) * 1e3,
        "refusal_max_ms": max(refused, default=float("nan")) * 1e3,
        "refused_over_50ms": sum(r > 0.05 for r in refused),
        "accepted_p50_ms": percentile(accepted, 50) * 1e3,
        "accepted_p99_ms": percentile(accepted, 99) * 1e3,
        "rss_start_mib": rss[0],
        "rss_max_mib": max(rss),
        "rss_end_mib": rss[-1],
    }
