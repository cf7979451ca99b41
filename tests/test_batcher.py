"""The micro-batcher with a fake model that records every batch; plus one parity test on the real path."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.engine.batcher import Batcher, BatchLimits, Overloaded, eager
from tests.conftest import FP32_REORDERED
from tests.ops_helpers import until


@dataclass(frozen=True)
class Pair:
    key: int  # the fake model's score
    length: int  # tokens


class FakeModel:
    """Scores a pair as its key; records each batch; `hold()` makes the next forward pass wait for `release()`."""

    def __init__(self) -> None:
        self.batches: list[list[Pair]] = []
        self.started = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self.fail_on: int | None = None

    def hold(self) -> None:
        self._gate.clear()
        self.started.clear()

    def release(self) -> None:
        self._gate.set()

    def forward(self, batch: Sequence[Pair]) -> list[float]:
        self.started.set()
        assert self._gate.wait(10), "the test never released the model"
        self.batches.append(list(batch))
        if self.fail_on is not None and any(p.key == self.fail_on for p in batch):
            raise RuntimeError("model blew up")
        return [float(p.key) for p in batch]

    def keys(self) -> list[set[int]]:
        return [{p.key for p in b} for b in self.batches]


def pairs(keys: range | list[int], length: int | list[int] = 10) -> list[Pair]:
    lengths = length if isinstance(length, list) else [length] * len(keys)
    return [Pair(k, n) for k, n in zip(keys, lengths, strict=True)]


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
async def make(model: FakeModel) -> AsyncIterator[Any]:
    """make(**limits) -> a started Batcher over the fake model; stopped after the test."""
    pool = ThreadPoolExecutor(1)
    made: list[Batcher[Pair]] = []

    def _make(**limits: Any) -> Batcher[Pair]:
        b: Batcher[Pair] = Batcher(eager(model.forward), pool, BatchLimits(**limits), length=lambda p: p.length)
        b.start()
        made.append(b)
        return b

    yield _make
    model.release()
    for b in made:
        await b.stop()
    pool.shutdown(wait=True)


async def block_worker(batcher: Batcher[Pair], model: FakeModel) -> asyncio.Task[Any]:
    """Occupy the worker with a one-pair request (key -1) so that what comes next waits in the queue."""
    model.hold()
    first = asyncio.ensure_future(batcher.submit(pairs([-1])))
    assert await asyncio.to_thread(model.started.wait, 10)
    return first


async def test_budgets_respected_and_scores_in_input_order(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=8, max_tokens=200, max_wait_s=0.0)
    rng = random.Random(0)
    lengths = [rng.randint(1, 25) for _ in range(100)]
    result = await batcher.submit(pairs(range(100), lengths))
    assert result.scores == [float(k) for k in range(100)]
    assert result.tokens == sum(lengths)
    assert sorted(p.key for b in model.batches for p in b) == list(range(100))  # each pair scored once
    for b in model.batches:
        assert len(b) <= 8
        assert max(p.length for p in b) * len(b) <= 200
    assert batcher.stats.pairs == 100 and batcher.stats.batches == len(model.batches)


async def test_concurrent_small_requests_share_batches(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=32)
    first = await block_worker(batcher, model)
    requests = [asyncio.ensure_future(batcher.submit(pairs(range(10 * i, 10 * i + 3)))) for i in range(6)]
    await asyncio.sleep(0)  # let them queue
    assert batcher.queued_pairs == 18
    model.release()
    results = await asyncio.gather(*requests)
    await first
    assert [len(b) for b in model.batches] == [1, 18]  # six requests, one forward pass
    for i, r in enumerate(results):
        assert r.scores == [float(k) for k in range(10 * i, 10 * i + 3)]


async def test_short_wait_lets_a_batch_fill(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=6, max_wait_s=30.0)  # a full batch goes at once; it never waits the 30 s
    a = asyncio.ensure_future(batcher.submit(pairs(range(3))))
    await asyncio.sleep(0.01)
    b = asyncio.ensure_future(batcher.submit(pairs(range(3, 6))))
    await asyncio.gather(a, b)
    assert [len(x) for x in model.batches] == [6]


async def test_large_request_split_across_batches(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=32, max_tokens=100_000, max_wait_s=0.0)
    result = await batcher.submit(pairs(range(70)))
    assert [len(b) for b in model.batches] == [32, 32, 6]
    assert result.scores == [float(k) for k in range(70)]


async def test_token_budget_splits_long_pairs(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=32, max_tokens=1000, max_wait_s=0.0)
    await batcher.submit(pairs(range(10), 400))
    assert [len(b) for b in model.batches] == [2, 2, 2, 2, 2]  # 2 x 400 padded tokens fit, 3 do not


async def test_similar_lengths_grouped(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=8, max_wait_s=0.0)
    lengths = [10, 300] * 8  # interleaved short and long
    await batcher.submit(pairs(range(16), lengths))
    assert [sorted({p.length for p in b}) for b in model.batches] == [[10], [300]]


async def test_one_request_batched_like_an_offline_length_sort(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=16, max_tokens=100_000, max_wait_s=0.0)
    lengths = random.Random(2).sample(range(1, 500), 70)
    await batcher.submit(pairs(range(70), lengths))
    by_length = sorted(range(70), key=lambda k: -lengths[k])
    chunks = [set(by_length[s : s + 16]) for s in range(0, 70, 16)]
    assert sorted(model.keys(), key=min) == sorted(chunks, key=min)  # the engine ceiling's batches
    assert 0 in model.keys()[0]  # the oldest pair's batch went first


async def test_short_request_not_starved_by_long_ones(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=4, max_tokens=100_000)
    first = await block_worker(batcher, model)
    short = asyncio.ensure_future(batcher.submit(pairs([100], 5)))
    longs = [asyncio.ensure_future(batcher.submit(pairs(range(200 + 4 * i, 204 + 4 * i), 400))) for i in range(5)]
    await asyncio.sleep(0)
    model.release()
    await asyncio.gather(first, short, *longs)
    assert 100 in model.keys()[1]  # the oldest pending pair is in the very next batch


async def test_full_queue_refuses_at_once_without_preparing(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=32, max_queue_pairs=10)
    first = await block_worker(batcher, model)
    queued = asyncio.ensure_future(batcher.submit(pairs(range(10))))
    await asyncio.sleep(0)
    assert batcher.queued_pairs == 10
    prepared: list[int] = []

    async def prepare() -> AsyncIterator[list[Pair]]:
        prepared.append(1)
        yield pairs([99])

    with pytest.raises(Overloaded, match="10 pairs queued, 1 more would exceed the queue limit of 10"):
        await batcher.submit_after(1, prepare)
    assert prepared == []  # refused before any work (tokenizing) was spent on it
    assert batcher.stats.rejected_requests == 1
    model.release()
    assert (await queued).scores == [float(k) for k in range(10)]  # the accepted request still finishes
    await first
    assert (await batcher.submit(pairs([7]))).scores == [7.0]  # room again


async def test_reserved_places_count_against_the_queue(make: Any, model: FakeModel) -> None:
    batcher = make(max_queue_pairs=10, max_wait_s=0.0)
    ready = asyncio.Event()

    async def slow_prepare() -> AsyncIterator[list[Pair]]:
        await ready.wait()  # e.g. still tokenizing
        yield pairs(range(8))

    preparing = asyncio.ensure_future(batcher.submit_after(8, slow_prepare))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="8 pairs queued, 3 more"):
        await batcher.submit(pairs(range(3)))
    ready.set()
    assert len((await preparing).scores) == 8
    assert len((await batcher.submit(pairs(range(3)))).scores) == 3  # the reservation was released


async def test_failed_prepare_releases_its_places(make: Any) -> None:
    batcher = make(max_queue_pairs=10)

    async def broken() -> AsyncIterator[list[Pair]]:
        yield pairs(range(4))  # the first slice is tokenized and queued, the second fails
        raise ValueError("tokenizer failed")

    with pytest.raises(ValueError, match="tokenizer failed"):
        await batcher.submit_after(10, broken)
    assert batcher.queued_pairs == 0  # the first slice's pairs left the queue with it
    assert len((await batcher.submit(pairs(range(10)))).scores) == 10


async def test_parts_queue_as_they_are_prepared(make: Any, model: FakeModel) -> None:
    """A large request's first slices are scored while its later ones are still being tokenized."""
    batcher = make(max_pairs=4, max_wait_s=0.0)
    second_slice = asyncio.Event()

    async def slices() -> AsyncIterator[list[Pair]]:
        yield pairs(range(4))
        await second_slice.wait()
        yield pairs(range(4, 8))

    request = asyncio.ensure_future(batcher.submit_after(8, slices))
    await until(lambda: len(model.batches) == 1, 10)  # scored before the second slice exists
    assert [p.key for p in model.batches[0]] == [0, 1, 2, 3]
    second_slice.set()
    assert (await asyncio.wait_for(request, 10)).scores == [float(k) for k in range(8)]


