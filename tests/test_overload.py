"""Refusing is cheap and says when to come back: RESOURCE_EXHAUSTED carries retry-after-ms, logs nothing at INFO,
and past a rate of refusals each waits its turn, so callers resending at once cannot keep the server busy refusing.

Goodput under a retry storm is measured by `python -m bench.retry_storm`, not here.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients._common import OverloadedError, error_from_rpc
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server import admission
from server.admission import Admission
from server.app import RerankServer
from server.interceptors import RETRY_AFTER_KEY, RETRY_AFTER_MS
from tests.conftest import test_config
from tests.ops_helpers import GatedEngine, until

QUERY = "what is panda?"


def _request(n: int, text: str = "a bear") -> pb.RerankRequest:
    return pb.RerankRequest(query=QUERY, candidates=[text] * n)


async def _refusal(stub: pb_grpc.RerankerStub, request: pb.RerankRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Rerank(request, timeout=30)
    return err.value


def _loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records if r.levelno >= logging.INFO]


@pytest.mark.parametrize("limit", ["queue", "cap"])
async def test_a_refusal_carries_the_retry_after_hint_and_logs_nothing_at_info(
    model_dir: Path, engine: Any, caplog: pytest.LogCaptureFixture, limit: str
) -> None:
    gate = GatedEngine(engine)
    caps = {"max_concurrent_rpcs": 2} if limit == "cap" else {"max_candidates": 4, "max_queue_pairs": 4}
    srv = RerankServer(test_config(model_dir, **caps), engine=gate)
    await srv.start()
    caplog.set_level(logging.DEBUG)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            gate.gate.clear()
            held = [asyncio.ensure_future(stub.Rerank(_request(4, "held"), timeout=60))]
            assert await asyncio.to_thread(gate.entered.wait, 30)  # its pairs are in the model
            held.append(asyncio.ensure_future(stub.Rerank(_request(4, "queued"), timeout=60)))
            await until(lambda: (b := srv.batcher()) is not None and b.queued_pairs == 4)
            caplog.clear()
            refused = await _refusal(stub, _request(1))
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("queue limit of 4" if limit == "queue" else "--max-concurrent-rpcs") in (refused.details() or "")
            trailers = dict(refused.trailing_metadata() or ())
            assert trailers[RETRY_AFTER_KEY] == str(RETRY_AFTER_MS) and trailers["x-request-id"]
            error = error_from_rpc(refused)  # what the Python client raises
            assert isinstance(error, OverloadedError) and error.retry_after_s == RETRY_AFTER_MS / 1e3
            assert not _loud(caplog)  # the access line of a refusal is DEBUG
            assert any(r.name == "server.access" and r.levelno == logging.DEBUG for r in caplog.records)
            gate.gate.set()
            for call in held:
                assert len((await call).scores) == 4
            caplog.clear()
            assert len((await stub.Rerank(_request(1), timeout=30)).scores) == 1
            assert any(r.name == "server.access" and r.levelno == logging.INFO for r in caplog.records)  # answered
    finally:
        gate.gate.set()
        await srv.stop(0)


def test_refusals_past_the_rate_wait_their_turn_never_past_the_bound_or_the_deadline() -> None:
    gate = Admission(cap=1)
    burst = [gate.refusal_delay() for _ in range(admission.REFUSAL_BURST)]
    assert burst == [0.0] * admission.REFUSAL_BURST  # answered at once
    held = [gate.refusal_delay() for _ in range(3 * int(admission.REFUSALS_PER_S))]
    assert all(0 < d <= admission.MAX_HOLD_S for d in held)
    assert held == sorted(held) and held[-1] > held[0]  # each later in line
    assert gate.refusal_delay(remaining_s=0.2) <= 0.2 - admission.DEADLINE_MARGIN_S  # answered before the deadline
    assert gate.refusal_delay(remaining_s=0.01) == 0.0


async def test_a_drain_releases_held_refusals_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "REFUSALS_PER_S", 0.1)  # one refusal every 10 s, after a burst of one
    monkeypatch.setattr(admission, "REFUSAL_BURST", 1)
    monkeypatch.setattr(admission, "MAX_HOLD_S", 60.0)
    gate = Admission(cap=1)
    assert gate.refusal_delay() == 0.0
    holding = asyncio.ensure_future(gate.hold_refusal())  # its turn is 10 s away
    await asyncio.sleep(0)
    assert not holding.done()
    assert await gate.drain(5.0)
    await asyncio.wait_for(holding, 5.0)  # released by the drain, not by its turn
