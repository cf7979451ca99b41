"""The friendly face of the reranker.v1 stub: typed results, deadlines, retries, round_robin, typed errors.

    with RerankerClient("localhost:50051") as client:
        ranked = client.rerank("what is panda?", ["hi", "The giant panda is a bear."], top_n=1)

`python -m clients.python_client --help` runs the command line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients._common import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    SERVICE_NAME,
    AuthenticationError,
    ChannelSpec,
    DeadlineExceededError,
    InvalidRequestError,
    ModelInfo,
    ModelNotFoundError,
    OverloadedError,
    RankedResult,
    RerankerError,
    RerankResult,
    Retry,
    StreamAnswer,
    StreamRequest,
    UnavailableError,
    Usage,
    channel_spec,
    error_from_rpc,
    health_status,
    model_info,
    pairs_request,
    rerank_request,
    rerank_result,
    stream_answer,
    stream_error,
)
from clients._stream import Messages, send
from clients._tracing import context_metadata
from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc

__all__ = [
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
]

T = TypeVar("T")
_POLL_S = 0.2


class _Base:
    """Channel settings shared by both flavours; subclasses open the channel their way."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        retry: Retry | None = None,
        keepalive_s: float = 30.0,
        tls_client_cert: bytes | None = None,
        tls_client_key: bytes | None = None,
    ) -> None:
        self._spec: ChannelSpec = channel_spec(
            target,
            timeout=timeout,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            tls_server_name=tls_server_name,
            retry=retry,
            keepalive_s=keepalive_s,
            tls_client_cert=tls_client_cert,
            tls_client_key=tls_client_key,
        )
        self._channel = self._open(self._spec)
        self._stub = pb_grpc.RerankerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _open(self, spec: ChannelSpec) -> Any:
        raise NotImplementedError

    @property
    def target(self) -> str:
        return self._spec.target

    def _kwargs(self, timeout: float | None) -> dict[str, Any]:
        """Per-call deadline (the client default unless given), the API key and the caller's trace context."""
        timeout = self._spec.timeout_s if timeout is None else timeout
        return {"timeout": timeout, "metadata": self._spec.metadata + context_metadata()}

    def _stream_kwargs(self, timeout: float | None) -> dict[str, Any]:
        """A stream lives as long as its caller feeds it: no deadline unless `timeout` is given."""
        return {"timeout": timeout, "metadata": self._spec.metadata + context_metadata()}

    def _not_ready(self, waited: float, last: str) -> UnavailableError:
        return UnavailableError(
            grpc.StatusCode.UNAVAILABLE, f"server at {self.target} not SERVING after {waited:.1f} s (last: {last})"
        )


