"""Faults a fleet meets (issue 23), on real servers in this process: workers that cannot be replaced, a stopped
worker, a drain beside stuck workers, a second server on a busy port, a reload while a request cuts windows, a
reload of a deleted directory, a call arriving as the drain ends."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import server.service
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import SERVICE_NAME, RerankServer, model_health_name
from server.tokenize.workers import TokenizerWorkers
from tests.conftest import test_config
from tests.ops_helpers import free_port, sample, scrape, until
from tests.test_lifecycle import _serve
from tests.test_models import _replace_weights, other_model_dir  # noqa: F401  (its session fixture)
from tools.make_model import SENTENCES

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RERANK = pb.RerankRequest(query="what is panda?", candidates=SENTENCES[:4])


def _workers(srv: RerankServer) -> TokenizerWorkers:
    workers = srv.service.scoring.tokenizing.workers  # type: ignore[union-attr]
    assert workers is not None
    return workers


async def _health(channel: grpc.aio.Channel, *services: str) -> list[int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return [(await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=10)).status for s in services]


async def _rejected(stub: pb_grpc.RerankerStub) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Rerank(RERANK, timeout=30)
    return err.value


@pytest.fixture
async def one_worker(model_dir: Path, engine: Any) -> Any:
    srv = RerankServer(test_config(model_dir, tokenize_workers=1, metrics_port=free_port()), engine=engine)
    await srv.start()
    yield srv
    await srv.stop(0)


async def test_a_model_whose_workers_cannot_start_is_not_serving_fails_fast_and_recovers(
    one_worker: RerankServer,
) -> None:
    """Every replacement fails (a broken environment): health NOT_SERVING, calls UNAVAILABLE at once naming why,
    starts retried for ever (counted), and SERVING again once a worker starts."""
    srv, workers = one_worker, _workers(one_worker)
    name = srv.config.default_model
    names = ("", SERVICE_NAME, model_health_name(name))
    workers.backoff_s = (0.05,)
    payload, workers._payload = workers._payload, b"not a pickled encoder"  # each new worker exits while starting
    (pid,) = workers.pids
    os.kill(pid, signal.SIGKILL)
    await until(lambda: workers.failed_starts >= 3, 60)  # more than one: it keeps trying
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        assert await _health(ch, *names) == [NOT_SERVING] * 3
        err = await _rejected(pb_grpc.RerankerStub(ch))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "no tokenizer worker is running" in err.details() and "while starting" in err.details()
        m = await asyncio.to_thread(scrape, srv.metrics_port)
        assert sample(m, "reranker_tokenizer_workers", model=name) == 0
        assert sample(m, "reranker_tokenizer_worker_start_failures_total", model=name) >= 3
        assert sample(m, "reranker_tokenizer_worker_deaths_total") == 1
        workers._payload = payload  # the environment is fixed: the next try starts one
        await until(lambda: workers.live == 1, 60)
        await until(lambda: srv.health._server_status[""] == SERVING, 10)
        assert await _health(ch, *names) == [SERVING] * 3
        assert len((await pb_grpc.RerankerStub(ch).Rerank(RERANK, timeout=30)).scores) == len(RERANK.candidates)
    assert sample(await asyncio.to_thread(scrape, srv.metrics_port), "reranker_tokenizer_workers", model=name) == 1


async def test_a_stopped_worker_is_killed_and_replaced_and_its_call_is_unavailable(one_worker: RerankServer) -> None:
    workers = _workers(one_worker)
    workers.slice_timeout_s = 0.5  # a few short pairs take milliseconds
    (pid,) = workers.pids
    os.kill(pid, signal.SIGSTOP)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{one_worker.port}") as ch:
        stub = pb_grpc.RerankerStub(ch)
        err = await _rejected(stub)  # not DEADLINE_EXCEEDED: the wait on the worker is bounded
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert f"tokenizer worker (pid {pid}) was stopped: it took more than" in err.details()
        await until(lambda: workers.pids not in ([], [pid]), 60)
        assert len((await stub.Rerank(RERANK, timeout=30)).scores) == len(RERANK.candidates)


async def test_the_drain_kills_stuck_workers_when_the_grace_ends(
    model_dir: Path, engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Both workers stopped, a call held by one: the drain ends with the grace and kills them, not waiting on
    them any further (close() would give each 2 s to exit politely)."""
    srv = RerankServer(test_config(model_dir, tokenize_workers=2, grace_s=0.5), engine=engine)
    await srv.start()
    workers = _workers(srv)
    pids = workers.pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        held = asyncio.ensure_future(pb_grpc.RerankerStub(ch).Rerank(RERANK, timeout=60))
        await until(lambda: len(workers._idle) < len(pids))  # a slice is in a stopped worker's hands
        with caplog.at_level(logging.WARNING, logger="server"):
            await srv.stop()
        assert isinstance((await asyncio.gather(held, return_exceptions=True))[0], grpc.aio.AioRpcError)  # cut off
    [killed] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("killed tokenizer worker(s)")]
    assert killed.endswith("still busy when the server stopped") and all(str(p) in killed for p in pids)
    assert "grace period of 0.5 s ended with calls in flight" in caplog.text


