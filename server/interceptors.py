"""The one server interceptor: request id, API key, malformed messages, concurrency cap, metrics, access log."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from reranker_proto import reranker_pb2 as pb
from server import tracing
from server.admission import Admission
from server.config import Config
from server.errors import status_for
from server.logs import fields, request_id
from server.metrics import Metrics
from server.wire import Malformed, tolerant

access_log = logging.getLogger("server.access")

# Probes and tooling must work without the API key; they carry no request data.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
DEADLINE_SKEW_S = 0.25
UNAUTHENTICATED_MESSAGE = "missing or wrong API key: send metadata 'authorization: Bearer <key>'"
AMBIGUOUS_MESSAGE = "several 'authorization' metadata entries: send exactly one, 'Bearer <key>'"
# On RESOURCE_EXHAUSTED: how long a caller should wait before resending (README, Errors).
RETRY_AFTER_KEY = "retry-after-ms"
RETRY_AFTER_MS = 200
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}

Behavior = Callable[..., Any]


def _pairs(request: Any) -> int:
    if isinstance(request, pb.RerankRequest):
        return len(request.pairs) or len(request.candidates)
    return 0


@dataclass
class _Call:
    """What the access line and the metrics say about one RPC."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    pairs: int = 0
    refused: bool = False  # queue full, over the cap, or draining: a DEBUG access line, not INFO
    stream: dict[str, int] = field(default_factory=dict)  # RerankStream: requests, answered, errors


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC: all get a tolerant deserializer; Rerank, GetModelInfo and RerankStream get the rest.

    Health and reflection stay open (no API key, no cap) and are logged at DEBUG.
    """

    def __init__(self, config: Config, metrics: Metrics, admission: Admission | None = None) -> None:
        self._expected = f"Bearer {config.api_key}".encode() if config.api_key else None
        self._metrics = metrics
        self.admission = admission or Admission(config.max_concurrent_rpcs)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # built once per method, not per call
        metrics.in_flight.set_function(lambda: self.admission.in_flight)  # read at scrape time

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    async def drain(self, grace_s: float) -> bool:
        """Refuse new calls with UNAVAILABLE; streams stop reading, answer what they read, and close.

        True once no call or stream is in flight, False if `grace_s` passed first.
        """
        return await self.admission.drain(grace_s)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method_path: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None:
            return None
        wrapped = self._wrapped.get(method_path)
        if wrapped is None:
            wrapped = self._wrap(handler, method_path)
            if wrapped is None:
                return None
            self._wrapped[method_path] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, path: str) -> grpc.RpcMethodHandler | None:
        parse, serialize = tolerant(handler.request_deserializer), handler.response_serializer
        if path.startswith(OPEN_PREFIXES):
            return _open_handler(handler, path, parse)
        method = path.rpartition("/")[2]
        if handler.unary_unary is not None:
            serve = self._unary(handler.unary_unary, method)
            return grpc.unary_unary_rpc_method_handler(serve, request_deserializer=parse, response_serializer=serialize)
        if handler.stream_stream is not None:
            serve_stream = self._stream(handler.stream_stream, method)
            return grpc.stream_stream_rpc_method_handler(
                serve_stream, request_deserializer=parse, response_serializer=serialize
            )
        # Anything else would bypass the API key, so it is not served.
        access_log.error("refusing %s: the interceptor wraps only unary and bidirectional RPCs", path)
        return None

    def _unary(self, behavior: Behavior, method: str) -> Behavior:
        async def serve(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(pairs=_pairs(request))
            async with self._rpc(method, context, call):
                if isinstance(request, Malformed):
                    call.code = INVALID
                    await context.abort(INVALID, request.message)
                try:
                    self.admission.enter()
                except Exception as exc:  # Busy: over --max-concurrent-rpcs
                    call.code, message = status_for(exc)
                    await _refuse(context, call, message, self.admission)
                try:
                    return await behavior(request, _Hinting(context, self.admission))
                finally:
                    self.admission.leave()

        return serve

    def _stream(self, behavior: Behavior, method: str) -> Behavior:
        async def serve(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(stream={"requests": 0, "answered": 0, "errors": 0})
            async with self._rpc(method, context, call):
                self.admission.open_stream()
                try:
                    async for answer in behavior(self._counted(requests, call), context):
                        if not answer.HasField("draining"):  # the drain notice answers no request
                            self._count_answer(method, answer, call)
                        yield answer
                finally:
                    self.admission.close_stream()

        return serve

    async def _counted(self, requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
        async for request in requests:
            call.stream["requests"] += 1
            call.pairs += _pairs(request)
            yield request

    def _count_answer(self, method: str, answer: Any, call: _Call) -> None:
        """One count per answered stream request, under its own code (the stream's end is in the access line)."""
        call.stream["answered"] += 1
        code = grpc.StatusCode.OK
        if answer.HasField("error"):
            call.stream["errors"] += 1
            code = CODE_BY_NUMBER.get(answer.error.code, grpc.StatusCode.UNKNOWN)
        self._metrics.requests.labels(method, code.name).inc()

    @asynccontextmanager
    async def _rpc(self, method: str, context: grpc.aio.ServicerContext, call: _Call) -> AsyncIterator[None]:
        """Request id, drain refusal and API key before; status, metrics and the access line after."""
        start = time.perf_counter()
        rid, auths = "", []
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY:
                rid = str(value)[:MAX_REQUEST_ID_CHARS]
            elif key == "authorization":
                auths.append(str(value))
        rid = rid or uuid.uuid4().hex
        token = request_id.set(rid)
        traced = tracing.rpc_started(method, context.invocation_metadata(), rid)  # None unless tracing is on
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        self.admission.touch()
        try:
            try:
                self.admission.check_open()
            except Exception as exc:  # Draining
                call.code, message = status_for(exc)
                await _refuse(context, call, message, self.admission)
            if self._expected is not None:
                await self._authenticate(auths, context, call)
            yield
            call.code = context.code() or grpc.StatusCode.OK
        except asyncio.CancelledError:
            # The client's timer fires first (the server's deadline starts when the request arrives),
            # so a cancel this close to the deadline is the deadline.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining < DEADLINE_SKEW_S
            call.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            if call.code == grpc.StatusCode.OK:  # not one of ours above: the servicer aborted, or it failed
                call.code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.admission.touch()
            self._record(method, call, time.perf_counter() - start)
            refused = call.refused or call.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            tracing.rpc_ended(traced, call.code, context.details() if traced else None, call.pairs, refused)
            try:
                request_id.reset(token)
            except ValueError:  # a stream's generator closed from another context (grpc dropped it)
                pass

    async def _authenticate(self, auths: list[str], context: grpc.aio.ServicerContext, call: _Call) -> None:
        """Exactly one authorization entry, equal to the key; several are ambiguous, whichever one is right."""
        if len(auths) == 1 and hmac.compare_digest(auths[0].encode(), self._expected or b""):
            return
        call.code = grpc.StatusCode.UNAUTHENTICATED
        await context.abort(call.code, AMBIGUOUS_MESSAGE if len(auths) > 1 else UNAUTHENTICATED_MESSAGE)

    def _record(self, method: str, call: _Call, seconds: float) -> None:
        m = self._metrics
        if not call.stream:  # a stream's requests are counted one by one as they are answered
            m.requests.labels(method, call.code.name).inc()
            m.request_seconds.labels(method).observe(seconds)
        # A refusal is counted, not logged at INFO: under a retry storm one line each would cost more than the
        # refusal itself, and flood the log.
        if call.refused or call.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if not access_log.isEnabledFor(logging.DEBUG):
                return
            level = logging.DEBUG
        else:
            level = logging.INFO
        access_log.log(
            level,
            "rpc",
            extra=fields(
                method=method,
                code=call.code.name,
                ms=round(seconds * 1e3, 2),
                pairs=call.pairs,
                **call.stream,
                **tracing.log_fields(),
            ),
        )


async def _refuse(context: grpc.aio.ServicerContext, call: _Call, message: str, admission: Admission) -> None:
    """Answer the call's refusal (call.code); RESOURCE_EXHAUSTED carries the retry-after hint and, in a storm of
    refusals, waits its turn first (Admission.hold_refusal)."""
    call.refused = True
    if call.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        await admission.hold_refusal(context.time_remaining())
    await context.abort(call.code, message, _trailers(context, call.code))


def _trailers(context: grpc.aio.ServicerContext, code: grpc.StatusCode) -> tuple[tuple[str, str], ...]:
    """The trailing metadata set so far (the request id), plus the retry-after hint on RESOURCE_EXHAUSTED."""
    trailers = tuple(context.trailing_metadata() or ())
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailers += ((RETRY_AFTER_KEY, str(RETRY_AFTER_MS)),)
    return trailers


class _Hinting:
    """The servicer's context, but a RESOURCE_EXHAUSTED it answers (a full queue) is a refusal like the cap's."""

    def __init__(self, context: grpc.aio.ServicerContext, admission: Admission) -> None:
        self._context = context
        self._admission = admission

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            await self._admission.hold_refusal(self._context.time_remaining())
        trailers = tuple(trailing_metadata) or _trailers(self._context, code)
        await self._context.abort(code, details, trailers)


def _open_handler(handler: grpc.RpcMethodHandler, path: str, parse: Any) -> grpc.RpcMethodHandler:
    """Health and reflection as they are, but a malformed message gets INVALID_ARGUMENT and one access line."""
    serialize = handler.response_serializer

    async def refuse(bad: Malformed, context: grpc.aio.ServicerContext) -> None:
        access_log.info("rpc", extra=fields(method=path, code=INVALID.name))
        await context.abort(INVALID, bad.message)

    def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def each() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Malformed):
                    await refuse(request, context)
                yield request

        return each()

    async def respond(result: Any, context: grpc.aio.ServicerContext) -> Any:
        """Await a unary answer, or write out a stream however the servicer produces it."""
        if inspect.isasyncgen(result):
            async for response in result:
                await context.write(response)
            return None
        return await result

    async def unary_in(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await refuse(request, context)
        access_log.debug("rpc", extra=fields(method=path))
        behavior = handler.unary_unary or handler.unary_stream
        return await respond(behavior(request, context), context)

    async def stream_in(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        access_log.debug("rpc", extra=fields(method=path))
        behavior = handler.stream_unary or handler.stream_stream
        return await respond(behavior(checked(requests, context), context), context)

    make = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, build in make.items():
        if getattr(handler, kind) is not None:
            serve = unary_in if kind.startswith("unary") else stream_in
            return build(serve, request_deserializer=parse, response_serializer=serialize)  # type: ignore[no-any-return]
    return handler
