"""RerankStream: answer each request of a stream as soon as it is scored, through the same path as Rerank."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from reranker_proto import reranker_pb2 as pb
from server.admission import Admission
from server.errors import Draining, InvalidRequest, status_for
from server.logs import request_id
from server.wire import Malformed

Rerank = Callable[[pb.RerankRequest], Awaitable[pb.RerankResponse]]
DRAINED_MESSAGE = (
    "the server is shutting down: every request read was answered; "
    "requests without an answer were not read, resend them to another replica"
)
_END = object()


def error_answer(rid: str, exc: BaseException) -> pb.RerankStreamResponse:
    code, message = status_for(exc)
    return pb.RerankStreamResponse(request_id=rid, error=pb.RequestError(code=code.value[0], message=message))


async def answer_one(request: Any, rerank: Rerank, admission: Admission, stream_id: str) -> pb.RerankStreamResponse:
    """One request's answer: its response, or its error; never an exception, so the stream goes on."""
    rid = "" if isinstance(request, Malformed) else request.request_id
    request_id.set(f"{stream_id}/{rid}")  # log lines written while scoring it name the stream and the request
    try:
        if isinstance(request, Malformed):
            raise InvalidRequest(request.message)
        if not rid:
            raise InvalidRequest("request_id is empty: answers on RerankStream come out of order, so each needs an id")
        admission.enter()
        try:
            return pb.RerankStreamResponse(request_id=rid, response=await rerank(request))
        finally:
            admission.leave()
    except Exception as exc:
        return error_answer(rid, exc)


async def answer_stream(
    requests: AsyncIterator[Any], rerank: Rerank, admission: Admission
) -> AsyncIterator[pb.RerankStreamResponse]:
    """Answers in the order they are ready. On drain: stop reading, answer what was read, raise Draining."""
    stream_id = request_id.get()
    pending: set[asyncio.Future[Any]] = set()
    reading: asyncio.Future[Any] | None = asyncio.ensure_future(anext(requests, _END))
    stopping = asyncio.ensure_future(admission.stopping.wait())
    drained = False
    try:
        while reading is not None or pending:
            waiting = set(pending)
            if reading is not None:
                waiting |= {reading, stopping}  # once not reading, the drain no longer matters here
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if reading is not None and reading in done:
                request, reading = reading.result(), None
                if request is not _END:
                    pending.add(asyncio.ensure_future(answer_one(request, rerank, admission, stream_id)))
                    reading = asyncio.ensure_future(anext(requests, _END))
            if stopping.done() and reading is not None:  # read nothing more; what was read is still answered
                reading.cancel()
                reading, drained = None, True
            for answered in done & pending:
                pending.discard(answered)
                yield answered.result()
        if drained:
            raise Draining(DRAINED_MESSAGE)
    finally:
        for future in (*pending, reading, stopping):
            if future is not None:
                future.cancel()
