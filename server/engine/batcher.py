"""Coalesce the pairs of concurrent requests into forward passes.

The queue holds pairs, not requests, so many small RPCs share one forward pass and one large RPC is
split across several. Knows neither protobuf nor torch: items are opaque, with a token length.

Batches are pipelined: `launch` starts a batch's forward pass and returns a function that waits for its
scores; while a device computes batch k, batch k+1 is already formed, padded and queued behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")


class Overloaded(Exception):
    """The queue is full; the caller should back off and retry."""


@dataclass(frozen=True)
class BatchLimits:
    max_pairs: int = 32
    max_tokens: int = 16384  # padded tokens: pairs x longest pair
    max_wait_s: float = 0.002
    max_queue_pairs: int = 8192
    window: int = 1024  # oldest pending pairs considered when grouping by length (a max-size request fits)
    depth: int = 2  # batches launched and not yet collected; 2 keeps the next batch queued behind the running one
    stuck_s: float = 120.0  # a batch launched longer ago than this and not done: the inference thread is stuck


@dataclass(frozen=True)
class Pass:
    """One forward pass that scored some of a request's pairs (perf_counter times), for its trace."""

    number: int  # the batcher's count of batches, this one included
    start: float
    end: float
    pairs: int  # in the whole batch
    tokens: int
    mine: int  # the request's own pairs in it


@dataclass
class BatchResult:
    scores: list[float]
    tokens: int
    queue_s: float
    inference_s: float
    submitted: float = 0.0  # perf_counter when its first pairs were queued
    batches: list[Pass] = field(default_factory=list)


