"""The 16-client workload against one server, repeated: for trying server flags, and profiling it under load.

`python -m bench.closed_loop [--rounds 20] [--repeat 3] [--py-spy OUT] [--in-process] -- [server flags]`
Tiny random-weight model (built once, as `bench.run --quick` does); 16 clients each send 1 x 10 requests one after
another. Prints pairs/s and p50 per repetition. Loopback only; the server is stopped by pid. Server flags, e.g.
`-- --threads 1`, go after `--`.

`--in-process` drives the same server code without gRPC: 16 tasks in the server's own event loop call the servicer's
request path directly (validation, tokenizing pool, batcher, model, response). Against the gRPC figures it shows what
the transport (server and load generator, on the same cores) costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import drive
from bench.common import Workload, build_workloads, summary
from bench.run import ENV, free_port, model_dir, process


async def in_process(model: str, load: Workload, flags: list[str], repeat: int) -> None:
    os.environ.update(ENV)  # as the benchmark's server processes run
    from reranker_proto import reranker_pb2 as pb
    from server.app import RerankServer
    from server.config import load_config

    config = load_config(["--model", model, "--host", "127.0.0.1", "--port", "0", *flags])
    server = RerankServer(config)
    await server.start()  # binds, loads and warms the model
    try:
        service = server.service

        async def workload() -> dict[str, Any]:
            latencies: list[float] = []

            async def client(i: int) -> None:
                for query, passages in load.requests[i :: load.clients]:
                    t = time.perf_counter()
                    await service._rerank(pb.RerankRequest(query=query, candidates=passages))
                    latencies.append(time.perf_counter() - t)

            start = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(load.clients)))
            return summary(load.pairs, time.perf_counter() - start, latencies)

        await workload()  # warm up
        for _ in range(repeat):
            r = await workload()
            print(f"in-process: {r['pairs_per_s']:,.0f} pairs/s, p50 {r['p50_ms']:.0f} ms", flush=True)
    finally:
        await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="requests per client (%(default)s)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--py-spy", help="record a raw py-spy profile of the server's threads into this file")
    parser.add_argument("--in-process", action="store_true", help="call the servicer in-process, without gRPC")
    parser.add_argument("server_flags", nargs="*", help="flags for python -m server (after --)")
    args = parser.parse_args()
    model = model_dir("tiny", None)
    load = build_workloads(model, {"big": 1, "clients": 16, "rounds": args.rounds, "mixed": 1})[1]
    if args.in_process:
        asyncio.run(in_process(model, load, args.server_flags, args.repeat))
        return
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryDirectory() as tmp, process([*server, *args.server_flags], Path(tmp) / "log") as proc:
        asyncio.run(drive.wait_ready(target, proc))
        asyncio.run(drive.grpc_workload(target, load))  # warm up
        spy = None
        if args.py_spy:
            cmd = ["py-spy", "record", "--pid", str(proc.pid), "--rate", "100", "--nonblocking", "--threads"]
            spy = subprocess.Popen([*cmd, "--format", "raw", "-o", args.py_spy, "--duration", str(2 * args.repeat)])
        for _ in range(args.repeat):
            r = asyncio.run(drive.grpc_workload(target, load))
            queue, inference = r["mean_queue_ms"], r["mean_inference_ms"]
            rest = r["mean_ms"] - queue - inference
            print(
                f"{r['pairs_per_s']:,.0f} pairs/s, p50 {r['p50_ms']:.0f} ms; a request's mean {r['mean_ms']:.1f} ms = "
                f"queued {queue:.1f} + forward passes {inference:.1f} + outside the batcher {rest:.1f}",
                flush=True,
            )
        if spy is not None:
            spy.wait()


if __name__ == "__main__":
    main()
