"""The benchmark's results as markdown, and their place in bench/README.md."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

SYSTEMS = {
    "a": "(a) compute_score in-process",
    "b": "(b) gRPC service",
    "c": "(c) REST bridge `POST /rerank`",
    "d": "(d) naive server (compute_score per request)",
    "e": "(e) engine ceiling",
}
TARGETS = {
    "big": [("b/e", 0.95), ("b/a", 1.0)],
    "16 clients": [("b/e", 0.85), ("b/d", 1.5), ("p99 d/b", 1.0)],
}


def _num(x: float, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _ratios(results: dict[str, Any], workload: str) -> dict[str, float]:
    rate = {k: results[k][workload]["pairs_per_s"] for k in "abde" if workload in results.get(k, {})}
    p99 = {k: results[k][workload]["p99_ms"] for k in "bd"}
    return {
        "b/e": rate["b"] / rate["e"],
        "b/a": rate["b"] / rate["a"],
        "b/d": rate["b"] / rate["d"],
        "p99 d/b": p99["d"] / p99["b"],
    }


def _main_table(results: dict[str, Any], workloads: list[Any]) -> list[str]:
    rows = ["| workload | system | pairs/s | p50 ms | p99 ms | peak RSS MiB |", "|---|---|---:|---:|---:|---:|"]
    for w in workloads:
        for key, label in SYSTEMS.items():
            r = results.get(key, {}).get(w.name)
            if r is None:
                continue
            p50, p99 = (r["p50_ms"], r["p99_ms"]) if key != "e" else (float("nan"), float("nan"))
            rows.append(
                f"| {w.name} | {label} | {_num(r['pairs_per_s'], 2)} | {_num(p50, 0)} | {_num(p99, 0)} "
                f"| {_num(r['peak_rss_mib'], 0)} |"
            )
    return rows


def _ratio_table(results: dict[str, Any], workloads: list[Any]) -> list[str]:
    rows = [
        "| workload | (b)/(e) | (b)/(a) | (b)/(d) | p99 (d)/(b) | targets |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for w in workloads:
        r = _ratios(results, w.name)
        verdicts = [f"{k} >= {t}: {'met' if r[k] >= t else 'MISSED'}" for k, t in TARGETS.get(w.name, [])]
        rows.append(
            f"| {w.name} | {r['b/e']:.2f} | {r['b/a']:.2f} | {r['b/d']:.2f} | {r['p99 d/b']:.2f} "
            f"| {'; '.join(verdicts) or '—'} |"
        )
    return rows


def _overload(o: dict[str, Any]) -> list[str]:
    return [
        f"{o['clients']} clients for the run's duration against `--max-candidates 10 --max-queue-pairs "
        f"{o['max_queue_pairs']}` (each request 1 x 10; a refused client backs off 50-250 ms):",
        "",
        "| requests | accepted (all finished) | refused | other errors | refusal p50 / p99 / max ms "
        "| refusals over 50 ms | accepted p50 / p99 ms | server RSS start / max / end MiB |",
        "|---:|---:|---:|---:|---|---:|---|---|",
        f"| {o['requests']} | {o['accepted']} | {o['refused']} | {o['error_count']} "
        f"| {_num(o['refusal_p50_ms'])} / {_num(o['refusal_p99_ms'])} / {_num(o['refusal_max_ms'])} "
        f"| {o['refused_over_50ms']} | {_num(o['accepted_p50_ms'], 0)} / {_num(o['accepted_p99_ms'], 0)} "
        f"| {_num(o['rss_start_mib'], 0)} / {_num(o['rss_max_mib'], 0)} / {_num(o['rss_end_mib'], 0)} |",
    ]


def _costs(costs: dict[str, Any]) -> list[str]:
    rows = [
        "| request | compute_score | model.to + eval | tokenize | sort | trial forward (longest sub-batch) "
        "| lean encode + forward | compute_score / lean | engine ceiling (e) | (e) / lean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in costs.items():
        rows.append(
            f"| {name} | {_num(c['compute_score_ms'])} | {_num(c['model_to_device_ms'], 2)} "
            f"| {_num(c['tokenize_ms'], 2)} | {_num(c['sort_ms'], 3)} | {_num(c['trial_forward_ms'])} "
            f"| {_num(c['lean_ms'])} | {c['compute_score_ms'] / c['lean_ms']:.2f}x | {_num(c['ceiling_ms'])} "
            f"| {c['ceiling_ms'] / c['lean_ms']:.2f} |"
        )
    return rows


def render(
    mode: str, command: str, env: dict[str, Any], sizes: dict[str, Any], workloads: list[Any], results: dict[str, Any]
) -> str:
    shape = "tiny random-weight model" if mode == "quick" else "bge-reranker-base shape (random weights)"
    lines = [
        f"### {mode} mode: `{command}`",
        "",
        f"{env['date']}, {env['cpu']}, load average at start {' '.join(env['load'])}, Python {env['python']}, "
        f"torch {env['torch']}; {shape}; took {env['elapsed_s']} s." + (f" {env['note']}" if env["note"] else ""),
        "",
        "Workloads: "
        + "; ".join(f"{w.name}: {w.clients} client(s), {len(w.requests)} requests, {w.pairs} pairs" for w in workloads)
        + ".",  # fmt: skip
        "",
        *_main_table(results, workloads),
        "",
        *_ratio_table(results, workloads),
        "",
        *[f"- {n}" for n in results.get("notes", [])],
        "",
        "Overload:",
        "",
        *_overload(results["overload"]),
        "",
        "Per-call work of `compute_score` against the server's lean path and the engine ceiling, on one request of "
        "each workload, all in one process, back to back (median ms of 3):",
        "",
        *_costs(results["costs"]),
        "",
    ]
    return "\n".join(lines)


def write_readme(path: Path, mode: str, text: str) -> None:
    """Put `text` between this mode's markers in `path`, replacing what a previous run left there."""
    start, end = f"<!-- results:{mode}:start -->", f"<!-- results:{mode}:end -->"
    block = f"{start}\n{text}\n{end}"
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    updated = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip() + "\n\n" + block
    path.write_text(updated.lstrip() + "\n", encoding="utf-8")
