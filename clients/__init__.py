"""Python clients for the reranker.v1 gRPC service: `from clients import RerankerClient, AsyncRerankerClient`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.python_client import (  # noqa: F401
        AsyncRerankerClient,
        AuthenticationError,
        DeadlineExceededError,
        InvalidRequestError,
        ModelInfo,
        ModelNotFoundError,
        OverloadedError,
        RankedResult,
        RerankerClient,
        RerankerError,
        RerankResult,
        Retry,
        StreamAnswer,
        StreamRequest,
        UnavailableError,
        Usage,
    )

# Imported lazily so `python -m clients.python_client` runs the module once, without a runpy warning.
_EXPORTS = {
    "AsyncRerankerClient",
    "AuthenticationError",
    "DeadlineExceededError",
    "InvalidRequestError",
    "ModelInfo",
    "ModelNotFoundError",
    "OverloadedError",
    "RankedResult",
    "RerankResult",
    "RerankerClient",
    "RerankerError",
    "Retry",
    "StreamAnswer",
    "StreamRequest",
    "UnavailableError",
    "Usage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from clients import python_client

        return getattr(python_client, name)
    raise AttributeError(f"module 'clients' has no attribute {name!r}")
