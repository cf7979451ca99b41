"""SIGTERM in the middle of load: answers are whole or cleanly refused, nothing new is accepted, exit 0.

Figures are printed; `python -m pytest tests/test_shutdown_under_load.py -s` shows them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from reranker_proto import reranker_pb2_grpc as pb_grpc
from tests.load import is_whole, rerank_request
from tests.subprocess_server import ServerProcess

CLIENTS = 32
BEFORE_SIGTERM = 300  # answered requests before the signal
AFTER_REFUSAL = 3  # requests each client still sends once it has been refused
OK, UNAVAILABLE = "OK", grpc.StatusCode.UNAVAILABLE.name
GRACE_S = 60  # the drain ends with its work: the exit comes long before the grace would end


@dataclass(frozen=True)
class Outcome:
    started: float
    finished: float
    status: str  # OK, "half answer", or the gRPC status name


async def test_sigterm_under_load_answers_or_refuses_every_request_and_exits_0(model_dir: Path, tmp_path: Path) -> None:
    srv = ServerProcess(model_dir, tmp_path / "server.log", "--threads", "1", "--grace-s", str(GRACE_S))
    outcomes: list[Outcome] = []
    numbers = itertools.count()
    enough = asyncio.Event()

    async def client() -> None:
        refusals = 0
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.RerankerStub(channel)
            while refusals <= AFTER_REFUSAL:
                req = rerank_request(next(numbers))
                started = time.monotonic()
                try:
                    resp = await stub.Rerank(req, timeout=60)
                    status = OK if is_whole(req, resp) else "half answer"
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                outcomes.append(Outcome(started, time.monotonic(), status))
                if status != OK:
                    refusals += 1
                if len(outcomes) >= BEFORE_SIGTERM:
                    enough.set()

    clients = asyncio.gather(*(client() for _ in range(CLIENTS)))
    try:
        await asyncio.wait_for(enough.wait(), 120)
        sigterm_at = time.monotonic()
        srv.terminate()
        await asyncio.wait_for(clients, 120)
        exit_code = await asyncio.to_thread(srv.wait, GRACE_S - 15)
    finally:
        clients.cancel()
        srv.stop()
    log = srv.log()

    statuses = Counter(o.status for o in outcomes)
    answered_across = sum(o.status == OK and o.started < sigterm_at < o.finished for o in outcomes)
    first_refusal = min(o.finished for o in outcomes if o.status != OK)
    late_answers = sum(o.status == OK and o.started > first_refusal for o in outcomes)
    print(
        f"\nSIGTERM under load: {CLIENTS} clients, {len(outcomes)} requests, "
        f"{sum(o.started < sigterm_at for o in outcomes)} started before the signal; outcomes {dict(statuses)}; "
        f"{answered_across} in flight at SIGTERM answered in full; {late_answers} answered after the first "
        f"refusal; exit code {exit_code}; drain took {first_refusal - sigterm_at:.2f} s to the first refusal"
    )
    odd = [
        (o.started - sigterm_at, o.finished - sigterm_at, o.status)
        for o in outcomes
        if o.status not in (OK, UNAVAILABLE)
    ]
    assert not odd, (
        f"(started, finished) relative to SIGTERM, status: {odd}"
    )  # whole answers or clean refusals, never a half answer
    assert answered_across > 0  # requests in flight when the signal came were answered, not dropped
    assert late_answers == 0  # once refusing, the server accepts nothing new
    assert exit_code == 0
    assert "Traceback" not in log and "unexpected error" not in log
