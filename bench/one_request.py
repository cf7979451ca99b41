"""Wall time of one Rerank (1 query x N candidates) through gRPC vs the same compute_score in-process.

`python -m bench.one_request --shape tiny|base [--candidates 100] [--repeats 5]`
Builds a random-weight model of the given shape (offline), serves it on 127.0.0.1, and times both paths
on the same pairs; prints the median of the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import grpc

os.environ.setdefault("TQDM_DISABLE", "1")  # compute_score shows progress bars; not part of what is timed

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.config import Config
from tools.make_model import SENTENCES, build_model

WORDS = " ".join(SENTENCES).split()


def passages(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(20, 120))) for _ in range(n)]


async def time_grpc(config: Config, engine: object, query: str, docs: list[str], repeats: int) -> list[float]:
    srv = RerankServer(config, engine=engine)
    await srv.start()
    times = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            request = pb.RerankRequest(query=query, candidates=docs)
            await stub.Rerank(request)  # connection set-up, not counted
            for _ in range(repeats):
                start = time.perf_counter()
                await stub.Rerank(request)
                times.append(time.perf_counter() - start)
    finally:
        await srv.stop(0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--model", help="an existing model directory instead of building one")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from FlagEmbedding import FlagReranker

    from server.engine.model import RerankerModel

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(tmp, args.shape)
        config = Config(model=str(model_dir), host="127.0.0.1", port=0)
        engine = RerankerModel(config)
        flag = FlagReranker(str(model_dir), devices=["cpu"], batch_size=config.batch_size)
        query, docs = "what is panda?", passages(args.candidates)
        flag.compute_score([[query, d] for d in docs])  # warm-up
        in_process = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            flag.compute_score([[query, d] for d in docs])
            in_process.append(time.perf_counter() - start)
        through_grpc = asyncio.run(time_grpc(config, engine, query, docs, args.repeats))

    a, b = statistics.median(in_process), statistics.median(through_grpc)
    model = args.model or f"shape={args.shape}"
    print(f"model {model} 1 x {args.candidates} candidates, median of {args.repeats}")
    print(f"in-process FlagReranker.compute_score: {a * 1e3:9.1f} ms")
    print(f"gRPC Rerank (127.0.0.1):               {b * 1e3:9.1f} ms   ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
