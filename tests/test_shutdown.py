"""Graceful stop: NOT_SERVING at once, new RPCs refused, in-flight ones answered within the grace, exit 0."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import SERVICE_NAME, RerankServer
from tests.conftest import test_config
from tests.ops_helpers import GatedEngine, free_port, sample, scrape, until

ROOT = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RERANK = pb.RerankRequest(query="what is panda?", candidates=["The giant panda is a bear species endemic to China."])


async def _refused(port: int) -> grpc.StatusCode:
    """The status a brand-new RPC gets from a stopping server."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.RerankerStub(ch).Rerank(RERANK, timeout=10)
    assert "draining" in (err.value.details() or "")
    return err.value.code()


async def _watch(channel: grpc.aio.Channel) -> Any:
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert (await watch.read()).status == SERVING
    return watch


async def test_stop_drains_in_flight_rpcs_and_refuses_new_ones(model_dir: Path, engine: Any) -> None:
    gate = GatedEngine(engine)
    srv = RerankServer(test_config(model_dir, grace_s=30.0), engine=gate)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            watch = await _watch(ch)
            gate.gate.clear()
            in_flight = asyncio.ensure_future(pb_grpc.RerankerStub(ch).Rerank(RERANK, timeout=60))
            await asyncio.to_thread(gate.entered.wait, 30)
            stopping = asyncio.ensure_future(srv.stop())
            assert (await watch.read()).status == NOT_SERVING
            assert await _refused(srv.port) == grpc.StatusCode.UNAVAILABLE
            watch.cancel()  # a watch would hold the server open for the whole grace
            assert not stopping.done()  # still draining the held RPC
            gate.gate.set()
            assert len((await in_flight).scores) == 1
            await asyncio.wait_for(stopping, 30)
    finally:
        gate.gate.set()
        await srv.stop(0)


async def test_the_drain_ends_with_its_work_while_a_refused_client_keeps_retrying(
    model_dir: Path, engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gate = GatedEngine(engine)
    srv = RerankServer(test_config(model_dir, grace_s=60.0), engine=gate)
    await srv.start()
    codes: list[grpc.StatusCode] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            gate.gate.clear()
            in_flight = asyncio.ensure_future(stub.Rerank(RERANK, timeout=60))
            await asyncio.to_thread(gate.entered.wait, 30)
            stopping = asyncio.ensure_future(srv.stop())

            async def retrying() -> None:  # every 0.2 s, until the server has stopped (at most 300 tries)
                for _ in range(300):
                    if stopping.done():
                        return
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Rerank(RERANK, timeout=10)
                    codes.append(err.value.code())
                    await asyncio.sleep(0.2)

            retries = asyncio.ensure_future(retrying())
            await until(lambda: len(codes) >= 3)  # refused, and retrying, while the held call runs
            assert not stopping.done()
            gate.gate.set()
            assert len((await in_flight).scores) == 1
            await asyncio.wait_for(stopping, 45)  # before the 60 s grace: the refusals do not hold it
            await asyncio.wait_for(retries, 30)
    finally:
        gate.gate.set()
        await srv.stop(0)
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_rpcs_still_running_after_the_grace_are_cut_off(model_dir: Path, engine: Any) -> None:
    gate = GatedEngine(engine)
    srv = RerankServer(test_config(model_dir, grace_s=0.5), engine=gate)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            gate.gate.clear()
            stuck = asyncio.ensure_future(pb_grpc.RerankerStub(ch).Rerank(RERANK, timeout=60))
            await asyncio.to_thread(gate.entered.wait, 30)
            await asyncio.wait_for(srv.stop(), 30)  # returns after the grace although the RPC never finished
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stuck
            assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        gate.gate.set()


class _Lines:
    """Collects a child's stderr as it comes, so its pipe never fills."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._task = asyncio.ensure_future(self._read(proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            self.lines.append(raw.decode())
            self._new.set()
        self._new.set()

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    async def wait_for(self, msg: str) -> dict[str, Any]:
        while True:
            found = [d for d in self.json() if d["msg"] == msg]
            if found:
                return found[0]
            if self._task.done():
                raise AssertionError(f"no {msg!r} log line; stderr:\n{''.join(self.lines)}")
            self._new.clear()
            await self._new.wait()


def _wait_queued(metrics_port: int, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while sample(scrape(metrics_port), "reranker_queue_pairs") < 1:
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.02)


async def test_sigterm_drains_and_exits_zero(model_dir: Path) -> None:
    metrics_port = free_port()
    # A long batching wait keeps a one-pair Rerank in flight for seconds: the signal lands while it waits.
    args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(metrics_port)]
    args += ["--log-json", "--max-wait-ms", "6000", "--grace-s", "30"]
    env = {**os.environ, "RERANKER_API_KEY": ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", *args, cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    lines = _Lines(proc)
    try:
        start = await asyncio.wait_for(lines.wait_for("serving"), 120)
        assert start["model"] == model_dir.name and str(model_dir) in start["models"]
        assert start["device"] == "cpu" and start["dtype"] == "float32"
        assert start["metrics_port"] == metrics_port and start["max_candidates"] == 1000 and start["grace_s"] == 30
        port = start["grpc_port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            watch = await _watch(ch)
            in_flight = asyncio.ensure_future(pb_grpc.RerankerStub(ch).Rerank(RERANK, timeout=60))
            await asyncio.to_thread(_wait_queued, metrics_port)
            proc.send_signal(signal.SIGTERM)
            assert (await watch.read()).status == NOT_SERVING
            assert not in_flight.done()
            assert await _refused(port) == grpc.StatusCode.UNAVAILABLE
            watch.cancel()
            assert len((await in_flight).scores) == 1
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await lines._task
        logs = lines.json()
        assert [d["msg"] for d in logs].count("serving") == 1
        assert any(d["msg"] == "rpc" and d["method"] == "Rerank" and d["code"] == "OK" for d in logs)
        assert logs[-1]["msg"] == "stopped"
        assert "panda" not in "".join(lines.lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