async def test_caller_gone_between_parts_gives_back_every_place(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=32, max_queue_pairs=10)
    first = await block_worker(batcher, model)
    started = asyncio.Event()

    async def stalls() -> AsyncIterator[list[Pair]]:
        yield pairs(range(5))
        started.set()
        await asyncio.sleep(3600)  # the rest never comes
        yield pairs(range(5, 9))

    gone = asyncio.ensure_future(batcher.submit_after(9, stalls))
    await asyncio.wait_for(started.wait(), 10)
    assert batcher.queued_pairs == 5
    gone.cancel()  # client disconnected while its request was still being tokenized
    await asyncio.gather(gone, return_exceptions=True)
    assert batcher.queued_pairs == 0
    model.release()
    await first
    assert len((await batcher.submit(pairs(range(10)))).scores) == 10  # all ten places are free again


async def test_more_items_than_reserved_is_an_error(make: Any) -> None:
    batcher = make(max_queue_pairs=10)

    async def too_many() -> AsyncIterator[list[Pair]]:
        yield pairs(range(3))
        yield pairs(range(3, 6))

    with pytest.raises(ValueError, match="prepared more than 4 items for 4 reserved places"):
        await batcher.submit_after(4, too_many)
    assert batcher.queued_pairs == 0
    assert len((await batcher.submit(pairs(range(10)))).scores) == 10


