"""Does the server keep a GPU busy? One run, one device: the ceiling, compute_score, our server, Infinity's engine.

`python -m bench.gpu` (CUDA, bge-reranker-base shape, random weights, fp16) or
`python -m bench.gpu --device cpu --shape tiny` (anywhere, in a minute). Rows:
- ceiling: the pairs tokenized and padded beforehand, sorted by length, plain forward passes of 128;
- compute_score: one `FlagReranker.compute_score` call over the same pairs (batch 128);
- server: `python -m server` with default flags, 64 concurrent clients each sending 1 x 20, then 1 x 1000 requests;
- infinity: Infinity's engine in-process (no HTTP), torch, batch 128, the same two loads; when `infinity_emb` imports.
Everything runs on 127.0.0.1; the server is stopped by pid. Results go into bench/README.md (`--no-write`: print).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import drive
from bench.common import QUERY, Workload, summary, text_of_tokens
from bench.report import write_readme
from bench.run import ENV, ROOT, free_port, machine, model_dir, process

BATCH = 128


def workloads(model: str, clients: int, per_client: int, big: int, seed: int = 0) -> list[Workload]:
    """`clients` x 1 x 20 requests (`per_client` each), and one 1 x `big` request; passages of 30-250 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)

    def passages(n: int) -> list[str]:
        return [text_of_tokens(tok, rng.randint(30, 250), rng) for _ in range(n)]

    small = [(f"{QUERY} {i}", passages(20)) for i in range(clients * per_client)]
    return [Workload(f"{clients} clients x 1x20", clients, small), Workload(f"1 x {big}", 1, [(QUERY, passages(big))])]


def pairs_of(w: Workload) -> list[tuple[str, str]]:
    return [(q, p) for q, ps in w.requests for p in ps]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def ceiling(model: str, device: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Plain batched forward passes over pre-tokenized, pre-padded, length-sorted inputs already on the device."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    net = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype).to(device).eval()
    enc = tok([q for q, _ in pairs], [p for _, p in pairs], truncation="only_second", max_length=512).data
    order = sorted(range(len(pairs)), key=lambda i: -len(enc["input_ids"][i]))
    batches = [
        tok.pad([{k: v[i] for k, v in enc.items()} for i in order[s : s + BATCH]], return_tensors="pt").to(device)
        for s in range(0, len(order), BATCH)
    ]
    with torch.inference_mode():
        net(**batches[0])  # warm up
        _sync(device)
        start = time.perf_counter()
        outs = [net(**b).logits.view(-1).float() for b in batches]
        _sync(device)
        wall = time.perf_counter() - start
    del outs, batches, net
    _free(device)
    return summary(len(pairs), wall, [])


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def compute_score(model: str, device: str, pairs: list[tuple[str, str]]) -> tuple[dict[str, Any], list[float]]:
    from FlagEmbedding import FlagReranker

    flag = FlagReranker(model, use_fp16=device.startswith("cuda"), devices=[device], batch_size=BATCH)
    flag.compute_score([list(p) for p in pairs[:BATCH]])  # warm up
    start = time.perf_counter()
    scores = flag.compute_score([list(p) for p in pairs])
    wall = time.perf_counter() - start
    del flag
    _free(device)
    return summary(len(pairs), wall, []), [float(s) for s in scores]


def server(model: str, device: str, loads: list[Workload], tmp: Path) -> tuple[dict[str, Any], list[list[float]], str]:
    """`python -m server` with default flags; each load once to warm up, then timed. Returns the startup line too."""
    port = free_port()
    args = [sys.executable, "-m", "server", "--model", model, "--device", device, "--host", "127.0.0.1"]
    target = f"127.0.0.1:{port}"
    with process([*args, "--port", str(port)], tmp / "server.log") as proc:
        asyncio.run(drive.wait_ready(target, proc))
        results = {}
        for w in loads:
            asyncio.run(drive.grpc_workload(target, w))  # warm up: connections, allocator, kernels
            results[w.name] = asyncio.run(drive.grpc_workload(target, w))
        scores = asyncio.run(_scores(target, loads[0].requests[:5]))
    line = next((x for x in (tmp / "server.log").read_text().splitlines() if " serving " in x), "")
    return results, scores, line


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
            model_name_or_path=model, engine="torch", device=device.split(":")[0], dtype=dtype, batch_size=BATCH,
            bettertransformer=False, model_warmup=False,
        )  # fmt: skip
        engine = AsyncEmbeddingEngine.from_args(args)
        await engine.astart()
        try:
            out = {}
            for w in loads:

                async def call(i: int, query: str, docs: list[str]) -> None:
                    scores, _ = await engine.rerank(query=query, docs=docs, raw_scores=True)
                    assert len(scores) == len(docs)

                await drive._clients(w, call)  # warm up
                out[w.name] = await drive._clients(w, call)
            return out
        finally:
            await engine.astop()

    try:
        return asyncio.run(run())
    except Exception as exc:
        return f"skipped: Infinity's engine failed ({type(exc).__name__}: {str(exc)[:160]})"


