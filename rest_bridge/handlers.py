"""Route handlers: small translations from JSON to the gRPC Rerank call and back."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from rest_bridge.channel import open_channel
from rest_bridge.config import BridgeConfig
from rest_bridge.errors import TEXT_PAIRS_KEY, BadRequest
from rest_bridge.literal import LiteralError, parse_text_pairs

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reranker"].full_name
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

    async def close(self) -> None:
        await self.channel.close()


UPSTREAM_KEY = web.AppKey("upstream", Upstream)


def _upstream(request: web.Request) -> Upstream:
    return request.app[UPSTREAM_KEY]


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    metadata = []
    for name in FORWARDED_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            if not value.isascii() or not value.isprintable():
                raise BadRequest(f"the {name} header must be printable ASCII")
            metadata.append((name, value))
    return metadata


async def _rerank(request: web.Request, req: pb.RerankRequest) -> pb.RerankResponse:
    up = _upstream(request)
    return await up.reranker.Rerank(req, timeout=up.config.deadline_s, metadata=_metadata(request))


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
        raise BadRequest(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} is not valid Unicode (a lone surrogate escape)") from None
    return value


def _required(body: dict[str, Any], name: str) -> Any:
    if name not in body or body[name] is None:
        raise BadRequest(f'"{name}" is required')
    return body[name]


def _text_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be a list of strings, got {_kind(value)}")
    if not value:
        raise BadRequest(f"{name} is empty; send at least one text")
    return [_text(v, f"{name}[{i}]") for i, v in enumerate(value)]


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- legacy 1: bge-reranker-base-api


def _legacy_pairs(value: Any, config: BridgeConfig) -> list[list[str]]:
    if isinstance(value, str):
        try:
            pairs = parse_text_pairs(value, max_chars=config.max_body_bytes, max_pairs=config.max_pairs)
        except LiteralError as exc:
            raise BadRequest(str(exc)) from None
    elif isinstance(value, list):
        if not value:
            raise BadRequest("text_pairs is an empty list; send at least one [query, passage] pair")
        if len(value) > config.max_pairs:
            raise BadRequest(f"text_pairs has {len(value)} pairs; the limit is {config.max_pairs}")
        for i, pair in enumerate(value):
            if not isinstance(pair, list) or len(pair) != 2:
                raise BadRequest(f"text_pairs[{i}] must be a [query, passage] list of two strings")
        pairs = value
    else:
        raise BadRequest(f"text_pairs must be a string like \"[['query', 'passage']]\" or a list, got {_kind(value)}")
    for i, (q, p) in enumerate(pairs):
        _text(q, f"text_pairs[{i}][0]")
        _text(p, f"text_pairs[{i}][1]")
    return pairs


async def legacy_post(request: web.Request) -> web.Response:
    """POST /bge-reranker-base/post: raw logits in input order, in the legacy envelope."""
    request_time = _now()
    body = await _read_object(request)
    raw = _required(body, "text_pairs")
    request[TEXT_PAIRS_KEY] = raw
    pairs = _legacy_pairs(raw, request.app[UPSTREAM_KEY].config)
    resp = await _rerank(request, pb.RerankRequest(pairs=[pb.Pair(query=q, passage=p) for q, p in pairs]))
    return web.json_response(
        {
            "text_pairs": pairs,
            "rerank_scores": list(resp.scores),
            "request_time": request_time,
            "response_time": _now(),
            "code": 200,
        }
    )


# ---------------------------------------------------------------- legacy 2: fc3-bge-reranker-api


async def legacy_rerank(request: web.Request) -> web.Response:
    """POST /rerank (and /reank): sigmoid scores in input order."""
    body = await _read_object(request)
    query = _text(_required(body, "query"), "query")
    compare_to = _text_list(_required(body, "compare_to"), "compare_to")
    resp = await _rerank(request, pb.RerankRequest(query=query, candidates=compare_to, normalize=True))
    return web.json_response({"object": "list", "data": list(resp.scores)})


# ---------------------------------------------------------------- Cohere / Jina: /v1/rerank


def _documents(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise BadRequest(f"documents must be a list of strings or {{'text': ...}} objects, got {_kind(value)}")
    if not value:
        raise BadRequest("documents is empty; send at least one document")
    texts = []
    for i, doc in enumerate(value):
        if isinstance(doc, dict):
            if "text" not in doc:
                raise BadRequest(f'documents[{i}] is an object without "text"')
            texts.append(_text(doc["text"], f"documents[{i}].text"))
        else:
            texts.append(_text(doc, f"documents[{i}]"))
    return texts


def _optional(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {str: "a string", int: "an integer", bool: "true or false"}[kind]
        raise BadRequest(f"{name} must be {expected}, got {_kind(value)}")
    return value


async def v1_rerank(request: web.Request) -> web.Response:
    """POST /v1/rerank: Cohere/Jina shape, best first, sigmoid scores unless raw_scores."""
    body = await _read_object(request)
    query = _text(_required(body, "query"), "query")
    documents = _documents(_required(body, "documents"))
    _optional(body, "model", str, "")  # one model per server: accepted and answered with the served one
    top_n = _optional(body, "top_n", int, 0)
    if top_n < 1 and "top_n" in body and body["top_n"] is not None:
        raise BadRequest(f"top_n must be at least 1, got {top_n}")
    return_documents = _optional(body, "return_documents", bool, False)
    raw_scores = _optional(body, "raw_scores", bool, False)
    req = pb.RerankRequest(
        query=query,
        candidates=documents,
        normalize=not raw_scores,
        top_n=top_n if top_n < len(documents) else 0,
        return_documents=return_documents,
    )
    resp = await _rerank(request, req)
    results = []
    for r in resp.results:
        item: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
        if return_documents:
            item["document"] = {"text": r.document}
        results.append(item)
    tokens = resp.usage.tokens
    return web.json_response(
        {
            "id": request.headers.get("x-request-id") or str(uuid.uuid4()),
            "model": resp.model,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


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