async def test_cancelled_callers_pairs_dropped_before_compute(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=32)
    first = await block_worker(batcher, model)
    gone = asyncio.ensure_future(batcher.submit(pairs(range(100, 105))))
    kept = asyncio.ensure_future(batcher.submit(pairs(range(3))))
    await asyncio.sleep(0)
    gone.cancel()  # what grpc.aio does when the client disconnects or its deadline passes
    await asyncio.gather(gone, return_exceptions=True)
    assert batcher.queued_pairs == 3  # its places are free at once
    model.release()
    assert (await kept).scores == [0.0, 1.0, 2.0]
    await first
    assert not any(p.key >= 100 for b in model.batches for p in b)
    assert batcher.stats.dropped_pairs == 5


async def test_model_error_fails_only_that_batch_and_worker_lives_on(make: Any, model: FakeModel) -> None:
    batcher = make(max_pairs=2, max_wait_s=0.0)
    model.fail_on = 13
    first = await block_worker(batcher, model)
    bad = asyncio.ensure_future(batcher.submit(pairs([13, 14, 15, 16])))  # its first batch fails
    good = asyncio.ensure_future(batcher.submit(pairs([20, 21])))
    await asyncio.sleep(0)
    model.release()
    await first
    with pytest.raises(RuntimeError, match="model blew up"):
        await bad
    assert (await good).scores == [20.0, 21.0]
    assert not any(p.key in (15, 16) for b in model.batches for p in b)  # the failed caller's rest is skipped
    assert batcher.stats.failed_batches == 1
    assert (await batcher.submit(pairs([30]))).scores == [30.0]  # the worker lives on


async def test_stop_fails_waiting_callers(make: Any, model: FakeModel) -> None:
    batcher = make()
    first = await block_worker(batcher, model)
    waiting = asyncio.ensure_future(batcher.submit(pairs([1])))
    await asyncio.sleep(0)
    await batcher.stop()  # while a batch is in the model and another request waits
    for caller in (first, waiting):
        with pytest.raises(RuntimeError, match="shutting down"):
            await caller
    with pytest.raises(RuntimeError, match="shutting down"):
        await batcher.submit(pairs([2]))


async def test_concurrent_grpc_requests_equal_compute_score(stub: pb_grpc.RerankerStub, flag_reranker: Any) -> None:
    """The real path: concurrent requests share batches, yet each gets what compute_score gives it alone."""
    rng = random.Random(1)
    words = "the giant panda is a bear species endemic to China gRPC reranker passage query".split()
    requests = [
        (f"query {i}", [" ".join(rng.choices(words, k=rng.randint(1, 60))) for _ in range(rng.randint(1, 12))])
        for i in range(12)
    ]
    responses = await asyncio.gather(*(stub.Rerank(pb.RerankRequest(query=q, candidates=c)) for q, c in requests))
    for (query, candidates), resp in zip(requests, responses, strict=True):
        expected = flag_reranker.compute_score([[query, c] for c in candidates])
        expected = expected if isinstance(expected, list) else [expected]
        # A shared batch pads a pair differently from compute_score's own call, and fp32 sums then differ by up
        # to about 1e-5 on this wide-weight tiny model (compute_score shifts as much with its call's other pairs).
        assert list(resp.scores) == pytest.approx(expected, **FP32_REORDERED)


