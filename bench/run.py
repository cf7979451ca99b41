"""Side-by-side benchmark: (a) compute_score, (b) our gRPC service, (c) the REST bridge, (d) a naive server,
(e) the engine ceiling, on the same random-weight model and the same generated workload.

`python -m bench.run [--quick]`: full mode uses the bge-reranker-base shape (12 layers, hidden 768,
vocab 250002), --quick a tiny model. Everything runs on 127.0.0.1; every process started is stopped.
Results are printed and written into bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench import drive
from bench.common import build_workloads, peak_rss_mib, reset_peak_rss, save_workloads
from bench.report import render, write_readme

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # full: 1 x 1000 on a 2-core CPU with the base shape would take ~6 min per system; see README.
    "full": {"big": 100, "clients": 16, "rounds": 1, "mixed": 3, "overload_s": 10.0},
    "quick": {"big": 1000, "clients": 16, "rounds": 4, "mixed": 10, "overload_s": 3.0},
}
ENV = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def model_dir(shape: str, given: str | None) -> str:
    """The given directory, or a random-weight model of `shape` built once into a cache directory."""
    if given:
        return given
    from tools.make_model import build_model

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reranker-bench" / f"{shape}-seed0"
    if not (cache / "config.json").is_file():
        print(f"building a random-weight {shape} model in {cache} ...", flush=True)
        build_model(cache, shape)
    return str(cache)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process(
    args: list[str],
    log: Path | str,
    preexec_fn: Callable[[], object] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process (its output in `log`; `env` added to ours), stopped by pid on exit: SIGTERM, then SIGKILL."""
    with open(log, "wb") as out:
        environment = os.environ | ENV | (env or {})
        proc = subprocess.Popen(
            args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=environment, preexec_fn=preexec_fn
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_inproc(mode: str, model: str, workloads: Path, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{mode}.json"
    with process([sys.executable, "-m", "bench.inproc", mode, "--model", model, "--workloads", str(workloads),
                  "--out", str(out)], tmp / f"{mode}.log") as proc:  # fmt: skip
        if proc.wait(900) != 0:
            raise RuntimeError(f"bench.inproc {mode} failed:\n{(tmp / f'{mode}.log').read_text()[-3000:]}")
    return json.loads(out.read_text())


def rest_bridge_args(grpc_port: int, rest_port: int) -> tuple[list[str], list[str]] | None:
    """Server flags, or a separate bridge command, for (c); None when the REST bridge is not installed."""
    if importlib.util.find_spec("rest_bridge") is None or importlib.util.find_spec("aiohttp") is None:
        return None
    from server.config import Config

    if "rest_port" in {f.name for f in fields(Config)}:
        return ["--rest-port", str(rest_port)], []
    bridge = [sys.executable, "-m", "rest_bridge", "--grpc-target", f"127.0.0.1:{grpc_port}", "--port", str(rest_port)]
    return [], bridge


def measure(pid: int, coro: Any) -> dict[str, Any]:
    """Run one client-driven workload against process `pid`; its peak RSS over that workload only."""
    reset_peak_rss(pid)
    result = asyncio.run(coro)
    return result | {"peak_rss_mib": peak_rss_mib(pid)}


def run_servers(model: str, workloads: list[Any], sizes: dict[str, Any], tmp: Path, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"notes": []}
    port, rest_port = free_port(), free_port()
    server = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--log-level", "WARNING"]
    rest = rest_bridge_args(port, rest_port)
    if rest is None:
        results["notes"].append("(c) skipped: the REST bridge (`rest_bridge`, with aiohttp) is not installed here.")
    with contextlib.ExitStack() as stack:
        proc = stack.enter_context(process([*server, "--port", str(port), *(rest[0] if rest else [])], tmp / "b.log"))
        asyncio.run(drive.wait_ready(f"127.0.0.1:{port}", proc))
        results["b"] = {w.name: measure(proc.pid, drive.grpc_workload(f"127.0.0.1:{port}", w)) for w in workloads}
        if rest is not None:
            if rest[1]:
                stack.enter_context(process(rest[1], tmp / "c.log"))
            url = f"http://127.0.0.1:{rest_port}/rerank"
            asyncio.run(drive.wait_rest_ready(url))
            chosen = workloads if quick else [w for w in workloads if w.name == "16 clients"]
            results["c"] = {w.name: measure(proc.pid, drive.rest_workload(url, w)) for w in chosen}
    port = free_port()
    small = ["--max-candidates", "10", "--max-queue-pairs", "20"]
    with process([*server, "--port", str(port), *small], tmp / "overload.log") as proc:
        asyncio.run(drive.wait_ready(f"127.0.0.1:{port}", proc))
        results["overload"] = asyncio.run(
            drive.overload(f"127.0.0.1:{port}", proc.pid, workloads[1], 64, sizes["overload_s"])
        ) | {"max_queue_pairs": 20, "clients": 64}
    port = free_port()
    naive = [sys.executable, "-m", "bench.naive_server", "--model", model, "--port", str(port)]
    with process(naive, tmp / "d.log") as proc:
        asyncio.run(drive.wait_ready(f"127.0.0.1:{port}", proc))
        results["d"] = {w.name: measure(proc.pid, drive.grpc_workload(f"127.0.0.1:{port}", w)) for w in workloads}
    return results


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each system's workload as measured in the run that gave its median pairs/s (overload: the median refusal
    p99), and (b)/(e) of every run as a note: the VM's speed drifts between minutes, one run is one sample."""
    middle = (len(runs) - 1) // 2
    out: dict[str, Any] = {"notes": list(runs[0]["notes"])}
    for key in "abcde":
        names = runs[0].get(key, {})
        out[key] = {n: sorted((r[key][n] for r in runs), key=lambda x: x["pairs_per_s"])[middle] for n in names}
    out["overload"] = sorted((r["overload"] for r in runs), key=lambda o: o["refusal_p99_ms"])[middle]
    if len(runs) > 1:
        each = "; ".join(
            f"{n} " + ", ".join(f"{r['b'][n]['pairs_per_s'] / r['e'][n]['pairs_per_s']:.2f}" for r in runs)
            for n in runs[0]["b"]
        )
        out["notes"].append(f"Median of {len(runs)} runs per system. (b)/(e) in each run: {each}.")
    return out


def machine(note: str) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": f"{cpu} x {os.cpu_count()} cores",
        "load": open("/proc/loadavg").read().split()[:3],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "note": note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds instead of minutes")
    parser.add_argument("--model", help="an existing model directory instead of a generated one")
    parser.add_argument("--big", type=int, help="passages in the big request")
    parser.add_argument("--rounds", type=int, help="requests per client in the concurrent workloads")
    parser.add_argument("--repeat", type=int, default=1, help="run every system this many times; report medians")
    parser.add_argument("--note", default="", help="a line about the machine, written with the results")
    parser.add_argument("--no-write", action="store_true", help="print the results, leave bench/README.md alone")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    mode = "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    sizes.update({k: v for k, v in (("big", args.big), ("rounds", args.rounds)) if v})
    started = time.perf_counter()
    model = model_dir("tiny" if args.quick else "base", args.model)
    env = machine(args.note)
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as tmp_name:
        tmp = Path(tmp_name)
        workloads = build_workloads(model, sizes)
        save_workloads(workloads, tmp / "workloads.json")
        runs = []
        for i in range(args.repeat):
            run: dict[str, Any] = {"e": run_inproc("engine", model, tmp / "workloads.json", tmp)}
            print(f"(e) done ({i + 1}/{args.repeat})", flush=True)
            run["a"] = run_inproc("flag", model, tmp / "workloads.json", tmp)
            print(f"(a) done ({i + 1}/{args.repeat})", flush=True)
            runs.append(run | run_servers(model, workloads, sizes, tmp, args.quick))
            print(f"(b) (c) (d) done ({i + 1}/{args.repeat})", flush=True)
        results = median_of(runs)
        results["costs"] = run_inproc("costs", model, tmp / "workloads.json", tmp)
    env["elapsed_s"] = round(time.perf_counter() - started)
    command = (
        "python -m bench.run"
        + (" --quick" if args.quick else "")
        + (f" --repeat {args.repeat}" if args.repeat > 1 else "")
    )
    text = render(mode, command, env, sizes, workloads, results)
    print(text)
    if not args.no_write:
        write_readme(ROOT / "bench" / "README.md", mode, text)


if __name__ == "__main__":
    main()
