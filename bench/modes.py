"""Precision modes side by side on CPU (issue 27): one server per --dtype (fp32, bf16, int8), all up at once and
measured in turn, round by round, so that a shared machine's drift hits every mode alike; then our fastest mode and
fp32 against Infinity's server over the same HTTP client and body.

`python -m bench.modes` (base shape, 2 rounds; several minutes on 2 cores, plus the int8 conversion once),
`--shape tiny --rounds 1 --no-write` as a quick check. Infinity runs when `--infinity-site DIR` names a directory that
holds infinity_emb and its server's packages (see bench/README.md, "Precision modes"); our servers run with the REST
bridge for that comparison. Every process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench import drive
from bench.common import Workload, build_workloads, peak_rss_mib, percentile, reset_peak_rss, rss_mib
from bench.report import write_readme
from bench.run import ROOT, free_port, model_dir, process
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc

MODES = ("fp32", "bf16", "int8")
SEQUENTIAL = 10  # 1 x 10 requests one after another, for the p50


def available_modes() -> list[str]:
    """fp32, and bf16 / int8 where this machine runs them."""
    import importlib.util

    from server.engine.precision import CPUINFO, native_bf16

    out = ["fp32"]
    if native_bf16(CPUINFO):
        out.append("bf16")
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        out.append("int8")
    return out


async def _info(target: str) -> pb.GetModelInfoResponse:
    async with grpc.aio.insecure_channel(target) as ch:
        return await pb_grpc.RerankerStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)


async def _sequential(target: str, requests: list[tuple[str, list[str]]]) -> float:
    """p50 ms of `requests` sent one at a time by one client (one untimed first)."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.RerankerStub(ch)
        await stub.Rerank(pb.RerankRequest(query=requests[0][0], candidates=requests[0][1]), timeout=drive.DEADLINE_S)
        times = []
        for query, passages in requests:
            start = time.perf_counter()
            await stub.Rerank(pb.RerankRequest(query=query, candidates=passages), timeout=drive.DEADLINE_S)
            times.append(time.perf_counter() - start)
    return percentile(times, 50) * 1e3


async def _http_ready(url: str, model: str, timeout_s: float = 900.0) -> None:
    one = Workload("ready", 1, [("ready?", ["a short passage"])])
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            await drive.rest_workload(url, one, model)
            return
        except Exception:  # not listening yet, or still loading
            await asyncio.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def _load_line() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _start_server(
    stack: contextlib.ExitStack, model: str, mode: str, tmp: Path, threads: int = 0
) -> tuple[Any, str, str, dict]:
    """Our server in `mode` with the REST bridge; (process, gRPC target, REST URL, what GetModelInfo says)."""
    port, rest = free_port(), free_port()
    flags = ["--host", "127.0.0.1", "--port", str(port), "--rest-port", str(rest), "--log-level", "WARNING"]
    flags += ["--threads", str(threads)]
    flags += ["--rest-deadline-s", str(drive.DEADLINE_S)]  # fp32 on a busy 2-core machine: 160 pairs > 30 s
    # the conversion is part of the int8 server's first start, as in a fresh deployment
    args = [sys.executable, "-m", "server", "--model", model, "--dtype", mode, "--quantize-cache", str(tmp / "int8")]
    started = time.perf_counter()
    proc = stack.enter_context(process([*args, *flags], tmp / f"{mode}.log"))
    asyncio.run(drive.wait_ready(f"127.0.0.1:{port}", proc, timeout_s=1800))
    info = asyncio.run(_info(f"127.0.0.1:{port}"))
    d = info.drift
    described = {
        "backend": info.backend,
        "start_s": time.perf_counter() - started,
        "drift": (d.max_abs_diff, d.rank_correlation, d.pairs) if info.HasField("drift") else None,
    }
    print(f"{mode}: {described}", flush=True)
    return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{rest}/rerank", described


def _start_infinity(stack: contextlib.ExitStack, model: str, site: str, tmp: Path) -> tuple[Any, str]:
    """Infinity's server (torch, fp32 on CPU, batches of 32 as ours), from the packages in `site`."""
    port = free_port()
    args = ["--model-id", model, "--engine", "torch", "--device", "cpu", "--batch-size", "32", "--no-model-warmup"]
    launcher = f"import sys; sys.path.insert(0, {site!r}); from infinity_emb.cli import cli; cli()"
    cmd = [sys.executable, "-c", launcher, "v2", *args, "--host", "127.0.0.1", "--port", str(port)]
    proc = stack.enter_context(process(cmd, tmp / "infinity.log"))
    url = f"http://127.0.0.1:{port}/rerank"
    asyncio.run(_http_ready(url, model))
    return proc, url


