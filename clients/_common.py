"""What the blocking and asyncio clients share: channel settings, requests, results, errors."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from reranker_proto import reranker_pb2 as pb

SERVICE_NAME = "reranker.v1.Reranker"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # 1000 candidates x 20000 characters with documents is ~20 MB


# ---------------------------------------------------------------- errors


class RerankerError(Exception):
    """A failed call: the gRPC status `code` and the server's `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidRequestError(RerankerError, ValueError):
    """The request breaks a rule (INVALID_ARGUMENT); the message names the rule and the limit."""


class OverloadedError(RerankerError):
    """The server's queue is full (RESOURCE_EXHAUSTED): back off and retry, after `retry_after_s` where the server
    said how long (its `retry-after-ms` trailer), else with your own backoff."""

    retry_after_s: float | None = None


class UnavailableError(RerankerError, ConnectionError):
    """No server could answer (UNAVAILABLE), even after the automatic retries."""


class DeadlineExceededError(RerankerError, TimeoutError):
    """The call did not finish within its deadline (DEADLINE_EXCEEDED)."""


class ModelNotFoundError(RerankerError, LookupError):
    """The request named a model the server does not serve; the message lists the ones it does."""


class AuthenticationError(RerankerError):
    """The API key is missing or wrong (UNAUTHENTICATED or PERMISSION_DENIED)."""


