"""Route handlers: read the body, validate it as its dialect, call gRPC, answer in the dialect's shape."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from rest_bridge.channel import open_channel
from rest_bridge.config import BridgeConfig
from rest_bridge.dialects import Dialect
from rest_bridge.errors import DIALECT_KEY, ERROR_SHAPE_KEY, TEXT_PAIRS_KEY, BadRequest, ErrorShape
from rest_bridge.models import LegacyPostRequest, LegacyPostResponse, ModelList, TeiInfo, kind, parse
from rest_bridge.recognise import choose
from rest_bridge.tracing import trace_metadata
from rest_bridge.truncation import refused

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reranker"].full_name
MODELS_TTL_S = 10.0  # how long the bridge trusts its copy of the server's model list
FORWARDED_HEADERS = ("authorization", "x-request-id")  # become gRPC metadata of the same name


class Upstream:
    """The gRPC channel and stubs the handlers call; one per app, opened and closed with it."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        # Short reconnect backoff: once the server is back, the next request (within ~1 s) gets through.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        self.channel = open_channel(config, options)  # plaintext, or TLS with --grpc-ca/--grpc-cert/--grpc-key
        self.reranker = pb_grpc.RerankerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._models: tuple[float, list[str]] = (0.0, [])  # (when read, the server's loaded models)
        self._max_length: dict[str, tuple[float, int]] = {}  # model -> (when read, its pair limit in tokens)

    async def models(self, metadata: list[tuple[str, str]], fresh: bool = False) -> list[str]:
        """The server's loaded models (the first is its default), read at most every MODELS_TTL_S."""
        read_at, names = self._models
        if fresh or not names or time.monotonic() - read_at > MODELS_TTL_S:
            info = await self.reranker.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=min(5.0, self.config.deadline_s), metadata=metadata
            )
            names = list(info.models) or [info.model]
            self._models = (time.monotonic(), names)
        return names

    async def route(self, name: str, metadata: list[tuple[str, str]]) -> str:
        """The gRPC `model` for a REST caller's model name.

        One model loaded: any name is accepted and scored by it (as TEI does, so Cohere-style callers naming
        their cloud model keep working). Several: a loaded name, else 404 listing them.
        """
        if not name:
            return ""
        for fresh in (False, True):  # a name we do not know yet may have been loaded since we last looked
            models = await self.models(metadata, fresh)
            if len(models) <= 1:
                return ""
            if name in models:
                return name
        raise BadRequest(f"model {name!r} is not served here; loaded models: {', '.join(models)}", status=404)

    async def max_length(self, model: str, metadata: list[tuple[str, str]]) -> int:
        """A model's pair limit in tokens (what max_length 0 means), read at most every MODELS_TTL_S."""
        read_at, limit = self._max_length.get(model, (0.0, 0))
        if not limit or time.monotonic() - read_at > MODELS_TTL_S:
            info = await self.reranker.GetModelInfo(
                pb.GetModelInfoRequest(model=model), timeout=min(5.0, self.config.deadline_s), metadata=metadata
            )
            limit = info.max_length
            self._max_length[model] = (time.monotonic(), limit)
        return limit

    async def described_models(self) -> list[str]:
        """A line per served model for the docs page (name, family, device, dtype); [] when the server cannot say.

        Asked with the bridge's own key (the page opens before its reader has authorized).
        """
        key = self.config.api_key
        metadata = [("authorization", f"Bearer {key}")] if key else []
        try:
            names = await self.models(metadata)
        except grpc.aio.AioRpcError:
            return []
        return [await self._describe(name, metadata) for name in names]

    async def _describe(self, name: str, metadata: list[tuple[str, str]]) -> str:
        request = pb.GetModelInfoRequest(model=name)
        try:
            i = await self.reranker.GetModelInfo(request, timeout=min(5.0, self.config.deadline_s), metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return f"`{name}`: {'still loading' if exc.code() == grpc.StatusCode.UNAVAILABLE else exc.code().name}"
        return f"`{i.model}`: " + ", ".join(([f"{i.family} reranker"] if i.family else []) + [i.device, i.dtype])

    async def close(self) -> None:
        await self.channel.close()


UPSTREAM_KEY = web.AppKey("upstream", Upstream)


def _upstream(request: web.Request) -> Upstream:
    return request.app[UPSTREAM_KEY]


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    if len(request.headers.getall("authorization", [])) > 1:
        raise BadRequest("several Authorization headers: send exactly one, 'Bearer <key>'", status=401)
    metadata = []
    for name in FORWARDED_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            if not value.isascii() or not value.isprintable():
                raise BadRequest(f"the {name} header must be printable ASCII")
            metadata.append((name, value))
    return metadata + trace_metadata(request)  # the caller's trace continues on the server


async def _rerank(request: web.Request, req: pb.RerankRequest, model: str) -> pb.RerankResponse:
    up = _upstream(request)
    metadata = _metadata(request)
    req.model = await up.route(model, metadata)
    return await up.reranker.Rerank(req, timeout=up.config.deadline_s, metadata=metadata)


async def _read_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type (legacy clients send it in many ways)."""
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {kind(body)}")
    return body


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _request_id(request: web.Request) -> str:
    return request.headers.get("x-request-id") or str(uuid.uuid4())


async def _serve(request: web.Request, dialect: Dialect[Any], body: dict[str, Any]) -> web.Response:
    request[ERROR_SHAPE_KEY] = dialect.error
    request[DIALECT_KEY] = dialect.name
    parsed = parse(dialect.model, body)
    up = _upstream(request)
    metadata = _metadata(request)
    asked = request.match_info.get("model") or dialect.asked_model(parsed)  # NIM's per-model path names it
    req = dialect.request(parsed, up.config)
    req.model = await up.route(getattr(up.config, dialect.pinned_model) if dialect.pinned_model else asked, metadata)
    if dialect.limits is not None:
        dialect.limits(parsed, await up.max_length(req.model, metadata))
    try:
        resp = await up.reranker.Rerank(req, timeout=up.config.deadline_s, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        index = refused(req, exc)
        if index is None or dialect.too_long is None:
            raise
        limit = req.max_length or await up.max_length(req.model, metadata)
        status, message = dialect.too_long(parsed, index, limit)
        raise BadRequest(message, status=status) from None
    return web.json_response(dialect.answer(parsed, resp, _request_id(request)))


# ---------------------------------------------------------------- legacy 1: bge-reranker-base-api


async def legacy_post(request: web.Request) -> web.Response:
    """POST /bge-reranker-base/post: raw logits in input order, in the legacy envelope."""
    request_time = _now()
    body = await _read_object(request)
    request[TEXT_PAIRS_KEY] = body.get("text_pairs")
    config = _upstream(request).config
    pairs = parse(LegacyPostRequest, body, max_pairs=config.max_pairs, max_chars=config.max_body_bytes).text_pairs
    req = pb.RerankRequest(pairs=[pb.Pair(query=q, passage=p) for q, p in pairs])
    resp = await _rerank(request, req, config.legacy1_model)
    answer: LegacyPostResponse = {
        "text_pairs": pairs,
        "rerank_scores": list(resp.scores),
        "request_time": request_time,
        "response_time": _now(),
        "code": 200,
    }
    return web.json_response(answer)


# ---------------------------------------------------------------- every rerank and score route


def dialect_route(
    candidates: Callable[[dict[str, Any]], Sequence[Dialect[Any]]], shape: ErrorShape | None = None
) -> Handler:
    """A route's handler: the body's dialect among `candidates(body)` (the first fitting one), then `_serve`.

    `shape`: the error body until the dialect is known (a path of one dialect's own), else the path's default.
    """

    async def handle(request: web.Request) -> web.Response:
        if shape is not None:
            request[ERROR_SHAPE_KEY] = shape
        body = await _read_object(request)
        return await _serve(request, choose(candidates(body), body), body)

    return handle


# ---------------------------------------------------------------- operations


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 only while the gRPC server reports SERVING."""
    up = _upstream(request)
    try:
        resp = await up.health.Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME),
            timeout=min(5.0, up.config.deadline_s),
            metadata=_metadata(request),
        )
    except grpc.aio.AioRpcError as exc:
        return web.json_response({"status": exc.code().name, "error": exc.details()}, status=503)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return web.json_response({"status": status}, status=200 if status == "SERVING" else 503)


