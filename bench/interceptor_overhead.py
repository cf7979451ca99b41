"""Per-call cost of the server interceptor (request id, API key, metrics, access log) on 127.0.0.1.

`python -m bench.interceptor_overhead [--calls 2000] [--rounds 5]`
Serves one tiny random-weight model twice: the real RerankServer (interceptor on, API key on, access log
formatted and written to /dev/null) and a bare grpc.aio server with the same servicer and nothing else.
Times sequential GetModelInfo calls (no model work, so the interceptor's share is as large as it gets)
and prints the median per-call time of the rounds for each.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from typing import TextIO

import grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.config import Config
from server.logs import JsonFormatter, TextFormatter
from tools.make_model import build_model

KEY = "bench-key"


async def per_call_us(port: int, calls: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.RerankerStub(ch)
        metadata = (("authorization", f"Bearer {KEY}"),)
        request = pb.GetModelInfoRequest()
        await stub.GetModelInfo(request, metadata=metadata)  # connection set-up, not counted
        start = time.perf_counter()
        for _ in range(calls):
            await stub.GetModelInfo(request, metadata=metadata)
        return (time.perf_counter() - start) / calls * 1e6


async def run(config: Config, engine: object, calls: int, rounds: int, sink: TextIO) -> dict[str, list[float]]:
    srv = RerankServer(config, engine=engine)
    await srv.start()
    bare = grpc.aio.server()
    pb_grpc.add_RerankerServicer_to_server(srv.service, bare)
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()
    access = logging.getLogger("server.access")
    handler = logging.StreamHandler(sink)
    access.addHandler(handler)
    access.propagate = False
    results: dict[str, list[float]] = {"bare": [], "interceptor, log off": [], "text log": [], "json log": []}
    try:
        for _ in range(rounds):  # interleaved, so drift from other load hits every mode alike
            results["bare"].append(await per_call_us(bare_port, calls))
            access.setLevel(logging.WARNING)
            results["interceptor, log off"].append(await per_call_us(srv.port, calls))
            access.setLevel(logging.INFO)
            handler.setFormatter(TextFormatter())
            results["text log"].append(await per_call_us(srv.port, calls))
            handler.setFormatter(JsonFormatter())
            results["json log"].append(await per_call_us(srv.port, calls))
    finally:
        access.removeHandler(handler)
        await bare.stop(0)
        await srv.stop(0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from server.engine.model import RerankerModel

    with tempfile.TemporaryDirectory() as tmp:
        config = Config(model=str(build_model(tmp, "tiny")), host="127.0.0.1", port=0, api_key=KEY)
        engine = RerankerModel(config)
        with open(os.devnull, "w") as sink:
            results = asyncio.run(run(config, engine, args.calls, args.rounds, sink))
    base = statistics.median(results["bare"])
    print(f"GetModelInfo on 127.0.0.1, {args.calls} sequential calls, median of {args.rounds} rounds")
    for name, values in results.items():
        m = statistics.median(values)
        print(f"{name:22s} {m:8.1f} us/call   (+{m - base:6.1f} us over bare)")


if __name__ == "__main__":
    main()