@dataclass(eq=False)
class _Job:
    future: asyncio.Future[BatchResult]
    size: int
    submitted: float
    scores: list[float] = field(init=False)
    remaining: int = field(init=False)  # pairs not scored yet
    tokens: int = 0
    started: float | None = None
    inference_s: float = 0.0
    launched: int = 0  # pairs taken into batches so far
    batches: list[Pass] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = [0.0] * self.size
        self.remaining = self.size

    @property
    def abandoned(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class _Pending(Generic[Item]):
    job: _Job
    index: int
    item: Item
    length: int


@dataclass
class BatchStats:
    """What the batcher has done; read by metrics and tests."""

    batches: int = 0
    pairs: int = 0
    dropped_pairs: int = 0
    rejected_requests: int = 0
    failed_batches: int = 0


async def _whole(items: Sequence[Item]) -> AsyncIterator[Sequence[Item]]:
    yield items


Collect = Callable[[], list[float]]  # waits for a launched batch's scores
Done = Callable[[], None]  # called once when a launched batch's scores are in, or it failed


def _nothing() -> None:
    pass


def eager(forward: Callable[[Sequence[Item]], list[float]]) -> Callable[[Sequence[Item]], Collect]:
    """A `launch` for a plain blocking forward function: the scores are ready when it returns."""

    def launch(items: Sequence[Item]) -> Collect:
        scores = forward(items)
        return lambda: scores

    return launch


class Batcher(Generic[Item]):
    """Queue pairs from many callers; one worker launches length-grouped batches off the loop.

    `launch` runs on `executor` (one thread: the device's), the functions it returns on `collect_executor`
    (default: `executor`), so a wait for the device never holds up the launch of the next batch.
    """

    def __init__(
        self,
        launch: Callable[[Sequence[Item]], Collect],
        executor: Executor,
        limits: BatchLimits,
        length: Callable[[Item], int] = len,  # type: ignore[assignment]
        on_batch: Callable[[int, int, float], None] | None = None,
        collect_executor: Executor | None = None,
        group: Callable[[Item], Hashable] | None = None,
        on_launch: Callable[[], Done] | None = None,
    ) -> None:
        self._launch = launch
        self._group = group  # items of different groups (e.g. other layers to score at) never share a batch
        self._on_launch = on_launch  # the device's busy clock: a batch is in flight until its Done is called
        self._executor = executor
        self._collect_executor = collect_executor or executor
        self._collecting: set[asyncio.Task[None]] = set()
        self._limits = limits
        self._length = length
        self._on_batch = on_batch
        self._pending: list[_Pending[Item]] = []
        self._reserved = 0  # places promised to callers still preparing their items
        self._open = 0  # submitted calls not yet answered
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._newer_turn = False  # the last batch went to a newer request than the oldest (_anchor)
        self._running: dict[int, float] = {}  # batches on the device (see _in_flight) -> when each was launched
        self._launches = itertools.count()
        self.stats = BatchStats()

    @property
    def limits(self) -> BatchLimits:
        return self._limits

    @property
    def queued_pairs(self) -> int:
        return len(self._pending)

    def unavailable(self) -> str:
        """Why this batcher cannot score now ("" when it can): its device loop ended, or a batch has been on the
        inference thread past `stuck_s`."""
        worker = self._worker
        if worker is not None and worker.done() and not self._closed:
            why = "cancelled" if worker.cancelled() else repr(worker.exception())
            return f"its device loop stopped ({why})"
        if self._running:
            age = time.perf_counter() - min(self._running.values())
            if age > self._limits.stuck_s:
                bound = self._limits.stuck_s
                return f"its inference thread has been on one batch for {age:.0f} s (the bound is {bound:.0f} s)"
        return ""

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop the worker; callers still waiting get an error."""
        self._closed = True
        tasks = [t for t in (self._worker, *self._collecting) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._worker = None
        for p in self._pending:
            if not p.job.abandoned:
                p.job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()

    async def submit(self, items: Sequence[Item]) -> BatchResult:
        """Score `items`; scores come back in input order. Raises Overloaded when the queue is full."""
        return await self.submit_after(len(items), lambda: _whole(items))

    async def submit_after(self, count: int, prepare: Callable[[], AsyncIterator[Sequence[Item]]]) -> BatchResult:
        """Reserve `count` queue places, then queue the items `prepare()` yields, part by part, in order.

        The reservation comes first so that an overloaded server refuses (Overloaded) before it spends
        any work, such as tokenizing, on a request it cannot queue. Each part queues as soon as it is ready,
        so the first batches of a large request run while the rest of it is still being tokenized.
        """
        if count == 0:
            return BatchResult([], 0, 0.0, 0.0)
        self._reserve(count)
        self._open += 1
        self._idle.clear()
        try:
            return await self._queue_and_wait(count, prepare)
        finally:
            self._open -= 1
            if self._open == 0:
                self._idle.set()

    async def close_when_idle(self, timeout_s: float) -> None:
        """Stop once every call already submitted is answered (a replaced model's batcher), or after `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("%d calls still waiting on a retired batcher after %.0f s: stopping it", self._open, timeout_s)
        await self.stop()

    async def _queue_and_wait(self, count: int, prepare: Callable[[], AsyncIterator[Sequence[Item]]]) -> BatchResult:
        job: _Job | None = None
        queued = 0
        try:
            async with contextlib.aclosing(prepare()) as parts:
                async for part in parts:
                    # Submitted when its first pairs queue: the batch-filling wait counts from there.
                    job = job or _Job(asyncio.get_running_loop().create_future(), count, time.perf_counter())
                    if job.abandoned:  # a batch holding its first pairs failed: the rest would be wasted work
                        break
                    self._queue_part(job, queued, part)
                    queued += len(part)
            if job is None or (queued != count and not job.abandoned):
                raise ValueError(f"prepared {queued} items for {count} reserved places")
            return await job.future
        except BaseException:  # failed, or cancelled (client gone, deadline passed): its pairs leave the queue now
            if job is not None:
                if not job.future.done():
                    job.future.cancel()
                self._drop(job)
            raise
        finally:
            self._reserved -= count - queued  # places never filled are given back

    def _queue_part(self, job: _Job, offset: int, part: Sequence[Item]) -> None:
        """Queue `part` as the job's items from `offset` on, in the places reserved for them."""
        if offset + len(part) > job.size:
            raise ValueError(f"prepared more than {job.size} items for {job.size} reserved places")
        if self._closed:
            raise RuntimeError("the server is shutting down")
        self._reserved -= len(part)  # no await between this and queuing: the places pass on atomically
        self._pending.extend(_Pending(job, offset + i, it, self._length(it)) for i, it in enumerate(part))
        self._wakeup.set()

    def _reserve(self, count: int) -> None:
        held = len(self._pending) + self._reserved
        if held + count > self._limits.max_queue_pairs:
            self.stats.rejected_requests += 1
            raise Overloaded(
                f"server overloaded: {held} pairs queued, {count} more would exceed "
                f"the queue limit of {self._limits.max_queue_pairs}; retry with backoff"
            )
        self._reserved += count

    def _drop(self, job: _Job) -> None:
        kept = [p for p in self._pending if p.job is not job]
        self.stats.dropped_pairs += len(self._pending) - len(kept)
        self._pending = kept

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self._limits.depth)
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await slots.acquire()  # released when the batch's scores are delivered
                batch = await self._next_batch()
                collect = await self._launch_batch(batch) if batch else None
                if collect is None:
                    slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._collect(batch, collect, slots))
                self._collecting.add(task)
                task.add_done_callback(self._collecting.discard)
                task.add_done_callback(lambda _, done=collect[2]: done())  # even if cancelled before it ran

    async def _next_batch(self) -> list[_Pending[Item]]:
        if self._pending:
            await self._fill_wait()
        return self._take_batch()

    async def _fill_wait(self) -> None:
        """Wait briefly for more pairs when the batch is not full, so concurrent callers share it."""
        deadline = self._pending[0].job.submitted + self._limits.max_wait_s
        while len(self._pending) < self._limits.max_pairs:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending[Item]]:
        """The length group of the anchor pair (see _anchor), within the pair and padded-token budgets.

        The `window` pending pairs from the anchor on are sorted longest first and cut into batches, as an offline
        scorer would cut them; the batch holding the anchor goes next. So pairs of similar length share a batch
        (little padding), one request alone is batched exactly like the engine ceiling, and a short request is never
        starved by a stream of long ones.
        """
        live = [p for p in self._pending if not p.job.abandoned]
        self.stats.dropped_pairs += len(self._pending) - len(live)
        if not live:
            self._pending = live
            return []
        start = self._anchor(live)
        anchor = live[start]
        window = live[start:]
        if self._group is not None:
            key = self._group(anchor.item)
            window = [p for p in window if self._group(p.item) == key]
        batch: list[_Pending[Item]] = []
        for p in sorted(window[: self._limits.window], key=lambda p: -p.length):
            # Longest first, so a batch's first pair sets the padded length of the whole batch.
            if batch and (
                len(batch) >= self._limits.max_pairs or batch[0].length * (len(batch) + 1) > self._limits.max_tokens
            ):
                if any(q is anchor for q in batch):
                    break
                batch = []
            batch.append(p)
        taken = {id(p) for p in batch}
        self._pending = [p for p in live if id(p) not in taken]
        for p in batch:
            p.job.launched += 1
        return batch

    def _anchor(self, live: list[_Pending[Item]]) -> int:
        """Where the next batch is drawn from: the oldest pending pair, except that once the oldest request has had a
        batch's worth of pairs, the batch after one of its own goes to the oldest newer request that has not. So a
        small call waits for about one of a large request's batches, not for all of them, and the large one keeps
        at least half."""
        if live[0].job.launched >= self._limits.max_pairs and not self._newer_turn:
            for i, p in enumerate(live):
                if p.job.launched < self._limits.max_pairs:
                    self._newer_turn = True
                    return i
        self._newer_turn = False
        return 0

    def _in_flight(self, start: float) -> Done:
        """Record a batch as on the device from `start` (the stuck check, the busy clock) until the Done it returns
        is called: once its scores are in or it failed."""
        key = next(self._launches)
        self._running[key] = start
        busy = self._on_launch() if self._on_launch is not None else _nothing

        def done() -> None:
            if self._running.pop(key, None) is not None:  # once, whichever path ends the batch
                busy()

        return done

    async def _launch_batch(self, batch: list[_Pending[Item]]) -> tuple[Collect, float, Done] | None:
        """Start the batch's forward pass; None if it failed (its callers have the error)."""
        start = time.perf_counter()
        for p in batch:
            if p.job.started is None:
                p.job.started = start
        done = self._in_flight(start)
        try:
            collect = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._launch, [p.item for p in batch]
            )
        except asyncio.CancelledError:  # stop(): the callers of this batch must not wait forever
            done()
            self._fail(batch, RuntimeError("the server is shutting down"))
            raise
        except Exception as exc:  # a model error fails only the callers in this batch
            done()
            self._failed(batch, exc)
            return None
        return collect, start, done

    async def _collect(
        self, batch: list[_Pending[Item]], launched: tuple[Collect, float, Done], slots: asyncio.Semaphore
    ) -> None:
        collect, start, _ = launched
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self._collect_executor, collect)
            if len(scores) != len(batch):
                raise RuntimeError(f"model returned {len(scores)} scores for {len(batch)} pairs")
        except asyncio.CancelledError:
            self._fail(batch, RuntimeError("the server is shutting down"))
            raise
        except Exception as exc:
            self._failed(batch, exc)
            return
        finally:
            slots.release()
        end = time.perf_counter()
        elapsed, tokens = end - start, sum(p.length for p in batch)
        self.stats.batches += 1
        self.stats.pairs += len(batch)
        if self._on_batch is not None:
            self._on_batch(len(batch), tokens, elapsed)
        for job, mine in Counter(p.job for p in batch).items():
            job.inference_s += elapsed
            job.batches.append(Pass(self.stats.batches, start, end, len(batch), tokens, mine))
        for p, score in zip(batch, scores, strict=True):
            self._deliver(p, score)

    def _failed(self, batch: list[_Pending[Item]], exc: Exception) -> None:
        log.error("forward pass failed for a batch of %d pairs", len(batch), exc_info=exc)
        self.stats.failed_batches += 1
        self._fail(batch, exc)

    def _deliver(self, p: _Pending[Item], score: float) -> None:
        job = p.job
        if job.abandoned:
            return
        job.scores[p.index] = score
        job.tokens += p.length
        job.remaining -= 1
        if job.remaining == 0:
            queue_s = (job.started or job.submitted) - job.submitted
            job.future.set_result(
                BatchResult(job.scores, job.tokens, queue_s, job.inference_s, job.submitted, job.batches)
            )

    def _fail(self, batch: list[_Pending[Item]], exc: Exception) -> None:
        failed = {id(p.job): p.job for p in batch}
        for job in failed.values():
            if not job.abandoned:
                job.future.set_exception(exc)
        # The rest of a failed caller's pairs would be wasted work.
        self._pending = [p for p in self._pending if id(p.job) not in failed]
