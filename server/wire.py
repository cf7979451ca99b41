"""Request bytes that are not a valid message: INVALID_ARGUMENT with the parser's reason, never a traceback.

gRPC calls the deserializer before any servicer code runs, and a parse error there becomes UNKNOWN plus a
logged traceback. So every handler is registered with a tolerant deserializer that returns `Malformed`
instead, and the interceptor (or RerankStream, for one message of a stream) answers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request message whose bytes did not parse; `message` says why."""

    message: str


def tolerant(deserializer: Deserializer | None) -> Deserializer | None:
    """`deserializer`, returning Malformed where it would raise."""
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)  # Message.FromString
    name = descriptor.full_name if descriptor is not None else "request message"
    parse = deserializer  # bound once: a closure over the narrowed, non-None callable

    def parse_or_malformed(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, and anything else hostile bytes can provoke
            reason = str(exc).rpartition("': ")[2] or type(exc).__name__  # drop "Error parsing message ..."
            return Malformed(f"the request is not a valid {name}: {reason} ({len(data)} bytes)")

    return parse_or_malformed
