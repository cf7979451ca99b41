"""Latency of one caller with `--threads` 0/1/2/4, as the machine is and beside a busy neighbour.

`python -m bench.threads [--shapes tiny,base] [--threads 0,1,2,4] [--small 10] [--big 50] [--seconds 20]`
For each model shape, wait policy and thread count it starts one `python -m server` on 127.0.0.1 and sends 1 x
`--small` requests one after another (then a few 1 x `--big`), first as the machine is, then beside `--burners`
busy processes (one per core by default: pure-Python loops, each bounded by its own deadline and stopped by pid).
Wait policies: `passive` is what `python -m server` sets (OMP_WAIT_POLICY=PASSIVE); `spin` is libgomp's own
default (GOMP_SPINCOUNT=300000: spin a while at each barrier, then sleep), which the server ran with before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc

from bench.common import percentile
from bench.run import free_port, machine, model_dir, process
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from tools.make_model import SENTENCES

WORDS = " ".join(SENTENCES).split()
POLICIES = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin": {"GOMP_SPINCOUNT": "300000"}}
BURN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


def request(n: int, seed: int) -> pb.RerankRequest:
    rng = random.Random(seed)
    passages = [" ".join(rng.choices(WORDS, k=rng.randint(8, 20))) for _ in range(n)]
    return pb.RerankRequest(query="what is panda?", candidates=passages)


@contextlib.contextmanager
def burners(count: int, limit_s: float) -> Iterator[None]:
    """`count` busy processes, each exiting by itself after `limit_s`; stopped by pid on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN.format(s=limit_s)]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let the scheduler see them
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def timed_calls(stub: pb_grpc.RerankerStub, req: pb.RerankRequest, calls: int, seconds: float) -> dict[str, float]:
    """Up to `calls` calls one after another within `seconds`; a call cut off by the window counts as unfinished."""
    done: list[float] = []
    end = time.monotonic() + seconds
    unfinished = 0
    while len(done) < calls and (left := end - time.monotonic()) > 0:
        start = time.perf_counter()
        try:
            stub.Rerank(req, timeout=left)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                raise
            unfinished += 1
            break
        done.append(time.perf_counter() - start)
    return {
        "calls": len(done),
        "unfinished": unfinished,
        "p50_ms": percentile(done, 50) * 1e3,
        "p90_ms": percentile(done, 90) * 1e3,
        "max_ms": max(done) * 1e3 if done else float("nan"),
    }


def measure(model: str, threads: int, policy: str, args: argparse.Namespace, log: str) -> dict[str, dict[str, float]]:
    port = free_port()
    server = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    small, big = request(args.small, 1), request(args.big, 2)
    out = {}
    with process([*server, "--threads", str(threads), "--log-level", "WARNING"], log, env=POLICIES[policy]) as proc:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RerankerStub(channel)
            grpc.channel_ready_future(channel).result(timeout=600)
            _wait_serving(stub, proc)
            timed_calls(stub, small, 3, 30)  # warm: first calls pay one-off costs
            out["small"] = timed_calls(stub, small, args.calls, args.seconds)
            out["big"] = timed_calls(stub, big, 3, args.seconds)
            with burners(args.burners, 2 * args.seconds + 10):
                out["small busy"] = timed_calls(stub, small, args.calls, args.seconds)
                out["big busy"] = timed_calls(stub, big, 3, args.seconds)
    return out


def _wait_serving(stub: pb_grpc.RerankerStub, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            stub.Rerank(request(1, 0), timeout=5)
            return
        except grpc.RpcError:
            time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


def cell(r: dict[str, float]) -> str:
    if not r["calls"]:
        return "none finished"
    if r["calls"] > 3:
        text = f"{r['p50_ms']:,.0f} / {r['p90_ms']:,.0f}"
    else:
        text = f"{r['p50_ms']:,.0f} (max {r['max_ms']:,.0f})"
    return text + (f", {r['calls']:.0f} calls + 1 cut off" if r["unfinished"] else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,base", help="model shapes (%(default)s)")
    parser.add_argument("--threads", default="0,1,2,4", help="--threads values (%(default)s)")
    parser.add_argument("--policies", default="passive,spin", help="OpenMP wait policies (%(default)s)")
    parser.add_argument("--small", type=int, default=10, help="passages in the latency request (%(default)s)")
    parser.add_argument("--big", type=int, default=50, help="passages in the large request (%(default)s)")
    parser.add_argument("--calls", type=int, default=30, help="small calls per phase, at most (%(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="bound on each phase (%(default)s)")
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 1, help="busy processes (one per core)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwind: the server and burners are stopped by pid
    env = machine("")
    print(f"{env['date']}, {env['cpu']}, load before {' '.join(env['load'])}, burners={args.burners}", flush=True)
    small, big = f"1x{args.small}", f"1x{args.big}"
    phases = (f"{small} p50 / p90 ms", f"{big} ms", f"{small} + burners p50 / p90 ms", f"{big} + burners ms")
    print("| shape | policy | --threads | " + " | ".join(phases) + " |")
    print("|---|---|---:|---:|---:|---:|---:|", flush=True)
    log = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench-threads-server.log")
    for shape in args.shapes.split(","):
        model = model_dir(shape, None)
        for policy in args.policies.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                r = measure(model, threads, policy, args, log)
                cells = " | ".join(cell(r[k]) for k in ("small", "big", "small busy", "big busy"))
                print(f"| {shape} | {policy} | {threads} | {cells} |", flush=True)
    print(f"load after: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
