"""The one server interceptor: request id, API key, concurrency cap, metrics and access log per RPC."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from reranker_proto import reranker_pb2 as pb
from server.config import Config
from server.logs import fields, request_id
from server.metrics import Metrics

access_log = logging.getLogger("server.access")

# Probes and tooling must work without the API key; they carry no request data.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
DEADLINE_SKEW_S = 0.25
UNAUTHENTICATED_MESSAGE = "missing or wrong API key: send metadata 'authorization: Bearer <key>'"
DRAINING_MESSAGE = "the server is shutting down; retry on another replica"

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _pairs(request: Any) -> int:
    if isinstance(request, pb.RerankRequest):
        return len(request.pairs) or len(request.candidates)
    return 0


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary RPC outside health and reflection; those pass through untouched.

    It counts the RPCs in flight, so it also refuses them once `drain()` has begun.
    """

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._expected = f"Bearer {config.api_key}".encode() if config.api_key else None
        self._cap = config.max_concurrent_rpcs
        self._metrics = metrics
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # built once per method, not per call
        self.in_flight = 0
        self.draining = False
        self._last_call = -math.inf
        metrics.in_flight.set_function(lambda: self.in_flight)  # read at scrape time

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method_path: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None:
            return None
        if method_path.startswith(OPEN_PREFIXES):
            access_log.debug("rpc", extra=fields(method=method_path))
            return handler
        wrapped = self._wrapped.get(method_path)
        if wrapped is None:
            if handler.unary_unary is None:
                # Only unary RPCs are wrapped; anything else would bypass the API key, so it is not served.
                access_log.error("refusing %s: the interceptor only wraps unary RPCs", method_path)
                return None
            wrapped = self._wrapped[method_path] = self._wrap(handler, method_path.rpartition("/")[2])
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior: Behavior = handler.unary_unary

        async def serve(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self._serve(behavior, method, request, context)

        return grpc.unary_unary_rpc_method_handler(
            serve,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _serve(self, behavior: Behavior, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        rid, auth = "", ""
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY:
                rid = str(value)[:MAX_REQUEST_ID_CHARS]
            elif key == "authorization":
                auth = str(value)
        rid = rid or uuid.uuid4().hex
        token = request_id.set(rid)
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        self.in_flight += 1
        self._last_call = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            if self.draining:
                code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, DRAINING_MESSAGE)
            if self._expected is not None and not hmac.compare_digest(auth.encode(), self._expected):
                code = grpc.StatusCode.UNAUTHENTICATED
                await context.abort(code, UNAUTHENTICATED_MESSAGE)
            if self._cap and self.in_flight > self._cap:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                await context.abort(
                    code,
                    f"{self._cap} RPCs are in flight, the limit (--max-concurrent-rpcs); retry with backoff",
                )
            response = await behavior(request, context)
            code = context.code() or grpc.StatusCode.OK
            return response
        except asyncio.CancelledError:
            # The client's timer fires first (the server's deadline starts when the request arrives),
            # so a cancel this close to the deadline is the deadline.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining < DEADLINE_SKEW_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            if code == grpc.StatusCode.OK:  # not one of ours above: the servicer aborted, or it failed
                code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.in_flight -= 1
            self._last_call = time.monotonic()
            self._record(method, code, time.perf_counter() - start, _pairs(request))
            request_id.reset(token)

    def _record(self, method: str, code: grpc.StatusCode, seconds: float, pairs: int) -> None:
        m = self._metrics
        m.requests.labels(method, code.name).inc()
        m.request_seconds.labels(method).observe(seconds)
        access_log.info("rpc", extra=fields(method=method, code=code.name, ms=round(seconds * 1e3, 2), pairs=pairs))

    async def drain(self, grace_s: float, quiet_s: float = 0.25) -> None:
        """Refuse new calls with UNAVAILABLE; return once none has come or run for `quiet_s`, or after `grace_s`.

        grpc's own stop() cancels calls that reached the server but not yet the servicer; refusing them here
        first, until callers have gone elsewhere, gives each a clean UNAVAILABLE instead.
        """
        self.draining = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self.in_flight == 0 and time.monotonic() - self._last_call >= quiet_s:
                return
            await asyncio.sleep(0.02)