class RerankerClient(_Base):
    """Blocking client; owns its channel (use `with`, or call `close()`).

    `target`: "host:port", "dns:///name:port" (round_robin over every address it resolves to), or a list of
    "ip:port" replicas. `timeout` is the default deadline of every call, retries included.
    """

    def _open(self, spec: ChannelSpec) -> grpc.Channel:
        if spec.credentials is None:
            return grpc.insecure_channel(spec.target, options=spec.options)
        return grpc.secure_channel(spec.target, spec.credentials, options=spec.options)

    def __enter__(self) -> RerankerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: object, timeout: float | None) -> T:
        try:
            return method(request, **self._kwargs(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    def rerank(
        self,
        query: str,
        candidates: Sequence[str],
        *,
        top_n: int | None = None,
        normalize: bool = False,
        return_documents: bool = False,
        max_length: int | None = None,
        model: str = "",
        long_documents: str = "truncate",
        max_windows_per_doc: int | None = None,
        instruction: str = "",
        query_max_length: int | None = None,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score `candidates` against `query`: results best first (cut to `top_n`) and input-order scores.

        `long_documents`: "truncate" (FlagReranker's behaviour), "chunk" (a long passage scores as its best window) or
        "truncate_left" (keep its end). `instruction`: the task text of an instruction-following model (Qwen3-Reranker,
        FlagEmbedding's LLM rerankers; "" = the model's default). `query_max_length`: tokens of the query per pair.
        """
        req = rerank_request(
            query,
            candidates,
            top_n=top_n,
            normalize=normalize,
            return_documents=return_documents,
            max_length=max_length,
            model=model,
            long_documents=long_documents,
            max_windows_per_doc=max_windows_per_doc,
            instruction=instruction,
            query_max_length=query_max_length,
        )
        return rerank_result(self._call(self._stub.Rerank, req, timeout), return_documents)

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        normalize: bool = False,
        max_length: int | None = None,
        model: str = "",
        timeout: float | None = None,
    ) -> list[float]:
        """One score per (query, passage) pair, in input order."""
        req = pairs_request(pairs, normalize=normalize, max_length=max_length, model=model)
        return list(self._call(self._stub.Rerank, req, timeout).scores)

    def rerank_stream(
        self, requests: Iterable[StreamRequest], *, timeout: float | None = None
    ) -> Iterator[StreamAnswer]:
        """Send `requests` on one RerankStream; yield each answer as soon as the server has scored it.

        Answers come in completion order, matched by `request_id`; a request's error comes as its answer.
        The stream has no deadline unless `timeout` (seconds, for the whole stream) is given.
        """
        if not isinstance(requests, Iterable):
            raise TypeError(
                "RerankerClient.rerank_stream takes an iterable of StreamRequest (async: AsyncRerankerClient)"
            )
        messages = Messages(requests)
        call = self._stub.RerankStream(iter(messages), **self._stream_kwargs(timeout))
        try:
            for resp in call:
                if resp.HasField("draining"):  # the server is shutting down: stop sending, answers still come
                    messages.stop()
                    continue
                yield stream_answer(resp)
        except grpc.RpcError as exc:
            raise messages.error or stream_error(exc) from exc
        finally:
            call.cancel()  # the caller stopped early: end the stream and drop its queued work
        if messages.error is not None:
            raise messages.error

    def model_info(self, model: str = "", *, timeout: float | None = None) -> ModelInfo:
        """A loaded model (default: the server's default) and the server's limits."""
        return model_info(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(model=model), timeout))

    def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status: SERVING, NOT_SERVING or SERVICE_UNKNOWN."""
        req = health_pb2.HealthCheckRequest(service=service)
        return health_status(self._call(self._health.Check, req, timeout))

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Poll health until SERVING; UnavailableError naming the last status once `timeout` seconds pass."""
        start = time.monotonic()
        last = "no answer"
        while (left := timeout - (time.monotonic() - start)) > 0:
            try:
                req = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
                last = health_status(self._call(self._health.Check, req, left))
                if last == "SERVING":
                    return
            except RerankerError as exc:
                last = str(exc)
            time.sleep(min(_POLL_S, max(0.0, timeout - (time.monotonic() - start))))
        raise self._not_ready(time.monotonic() - start, last)


class AsyncRerankerClient(_Base):
    """asyncio client (grpc.aio); owns its channel (use `async with`, or await `close()`).

    Same arguments and methods as RerankerClient, as coroutines. Create it inside the running event loop.
    """

    def _open(self, spec: ChannelSpec) -> grpc.aio.Channel:
        if spec.credentials is None:
            return grpc.aio.insecure_channel(spec.target, options=spec.options)
        return grpc.aio.secure_channel(spec.target, spec.credentials, options=spec.options)

    async def __aenter__(self) -> AsyncRerankerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: object, timeout: float | None) -> T:
        try:
            return await method(request, **self._kwargs(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    async def rerank(
        self,
        query: str,
        candidates: Sequence[str],
        *,
        top_n: int | None = None,
        normalize: bool = False,
        return_documents: bool = False,
        max_length: int | None = None,
        model: str = "",
        long_documents: str = "truncate",
        max_windows_per_doc: int | None = None,
        instruction: str = "",
        query_max_length: int | None = None,
        timeout: float | None = None,
    ) -> RerankResult:
        """Score `candidates` against `query`: results best first (cut to `top_n`) and input-order scores.

        `long_documents`: "truncate" (FlagReranker's behaviour), "chunk" (a long passage scores as its best window) or
        "truncate_left" (keep its end). `instruction`: the task text of an instruction-following model (Qwen3-Reranker,
        FlagEmbedding's LLM rerankers; "" = the model's default). `query_max_length`: tokens of the query per pair.
        """
        req = rerank_request(
            query,
            candidates,
            top_n=top_n,
            normalize=normalize,
            return_documents=return_documents,
            max_length=max_length,
            model=model,
            long_documents=long_documents,
            max_windows_per_doc=max_windows_per_doc,
            instruction=instruction,
            query_max_length=query_max_length,
        )
        return rerank_result(await self._call(self._stub.Rerank, req, timeout), return_documents)

    async def score_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        normalize: bool = False,
        max_length: int | None = None,
        model: str = "",
        timeout: float | None = None,
    ) -> list[float]:
        """One score per (query, passage) pair, in input order."""
        req = pairs_request(pairs, normalize=normalize, max_length=max_length, model=model)
        return list((await self._call(self._stub.Rerank, req, timeout)).scores)

    async def rerank_stream(
        self, requests: AsyncIterable[StreamRequest] | Iterable[StreamRequest], *, timeout: float | None = None
    ) -> AsyncIterator[StreamAnswer]:
        """Send `requests` on one RerankStream; yield each answer as soon as the server has scored it.

        `async for answer in client.rerank_stream(requests)`: answers come in completion order, matched by
        `request_id`; a request's error comes as its answer. No deadline unless `timeout` is given.
        """
        messages = Messages(requests)
        call = self._stub.RerankStream(**self._stream_kwargs(timeout))
        writer = asyncio.ensure_future(send(call, messages))
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                if resp.HasField("draining"):  # the server is shutting down: stop sending, answers still come
                    messages.stop()
                    continue
                yield stream_answer(resp)
        except grpc.RpcError as exc:
            raise messages.error or stream_error(exc) from exc
        finally:
            writer.cancel()
            call.cancel()
        if messages.error is not None:
            raise messages.error

    async def model_info(self, model: str = "", *, timeout: float | None = None) -> ModelInfo:
        """A loaded model (default: the server's default) and the server's limits."""
        req = pb.GetModelInfoRequest(model=model)
        return model_info(await self._call(self._stub.GetModelInfo, req, timeout))

    async def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status: SERVING, NOT_SERVING or SERVICE_UNKNOWN."""
        req = health_pb2.HealthCheckRequest(service=service)
        return health_status(await self._call(self._health.Check, req, timeout))

    async def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Poll health until SERVING; UnavailableError naming the last status once `timeout` seconds pass."""
        start = time.monotonic()
        last = "no answer"
        while (left := timeout - (time.monotonic() - start)) > 0:
            try:
                req = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
                last = health_status(await self._call(self._health.Check, req, left))
                if last == "SERVING":
                    return
            except RerankerError as exc:
                last = str(exc)
            await asyncio.sleep(min(_POLL_S, max(0.0, timeout - (time.monotonic() - start))))
        raise self._not_ready(time.monotonic() - start, last)


if __name__ == "__main__":
    from clients.cli import main  # the command line uses the package's own import of this module

    main()
