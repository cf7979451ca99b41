"""The one table from error kinds to gRPC status codes."""

from __future__ import annotations

import logging

import grpc

from server.engine.batcher import Overloaded

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A request that breaks a rule; the message names the rule and the limit."""


class NotReady(RuntimeError):
    """The model is still loading or the server is stopping."""


class Draining(NotReady):
    """The server is shutting down and takes no new work."""


class WorkerDied(NotReady):
    """A tokenizer worker process died while it held this request's pairs; a new one is starting."""


class Busy(RuntimeError):
    """As many requests as --max-concurrent-rpcs allows are in flight."""


class UnknownModel(LookupError):
    """The request names a model this server does not serve; the message lists the ones it does."""


STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Busy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    UnknownModel: grpc.StatusCode.NOT_FOUND,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and caller-facing message for `exc`; unexpected errors are logged and kept short."""
    for kind, code in STATUS_BY_ERROR.items():
        if isinstance(exc, kind):
            return code, str(exc)
    log.error("unexpected error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
