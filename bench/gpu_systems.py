"""The systems bench.gpu runs, each under the same loads: the warmed ceiling, compute_score, the server's request
path in-process, our server through gRPC, Infinity's engine."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench import drive
from bench.common import Workload, percentile, summary
from bench.gpu_probe import BusySampler, launch_check, serving_fields, startup_fields
from bench.run import free_port, process

CUDA_BATCH = 128
CPU_BATCH = 32  # the server's default on CPU: wider batches of mixed lengths pad too much there


def batch_size(device: str) -> int:
    """The plain batch size of the ceiling, compute_score and Infinity on this device."""
    return CUDA_BATCH if device.startswith("cuda") else CPU_BATCH


def pairs_of(w: Workload) -> list[tuple[str, str]]:
    return [(q, p) for q, ps in w.requests for p in ps]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def ceiling(model: str, device: str, loads: list[Workload]) -> dict[str, dict[str, Any]]:
    """Per load: plain batched forward passes over its pairs, pre-tokenized, length-sorted, padded, on the device.

    Every batch runs once untimed first and the device is synchronized, so the timed pass meets no new shape.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    net = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype).to(device).eval()
    out, size = {}, batch_size(device)
    for w in loads:
        pairs = pairs_of(w)
        enc = tok([q for q, _ in pairs], [p for _, p in pairs], truncation="only_second", max_length=512).data
        order = sorted(range(len(pairs)), key=lambda i: -len(enc["input_ids"][i]))
        batches = [
            tok.pad([{k: v[i] for k, v in enc.items()} for i in order[s : s + size]], return_tensors="pt").to(device)
            for s in range(0, len(order), size)
        ]
        with torch.inference_mode():
            warmed = set()
            for b in batches:  # untimed: every shape the timed pass will meet
                net(**b)
                warmed.add(tuple(b["input_ids"].shape))
            sync(device)
            with BusySampler(device) as busy:
                start = time.perf_counter()
                outs = [net(**b).logits.view(-1).float() for b in batches]
                sync(device)
                wall = time.perf_counter() - start
        timed = {tuple(b["input_ids"].shape) for b in batches}
        out[w.name] = summary(len(pairs), wall, []) | {
            "batches": len(batches),
            "warmed_batches": len(batches),
            "shapes": len(timed),
            "all_warmed": timed <= warmed,
            "busy": busy.result(),
        }
        del outs, batches
    del net
    free(device)
    return out


def compute_score(model: str, device: str, loads: list[Workload]) -> tuple[dict[str, Any], list[float]]:
    """Per load: one `FlagReranker.compute_score` call over its pairs, the same call run once untimed first.
    Also returns the first load's scores, as the parity reference."""
    from FlagEmbedding import FlagReranker

    flag = FlagReranker(model, use_fp16=device.startswith("cuda"), devices=[device], batch_size=batch_size(device))
    out, reference = {}, []
    for w in loads:
        pairs = [list(p) for p in pairs_of(w)]
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bars ignore TQDM_DISABLE
            flag.compute_score(pairs)  # untimed: every shape this call meets
            with BusySampler(device) as busy:
                start = time.perf_counter()
                scores = flag.compute_score(pairs)
                wall = time.perf_counter() - start
        out[w.name] = summary(len(pairs), wall, []) | {"busy": busy.result()}
        reference = reference or [float(s) for s in scores]
    del flag
    free(device)
    return out, reference


async def _timed_loads(loads: list[Workload], device: str, call: Any) -> dict[str, Any]:
    """Each load once untimed, then timed while the device's busy share is sampled."""
    out = {}
    for w in loads:
        await drive._clients(w, call)  # warm up: connections, allocator, the shapes this load forms
        with BusySampler(device) as busy:
            out[w.name] = await drive._clients(w, call)
        out[w.name]["busy"] = busy.result()
    return out


