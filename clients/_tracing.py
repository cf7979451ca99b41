"""Trace context for outgoing calls: the caller's W3C `traceparent` (and `tracestate`, baggage) as gRPC metadata.

An application that traces with OpenTelemetry has imported it; one that does not has no context to pass on, so this
never imports opentelemetry itself and costs one dictionary look-up per call there.
"""

from __future__ import annotations

import sys


def context_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as metadata entries, through the application's propagators (OTEL_PROPAGATORS,
    W3C trace context and baggage by default); () when it does not use OpenTelemetry or has no current span."""
    if "opentelemetry.context" not in sys.modules:
        return ()
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())
