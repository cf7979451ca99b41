"""One forward pass launched without waiting for the device, and collected with one host sync.

The attention mask goes to the model as a prepared 4D mask built by tensor ops on the device (transformers returns a
4D mask as it is): from a 2D padding mask it would check `padding_mask.all()` in Python, a host sync that makes
launching batch k+1 wait for batch k. A batch without padding gets no mask at all, as transformers would give it
(the same kernel, so CPU scores stay bit-equal to compute_score's). On CUDA each bucket's forward can be a CUDA graph:
one replay instead of hundreds of kernel launches from Python.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from server.engine.buckets import Buckets

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]  # input_ids, attention_mask (2D, 1 = token), ...: one padded batch on the host
Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # model inputs -> one float32 score per row
Collect = Callable[[], list[float]]

GRAPH_MODES = ("auto", "on", "off")


def expand_mask(mask: torch.Tensor, causal: bool, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask transformers would build from the 2D padding `mask`, by tensor ops only (no value read on the
    host). Bidirectional: (rows, 1, 1, width); causal: (rows, 1, width, width), where a padding position also
    sees itself so that no row is all masked (its output is never read). Boolean for SDPA, additive for eager."""
    keep = mask.bool()[:, None, None, :]
    if causal:
        width = mask.shape[1]
        tri = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
        keep = (keep & tri) | torch.eye(width, dtype=torch.bool, device=mask.device)
    if impl == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)
    return keep


class _Graph:
    """One bucket's forward captured as a CUDA graph, with the static input tensors it reads."""

    def __init__(self, launcher: Launcher, sample: Arrays, pool: Any) -> None:
        dev = launcher.device
        self.inputs = {k: torch.from_numpy(a).to(dev) for k, a in sample.items()}
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(2):
                launcher.run(self.inputs, masked=True)
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = launcher.run(self.inputs, masked=True)

    def replay(self, arrays: Arrays) -> torch.Tensor:
        for k, a in arrays.items():
            self.inputs[k].copy_(torch.from_numpy(a).pin_memory(), non_blocking=True)
        self.graph.replay()
        return self.out


class Launcher:
    """Runs `forward` on `device` over padded numpy batches: `launch` queues the work, its result waits for it."""

    def __init__(
        self, model: torch.nn.Module, device: str, forward: Forward, causal: bool, buckets: Buckets | None
    ) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.forward = forward
        self.causal = causal
        self.buckets = buckets
        self.impl = str(getattr(model.config, "_attn_implementation", "eager"))
        self.dtype = next(model.parameters()).dtype
        # Prepared 4D masks: for the attention implementations that take them; verified on the model at warm-up.
        self.masks_4d = self.impl in ("sdpa", "eager")
        self.graphs: dict[tuple[int, int], _Graph] = {}

    def shape(self, rows: int, width: int) -> tuple[int, int]:
        """The padded (rows, width) of a batch: its bucket on CUDA, exact elsewhere."""
        return self.buckets.shape(rows, width) if self.buckets else (rows, width)

    def run(self, inputs: dict[str, torch.Tensor], masked: bool) -> torch.Tensor:
        """The forward pass over device tensors, the 2D mask prepared as 4D (masked) or left out (no padding)."""
        inputs = dict(inputs)
        if not masked:
            del inputs["attention_mask"]
        elif self.masks_4d:
            inputs["attention_mask"] = expand_mask(inputs["attention_mask"], self.causal, self.impl, self.dtype)
        return self.forward(inputs)

    def launch(self, arrays: Arrays, rows: int, captured: bool = True) -> Collect:
        """Queue the forward pass of a padded batch whose first `rows` rows are real; returns a function that waits
        for their scores. On CUDA nothing here waits for the device: inputs go through pinned memory, the scores
        come back the same way, so the next batch is queued behind this one. On CPU the pass runs here. `captured`
        false: a forward that differs from the one captured (another layer to score at), run eagerly."""
        # Without padding no mask is needed; with buckets (CUDA) always one, so that a shape has one kernel path.
        masked = self.buckets is not None or not arrays["attention_mask"].all()
        with torch.inference_mode():
            if not self.cuda:
                scores = self.run({k: torch.from_numpy(a) for k, a in arrays.items()}, masked)[:rows].tolist()
                return lambda: scores
            graph = self.graphs.get(next(iter(arrays.values())).shape) if captured else None
            if graph is not None:
                scores = graph.replay(arrays)
            else:
                inputs = {
                    k: torch.from_numpy(a).pin_memory().to(self.device, non_blocking=True) for k, a in arrays.items()
                }
                scores = self.run(inputs, masked)
            out = torch.empty(len(scores), dtype=torch.float32, pin_memory=True)
            out.copy_(scores, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))

        def collect() -> list[float]:
            done.synchronize()
            return out[:rows].tolist()

        return collect

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).pin_memory().to(self.device, non_blocking=True)

    def check_masks(self, arrays: Arrays) -> None:
        """Keep the prepared 4D masks only if they give this model the scores its own 2D-mask path gives (a model
        with its own mask code may read a 4D mask differently, or refuse it)."""
        if not self.masks_4d:
            return
        with torch.inference_mode():
            inputs = {k: torch.from_numpy(a).to(self.device) for k, a in arrays.items()}
            ref = self.forward(dict(inputs))
            try:
                ours = self.run(inputs, masked=True)
                same = torch.allclose(ours, ref, atol=_tolerance(self.dtype), rtol=0)
            except Exception as exc:  # the model refuses a 4D mask
                same, why = False, f"{type(exc).__name__}: {exc}"
            else:
                why = f"scores differ by {(ours - ref).abs().max().item():.2e}"
        if not same:
            self.masks_4d = False
            log.warning("this model's attention does not take a prepared 4D mask (%s): each forward pass will wait "
                        "for the device once, in transformers' mask check", why)  # fmt: skip

    def capture(self, mode: str, samples: list[Arrays]) -> str:
        """Capture a CUDA graph per bucket (largest first, one memory pool); on failure, eager with one log line.
        Returns what happened, for the startup line."""
        if mode == "off" or not samples:
            return "off"
        if not self.cuda or self.buckets is None or not self.masks_4d:
            reason = "CUDA only" if not self.cuda else "needs shape buckets and prepared masks"
            (log.warning if mode == "on" else log.info)("CUDA graphs off: %s", reason)
            return f"off ({reason})"
        pool = torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode():
                for arrays in samples:
                    self.graphs[next(iter(arrays.values())).shape] = _Graph(self, arrays, pool)
                self._check_graph(samples[-1])
        except Exception as exc:
            self.graphs.clear()
            torch.cuda.synchronize(self.device)
            (log.warning if mode == "on" else log.info)("CUDA graphs off, eager forward passes: %s", exc)
            return f"off ({type(exc).__name__})"
        return f"{len(self.graphs)} captured"

    def _check_graph(self, arrays: Arrays) -> None:
        rows = len(arrays["input_ids"])
        replayed = self.launch(arrays, rows)()
        graph = self.graphs.pop(arrays["input_ids"].shape)
        eager = self.launch(arrays, rows)()
        self.graphs[arrays["input_ids"].shape] = graph
        diff = float(np.max(np.abs(np.asarray(replayed) - np.asarray(eager))))
        if diff > _tolerance(self.dtype):
            raise RuntimeError(f"a replayed graph's scores differ from eager ones by {diff:.2e}")


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
