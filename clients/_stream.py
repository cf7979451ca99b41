"""Sending a RerankStream's requests: numbered messages, a bad item ends the sending side, the drain notice too."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import grpc

from clients._common import RerankerError, StreamRequest, stream_message
from reranker_proto import reranker_pb2 as pb


class Messages:
    """A stream's requests as messages.

    A bad item ends the sending side, and the stream raises it after the answers to the items before it (an
    exception inside gRPC's request iterator would only cancel the call). `stop()` (the server's drain
    notice) ends it too: the server answers what it was sent, and the stream then ends with UNAVAILABLE.
    """

    def __init__(self, requests: AsyncIterable[StreamRequest] | Iterable[StreamRequest]) -> None:
        self._requests = requests
        self.error: Exception | None = None
        self._stopped = threading.Event()  # the blocking client's requests are read on gRPC's own thread
        self.stopped = asyncio.Event()  # the asyncio client's writer waits on it

    def stop(self) -> None:
        self._stopped.set()
        self.stopped.set()

    def __iter__(self) -> Iterator[pb.RerankRequest]:
        assert isinstance(self._requests, Iterable)
        for number, request in enumerate(self._requests):
            message = self._message(request, number)
            if message is None or self._stopped.is_set():
                return
            yield message

    async def aiter(self) -> AsyncIterator[pb.RerankRequest]:
        if not isinstance(self._requests, AsyncIterable):
            for message in self:
                yield message
            return
        number = 0
        async for request in self._requests:
            message = self._message(request, number)
            if message is None or self._stopped.is_set():
                return
            number += 1
            yield message

    def _message(self, request: StreamRequest, number: int) -> pb.RerankRequest | None:
        try:
            return stream_message(request, number)
        except RerankerError as exc:
            self.error = exc
            return None


async def send(call: Any, messages: Messages) -> None:
    """Write `messages` on a grpc.aio stream, then half-close.

    Writing starts once the server has accepted the stream (its headers come first), so a refusal such as a
    wrong API key is never hidden by a write into the refused stream; a drain notice half-closes at once,
    even while waiting for the caller's next request.
    """
    stopped = asyncio.ensure_future(messages.stopped.wait())
    source = messages.aiter()
    try:
        await call.initial_metadata()
        while not stopped.done() and not call.done():
            upcoming = asyncio.ensure_future(anext(source, None))
            await asyncio.wait({upcoming, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopped.done() or upcoming.result() is None:
                upcoming.cancel()
                break
            await call.write(upcoming.result())
        await call.done_writing()
    except (grpc.RpcError, asyncio.InvalidStateError):
        return  # the stream ended: the reading side reports how
    except Exception as exc:  # the caller's own iterator failed: end the stream and raise it there
        messages.error = exc
        call.cancel()
    finally:
        stopped.cancel()
