"""bench.gpu's results as markdown: a header that says what was measured, the table, ratios, one-caller latency."""

from __future__ import annotations

import math
from typing import Any

from bench.common import Workload
from bench.gpu_probe import describe_fields

IN_PROCESS_PATH = (
    "a `RerankServer` with default flags in the benchmark's own process (loaded and warmed as `python -m server`), "
    "its servicer's `_rerank` called directly by the load's clients as asyncio tasks in the server's event loop: "
    "validation, tokenizing, batcher, model, response; no gRPC (as `bench.closed_loop --in-process`)"
)
ROWS = (
    ("ceiling", "ceiling: pre-tokenized, length-sorted, padded forward passes of {batch}, every shape seen before"),
    ("compute_score", "FlagReranker.compute_score (batch {batch}), one call over the load, run once untimed first"),
    ("in_process", "the server's request path in-process, no gRPC"),
    ("server", "our server, `python -m server`, default flags"),
    ("infinity", "Infinity's engine, in-process"),
)
# Issue 17's targets for a CUDA run (H100/H200, base shape, fp16, default flags).
TARGETS = {"server / ceiling": 0.75, "server / infinity": 3.0}


def _n(x: Any, digits: int = 0) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _rate(r: dict[str, Any], key: str, load: str) -> float | None:
    row = r.get(key)
    return row[load]["pairs_per_s"] if isinstance(row, dict) and load in row else None


def header(env: dict[str, Any], loads: list[Workload], r: dict[str, Any]) -> list[str]:
    ceil = r["ceiling"]
    warmed = all(c["all_warmed"] and c["warmed_batches"] == c["batches"] for c in ceil.values())
    counts = "; ".join(
        f"{n}: warmed shapes {c['warmed_batches']} of {c['batches']} batches ({c['shapes']} distinct shapes)"
        for n, c in ceil.items()
    )
    return [
        f"**Device {env['device_name']}, {env['dtype']}, model shape {env['shape']} ({env['model_shape']}, random "
        f"weights), torch {env['torch']}, transformers {env['transformers']}.** "
        f"Every shape warmed before timing: **{'yes' if warmed else 'NO'}** "
        f"(ceiling, {counts}); compute_score, the servers and Infinity run each load once untimed first (a server "
        "forms its own batches, so its timed run meets a new width unless it pads to warmed buckets).",
        "",
        f"In-process path: {IN_PROCESS_PATH}.",
        "",
        f"{env['date']}, {env['cpu']}, load average {' '.join(env['load'])} at start, {env['load_end']} at the end, "
        f"Python {env['python']}; took {env['elapsed_s']} s. Workloads (passages of "
        "30-250 tokens): "
        + "; ".join(f"{w.name}: {w.clients} client(s), {len(w.requests)} requests, {w.pairs:,} pairs" for w in loads)
        + ".",
    ]


def table(loads: list[Workload], r: dict[str, Any], batch: int) -> list[str]:
    names = [w.name for w in loads]
    head = " | ".join(f"{n}: pairs/s | GPU busy | p99 ms" for n in names)
    lines = [f"| system | {head} |", "|---|" + "---:|---|---:|" * len(names)]
    for key, label in ROWS:
        label, row = label.format(batch=batch), r.get(key)
        if not isinstance(row, dict):
            lines.append(f"| {label} | {row} |" + " |" * (3 * len(names) - 1))
            continue
        cells = []
        for n in names:
            c = row.get(n, {})
            cells += [_n(c.get("pairs_per_s")), c.get("busy", "—"), _n(c.get("p99_ms"))]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines


def ratios(loads: list[Workload], r: dict[str, Any], cuda: bool) -> list[str]:
    pairs = (
        ("server / ceiling", "server", "ceiling"),
        ("in-process / ceiling", "in_process", "ceiling"),
        ("server / infinity", "server", "infinity"),
        ("in-process / infinity", "in_process", "infinity"),
        ("server / compute_score", "server", "compute_score"),
    )
    lines = ["| load | " + " | ".join(p[0] for p in pairs) + " |", "|---|" + "---:|" * len(pairs)]
    verdicts = []
    for w in loads:
        cells = []
        for label, a, b in pairs:
            x, y = _rate(r, a, w.name), _rate(r, b, w.name)
            ratio = x / y if x and y else None
            cells.append("—" if ratio is None else f"{ratio:.2f}")
            if cuda and label in TARGETS and ratio is not None:
                ok = "met" if ratio >= TARGETS[label] else "MISSED"
                verdicts.append(f"{w.name} {label} >= {TARGETS[label]}: {ok}")
        lines.append(f"| {w.name} | {' | '.join(cells)} |")
    if verdicts:
        lines += ["", "Targets (issue 17): " + "; ".join(verdicts) + "."]
    return lines


def latency(r: dict[str, Any], warm: int) -> list[str]:
    lat = r["latency"]
    count = next(iter(lat.values()))["requests"] if lat else 0
    lines = [
        f"One caller at a time against our server (gRPC, one channel): {count} requests one after another, after "
        f"{warm} untimed.",
        "",
        "| request | p50 ms | p90 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, x in lat.items():
        lines.append(f"| {name} | {_n(x['p50_ms'], 1)} | {_n(x['p90_ms'], 1)} | {_n(x['p99_ms'], 1)} |")
    return lines


def _parity(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2e}"


def render(command: str, env: dict[str, Any], loads: list[Workload], r: dict[str, Any], warm: int) -> str:
    cuda = bool(env["cuda"])
    return "\n".join(
        [
            f"### `{command}`",
            "",
            *header(env, loads, r),
            "",
            *table(loads, r, env["batch"]),
            "",
            *ratios(loads, r, cuda),
            "",
            *latency(r, warm),
            "",
            f"- No host sync in launch: {r['sync']} (engine from `server.engine.load.load_engine`: eager); "
            f"{r['sync_served']} (the in-process server's engine as served: shape buckets, CUDA graphs)",
            f"- Our server's startup line: {describe_fields(r['startup'])}",
            f"- In-process server's startup: {describe_fields(r['in_process_startup'])}",
            f"- Parity: max |server - compute_score| = {_parity(r['parity'])} over {r['parity_pairs']} pairs.",
        ]
    )
