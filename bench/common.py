"""Workloads, percentiles and memory readings shared by the benchmark's parts."""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.make_model import SENTENCES

WORDS = " ".join(SENTENCES).split()
QUERY = "what is panda?"


@dataclass
class Workload:
    """`requests` (query, passages) are dealt round-robin to `clients` concurrent clients."""

    name: str
    clients: int
    requests: list[tuple[str, list[str]]]

    @property
    def pairs(self) -> int:
        return sum(len(p) for _, p in self.requests)


def text_of_tokens(tokenizer: object, n: int, rng: random.Random) -> str:
    """A passage of about `n` tokens for `tokenizer` (random words, cut at the n-th token)."""
    text = " ".join(rng.choices(WORDS, k=n + 8))  # every word is at least one token
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)  # type: ignore[operator]
    offsets = enc["offset_mapping"]
    return text[: offsets[min(n, len(offsets)) - 1][1]]


def build_workloads(model_dir: str, sizes: dict[str, int], seed: int = 0) -> list[Workload]:
    """The same generated requests for every system: big, small (16 clients), mixed lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)

    def passages(count: int, lo: int, hi: int) -> list[str]:
        return [text_of_tokens(tok, rng.randint(lo, hi), rng) for _ in range(count)]

    clients = sizes["clients"]
    return [
        Workload("big", 1, [(QUERY, passages(sizes["big"], 20, 60))]),
        Workload(
            "16 clients",
            clients,
            [(f"{QUERY} {i}", passages(10, 20, 60)) for i in range(clients * sizes["rounds"])],
        ),
        Workload(
            "mixed lengths",
            clients,
            [(f"{QUERY} {i}", passages(sizes["mixed"], 20, 400)) for i in range(clients * sizes["rounds"])],
        ),
    ]


def save_workloads(workloads: list[Workload], path: Path) -> None:
    path.write_text(json.dumps([asdict(w) for w in workloads]))


def load_workloads(path: Path) -> list[Workload]:
    return [Workload(w["name"], w["clients"], [(q, p) for q, p in w["requests"]]) for w in json.loads(path.read_text())]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; q in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(pairs: int, wall_s: float, latencies: list[float]) -> dict[str, float]:
    return {
        "pairs": pairs,
        "wall_s": wall_s,
        "pairs_per_s": pairs / wall_s if wall_s > 0 else float("nan"),
        "p50_ms": percentile(latencies, 50) * 1e3 if latencies else float("nan"),
        "p99_ms": percentile(latencies, 99) * 1e3 if latencies else float("nan"),
        "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else float("nan"),
    }


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mib(pid: int | str = "self") -> float:
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int | str = "self") -> float:
    return _status_kib(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int | str = "self") -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); silently a no-op elsewhere."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass
