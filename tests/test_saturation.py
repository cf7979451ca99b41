"""The saturation signal: reranker_busy_seconds_total counts each moment a batch is in flight once, for the model the
device is running; the batcher ends every batch's interval (scored, failed or cancelled); reranker_serving follows
health."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.engine.batcher import Batcher, BatchLimits, eager
from server.metrics import BusyClock
from tests.conftest import test_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_overlapping_batches_count_once_for_the_batch_the_device_runs(clock: Clock) -> None:
    busy = BusyClock(clock)
    busy.track("b")
    clock.now = 1000.0
    a1 = busy.start("a")  # the device runs a1 ...
    clock.now = 1002.0
    a2 = busy.start("a")  # ... with a2 (pipelined) and b1 (another model) queued behind it
    clock.now = 1005.0
    b1 = busy.start("b")
    clock.now = 1010.0
    a1()
    clock.now = 1015.0
    a2()
    assert busy.seconds() == {"a": 15.0, "b": 0.0}
    clock.now = 1020.0
    b1()
    clock.now = 1030.0  # idle: nothing is credited
    assert busy.seconds() == {"a": 15.0, "b": 5.0}  # 20 s busy in all: the union of the three, not their sum (28 s)


def test_a_long_batch_shows_while_it_runs_and_the_count_never_goes_back(clock: Clock) -> None:
    busy = BusyClock(clock)
    done = busy.start("a")
    readings = []
    for _ in range(5):
        clock.now += 1.0
        readings.append(busy.seconds()["a"])
    done()
    clock.now += 1.0
    readings.append(busy.seconds()["a"])
    assert readings == [1.0, 2.0, 3.0, 4.0, 5.0, 5.0]


def test_the_family_is_exported_with_every_tracked_model(clock: Clock) -> None:
    busy = BusyClock(clock)
    busy.track("a")
    (family,) = busy.collect()
    assert family.name == "reranker_busy_seconds"
    assert [(s.name, s.labels, s.value) for s in family.samples] == [
        ("reranker_busy_seconds_total", {"model": "a"}, 0.0)
    ]


async def test_the_batcher_ends_every_batch_scored_failed_or_stopped() -> None:
    busy = BusyClock()
    pool = ThreadPoolExecutor(1)

    def forward(items: Any) -> list[float]:
        if "boom" in items:
            raise RuntimeError("model blew up")
        time.sleep(0.05)
        return [1.0] * len(items)

    batcher: Batcher[str] = Batcher(
        eager(forward), pool, BatchLimits(max_pairs=2, max_wait_s=0.0), on_launch=lambda: busy.start("m")
    )
    batcher.start()
    try:
        await batcher.submit(["x", "y", "z"])
        with pytest.raises(RuntimeError):
            await batcher.submit(["boom"])
        assert not busy._open  # every batch ended
        assert 0.1 <= busy.seconds()["m"] < 5  # two scored batches of 50 ms, and the failed one
    finally:
        await batcher.stop()
        pool.shutdown(wait=True)
    assert not busy._open


async def test_a_server_counts_busy_time_per_model_and_reports_serving(model_dir: Path, engine: Any) -> None:
    import grpc

    srv = RerankServer(test_config(model_dir), engine=engine)
    registry = srv.metrics.registry
    model = srv.config.default_model
    await srv.bind()
    assert registry.get_sample_value("reranker_serving") == 0  # loading
    await srv.load()
    try:
        assert registry.get_sample_value("reranker_serving") == 1
        assert registry.get_sample_value("reranker_busy_seconds_total", {"model": model}) == 0
        start = time.monotonic()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.RerankerStub(channel)
            await asyncio.gather(
                *(stub.Rerank(pb.RerankRequest(query="q", candidates=["a passage"] * 40), timeout=60) for _ in range(4))
            )
        elapsed = time.monotonic() - start
        busy = registry.get_sample_value("reranker_busy_seconds_total", {"model": model})
        assert busy is not None and 0 < busy <= elapsed
    finally:
        await srv.stop(0)
    assert registry.get_sample_value("reranker_serving") == 0  # draining
