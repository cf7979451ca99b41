"""The in-process systems, each run in its own process so its memory is its own.

`python -m bench.inproc flag|engine|costs --model DIR --workloads FILE --out FILE`
- flag:   (a) FlagReranker.compute_score, one call per request, requests one after another.
- engine: (e) the engine ceiling: every pair of a workload tokenized, sorted by length and scored in plain
          batched forward passes under torch.inference_mode(); perfect batching, no serving.
- costs:  what compute_score's per-call work costs, next to the server's lean path.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import Workload, load_workloads, peak_rss_mib, reset_peak_rss, summary  # noqa: E402

BATCH_SIZE = 32  # the server's default --batch-size, so every system batches alike
MAX_LENGTH = 512


def run_flag(model_dir: str, workloads: list[Workload]) -> dict[str, Any]:
    from FlagEmbedding import FlagReranker

    flag = FlagReranker(model_dir, devices=["cpu"], use_fp16=False, batch_size=BATCH_SIZE, max_length=MAX_LENGTH)
    flag.compute_score([["warm up", "a short passage to warm up the model"]] * 2)
    out = {}
    for w in workloads:
        reset_peak_rss()
        latencies = []
        start = time.perf_counter()
        for query, passages in w.requests:
            t = time.perf_counter()
            flag.compute_score([[query, p] for p in passages])
            latencies.append(time.perf_counter() - t)
        out[w.name] = summary(w.pairs, time.perf_counter() - start, latencies) | {"peak_rss_mib": peak_rss_mib()}
    return out


def load_plain(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    return tokenizer, model


def plain_scores(tokenizer: Any, model: Any, pairs: list[tuple[str, str]]) -> list[float]:
    """Tokenize once, sort by length, pad and score in batches of BATCH_SIZE."""
    enc = tokenizer([q for q, _ in pairs], [p for _, p in pairs], truncation="only_second", max_length=MAX_LENGTH).data
    order = sorted(range(len(pairs)), key=lambda i: -len(enc["input_ids"][i]))
    scores = [0.0] * len(pairs)
    with torch.inference_mode():
        for s in range(0, len(order), BATCH_SIZE):
            chunk = order[s : s + BATCH_SIZE]
            inputs = tokenizer.pad([{k: v[i] for k, v in enc.items()} for i in chunk], return_tensors="pt")
            logits = model(**inputs).logits.view(-1).float().tolist()
            for i, x in zip(chunk, logits, strict=True):
                scores[i] = x
    return scores


def run_engine(model_dir: str, workloads: list[Workload]) -> dict[str, Any]:
    tokenizer, model = load_plain(model_dir)
    plain_scores(tokenizer, model, [("warm up", "a short passage to warm up the model")] * 2)
    out = {}
    for w in workloads:
        reset_peak_rss()
        pairs = [(q, p) for q, passages in w.requests for p in passages]
        start = time.perf_counter()
        plain_scores(tokenizer, model, pairs)
        out[w.name] = summary(w.pairs, time.perf_counter() - start, []) | {"peak_rss_mib": peak_rss_mib()}
    return out


def _timed(fn: Any, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _costs_of(engine: Any, pairs: list[tuple[str, str]], repeats: int) -> dict[str, float]:
    """Median ms of compute_score and of each of its per-call parts, and of the lean path, on `pairs`."""
    from FlagEmbedding.utils.tokenizer_compat import pad_with_compat

    flag = engine.flag
    encoded = engine.encode(pairs)
    order = np.argsort([-len(e) for e in encoded])
    longest = [{"input_ids": encoded[i].input_ids, **encoded[i].extra} for i in order[:BATCH_SIZE]]

    def trial() -> None:  # what compute_score runs first, as an out-of-memory probe
        inputs = pad_with_compat(flag.tokenizer, longest, padding=True, return_tensors="pt")
        with torch.no_grad():
            flag.model(**inputs, return_dict=True)

    def lean() -> None:  # the server's path: encode, then length-sorted batches
        enc = engine.encode(pairs)
        ranked = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        for s in range(0, len(ranked), BATCH_SIZE):
            engine.forward([enc[i] for i in ranked[s : s + BATCH_SIZE]])

    return {
        "compute_score_ms": _timed(lambda: flag.compute_score([list(p) for p in pairs]), repeats) * 1e3,
        "model_to_device_ms": _timed(lambda: (flag.model.to("cpu"), flag.model.eval()), repeats) * 1e3,
        "tokenize_ms": _timed(lambda: engine.encode(pairs), repeats) * 1e3,
        "sort_ms": _timed(lambda: np.argsort([-len(e) for e in encoded]), repeats) * 1e3,
        "trial_forward_ms": _timed(trial, repeats) * 1e3,
        "lean_ms": _timed(lean, repeats) * 1e3,
        "ceiling_ms": _timed(lambda: plain_scores(flag.tokenizer, flag.model, pairs), repeats) * 1e3,
    }


def run_costs(model_dir: str, workloads: list[Workload], repeats: int = 3) -> dict[str, Any]:
    """compute_score's parts on the first request of each workload, against the server's lean path."""
    from server.config import Config
    from server.engine.model import RerankerModel

    engine = RerankerModel(Config(model=model_dir, device="cpu", batch_size=BATCH_SIZE, max_length=MAX_LENGTH))
    engine.warm_up()
    out = {}
    for w in workloads:
        query, passages = w.requests[0]
        out[f"{w.name} (1 x {len(passages)})"] = _costs_of(engine, [(query, p) for p in passages], repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["flag", "engine", "costs"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--workloads", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    workloads = load_workloads(args.workloads)
    run = {"flag": run_flag, "engine": run_engine, "costs": run_costs}[args.mode]
    args.out.write_text(json.dumps(run(args.model, workloads)))


if __name__ == "__main__":
    main()
