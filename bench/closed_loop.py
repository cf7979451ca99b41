"""The 16-client workload against one server, repeated: for trying server flags, and profiling it under load.

`python -m bench.closed_loop [--rounds 20] [--repeat 3] [--py-spy OUT] -- [server flags, e.g. --threads 1]`
Tiny random-weight model (built once, as `bench.run --quick` does); 16 clients each send 1 x 10 requests one after
another. Prints pairs/s and p50 per repetition. Loopback only; the server is stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import drive
from bench.common import build_workloads
from bench.run import free_port, model_dir, process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="requests per client (%(default)s)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--py-spy", help="record a raw py-spy profile of the server's threads into this file")
    parser.add_argument("server_flags", nargs="*", help="flags for python -m server (after --)")
    args = parser.parse_args()
    model = model_dir("tiny", None)
    load = build_workloads(model, {"big": 1, "clients": 16, "rounds": args.rounds, "mixed": 1})[1]
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
            print(f"{r['pairs_per_s']:,.0f} pairs/s, p50 {r['p50_ms']:.0f} ms", flush=True)
        if spy is not None:
            spy.wait()


if __name__ == "__main__":
    main()
