"""bench.run --repeat: each system is reported by its median run, and every run's (b)/(e) is kept."""

from __future__ import annotations

from typing import Any

from bench.run import median_of


def _run(b: float, e: float, p99: float) -> dict[str, Any]:
    return {
        "notes": [],
        "b": {"big": {"pairs_per_s": b, "p50_ms": b}},
        "e": {"big": {"pairs_per_s": e}},
        "overload": {"refusal_p99_ms": p99},
    }


def test_each_system_by_its_median_run() -> None:
    out = median_of([_run(30.0, 40.0, 9.0), _run(10.0, 50.0, 1.0), _run(20.0, 20.0, 5.0)])
    assert out["b"]["big"] == {"pairs_per_s": 20.0, "p50_ms": 20.0}  # the whole record of the median run
    assert out["e"]["big"]["pairs_per_s"] == 40.0
    assert out["overload"]["refusal_p99_ms"] == 5.0
    assert out["notes"] == ["Median of 3 runs per system. (b)/(e) in each run: big 0.75, 0.20, 1.00."]


def test_one_run_is_itself() -> None:
    run = _run(30.0, 40.0, 9.0)
    out = median_of([run])
    assert out["b"] == run["b"] and out["e"] == run["e"] and out["notes"] == []
