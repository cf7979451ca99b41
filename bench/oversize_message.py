"""What a too-large message costs the server: time to the refusal and the server's peak RSS growth.

`python -m bench.oversize_message [--mb 200]`
Serves a tiny random-weight model with the default limits on 127.0.0.1, sends one Rerank of about
`--mb` megabytes, and prints the status, the time until it came back, and how much the process's peak
resident memory grew while it was refused (client and server share the process; the client's own copy
of the message is made before the peak is sampled).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time

import grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer, max_receive_bytes
from server.config import Config
from tools.make_model import build_model


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run(config: Config, engine: object, megabytes: int) -> None:
    srv = RerankServer(config, engine=engine)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            chunk = "x" * 10_000_000
            request = pb.RerankRequest(query="q", candidates=[chunk] * (megabytes // 10))
            payload = request.SerializeToString()  # the client's copy, before the baseline
            before = peak_rss_mb()
            start = time.perf_counter()
            call = ch.unary_unary("/reranker.v1.Reranker/Rerank")
            try:
                await call(payload)
                status = "OK"
            except grpc.aio.AioRpcError as err:
                status = f"{err.code().name}: {err.details()}"
            elapsed = time.perf_counter() - start
            print(f"message {len(payload) / 1e6:.0f} MB, limit {max_receive_bytes(config) / 1e6:.0f} MB")
            print(f"status {status}")
            print(f"refused after {elapsed * 1e3:.0f} ms; peak RSS grew {peak_rss_mb() - before:.0f} MB")
            after = await stub.Rerank(pb.RerankRequest(query="q", candidates=["a"]))
            print(f"then a normal call: {len(after.scores)} score")
    finally:
        await srv.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    from server.engine.model import RerankerModel

    with tempfile.TemporaryDirectory() as tmp:
        config = Config(model=str(build_model(tmp, "tiny")), host="127.0.0.1", port=0)
        asyncio.run(run(config, RerankerModel(config), args.mb))


if __name__ == "__main__":
    main()
