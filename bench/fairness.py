"""Does one huge request stall small ones? 1 x 1 latency while a 1,000-candidate request of long texts is scored.

`python -m bench.fairness [--model DIR] [--root TREE]`: starts `python -m server` (from TREE, default this one: give
an older checkout to compare) on 127.0.0.1 with the tiny random model, then
- alone: 20 sequential 1 x 1 calls (p50, max);
- during: one 1 x N request of long texts (default 1,000 candidates of 12,500 emoji, ~50 MB) and, while it runs,
  1 x 1 calls one after another: their p50 and max, and the big request's time and its forward passes' time.
The server is stopped by pid. Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.drive import wait_ready
from bench.run import ENV, free_port, model_dir
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc

SMALL = pb.RerankRequest(query="what is a panda?", candidates=["The giant panda is a bear."])


async def _one(stub: pb_grpc.RerankerStub) -> float:
    start = time.perf_counter()
    await stub.Rerank(SMALL, timeout=120)
    return (time.perf_counter() - start) * 1e3


async def measure(target: str, big: pb.RerankRequest) -> dict[str, float]:
    opts = [("grpc.max_send_message_length", 256 << 20)]
    async with grpc.aio.insecure_channel(target, options=opts) as ch:
        stub = pb_grpc.RerankerStub(ch)
        for _ in range(5):
            await _one(stub)
        alone = [await _one(stub) for _ in range(20)]
        start = time.perf_counter()
        task = asyncio.ensure_future(stub.Rerank(big, timeout=600))
        during: list[float] = []
        while not task.done():
            during.append(await _one(stub))
        reply = await task
        big_ms = (time.perf_counter() - start) * 1e3
    during = during[:-1] or during  # the last one may have run after the big request was done
    print("1 x 1 latencies during (ms):", " ".join(f"{ms:.0f}" for ms in during))
    return {
        "alone p50 ms": statistics.median(alone),
        "alone max ms": max(alone),
        "during p50 ms": statistics.median(during),
        "during max ms": max(during),
        "small calls during": len(during),
        "big request ms": big_ms,
        "big forward ms": reply.usage.inference_ms,
        "big queue ms": reply.usage.queue_ms,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the tiny random model, built once)")
    p.add_argument(
        "--root", default=str(Path(__file__).resolve().parent.parent), help="the tree to run the server from"
    )
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--chars", type=int, default=12500)
    args = p.parse_args()
    model = model_dir("tiny", args.model)
    big = pb.RerankRequest(query="what is a panda?", candidates=["😀" * args.chars] * args.candidates)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        env = os.environ | ENV | {"PYTHONPATH": args.root}
        with open(Path(tmp) / "server.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=args.root, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            asyncio.run(wait_ready(f"127.0.0.1:{port}", proc))
            result = asyncio.run(measure(f"127.0.0.1:{port}", big))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"server tree: {args.root}; big request: 1 x {args.candidates} texts of {args.chars} characters")
    for k, v in result.items():
        print(f"  {k:>20}: {v:,.1f}")


if __name__ == "__main__":
    main()
