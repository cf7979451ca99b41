"""What bench.gpu measures beside pairs/s: the GPU's busy share, host syncs in a launch, the startup line's fields."""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# The startup line's fields that say how the server ran; `tokenize` and `shapes` (issue 17) are named even if absent.
STARTUP_FIELDS = ("device", "dtype", "batch_size", "max_batch_tokens", "batching", "tokenize", "shapes")
ALWAYS = ("tokenize", "shapes")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def startup_fields(line: str) -> dict[str, str]:
    """A log line's fields: JSON, or text `key=value` (quoted values are JSON strings, as server/logs.py writes)."""
    if line.lstrip().startswith("{"):  # --log-json
        return {k: str(v) for k, v in json.loads(line).items()}
    out = {}
    for key, value in _FIELD.findall(line):
        out[key] = json.loads(value) if value.startswith('"') else value
    return out


def describe_fields(found: dict[str, Any]) -> str:
    """The fields that say how a server ran, each marked where this server's line lacks it."""
    return ", ".join(
        f"{k}={found[k]}" if k in found else f"{k}: absent" for k in STARTUP_FIELDS if k in found or k in ALWAYS
    )


@contextmanager
def serving_fields() -> Iterator[dict[str, Any]]:
    """Catch the in-process server's `serving` log record; yields the dict its fields land in."""
    found: dict[str, Any] = {}

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "serving":
                found.update({k: str(v) for k, v in getattr(record, "fields", {}).items()})

    logger = logging.getLogger("server")
    handler, level = Catch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the record is made only if its level passes; nothing else is printed
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _nvml_reader(index: int) -> Callable[[], float]:
    import torch

    torch.cuda.utilization(index)  # raises where pynvml is missing
    return lambda: float(torch.cuda.utilization(index))


def _smi_reader(index: int) -> Callable[[], float]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    physical = visible[index] if index < len(visible) and visible[index].strip().isdigit() else str(index)
    cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", physical.strip()]

    def read() -> float:
        return float(subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.strip())

    read()
    return read


class BusySampler:
    """The device's busy share (NVML utilization.gpu, %) sampled every `period_s` in a thread while a load runs.

    Through torch.cuda.utilization (NVML), else `nvidia-smi`; on CPU nothing is sampled and the result is "n/a".
    """

    def __init__(self, device: str, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self.samples: list[float] = []
        self.source = "n/a"
        self._read: Callable[[], float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.startswith("cuda"):
            index = int(device.split(":")[1]) if ":" in device else 0
            for source, make in (("NVML", _nvml_reader), ("nvidia-smi", _smi_reader)):
                try:
                    self._read, self.source = make(index), source
                    break
                except Exception as exc:  # no pynvml, no nvidia-smi: say which
                    self.source = f"unavailable ({type(exc).__name__}: {str(exc)[:80]})"

    def _run(self) -> None:
        assert self._read is not None
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:  # a failed sample is skipped, not a failed run
                pass
            next_at += self.period_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> BusySampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._run, name="busy-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> str:
        """`23% (12 samples, NVML)`, or why there is no figure."""
        if self._read is None:
            return self.source
        if not self.samples:
            return f"no sample ({self.source}; the load ran under {self.period_s * 1e3:.0f} ms)"
        return f"{statistics.fmean(self.samples):.0f}% ({len(self.samples)} samples, {self.source})"


def launch_check(engine: Any, pairs: list[tuple[str, str]], device: str) -> str:
    """Does `engine.launch` wait for the device? One untimed launch of the batch, then one under torch's sync debug
    mode "error"; its collect() runs outside the mode."""
    if not device.startswith("cuda"):
        return "n/a (CUDA only)"
    import torch

    batch = engine.encode(pairs)
    engine.launch(batch)()  # not checked: a first pass may allocate or choose kernels once
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        collect = engine.launch(batch)
        verdict = "yes"
    except Exception as exc:  # the error names the synchronizing call
        collect, verdict = None, f"no ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if collect is not None:
        assert len(collect()) == len(batch)
    return f"{verdict} ({len(batch)} pairs, {type(engine).__name__}.launch)"


def sync_check(model: str, device: str, pairs: list[tuple[str, str]]) -> str:
    """launch_check on the engine as `server.engine.load.load_engine` returns it: eager, exact widths, no graphs."""
    if not device.startswith("cuda"):
        return "n/a (CUDA only)"
    import torch

    from server.config import load_config
    from server.engine.load import load_engine

    config = load_config(["--model", model, "--device", device])
    engine = load_engine(config, model, config.default_model)
    try:
        return launch_check(engine, pairs, device)
    finally:
        del engine
        torch.cuda.empty_cache()