def render(env: dict[str, Any], loads: list[Workload], r: dict[str, Any], command: str) -> str:
    names = [w.name for w in loads]
    ceil = r["ceiling"]["pairs_per_s"]
    inf = r["infinity"] if isinstance(r["infinity"], dict) else None
    lines = [
        f"### `{command}`",
        "",
        f"{env['date']}, {env['device_name']}, {env['cpu']}, Python {env['python']}, torch {env['torch']}; "
        f"{env['shape']} shape (random weights), {env['dtype']}; took {env['elapsed_s']} s.",
        "",
        f"Server startup line: `{env['startup']}`",
        "",
        f"| system | {' | '.join(f'{n}, pairs/s' for n in names)} | p99 ms ({names[0]}) |",
        "|---|" + "---:|" * (len(names) + 1),
        f"| ceiling: pre-tokenized, length-sorted forward passes of {BATCH} | "
        + " | ".join(f"{ceil:,.0f}" for _ in names)
        + " | — |",
        f"| FlagReranker.compute_score, one call | {r['compute_score']['pairs_per_s']:,.0f} |"
        + " |" * (len(names) - 1)
        + " — |",
    ]
    for key, label in (("server", "our server, default flags"), ("infinity", "Infinity engine, in-process")):
        row = r[key] if isinstance(r[key], dict) else None
        if row is None:
            lines.append(f"| {label} | {r[key]} |" + " |" * len(names))
            continue
        cells = " | ".join(f"{row[n]['pairs_per_s']:,.0f}" for n in names)
        lines.append(f"| {label} | {cells} | {row[names[0]]['p99_ms']:,.0f} |")
    served = [r["server"][n]["pairs_per_s"] for n in names]
    ratios = ["server / ceiling: " + ", ".join(f"{s / ceil:.2f}" for s in served)]
    if inf:
        rivals = [inf[n]["pairs_per_s"] for n in names]
        ratios.append("server / Infinity: " + ", ".join(f"{s / i:.2f}" for s, i in zip(served, rivals, strict=True)))
    lines += ["", "; ".join(ratios) + f". Parity: max |server - compute_score| = {r['parity']:.2e} over 100 pairs."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (%(default)s)")
    parser.add_argument("--shape", choices=("tiny", "base"), default=None, help="model shape (base on CUDA, else tiny)")
    parser.add_argument("--model", help="an existing model directory instead of a generated one")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=None, help="1x20 requests per client (10 CUDA, 2 CPU)")
    parser.add_argument("--big", type=int, default=1000, help="passages in the single big request")
    parser.add_argument("--no-infinity", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print the results, leave bench/README.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    os.environ.update({k: v for k, v in ENV.items() if k != "TOKENIZERS_PARALLELISM"})  # the server parallelizes
    cuda = args.device.startswith("cuda")
    device = "cuda:0" if args.device == "cuda" else args.device  # FlagReranker wants an indexed device
    shape = args.shape or ("base" if cuda else "tiny")
    model = model_dir(shape, args.model)
    loads = workloads(model, args.clients, args.per_client or (10 if cuda else 2), args.big)
    pairs = pairs_of(loads[0])
    results: dict[str, Any] = {"ceiling": ceiling(model, device, pairs)}
    print(f"ceiling {results['ceiling']['pairs_per_s']:,.0f} pairs/s", flush=True)
    results["compute_score"], reference = compute_score(model, device, pairs)
    print(f"compute_score {results['compute_score']['pairs_per_s']:,.0f} pairs/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="rerank-gpu-") as tmp:
        results["server"], served, startup = server(model, device, loads, Path(tmp))
    results["parity"] = max(abs(a - b) for a, b in zip(sum(served, []), reference, strict=False))
    print(f"server {[round(v['pairs_per_s']) for v in results['server'].values()]} pairs/s", flush=True)
    results["infinity"] = "skipped (--no-infinity)" if args.no_infinity else infinity(model, device, loads)
    print(f"infinity {results['infinity']}", flush=True)
    env = machine("") | {
        "device_name": _device_name(device),
        "shape": shape,
        "dtype": "fp16" if cuda else "fp32",
        "startup": startup.split("serving ", 1)[-1][:400],
        "elapsed_s": round(time.perf_counter() - started),
    }
    command = "python -m bench.gpu" + ("" if cuda else f" --device {args.device} --shape {shape}")
    text = render(env, loads, results, command)
    print(text)
    if not args.no_write:
        write_readme(ROOT / "bench" / "README.md", "gpu" if cuda else "gpu-on-cpu", text)


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return "CPU"


if __name__ == "__main__":
    main()