async def test_next_batch_launches_while_the_device_runs_the_previous_one() -> None:
    """Pipelining: batch k+1 is launched before batch k's scores are collected; never more than `depth` ahead."""
    events: list[str] = []
    gates: list[threading.Event] = []

    def launch(batch: Sequence[Pair]) -> Any:
        n = len(gates)
        gates.append(threading.Event())
        events.append(f"launch {n}")

        def collect() -> list[float]:
            assert gates[n].wait(10)
            events.append(f"collect {n}")
            return [float(p.key) for p in batch]

        return collect

    launch_pool, collect_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    batcher: Batcher[Pair] = Batcher(
        launch, launch_pool, BatchLimits(max_pairs=2, max_wait_s=0.0, depth=2), lambda p: p.length, None, collect_pool
    )
    batcher.start()
    try:
        request = asyncio.ensure_future(batcher.submit(pairs(range(6))))
        await until(lambda: len(events) >= 2, 10)
        assert events[:2] == ["launch 0", "launch 1"]  # two batches on the device; the third waits for a slot:
        for g in range(3):
            await until(lambda g=g: len(gates) > g, 10)
            gates[g].set()
        result = await asyncio.wait_for(request, 10)
        assert result.scores == [float(k) for k in range(6)]
        assert events.index("launch 2") > events.index("collect 0")  # ... launched only once the first was collected
        assert batcher.stats.batches == 3
    finally:
        for g in gates:
            g.set()
        await batcher.stop()
        launch_pool.shutdown(wait=True)
        collect_pool.shutdown(wait=True)


@pytest.fixture
async def collecting() -> AsyncIterator[Callable[[Callable[[Sequence[Pair]], list[float]]], Batcher[Pair]]]:
    """collecting(scores) -> a batcher whose batches launch at once and fail or succeed while their scores are
    collected (`scores(batch)`), one batch in flight at a time; stopped after the test."""
    pool = ThreadPoolExecutor(1)
    made: list[Batcher[Pair]] = []

    def _make(scores: Callable[[Sequence[Pair]], list[float]]) -> Batcher[Pair]:
        def launch(batch: Sequence[Pair]) -> Callable[[], list[float]]:
            return lambda: scores(batch)

        limits = BatchLimits(max_pairs=2, max_wait_s=0.0, depth=1)
        batcher: Batcher[Pair] = Batcher(launch, pool, limits, lambda p: p.length)
        batcher.start()
        made.append(batcher)
        return batcher

    yield _make
    for b in made:
        await b.stop()
    pool.shutdown(wait=True)


async def test_a_failure_while_collecting_fails_that_batch_and_the_worker_lives_on(
    collecting: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def collect(batch: Sequence[Pair]) -> list[float]:
        if any(p.key == 13 for p in batch):
            raise RuntimeError("device lost while waiting for the scores")
        return [float(p.key) for p in batch]

    batcher = collecting(collect)
    with pytest.raises(RuntimeError, match="device lost while waiting"):
        await asyncio.wait_for(batcher.submit(pairs([13, 14])), 10)
    assert (batcher.stats.failed_batches, batcher.stats.batches) == (1, 0)
    assert "forward pass failed for a batch of 2 pairs" in caplog.text
    for _ in range(3):  # one batch in flight at most: a slot the failure kept would stall these
        assert (await asyncio.wait_for(batcher.submit(pairs([20, 21])), 10)).scores == [20.0, 21.0]


async def test_a_model_returning_the_wrong_number_of_scores_is_an_error_for_that_batch(collecting: Any) -> None:
    def one_short(batch: Sequence[Pair]) -> list[float]:
        scores = [float(p.key) for p in batch]
        return scores[:-1] if 7 in (p.key for p in batch) else scores

    batcher = collecting(one_short)
    with pytest.raises(RuntimeError, match="model returned 1 scores for 2 pairs"):
        await asyncio.wait_for(batcher.submit(pairs([7, 8])), 10)
    assert batcher.stats.failed_batches == 1
    assert (await asyncio.wait_for(batcher.submit(pairs([20, 21])), 10)).scores == [20.0, 21.0]


async def test_a_small_request_waits_for_one_batch_of_a_large_one_not_all(make: Any, model: FakeModel) -> None:
    """Once the oldest request has had a batch, newer requests get every other batch: a 1-pair call sent during a
    20-batch request is scored within its next batches, and the large one keeps going meanwhile."""
    batcher = make(max_pairs=4, max_wait_s=0.0, depth=1)
    model.hold()
    large = asyncio.ensure_future(batcher.submit(pairs(range(80))))
    await asyncio.to_thread(model.started.wait, 10)  # the first batch of the large request is running
    small = asyncio.ensure_future(batcher.submit(pairs([1000])))
    await until(lambda: batcher.queued_pairs == 80 - 4 + 1)
    model.release()
    assert (await small).scores == [1000.0]
    await large
    position = next(i for i, keys in enumerate(model.keys()) if 1000 in keys)
    assert position <= 2, f"the small request ran in batch {position} of {len(model.batches)}"
    assert len(model.batches) == 21 and {k for keys in model.keys() for k in keys} == {*range(80), 1000}
