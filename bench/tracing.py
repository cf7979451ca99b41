"""What tracing costs: the 16-client workload against servers with tracing off and on, alternating; and the hooks'
own cost when off, per call.

`python -m bench.tracing [--rounds 10] [--repeat 5] [--rest] [--baseline TREE]`

Servers (`python -m server`, tiny random-weight model, each in its own process, all started before the first run and
idle while another is measured):
- off: no OTEL_* variables, as deployed by default;
- on: OTEL_TRACES_EXPORTER=otlp to an OTLP receiver in this process (bench/otlp_sink.py, standing in for a Collector
  on the same node), every request sampled (a root span each: parentbased_always_on), the SDK's batch processor;
- baseline (with --baseline TREE): the server of another checkout, e.g. the commit before tracing, with no OTEL_*.

Each repetition runs the workload once against every server, in a rotating order, so drift on a shared machine falls
on all of them alike; medians are reported. --rest sends the same load through the in-process REST bridge too (the
trace then starts at the bridge). Loopback only; every process is stopped by pid. Needs the tracing extra.
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
import timeit
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import drive
from bench.common import build_workloads
from bench.otlp_sink import start_sink
from bench.run import ENV, ROOT, free_port, model_dir


def start(tree: str, model: str, otel: dict[str, str], log: Path, stack: ExitStack) -> tuple[str, str]:
    """`python -m server` from `tree` with the REST bridge; its gRPC target and REST URL."""
    port, rest = free_port(), free_port()
    cmd = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | ENV | otel | {"PYTHONPATH": tree}
    out = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen([*cmd, "--rest-port", str(rest)], cwd=tree, stdout=out, stderr=subprocess.STDOUT, env=env)
    stack.callback(stop, proc)
    try:
        asyncio.run(drive.wait_ready(f"127.0.0.1:{port}", proc))
    except RuntimeError:
        raise RuntimeError(f"the server from {tree} did not start:\n{log.read_text()[-3000:]}") from None
    return f"127.0.0.1:{port}", f"http://127.0.0.1:{rest}/rerank"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hooks_off_ns() -> dict[str, float]:
    """ns per call of each hook on the request path with tracing off (this process never turned it on)."""
    from clients._tracing import context_metadata
    from server import tracing
    from server.engine.batcher import BatchResult

    assert not tracing.on()
    result = BatchResult([0.0], 10, 0.0, 0.0)
    meta = (("x-request-id", "r"), ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"))
    calls = {
        "rpc_started + rpc_ended": lambda: tracing.rpc_ended(tracing.rpc_started("Rerank", meta, "r"), None, "", 1, 0),
        "on_thread (per tokenizing slice)": lambda: tracing.on_thread("tokenize", len, {"reranker.pairs": 10}),
        "worker_taken (per slice, workers only)": lambda: tracing.worker_taken(1),
        "batched": lambda: tracing.batched(result, "m", "cpu", 1),
        "span('response')": lambda: tracing.span("response").__enter__(),
        "log_fields (access line)": tracing.log_fields,
        "client context_metadata": context_metadata,
    }
    n = 200_000
    return {name: min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e9 for name, fn in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="requests per client per run (%(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per server (%(default)s)")
    parser.add_argument("--rest", action="store_true", help="also drive the same load through the REST bridge")
    parser.add_argument("--baseline", help="a checkout to run a third server from (tracing off), e.g. the old commit")
    args = parser.parse_args()

    hooks = hooks_off_ns()
    print("hooks with tracing off, ns per call:", flush=True)
    for name, ns in hooks.items():
        print(f"  {name}: {ns:.0f}", flush=True)
    model = model_dir("tiny", None)
    load = build_workloads(model, {"big": 1, "clients": 16, "rounds": args.rounds, "mixed": 1})[1]
    sink_server, sink_port, sink = start_sink(keep=False)
    on = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
        "OTEL_SERVICE_NAME": "reranker-bench",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    variants = {"off": (str(ROOT), {}), "on": (str(ROOT), on)}
    if args.baseline:
        variants = {"baseline": (args.baseline, {}), **variants}
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        stack.callback(sink_server.stop, 0)
        targets = {name: start(tree, model, otel, Path(tmp) / name, stack) for name, (tree, otel) in variants.items()}
        paths = [("grpc", 0)] + ([("rest", 1)] if args.rest else [])
        for target, url in targets.values():  # warm each path once, not timed
            asyncio.run(drive.grpc_workload(target, load))
            if args.rest:
                asyncio.run(drive.rest_workload(url, load))
        names = list(targets)
        for r in range(args.repeat):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for path, which in paths:
                    where = targets[name][which]
                    run = drive.grpc_workload(where, load) if path == "grpc" else drive.rest_workload(where, load)
                    out = asyncio.run(run)
                    results.setdefault(f"{path} {name}", []).append(out)
                    print(f"{path} {name}: {out['pairs_per_s']:,.0f} pairs/s, p50 {out['p50_ms']:.1f} ms", flush=True)
        time.sleep(6)  # the SDK's batch processor exports every 5 s
    print(f"\nmedians of {args.repeat} runs, 16 clients x {args.rounds} requests of 1 x 10 (tiny model):")
    for key, runs in results.items():
        pairs = statistics.median(r["pairs_per_s"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        print(f"  {key}: {pairs:,.0f} pairs/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    sent = (args.repeat + 1) * (load.clients * args.rounds + load.clients) * len(paths)  # + warm-up, + connecting
    print(f"spans received from 'on': {sink.count:,}, about {sink.count / sent:.1f} per request")


if __name__ == "__main__":
    main()