async def models(request: web.Request) -> web.Response:
    """GET /v1/models (and Infinity's /models): the loaded models, in the OpenAI list shape."""
    names = await _upstream(request).models(_metadata(request), fresh=True)
    now = int(time.time())
    answer: ModelList = {
        "object": "list",
        "data": [
            {"id": n, "object": "model", "owned_by": "reranker", "created": now, "capabilities": ["rerank"]}
            for n in names
        ],
    }
    return web.json_response(answer)


async def info(request: web.Request) -> web.Response:
    """GET /info: the served model and limits, in TEI's shape."""
    up = _upstream(request)
    resp = await up.reranker.GetModelInfo(
        pb.GetModelInfoRequest(), timeout=min(5.0, up.config.deadline_s), metadata=_metadata(request)
    )
    answer: TeiInfo = {
        "model_id": resp.model,
        "model_sha": None,
        "model_dtype": resp.dtype,
        "model_type": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
        "max_concurrent_requests": 0,
        "max_input_length": resp.max_length,
        "max_batch_tokens": resp.batch_size * resp.max_length,
        "max_batch_requests": None,
        "max_client_batch_size": resp.limits.max_candidates,
        "auto_truncate": up.config.auto_truncate,
        "tokenization_workers": 1,
        "version": resp.version,
        "sha": None,
        "docker_label": None,
    }
    return web.json_response(answer)
