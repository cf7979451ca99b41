"""What tracing costs: the 16-client workload against servers with tracing off and on, alternating; and the hooks'
own cost when off, per call.

`python -m bench.tracing [--rounds 10] [--repeat 5] [--rest] [--shape tiny|base] [--baseline TREE]`

Servers (`python -m server`, a random-weight model (tiny unless --shape), each in its own process, all started
before the first run and idle while another is measured):
- off: no OTEL_* variables, as deployed by default;
- on: OTEL_TRACES_EXPORTER=otlp to an OTLP receiver in this process (bench/otlp_sink.py, standing in for a Collector
  on the same node), every request sampled (a root span each: parentbased_always_on), the SDK's batch processor;
- on 10%: the same, one request in ten sampled (parentbased_traceidratio, 0.1);
- baseline (with --baseline TREE): the server of another checkout, e.g. the commit before tracing, with no OTEL_*.

Each repetition runs the workload once against every server, in a rotating order, so drift on a shared machine falls
on all of them alike; medians are reported, with the server process's CPU time per request (user + system, from
/proc). --rest sends the same load through the in-process REST bridge too (the trace then starts at the bridge).
First, in a process of its own, one request's tracing work alone (its spans made, then also exported over OTLP), in
CPU microseconds: the part of the cost that other jobs on the machine cannot blur. Loopback only; every process is
stopped by pid. Needs the tracing extra.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
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


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all its threads) process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(tree: str, model: str, otel: dict[str, str], log: Path, stack: ExitStack) -> tuple[str, str, int]:
    """`python -m server` from `tree` with the REST bridge; its gRPC target, REST URL and pid."""
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
    return f"127.0.0.1:{port}", f"http://127.0.0.1:{rest}/rerank", proc.pid


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


def request_spans_us(exporter: str, sink_port: int, n: int = 3000) -> float:
    """CPU µs (this process, the SDK's export thread included) for one gRPC request's tracing work with tracing on:
    its RPC span, a tokenizing slice, the queue and one forward pass, the response, the access line's trace id.
    exporter "otlp" sends them to the receiver at `sink_port`; "none" makes them and exports nothing."""
    import grpc
    from opentelemetry import trace

    from server import tracing
    from server.engine.batcher import BatchResult, Pass

    os.environ.update({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"})
    tracing.setup()
    provider: Any = trace.get_tracer_provider()
    if exporter == "none":
        provider._active_span_processor._span_processors = ()  # spans are made and ended, then dropped
    t = time.perf_counter()
    result = BatchResult([0.0] * 10, 300, 0.001, 0.002, t, [Pass(1, t + 0.001, t + 0.003, 32, 900, 10)])

    def one() -> None:
        started = tracing.rpc_started("Rerank", (("x-request-id", "r"),), "r")
        tracing.on_thread("tokenize", len, {"reranker.pairs": 10})([("q", "p")])
        tracing.batched(result, "m", "cpu", 10)
        with tracing.span("response"):
            tracing.log_fields()
        tracing.rpc_ended(started, grpc.StatusCode.OK, None, 10, False)

    for _ in range(300):
        one()
    provider.force_flush()
    start = time.process_time()
    for i in range(n):
        one()
        if i % 300 == 299:  # the batch processor's queue never overflows (it would drop spans, and their cost)
            provider.force_flush()
    provider.force_flush()
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="requests per client per run (%(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per server (%(default)s)")
    parser.add_argument("--rest", action="store_true", help="also drive the same load through the REST bridge")
    parser.add_argument("--shape", default="tiny", help="the random-weight model's shape: tiny (default) or base")
    parser.add_argument("--baseline", help="a checkout to run a third server from (tracing off), e.g. the old commit")
    parser.add_argument("--spans", nargs=2, metavar=("EXPORTER", "PORT"), help=argparse.SUPPRESS)  # a child's part
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwind: the servers started below are stopped by pid
    if args.spans:
        print(f"{request_spans_us(args.spans[0], int(args.spans[1])):.0f}")
        return

    hooks = hooks_off_ns()
    print("hooks with tracing off, ns per call:", flush=True)
    for name, ns in hooks.items():
        print(f"  {name}: {ns:.0f}", flush=True)
    sink_server, sink_port, sink = start_sink(keep=False)
    print("one gRPC request's tracing work with tracing on (5 spans), CPU us, in a process of its own:", flush=True)
    for exporter in ("none", "otlp", "none", "otlp"):
        cmd = [sys.executable, "-m", "bench.tracing", "--spans", exporter, str(sink_port)]
        us = subprocess.run(cmd, cwd=ROOT, env=os.environ | ENV, capture_output=True, text=True, check=True).stdout
        print(f"  {'made, not exported' if exporter == 'none' else 'exported over OTLP'}: {us.strip()}", flush=True)
    sink.count = 0  # from here on, the servers' spans only
    model = model_dir(args.shape, None)
    load = build_workloads(model, {"big": 1, "clients": 16, "rounds": args.rounds, "mixed": 1})[1]
    on = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
        "OTEL_SERVICE_NAME": "reranker-bench",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    tenth = on | {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    variants = {"off": (str(ROOT), {}), "on": (str(ROOT), on), "on 10%": (str(ROOT), tenth)}
    if args.baseline:
        variants = {"baseline": (args.baseline, {}), **variants}
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        stack.callback(sink_server.stop, 0)
        targets = {name: start(tree, model, otel, Path(tmp) / name, stack) for name, (tree, otel) in variants.items()}
        paths = [("grpc", 0)] + ([("rest", 1)] if args.rest else [])
        for target, url, _ in targets.values():  # warm each path once, not timed
            asyncio.run(drive.grpc_workload(target, load))
            if args.rest:
                asyncio.run(drive.rest_workload(url, load))
        names = list(targets)
        for r in range(args.repeat):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for path, which in paths:
                    where, pid = targets[name][which], targets[name][2]
                    run = drive.grpc_workload(where, load) if path == "grpc" else drive.rest_workload(where, load)
                    cpu = cpu_s(pid)
                    out = asyncio.run(run)
                    out["cpu_ms"] = (cpu_s(pid) - cpu) * 1e3 / (load.clients * args.rounds)
                    results.setdefault(f"{path} {name}", []).append(out)
                    print(
                        f"{path} {name}: {out['pairs_per_s']:,.0f} pairs/s, p50 {out['p50_ms']:.1f} ms, "
                        f"server CPU {out['cpu_ms']:.2f} ms per request",
                        flush=True,
                    )
        time.sleep(6)  # the SDK's batch processor exports every 5 s
    print(f"\nmedians of {args.repeat} runs, 16 clients x {args.rounds} requests of 1 x 10 ({args.shape} model):")
    for key, runs in results.items():
        pairs = statistics.median(r["pairs_per_s"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        cpu = statistics.median(r["cpu_ms"] for r in runs)
        print(f"  {key}: {pairs:,.0f} pairs/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, server CPU {cpu:.2f} ms per request")
    sent = (args.repeat + 1) * (load.clients * args.rounds + load.clients) * len(paths)  # + warm-up, + connecting
    per = sink.count / (sent * 1.1)  # 'on 10%' samples about one request in ten
    print(f"spans received from 'on' and 'on 10%': {sink.count:,}, about {per:.1f} per sampled request")


if __name__ == "__main__":
    main()