def run(model: str, loads: list[Workload], sequential: list[tuple[str, list[str]]], rounds: int, modes: list[str],
        infinity_site: str, tmp: Path, threads: int = 0) -> dict[str, Any]:  # fmt: skip
    """Every mode's server (and Infinity's), all up, measured in turn round by round; every sample taken."""
    out: dict[str, Any] = {"grpc": {m: [] for m in modes}, "http": {}, "info": {}, "load": [_load_line()]}
    out["threads"] = threads
    with contextlib.ExitStack() as stack:
        servers = {}
        for mode in modes:
            proc, target, url, out["info"][mode] = _start_server(stack, model, mode, tmp, threads)
            servers[mode] = (proc, target, url)
        http: dict[str, tuple[Any, str]] = {}
        if infinity_site:
            for mode in dict.fromkeys(("fp32", modes[-1])):  # fp32, and the fastest mode (the last one listed)
                http[f"ours, {mode} (REST bridge)"] = (servers[mode][0], servers[mode][2])
            http["Infinity (torch, fp32)"] = _start_infinity(stack, model, infinity_site, tmp)
        out["http"] = {name: [] for name in http}
        for r in range(rounds):
            for mode, (proc, target, _) in servers.items():
                sample = {w.name: _measured(proc.pid, drive.grpc_workload(target, w)) for w in loads}
                sample["1 x 10 p50 ms"] = asyncio.run(_sequential(target, sequential))
                sample["rss_mib"] = rss_mib(proc.pid)
                out["grpc"][mode].append(sample)
                print(f"round {r + 1} {mode}: {_brief(sample, loads)}", flush=True)
            for name, (proc, url) in http.items():
                sample = {w.name: _measured(proc.pid, drive.rest_workload(url, w, model)) for w in loads}
                sample["rss_mib"] = rss_mib(proc.pid)
                out["http"][name].append(sample)
                print(f"round {r + 1} {name}: {_brief(sample, loads)}", flush=True)
            out["load"].append(_load_line())
    return out


def _measured(pid: int, coro: Any) -> dict[str, Any]:
    reset_peak_rss(pid)
    return asyncio.run(coro) | {"peak_rss_mib": peak_rss_mib(pid)}


def _brief(sample: dict[str, Any], loads: list[Workload]) -> str:
    rates = ", ".join(f"{w.name} {sample[w.name]['pairs_per_s']:.1f} pairs/s" for w in loads)
    p50 = f", 1 x 10 p50 {sample['1 x 10 p50 ms']:.0f} ms" if "1 x 10 p50 ms" in sample else ""
    return f"{rates}{p50}, RSS {sample['rss_mib']:.0f} MiB"


def _median(samples: list[dict[str, Any]], key: str, field: str = "pairs_per_s") -> float:
    return statistics.median(s[key][field] if isinstance(s[key], dict) else s[key] for s in samples)


def render(r: dict[str, Any], loads: list[Workload], rounds: int, note: str) -> str:
    names = [w.name for w in loads]
    head = (f"`python -m bench.modes {note}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"{platform.processor() or platform.machine()} x {os.cpu_count()} cores, "
            f"our inference threads: {r.get('threads') or 'the default (--threads 0: every usable core)'}; "
            f"{rounds} round(s), medians; load average (1, 5, 15 min) at start and after each round: "
            f"{' | '.join(r['load'])}.")  # fmt: skip
    lines = [head, "", f"| mode | backend | {' | '.join(f'{n} pairs/s' for n in names)} | vs fp32 | 1 x 10 p50 ms "
             "| RSS MiB | peak RSS MiB | drift: max abs diff, rank corr. | start s |",
             "|---|---|" + "---:|" * (len(names) + 4) + "---|---:|"]  # fmt: skip
    base = {n: _median(r["grpc"]["fp32"], n) for n in names}
    for mode, samples in r["grpc"].items():
        info, rates = r["info"][mode], [_median(samples, n) for n in names]
        ratio = " / ".join(f"{rate / base[n]:.2f}x" for rate, n in zip(rates, names, strict=True))
        drift = "exact" if info["drift"] is None else f"{info['drift'][0]:.1e}, {info['drift'][1]:.4f}"
        peak = max(s[n]["peak_rss_mib"] for s in samples for n in names)
        lines.append(f"| {mode} | {info['backend']} | {' | '.join(f'{x:.1f}' for x in rates)} | {ratio} | "
                     f"{_median(samples, '1 x 10 p50 ms', ''):.0f} | {_median(samples, 'rss_mib', ''):,.0f} | "
                     f"{peak:,.0f} | {drift} | {info['start_s']:.0f} |")  # fmt: skip
    if r["http"]:
        lines += ["", "Over HTTP, one client code and Infinity's request body for every server (`POST /rerank`):", ""]
        lines += [
            f"| server | {' | '.join(f'{n} pairs/s' for n in names)} | RSS MiB |",
            "|---|" + "---:|" * (len(names) + 1),
        ]
        for name, samples in r["http"].items():
            rates = " | ".join(f"{_median(samples, n):.1f}" for n in names)
            lines.append(f"| {name} | {rates} | {_median(samples, 'rss_mib', ''):,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.modes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "base"), default="base")
    parser.add_argument("--model", help="a real checkpoint instead of random weights")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated (%(default)s)")
    parser.add_argument("--infinity-site", default="", help="directory holding infinity_emb and its server packages")
    parser.add_argument("--threads", type=int, default=0, help="our servers' --threads (%(default)s: their default)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update bench/README.md")
    args = parser.parse_args()
    model = model_dir(args.shape, args.model)
    modes = [m for m in args.modes.split(",") if m in available_modes()]
    big, small, _ = build_workloads(model, {"big": 300, "clients": 16, "rounds": 1, "mixed": 1})
    loads = [Workload("16 clients x (1 x 10)", small.clients, small.requests), Workload("1 x 300", 1, big.requests)]
    with tempfile.TemporaryDirectory(prefix="bench-modes-") as tmp:
        results = run(model, loads, small.requests[:SEQUENTIAL], args.rounds, modes, args.infinity_site, Path(tmp),
                      args.threads)  # fmt: skip
    note = " ".join(a for a in sys.argv[1:])
    text = render(results, loads, args.rounds, note)
    print(text)
    if not args.no_write:
        write_readme(ROOT / "bench" / "README.md", "modes", text)


if __name__ == "__main__":
    main()
