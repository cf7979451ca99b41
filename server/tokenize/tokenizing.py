"""Where a model's pairs are tokenized: threads of the serving process, or worker processes behind them."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from server.tokenize.workers import STOP_WAIT_S, TokenizerWorkers, WorkerEvents

MAX_AUTO_WORKERS = 8


class Encoder(Protocol):
    """A model's exact tokenizing: the model itself, whose `encoder` (server.tokenize.exact.PairEncoder,
    server.tokenize.prompted.PromptEncoder) pickles to a worker without the weights."""

    encoder: Any

    def encode(self, pairs: Sequence[tuple[str, str]], options: Any = None) -> list[Any]: ...

    def thread_tokenizer(self) -> Any: ...

    def copy_tokenizer(self, threads: int) -> None: ...


def worker_count(requested: int, on_cuda: bool) -> int:
    """--tokenize-workers, or for auto (-1): on CUDA half the cores (2 to 8), so tokenizing never holds the GIL
    that launches the device's work; on CPU none, where the forward pass (torch threads) barely needs the GIL and
    in-process threads measured faster (bench/README.md)."""
    if requested >= 0:
        return requested
    if not on_cuda:
        return 0
    return max(2, min(MAX_AUTO_WORKERS, (os.cpu_count() or 4) // 2))


class Tokenizing:
    """`encode` on `executor`'s threads: in this process (workers=0, a tokenizer copy per thread) or, through those
    threads, in `workers` processes."""

    def __init__(self, model: Encoder, threads: int, workers: int, events: WorkerEvents | None = None) -> None:
        self.model = model
        self.threads = threads
        self.workers = TokenizerWorkers(model.encoder, workers, events) if workers else None
        # With workers a thread only waits on its worker's socket: one each is enough.
        self.executor = ThreadPoolExecutor(workers or threads, thread_name_prefix="tokenize")
        self.start_s = 0.0

    @property
    def parallel(self) -> int:
        """Slices tokenized at once."""
        return self.workers.count if self.workers else self.threads

    def encode(self, pairs: Sequence[tuple[str, str]], options: Any = None) -> list[Any]:
        """The pairs' inputs, exactly as the model's recipe builds them (`options`: the request's, a
        server.tokenize.options.Options); call it on `executor`."""
        if self.workers:
            return self.workers.encode(pairs, options)
        return self.model.encode(pairs, options)

    def start(self) -> None:
        """Make the threads' tokenizer copies, or start the workers (bounded; WorkerStartError when they fail)."""
        start = time.perf_counter()
        if self.workers:
            self.workers.start()
        else:
            self.model.copy_tokenizer(self.threads)
        self.start_s = time.perf_counter() - start

    def unavailable(self) -> str:
        """Why this model cannot tokenize now, or "" when it can (threads always can; workers while one lives)."""
        if self.workers is None or self.workers.live:
            return ""
        return self.workers.unavailable()

    def describe(self) -> str:
        """For the startup line."""
        if self.workers:
            n = self.workers.count
            return f"{n} process{'es' if n > 1 else ''} (started in {self.start_s:.1f} s)"
        return f"{self.threads} thread{'s' if self.threads > 1 else ''} in-process"

    def close(self, timeout_s: float = STOP_WAIT_S) -> None:
        """Stop tokenizing; workers still busy after `timeout_s` (stopped, stuck) are killed."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.workers:
            self.workers.close(timeout_s)