async def test_a_second_server_on_a_busy_grpc_port_stops_at_once(
    server: RerankServer, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC would share the port (SO_REUSEPORT) and split new connections between the two servers."""
    assert await _serve(test_config(model_dir, port=server.port)) == 1
    assert f"cannot start: cannot listen on 127.0.0.1:{server.port} for gRPC: the port is in use" in caplog.text
    assert "grace period" not in caplog.text  # nothing was in flight: nothing to say about cutting it off


@pytest.mark.parametrize("workers", [0, 1])
async def test_a_reload_while_a_request_cuts_windows_finishes_it_on_the_old_model(
    model_dir: Path,
    other_model_dir: Path,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    workers: int,
) -> None:
    live = tmp_path / "live"
    shutil.copytree(model_dir, live)
    srv = RerankServer(test_config(live, tokenize_workers=workers))
    await srv.start()
    cutting, gate = threading.Event(), threading.Event()
    split = server.service.split_passages

    def held(*args: Any) -> Any:
        cutting.set()
        gate.wait(30)
        return split(*args)

    long = pb.RerankRequest(
        query="what is panda?", candidates=[" ".join(SENTENCES) * 8] * 3, long_documents=pb.LONG_DOCUMENTS_CHUNK
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            old = await stub.Rerank(long, timeout=60)
            assert old.usage.windows > len(long.candidates)
            monkeypatch.setattr(server.service, "split_passages", held)
            call = asyncio.ensure_future(stub.Rerank(long, timeout=60))
            await asyncio.to_thread(cutting.wait, 30)
            _replace_weights(other_model_dir, live)
            assert await srv.reloader.reload() == {"live": "ok"}
            await asyncio.sleep(0.2)  # the old model's retirement runs meanwhile
            gate.set()
            assert list((await call).scores) == list(old.scores)  # finished on the old weights
            monkeypatch.setattr(server.service, "split_passages", split)
            assert list((await stub.Rerank(long, timeout=60)).scores) != list(old.scores)
            shutil.rmtree(live)  # SIGHUP on a deleted directory: one line says so, the model keeps serving
            with caplog.at_level(logging.ERROR, logger="server.reload"):
                assert await srv.reloader.reload() == {"live": "failed"}
            assert f"reload of model live: its directory {live} is gone" in caplog.text
            assert len((await stub.Rerank(RERANK, timeout=60)).scores) == len(RERANK.candidates)
    finally:
        gate.set()
        await srv.stop(0)


async def test_calls_arriving_as_the_drain_ends_are_unavailable_never_cancelled(model_dir: Path, engine: Any) -> None:
    """Callers retry UNAVAILABLE, not CANCELLED: a call the server never started must not read as cut off."""
    srv = RerankServer(test_config(model_dir), engine=engine)
    await srv.start()
    codes: list[grpc.StatusCode] = []
    stopped = asyncio.Event()

    async def caller(stub: pb_grpc.RerankerStub) -> None:
        while not stopped.is_set():
            try:
                await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                await asyncio.sleep(0.1)  # a retry policy's back-off

    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        callers = [asyncio.ensure_future(caller(pb_grpc.RerankerStub(ch))) for _ in range(8)]
        await until(lambda: len(codes) >= 50)
        await srv.stop(0)  # the drain ends at once, while calls keep arriving
        await until(lambda: len(codes) >= 50 and codes[-1] == grpc.StatusCode.UNAVAILABLE)
        stopped.set()
        await asyncio.gather(*callers)
    assert grpc.StatusCode.CANCELLED not in codes
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}


class _Blocking:
    """A real engine whose forward passes wait while `hold` is clear (an inference thread stuck on one batch)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.hold = threading.Event()
        self.hold.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def launch(self, batch: Any) -> Any:
        self.hold.wait(60)
        return self._engine.launch(batch)


async def test_a_stuck_inference_thread_or_a_stopped_device_loop_is_not_serving(model_dir: Path, engine: Any) -> None:
    blocking = _Blocking(engine)
    srv = RerankServer(test_config(model_dir), engine=blocking)
    await srv.start()
    names = ("", SERVICE_NAME, model_health_name(srv.config.default_model))
    try:
        batcher = srv.batcher()
        assert batcher is not None
        batcher._limits = dataclasses.replace(batcher.limits, stuck_s=0.5)  # the bound, short for the test
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            blocking.hold.clear()
            stuck = asyncio.ensure_future(stub.Rerank(RERANK, timeout=60))
            await until(lambda: srv.health._server_status[""] == NOT_SERVING, 10)
            assert await _health(ch, *names) == [NOT_SERVING] * 3
            err = await _rejected(stub)  # at once, not queued behind the stuck batch
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "inference thread has been on one batch" in (err.details() or "")
            blocking.hold.set()
            assert len((await stuck).scores) == len(RERANK.candidates)  # the stuck call still gets its answer
            await until(lambda: srv.health._server_status[""] == SERVING, 10)
            assert len((await stub.Rerank(RERANK, timeout=30)).scores) == len(RERANK.candidates)
            batcher._worker.cancel()  # type: ignore[union-attr]  # the device loop ends (as a bug would end it)
            await until(lambda: srv.health._server_status[""] == NOT_SERVING, 10)
            err = await _rejected(stub)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "device loop stopped" in (err.details() or "")
    finally:
        blocking.hold.set()
        await srv.stop(0)