ERROR_BY_STATUS: dict[grpc.StatusCode, type[RerankerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}


CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def error_from_rpc(exc: grpc.RpcError) -> RerankerError:
    """The typed error for a failed RPC (sync `grpc.RpcError` and `grpc.aio.AioRpcError` alike)."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    message: str = exc.details() or code.name.lower()  # type: ignore[attr-defined]
    error = ERROR_BY_STATUS.get(code, RerankerError)(code, message)
    if isinstance(error, OverloadedError):
        error.retry_after_s = _retry_after_s(exc)
    return error


def _retry_after_s(exc: grpc.RpcError) -> float | None:
    """The server's `retry-after-ms` trailer, in seconds; None when absent or not a number."""
    try:
        trailers = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
        value = next((v for k, v in trailers if k == "retry-after-ms"), None)
        return None if value is None else max(0.0, float(value) / 1e3)
    except (TypeError, ValueError, AttributeError):
        return None


# grpc.aio reports a write into a stream the server has just ended as this INTERNAL status, hiding the server's
# own (on a drain, UNAVAILABLE): the answers already received stand, the requests without one were not read.
_WRITE_RACE = "Internal error from Core"


def stream_error(exc: grpc.RpcError) -> RerankerError:
    """The typed error that ended a stream."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INTERNAL and exc.details() == _WRITE_RACE:  # type: ignore[attr-defined]
        return UnavailableError(
            grpc.StatusCode.UNAVAILABLE,
            "the server ended the stream while requests were still being sent (as it does when it drains): "
            "requests without an answer were not read, resend them",
        )
    return error_from_rpc(exc)


def invalid(message: str) -> InvalidRequestError:
    return InvalidRequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class RankedResult:
    """One candidate in ranked order; `index` is its position in the request."""

    index: int
    score: float
    document: str | None = None  # only with return_documents=True


@dataclass(frozen=True)
class Usage:
    pairs: int
    tokens: int
    queue_ms: float
    inference_ms: float
    windows: int = 0  # pairs fed to the model: more than `pairs` when long passages were chunked


LONG_DOCUMENTS = {
    "truncate": pb.LONG_DOCUMENTS_TRUNCATE,
    "chunk": pb.LONG_DOCUMENTS_CHUNK,
    "truncate_left": pb.LONG_DOCUMENTS_TRUNCATE_LEFT,
}


@dataclass(frozen=True)
class RerankResult:
    """`results` best first (cut to top_n); `scores` one per candidate in input order."""

    results: list[RankedResult]
    scores: list[float]
    model: str
    usage: Usage


@dataclass(frozen=True)
class StreamRequest:
    """One request of `rerank_stream`: query + candidates, or pairs. `request_id` "" lets the client number it."""

    query: str = ""
    candidates: Sequence[str] = ()
    pairs: Sequence[tuple[str, str]] = ()
    request_id: str = ""
    top_n: int | None = None
    normalize: bool = False
    return_documents: bool = False
    max_length: int | None = None
    model: str = ""  # which loaded model scores it; "" = the server's default


@dataclass(frozen=True)
class StreamAnswer:
    """The answer to one StreamRequest: `result`, or `error` (the stream goes on either way)."""

    request_id: str
    result: RerankResult | None = None
    error: RerankerError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ModelInfo:
    model: str
    device: str
    dtype: str
    max_length: int
    batch_size: int
    version: str
    max_candidates: int
    max_text_chars: int
    models: list[str]  # every model the server has loaded; the first is its default
    revision: str  # a short hash of the model's weights: changes when they are replaced
    family: str = ""  # whose recipe scores it: cross-encoder, qwen3-reranker, bge-llm, ...
    default_instruction: str = ""  # the instruction a request without one gets ("" where the family takes none)


def _optional_positive(value: int | None, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"{name} must be a positive integer or None, got {value!r}")
    return value


def _texts(values: Sequence[str], name: str) -> list[str]:
    if isinstance(values, str | bytes):
        raise invalid(f"{name} must be a list of strings, not a single string")
    texts = list(values)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise invalid(f"{name}[{i}] must be a string, got {type(text).__name__}")
    return texts


def rerank_request(
    query: str,
    candidates: Sequence[str],
    *,
    top_n: int | None,
    normalize: bool,
    return_documents: bool,
    max_length: int | None,
    model: str = "",
    long_documents: str = "truncate",
    max_windows_per_doc: int | None = None,
    instruction: str = "",
    query_max_length: int | None = None,
) -> pb.RerankRequest:
    if not isinstance(query, str):
        raise invalid(f"query must be a string, got {type(query).__name__}")
    if not isinstance(instruction, str):
        raise invalid(f"instruction must be a string, got {type(instruction).__name__}")
    if long_documents not in LONG_DOCUMENTS:
        raise invalid(f"long_documents must be one of {', '.join(LONG_DOCUMENTS)}, got {long_documents!r}")
    return pb.RerankRequest(
        query=query,
        candidates=_texts(candidates, "candidates"),
        top_n=_optional_positive(top_n, "top_n"),
        normalize=normalize,
        return_documents=return_documents,
        max_length=_optional_positive(max_length, "max_length"),
        model=model,
        long_documents=LONG_DOCUMENTS[long_documents],
        max_windows_per_doc=_optional_positive(max_windows_per_doc, "max_windows_per_doc"),
        instruction=instruction,
        query_max_length=_optional_positive(query_max_length, "query_max_length"),
    )


def pairs_request(
    pairs: Sequence[tuple[str, str]], *, normalize: bool, max_length: int | None, model: str = ""
) -> pb.RerankRequest:
    if isinstance(pairs, str | bytes):
        raise invalid("pairs must be a list of (query, passage) tuples, not a string")
    messages = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str | bytes) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise invalid(f"pairs[{i}] must be a (query, passage) pair of strings, got {pair!r:.80}")
        messages.append(pb.Pair(query=pair[0], passage=pair[1]))
    max_tokens = _optional_positive(max_length, "max_length")
    return pb.RerankRequest(pairs=messages, normalize=normalize, max_length=max_tokens, model=model)


def stream_message(request: StreamRequest, number: int) -> pb.RerankRequest:
    """The message for one StreamRequest; an empty request_id becomes the request's number in the stream."""
    if not isinstance(request, StreamRequest):
        raise invalid(f"rerank_stream takes StreamRequest items, got {type(request).__name__}")
    if request.pairs:
        if request.query or request.candidates:
            raise invalid("a StreamRequest has either query + candidates or pairs, not both")
        msg = pairs_request(
            request.pairs, normalize=request.normalize, max_length=request.max_length, model=request.model
        )
        msg.top_n = _optional_positive(request.top_n, "top_n")
        msg.return_documents = request.return_documents
    else:
        msg = rerank_request(
            request.query,
            request.candidates,
            top_n=request.top_n,
            normalize=request.normalize,
            return_documents=request.return_documents,
            max_length=request.max_length,
            model=request.model,
        )
    msg.request_id = request.request_id or str(number)
    return msg


def stream_answer(resp: pb.RerankStreamResponse) -> StreamAnswer:
    if resp.HasField("error"):
        code = CODE_BY_NUMBER.get(resp.error.code, grpc.StatusCode.UNKNOWN)
        return StreamAnswer(resp.request_id, error=ERROR_BY_STATUS.get(code, RerankerError)(code, resp.error.message))
    response = resp.response
    result = rerank_result(response, any(r.document for r in response.results))
    return StreamAnswer(resp.request_id, result=result)


def rerank_result(resp: pb.RerankResponse, return_documents: bool) -> RerankResult:
    u = resp.usage
    return RerankResult(
        results=[RankedResult(r.index, r.score, r.document if return_documents else None) for r in resp.results],
        scores=list(resp.scores),
        model=resp.model,
        usage=Usage(u.pairs, u.tokens, u.queue_ms, u.inference_ms, u.windows),
    )


def model_info(resp: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model=resp.model,
        device=resp.device,
        dtype=resp.dtype,
        max_length=resp.max_length,
        batch_size=resp.batch_size,
        version=resp.version,
        max_candidates=resp.limits.max_candidates,
        max_text_chars=resp.limits.max_text_chars,
        models=list(resp.models),
        revision=resp.revision,
        family=resp.family,
        default_instruction=resp.default_instruction,
    )


def health_status(resp: health_pb2.HealthCheckResponse) -> str:
    """SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


# ---------------------------------------------------------------- channel


@dataclass(frozen=True)
class Retry:
    """gRPC's own retry policy, for UNAVAILABLE only; every attempt counts against the call's deadline."""

    max_attempts: int = 5  # gRPC caps this at 5; 1 turns retries off
    initial_backoff_s: float = 0.2  # attempt n waits a random time in [0, min(initial * 2^(n-1), max)]
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be 1..5 (gRPC's limit), got {self.max_attempts}")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.multiplier <= 0:
            raise ValueError("initial_backoff_s, max_backoff_s and multiplier must be positive")


def join_targets(target: str | Sequence[str]) -> str:
    """One gRPC target: a name as is (`dns:///svc:50051`), or several `host:port` IP addresses as one list."""
    if isinstance(target, str):
        return target
    targets = list(target)
    if not targets:
        raise ValueError("no target given: pass 'host:port', 'dns:///name:port', or a list of 'ip:port'")
    if len(targets) == 1:
        return targets[0]
    families = {_ip_family(t) for t in targets}
    if len(families) != 1:
        raise ValueError("several targets must all be IPv4 or all IPv6 'ip:port' addresses")
    return f"{families.pop()}:{','.join(targets)}"  # e.g. ipv4:10.0.0.1:50051,10.0.0.2:50051


def _ip_family(target: str) -> str:
    host, sep, port = target.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if not sep or not port.isdigit() or address is None:
        raise ValueError(
            f"target {target!r} in a list must be 'ip:port'; for host names use one 'dns:///name:port' "
            "target whose name resolves to every replica (e.g. a headless Kubernetes service)"
        )
    return f"ipv{address.version}"


def service_config(retry: Retry) -> str:
    """round_robin over every resolved address, and the retry policy for the reranker and health services."""
    method: dict[str, object] = {"name": [{"service": SERVICE_NAME}, {"service": HEALTH_SERVICE_NAME}]}
    if retry.max_attempts > 1:  # gRPC rejects a retry policy of one attempt
        method["retryPolicy"] = {
            "maxAttempts": retry.max_attempts,
            "initialBackoff": f"{retry.initial_backoff_s}s",
            "maxBackoff": f"{retry.max_backoff_s}s",
            "backoffMultiplier": retry.multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]})


def channel_options(retry: Retry, keepalive_s: float, tls_server_name: str | None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(retry)),
        ("grpc.service_config_disable_resolution", 1),  # ours, not one published in DNS TXT records
        # Pings only while calls are open, and no more often than servers accept by default (no GOAWAY).
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # Drop connections idle for 4 minutes, before load balancers and NATs silently do (often ~5 minutes).
        ("grpc.client_idle_timeout_ms", 240_000),
        # Reconnect quickly after a replica restarts, then back off to a few seconds.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


@dataclass(frozen=True)
class ChannelSpec:
    """Everything needed to open a channel, built once from the client's keyword arguments."""

    target: str
    options: list[tuple[str, object]]
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float


def channel_spec(
    target: str | Sequence[str],
    *,
    timeout: float,
    api_key: str | None,
    tls: bool,
    root_certificates: bytes | None,
    tls_server_name: str | None,
    retry: Retry | None,
    keepalive_s: float,
    tls_client_cert: bytes | None = None,
    tls_client_key: bytes | None = None,
) -> ChannelSpec:
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    if (tls_client_cert is None) != (tls_client_key is None):
        raise ValueError("mutual TLS needs both tls_client_cert and tls_client_key (PEM bytes), or neither")
    for name, pem in (("root_certificates", root_certificates), ("tls_client_cert", tls_client_cert)):
        if pem is not None and (not isinstance(pem, bytes) or b"-----BEGIN " not in pem):
            raise ValueError(f"{name} must be PEM bytes (the file's contents, not its path)")
    credentials = None
    if tls or root_certificates is not None or tls_client_cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root_certificates, private_key=tls_client_key, certificate_chain=tls_client_cert
        )
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    return ChannelSpec(
        target=join_targets(target),
        options=channel_options(retry or Retry(), keepalive_s, tls_server_name),
        credentials=credentials,
        metadata=metadata,
        timeout_s=timeout,
    )
