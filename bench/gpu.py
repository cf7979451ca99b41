"""Does the server keep a GPU busy? One run, one device, every system under the same loads.

`python -m bench.gpu` (CUDA, bge-reranker-base shape, random weights, fp16) or
`python -m bench.gpu --device cpu --shape tiny` (anywhere, in a minute). Rows:
- ceiling: per load, its pairs tokenized and padded beforehand, sorted by length, plain forward passes of 128;
  every batch runs once untimed and the device is synchronized before the timed pass, so no shape is new;
- compute_score: one `FlagReranker.compute_score` call over each load's pairs (batch 128), run once untimed first;
- in-process: the server's request path without gRPC (a RerankServer here, its servicer called directly);
- server: `python -m server` with default flags, 64 concurrent clients each sending 1 x 20, then 1 x 1000 requests;
- infinity: Infinity's engine in-process (no HTTP), torch, batch 128, the same two loads; when `infinity_emb` imports.
Each server load runs once untimed, then timed while the GPU's busy share is sampled every 100 ms (NVML). Then one
caller at a time: p50/p90 of 1 x 10 and 1 x 100 against the server. On CUDA, the server engine's launch() runs under
`torch.cuda.set_sync_debug_mode("error")`: does it wait for the device? Everything runs on 127.0.0.1; the server is
stopped by pid. Results go into bench/README.md (`--no-write`: print).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any

# Before anything imports tqdm or the hub: compute_score's progress bars off, no network.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import gpu_systems as systems  # noqa: E402
from bench.common import QUERY, Workload, text_of_tokens  # noqa: E402
from bench.gpu_probe import describe_fields, sync_check  # noqa: E402
from bench.gpu_report import render  # noqa: E402
from bench.report import write_readme  # noqa: E402
from bench.run import ENV, ROOT, machine, model_dir  # noqa: E402

WARM_REQUESTS = 5  # untimed requests before each one-caller latency run


def workloads(
    model: str, clients: int, per_client: int, big: int, single: int, seed: int = 0
) -> tuple[list[Workload], list[Workload]]:
    """The loads (`clients` x 1 x 20, `per_client` requests each; one 1 x `big`) and the one-caller requests (1 x 10,
    1 x 100, `single` timed each after WARM_REQUESTS); passages of 30-250 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)

    def passages(n: int) -> list[str]:
        return [text_of_tokens(tok, rng.randint(30, 250), rng) for _ in range(n)]

    small = [(f"{QUERY} {i}", passages(20)) for i in range(clients * per_client)]
    loads = [Workload(f"{clients} clients x 1x20", clients, small), Workload(f"1 x {big}", 1, [(QUERY, passages(big))])]
    singles = [
        Workload(f"1 x {n}", 1, [(f"{QUERY} {i}", passages(n)) for i in range(WARM_REQUESTS + single)])
        for n in (10, 100)
    ]
    return loads, singles


def model_shape(model: str) -> str:
    c = json.loads((Path(model) / "config.json").read_text())
    keys = (("num_hidden_layers", "layers"), ("hidden_size", "hidden"), ("vocab_size", "vocab"))
    return ", ".join(f"{c[k]} {label}" for k, label in keys if k in c)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return "CPU"


def failed(what: str, exc: Exception) -> str:
    """A system that failed becomes its row's text (traceback on stderr), so one device run still reports the rest."""
    traceback.print_exc()
    print(f"{what} failed: {exc!r}", file=sys.stderr, flush=True)
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _rates(row: Any) -> Any:
    return [round(c["pairs_per_s"]) for c in row.values()] if isinstance(row, dict) else row


def run(args: argparse.Namespace, device: str, model: str) -> tuple[list[Workload], dict[str, Any]]:
    cuda = device.startswith("cuda")
    loads, singles = workloads(model, args.clients, args.per_client or (10 if cuda else 2), args.big, args.single)
    r: dict[str, Any] = {"ceiling": systems.ceiling(model, device, loads), "latency": {}, "startup": {}}
    print(f"ceiling {_rates(r['ceiling'])} pairs/s", flush=True)
    try:
        r["sync"] = sync_check(model, device, systems.pairs_of(loads[0])[: systems.batch_size(device)])
    except Exception as exc:
        r["sync"] = failed("sync check", exc)
    print(f"no host sync in launch: {r['sync']}", flush=True)
    reference: list[float] = []
    try:
        r["compute_score"], reference = systems.compute_score(model, device, loads)
    except Exception as exc:
        r["compute_score"] = failed("compute_score", exc)
    print(f"compute_score {_rates(r['compute_score'])} pairs/s", flush=True)
    try:
        r["in_process"], r["in_process_startup"], r["sync_served"] = systems.in_process(model, device, loads)
    except Exception as exc:
        r["in_process"], r["in_process_startup"], r["sync_served"] = failed("in-process", exc), {}, "not run"
    print(f"in-process {_rates(r['in_process'])} pairs/s; no host sync as served: {r['sync_served']}", flush=True)
    served: list[list[float]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="rerank-gpu-") as tmp:
            r["server"], r["latency"], served, r["startup"] = systems.server(
                model, device, loads, singles, WARM_REQUESTS, Path(tmp)
            )
    except Exception as exc:
        r["server"] = failed("server", exc)
    print(f"server {_rates(r['server'])} pairs/s; startup: {describe_fields(r['startup'])}", flush=True)
    flat = sum(served, [])
    r["parity_pairs"] = min(len(flat), len(reference))
    r["parity"] = max((abs(a - b) for a, b in zip(flat, reference, strict=False)), default=float("nan"))
    r["infinity"] = "skipped (--no-infinity)" if args.no_infinity else systems.infinity(model, device, loads)
    print(f"infinity {_rates(r['infinity'])}", flush=True)
    return loads, r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (%(default)s)")
    parser.add_argument("--shape", choices=("tiny", "base"), default=None, help="model shape (base on CUDA, else tiny)")
    parser.add_argument("--model", help="an existing model directory instead of a generated one")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=None, help="1x20 requests per client (10 CUDA, 2 CPU)")
    parser.add_argument("--big", type=int, default=1000, help="passages in the single big request")
    parser.add_argument("--single", type=int, default=50, help="timed one-caller requests of 1 x 10 and 1 x 100")
    parser.add_argument("--no-infinity", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print the results, leave bench/README.md alone")
    args = parser.parse_args()
    started, at_start = time.perf_counter(), machine("")  # the load average before the run
    os.environ.update({k: v for k, v in ENV.items() if k != "TOKENIZERS_PARALLELISM"})  # the server parallelizes
    cuda = args.device.startswith("cuda")
    device = "cuda:0" if args.device == "cuda" else args.device  # FlagReranker wants an indexed device
    shape = args.shape or ("base" if cuda else "tiny")
    model = model_dir(shape, args.model)
    loads, results = run(args, device, model)
    env = at_start | {
        "cuda": cuda,
        "device_name": device_name(device),
        "shape": shape,
        "model_shape": model_shape(model),
        "dtype": "fp16" if cuda else "fp32",
        "batch": systems.batch_size(device),
        "transformers": version("transformers"),
        "elapsed_s": round(time.perf_counter() - started),
        "load_end": " ".join(machine("")["load"]),
    }
    command = " ".join(["python -m bench.gpu", *sys.argv[1:]])  # as run: the loads' sizes are in the flags
    text = render(command, env, loads, results, WARM_REQUESTS)
    print(text)
    if not args.no_write:
        write_readme(ROOT / "bench" / "README.md", "gpu" if cuda else "gpu-on-cpu", text)


if __name__ == "__main__":
    main()
