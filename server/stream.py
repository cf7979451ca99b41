"""RerankStream: answer each request of a stream as soon as it is scored, through the same path as Rerank."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from reranker_proto import reranker_pb2 as pb
from server import tracing
from server.admission import Admission
from server.errors import Draining, InvalidRequest, status_for
from server.logs import request_id
from server.wire import Malformed

Rerank = Callable[[pb.RerankRequest], Awaitable[pb.RerankResponse]]
DRAINED_MESSAGE = (
    "the server is shutting down: every request read was answered; "
    "requests without an answer were not read, resend them to another replica"
)
NOTICE_MESSAGE = "the server is shutting down: send nothing more on this stream; what was sent is still answered"
NOT_ACCEPTED_MESSAGE = "not accepted: the server is shutting down; resend it to another replica"
NOTICE_WAIT_S = 2.0  # after the drain notice, how long the caller gets to half-close
_END = object()


def error_answer(rid: str, exc: BaseException) -> pb.RerankStreamResponse:
    code, message = status_for(exc)
    return pb.RerankStreamResponse(request_id=rid, error=pb.RequestError(code=code.value[0], message=message))


async def answer_one(request: Any, rerank: Rerank, admission: Admission, stream_id: str) -> pb.RerankStreamResponse:
    """One request's answer: its response, or its error; never an exception, so the stream goes on."""
    rid = _id_of(request)
    request_id.set(f"{stream_id}/{rid}")  # log lines written while scoring it name the stream and the request
    with tracing.span("rerank", {"reranker.request_id": rid}):  # one per request, under the stream's span
        try:
            if isinstance(request, Malformed):
                raise InvalidRequest(request.message)
            if not rid:
                raise InvalidRequest(
                    "request_id is empty: answers on RerankStream come out of order, so each needs an id"
                )
            admission.enter()
            try:
                return pb.RerankStreamResponse(request_id=rid, response=await rerank(request))
            finally:
                admission.leave()
        except Exception as exc:
            answer = error_answer(rid, exc)
            tracing.outcome(answer.error.code, answer.error.message)
            return answer


async def answer_stream(
    requests: AsyncIterator[Any], rerank: Rerank, admission: Admission
) -> AsyncIterator[pb.RerankStreamResponse]:
    """Answers in the order they are ready.

    On drain: a DrainNotice at once; requests read before it are answered as usual, any read after it get
    UNAVAILABLE. Once the caller half-closes (or NOTICE_WAIT_S has passed) and every answer is out, Draining.
    Waiting for the half-close matters: grpc.aio drops a client's unread answers when it writes into a
    stream the server has already ended.
    """
    stream_id = request_id.get()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[Any]] = set()
    reading: asyncio.Future[Any] | None = asyncio.ensure_future(anext(requests, _END))
    stopping = asyncio.ensure_future(admission.stopping.wait())
    give_up_at: float | None = None  # set by the drain notice
    try:
        while reading is not None or pending:
            waiting = set(pending)
            if reading is not None:
                waiting |= {reading} if give_up_at is not None else {reading, stopping}
            timeout = None if give_up_at is None else max(0.0, give_up_at - loop.time())
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if reading is not None and reading in done:
                request, reading = reading.result(), None
                if request is not _END:
                    if give_up_at is None:
                        pending.add(asyncio.ensure_future(answer_one(request, rerank, admission, stream_id)))
                    else:  # sent before the caller saw the notice: answered, not accepted
                        yield error_answer(_id_of(request), Draining(NOT_ACCEPTED_MESSAGE))
                    reading = asyncio.ensure_future(anext(requests, _END))
            if stopping.done() and give_up_at is None and reading is not None:
                give_up_at = loop.time() + NOTICE_WAIT_S
                yield pb.RerankStreamResponse(draining=pb.DrainNotice(message=NOTICE_MESSAGE))
            if give_up_at is not None and reading is not None and loop.time() >= give_up_at:
                reading.cancel()  # the caller did not half-close in time: read nothing more
                reading = None
            for answered in done & pending:
                pending.discard(answered)
                yield answered.result()
        if give_up_at is not None:
            raise Draining(DRAINED_MESSAGE)
    finally:
        for future in (*pending, reading, stopping):
            if future is not None:
                future.cancel()


def _id_of(request: Any) -> str:
    return "" if isinstance(request, Malformed) else str(request.request_id)
