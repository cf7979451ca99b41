"""OpenTelemetry traces: off unless OTEL_TRACES_EXPORTER names an exporter (README, Operations: Tracing).

On, the OpenTelemetry SDK configures itself from the standard OTEL_* variables (exporter, endpoint, service name,
sampler, resource), and the server records a span for each RPC (continuing the caller's W3C trace context), its
tokenizing (in a thread or a tokenizer worker), its wait in the queue, each forward pass that scored its pairs, and its
response. Off, nothing imports opentelemetry and every hook returns after one check of `_tracer`.

Spans that the batcher and the tokenizing threads time are recorded after the fact, with their own timestamps, under
the request's span: the request path keeps no tracing state, and a batch holding pairs of many requests appears as a
`forward` span under each of them (same `reranker.batch.number`), so every request's trace is complete on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import grpc

from server import __version__

T = TypeVar("T")

_tracer: Any = None  # an opentelemetry Tracer while tracing is on; None: off
_slice = threading.local()  # the tokenizer worker serving this thread's slice: (pid, taken at, ns)
_OFF: AbstractContextManager[None] = nullcontext()
_clock = (0, -(10**18))  # (epoch ns - perf_counter ns, when measured in perf_counter ns): see _offset
SERVICE = "reranker.v1.Reranker"
# Codes that are the server's fault, so its span is an error (OpenTelemetry's gRPC conventions); a refusal or a bad
# request is the caller's outcome, recorded in rpc.grpc.status_code only.
_FAULTS = ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")
SERVER_ERRORS = frozenset(grpc.StatusCode[c] for c in _FAULTS)
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class TracingError(RuntimeError):
    """Tracing was asked for but cannot start; the message says why."""


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces: OTEL_TRACES_EXPORTER names an exporter other than `none` and
    OTEL_SDK_DISABLED is not true. The configs record this; the SDK reads every other OTEL_* variable itself."""
    names = {n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")} - {"", "none"}
    return bool(names) and env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"


def setup() -> None:
    """Configure the OpenTelemetry SDK from the OTEL_* variables exactly as its own auto-configuration does (the
    configurator `opentelemetry-instrument` runs), then record spans through it."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk._configuration import _OTelSDKConfigurator
    except ImportError:
        raise TracingError(
            "OTEL_TRACES_EXPORTER is set but OpenTelemetry is not installed: install the tracing extra "
            "(pip install -c requirements-dev.lock '.[tracing]')"
        ) from None
    try:
        _OTelSDKConfigurator().configure()
    except Exception as exc:  # an unknown exporter or OTLP protocol, a bad endpoint: the SDK's own message
        raise TracingError(f"cannot configure OpenTelemetry from the OTEL_* variables: {exc}") from None
    enable(trace.get_tracer_provider())


def enable(provider: Any) -> None:
    """Record spans through `provider` (setup() passes the SDK's; tests pass one with an in-memory exporter)."""
    global _tracer
    _tracer = provider.get_tracer("reranker", __version__)


def disable() -> None:
    global _tracer
    _tracer = None


def on() -> bool:
    return _tracer is not None


def tracer() -> Any:
    """The tracer while tracing is on (for the REST bridge's HTTP spans)."""
    return _tracer


def span(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A child span of the current one around a block; nothing when off."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, attributes=attributes)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the server's RPCs


def rpc_started(method: str, metadata: Sequence[tuple[str, Any]] | None, rid: str) -> Any:
    """Start the RPC's server span, continuing the caller's trace context from its metadata (traceparent), and make
    it current; None when off. End it with rpc_ended."""
    if _tracer is None:
        return None
    from opentelemetry import context, propagate, trace

    fields = propagate.get_global_textmap().fields
    carrier = {k: str(v) for k, v in metadata or () if k in fields}
    s = _tracer.start_span(
        f"{SERVICE}/{method}",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method, "reranker.request_id": rid},
    )
    return s, context.attach(trace.set_span_in_context(s))


def rpc_ended(started: Any, code: grpc.StatusCode, details: str | None, pairs: int, refused: bool) -> None:
    """End the span rpc_started began, with the call's status."""
    if started is None:
        return
    s, token = started
    _outcome(s, code, details)
    s.set_attribute("reranker.pairs", pairs)
    if refused:
        s.set_attribute("reranker.refused", True)
    s.end()
    try:
        token.var.reset(token)  # as logs.request_id: a stream closed from another context cannot restore its own
    except ValueError:
        pass


def outcome(number: int, details: str) -> None:
    """A stream request's status (its code's number) on its span, the current one."""
    if _tracer is not None:
        from opentelemetry import trace

        _outcome(trace.get_current_span(), _CODES.get(number, grpc.StatusCode.UNKNOWN), details)


def _outcome(s: Any, code: grpc.StatusCode, details: str | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    s.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_ERRORS:
        s.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))


def log_fields() -> dict[str, str]:
    """The current trace id for a log line ({} when off or not sampled), to find the trace from the access log."""
    if _tracer is None:
        return {}
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return {"trace_id": trace.format_trace_id(ctx.trace_id)} if ctx.is_valid and ctx.trace_flags.sampled else {}


# ---------------------------------------------------------------- work timed elsewhere, recorded under the request


def _recording() -> Any:
    """The current context if its span records (sampled), else None: children of an unsampled span are skipped."""
    from opentelemetry import context, trace

    current = context.get_current()
    return current if trace.get_current_span(current).is_recording() else None


def on_thread(name: str, fn: Callable[..., T], attributes: dict[str, Any]) -> Callable[..., T]:
    """`fn` to run on an executor thread, recording a span `name` of its run under the caller's current span, with
    how long it waited for a thread; and, when a tokenizer worker process served it, a child span of the worker's
    round trip. `fn` itself when off."""
    parent = _recording() if _tracer is not None else None
    if parent is None:
        return fn
    submitted = time.time_ns()

    def run(*args: Any) -> T:
        _slice.worker, failed = None, None
        start = time.time_ns()
        try:
            return fn(*args)
        except Exception as exc:  # the request's error (a worker died, a text it cannot tokenize): the span says so
            failed = exc
            raise
        finally:
            end = time.time_ns()
            attributes["reranker.thread_wait_ms"] = (start - submitted) / 1e6
            s = _tracer.start_span(name, context=parent, start_time=start, attributes=attributes)
            if _slice.worker is not None:
                _worker_span(s, *_slice.worker, end)
            if failed is not None:
                _failed(s, failed)
            s.end(end_time=end)

    return run


def _failed(s: Any, exc: Exception) -> None:
    from opentelemetry.trace import Status, StatusCode

    s.record_exception(exc)
    s.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _worker_span(parent: Any, pid: int, taken: int, end: int) -> None:
    # Timed here, not in the worker: the worker needs no SDK, no exporter and no change to its protocol, and a
    # worker killed mid-slice still leaves its span. The round trip adds the socket transfer of the slice's arrays.
    from opentelemetry import trace

    s = _tracer.start_span(
        "tokenizer worker",
        context=trace.set_span_in_context(parent),
        start_time=taken,
        attributes={"reranker.worker.pid": pid},
    )
    s.end(end_time=end)


def worker_taken(pid: int) -> None:
    """Called on a tokenizing thread when worker `pid` takes its slice: on_thread records the worker's span."""
    if _tracer is not None:
        _slice.worker = (pid, time.time_ns())


def _offset() -> int:
    """Epoch ns minus perf_counter ns, to place the batcher's perf_counter() times; renewed each second (the two clocks
    drift apart slowly), not per call, so the spans of one batch recorded under different requests line up."""
    global _clock
    now = time.perf_counter_ns()
    if now - _clock[1] > 1_000_000_000:
        _clock = (time.time_ns() - time.perf_counter_ns(), now)
    return _clock[0]


def batched(result: Any, model: str, device: object, pairs: int) -> None:
    """The request's wait in the queue and each forward pass that scored its pairs, as spans under the current one,
    from the batcher's own timings (server.engine.batcher.BatchResult); the model and the counts on the current."""
    if _tracer is None:
        return
    parent = _recording()
    if parent is None:
        return
    from opentelemetry import trace

    trace.get_current_span(parent).set_attributes(
        {"reranker.model": model, "reranker.pairs": pairs, "reranker.windows": len(result.scores),
         "reranker.tokens": result.tokens}
    )  # fmt: skip
    if not result.batches:
        return
    offset = _offset()

    def ns(t: float) -> int:
        return offset + int(t * 1e9)

    first = min(b.start for b in result.batches)
    _tracer.start_span("queue", context=parent, start_time=ns(result.submitted)).end(end_time=ns(first))
    for b in result.batches:
        attributes = {
            "reranker.model": model,
            "reranker.device": str(device),
            "reranker.batch.number": b.number,
            "reranker.batch.pairs": b.pairs,
            "reranker.batch.tokens": b.tokens,
            "reranker.batch.request_pairs": b.mine,
        }
        _tracer.start_span("forward", context=parent, start_time=ns(b.start), attributes=attributes).end(
            end_time=ns(b.end)
        )