def in_process(model: str, device: str, loads: list[Workload]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The server's request path without gRPC, as `bench.closed_loop --in-process`: a RerankServer with default
    flags in this process, its servicer's `_rerank` called directly by the load's clients (asyncio tasks). Returns
    the loads' results, its startup fields, and launch_check on its engine as served (buckets, graphs)."""
    from reranker_proto import reranker_pb2 as pb
    from server.app import RerankServer
    from server.config import load_config

    async def run() -> tuple[dict[str, Any], dict[str, Any], str]:
        config = load_config(["--model", model, "--device", device, "--host", "127.0.0.1", "--port", "0"])
        server = RerankServer(config)
        try:
            with serving_fields() as fields:
                await server.start()  # binds 127.0.0.1:0, which nothing calls; loads and warms as `python -m server`
            service = server.service

            async def call(i: int, query: str, passages: list[str]) -> None:
                resp = await service._rerank(pb.RerankRequest(query=query, candidates=passages))
                assert len(resp.scores) == len(passages)

            results = await _timed_loads(loads, device, call)
            engine = service.models[config.default_model].engine
            check = partial(launch_check, engine, pairs_of(loads[0])[: batch_size(device)], device)
            # on the inference thread, where the server captured its CUDA graphs; the batcher is idle
            synced = await asyncio.get_running_loop().run_in_executor(server._infer_pool, check)
            return results, fields, synced
        finally:
            await server.stop(0)

    try:
        return asyncio.run(run())
    finally:
        free(device)


async def _one_caller(target: str, w: Workload, warm: int) -> dict[str, Any]:
    """One caller, one request at a time: the first `warm` untimed, then p50/p90/p99 of the rest."""
    import grpc

    from reranker_proto import reranker_pb2 as pb
    from reranker_proto import reranker_pb2_grpc as pb_grpc

    latencies = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RerankerStub(channel)
        for n, (query, passages) in enumerate(w.requests):
            t = time.perf_counter()
            await stub.Rerank(pb.RerankRequest(query=query, candidates=passages), timeout=drive.DEADLINE_S)
            if n >= warm:
                latencies.append(time.perf_counter() - t)
    return {"requests": len(latencies), **{f"p{q}_ms": percentile(latencies, q) * 1e3 for q in (50, 90, 99)}}


def server(
    model: str, device: str, loads: list[Workload], singles: list[Workload], warm: int, tmp: Path
) -> tuple[dict[str, Any], dict[str, Any], list[list[float]], dict[str, str]]:
    """`python -m server` with default flags on 127.0.0.1: the loads (each once untimed, then timed, the GPU's busy
    share sampled), one caller at a time for each of `singles`, the first requests' scores, its startup fields."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    args = [sys.executable, "-m", "server", "--model", model, "--device", device, "--host", "127.0.0.1"]
    log = tmp / "server.log"
    with process([*args, "--port", str(port)], log) as proc:

        async def run() -> tuple[dict[str, Any], dict[str, Any], list[list[float]]]:
            await drive.wait_ready(target, proc)
            loaded = {}
            for w in loads:
                await drive.grpc_workload(target, w)  # warm up
                with BusySampler(device) as busy:
                    loaded[w.name] = await drive.grpc_workload(target, w)
                loaded[w.name]["busy"] = busy.result()
            latency = {w.name: await _one_caller(target, w, warm) for w in singles}
            return loaded, latency, await _scores(target, loads[0].requests[:5])

        try:
            loaded, latency, scores = asyncio.run(run())
        except Exception:
            print(f"the server's log ends:\n{log.read_text()[-3000:]}", file=sys.stderr, flush=True)
            raise
    line = next((x for x in log.read_text().splitlines() if " serving " in x or '"serving"' in x), "")
    return loaded, latency, scores, startup_fields(line)


async def _scores(target: str, requests: list[tuple[str, list[str]]]) -> list[list[float]]:
    import grpc

    from reranker_proto import reranker_pb2 as pb
    from reranker_proto import reranker_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RerankerStub(channel)
        return [list((await stub.Rerank(pb.RerankRequest(query=q, candidates=ps))).scores) for q, ps in requests]


def infinity(model: str, device: str, loads: list[Workload]) -> dict[str, Any] | str:
    """Infinity's engine in-process under the same loads, or why it was skipped."""
    try:
        from infinity_emb import AsyncEmbeddingEngine, EngineArgs
    except Exception as exc:  # not installed, or it does not import with this torch/transformers
        return f"skipped: infinity_emb does not import here ({type(exc).__name__}: {str(exc)[:120]})"

    async def run() -> dict[str, Any]:
        dtype = "float16" if device.startswith("cuda") else "float32"
        args = EngineArgs(
            model_name_or_path=model, engine="torch", device=device.split(":")[0], dtype=dtype,
            batch_size=batch_size(device), bettertransformer=False, model_warmup=False,
        )  # fmt: skip
        engine = AsyncEmbeddingEngine.from_args(args)
        await engine.astart()
        try:

            async def call(i: int, query: str, docs: list[str]) -> None:
                scores, _ = await engine.rerank(query=query, docs=docs, raw_scores=True)
                assert len(scores) == len(docs)

            return await _timed_loads(loads, device, call)
        finally:
            await engine.astop()

    try:
        return asyncio.run(run())
    except Exception as exc:
        return f"skipped: Infinity's engine failed ({type(exc).__name__}: {str(exc)[:160]})"
    finally:
        free(device)
