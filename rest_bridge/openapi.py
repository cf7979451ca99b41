"""The OpenAPI 3.0 document served at /openapi.json (and shown by Swagger UI at /docs).

Every schema comes from the declarations in rest_bridge/models.py; this module only lays out the paths and
turns pydantic's JSON Schema (2020-12) into OpenAPI 3.0's dialect, which the bundled Swagger UI 4 reads.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import TypeAdapter

from rest_bridge import models as m
from rest_bridge import models_vendors as mo
from rest_bridge import models_vllm as mv
from rest_bridge.recognise import V1_RERANK, V2_RERANK
from rest_bridge.routes import RERANK, ROUTES, Route

_REF = "#/components/schemas/{model}"

# Each dialect's request, answer and error body, named once as components.
DIALECT_SCHEMAS: dict[str, tuple[str, str, str]] = {
    "legacy 2": ("LegacyRerankRequest", "LegacyRerankResponse", "Error"),
    "TEI": ("TeiRerankRequest", "TeiRerankResponse", "Error"),
    "Infinity": ("InfinityRerankRequest", "InfinityRerankResponse", "Error"),
    "Cohere v1": ("CohereV1RerankRequest", "CohereV1RerankResponse", "CohereError"),
    "Cohere v2": ("CohereV2RerankRequest", "CohereV2RerankResponse", "CohereError"),
    "vLLM rerank": ("VllmRerankRequest", "VllmRerankResponse", "VllmError"),
    "vLLM score": ("VllmScoreRequest", "VllmScoreResponse", "VllmError"),
    "Voyage": ("VoyageRerankRequest", "VoyageRerankResponse", "DetailError"),
    "Mixedbread": ("MixedbreadRerankRequest", "MixedbreadRerankResponse", "DetailError"),
    "NVIDIA NIM": ("NimRankingRequest", "NimRankingResponse", "NimError"),
}
# A shared path's union components: "Rerank" -> RerankRequest, RerankResponse, RerankError.
SHARED = {RERANK.dialects: "Rerank", V1_RERANK: "V1Rerank", V2_RERANK: "V2Rerank"}


def _declared(name: str) -> Any:
    if name == "TeiRerankResponse":
        return list[m.TeiRank]
    return next(getattr(module, name) for module in (m, mv, mo) if hasattr(module, name))


_TYPES = {name: _declared(name) for triple in DIALECT_SCHEMAS.values() for name in triple}


def _union(names: list[str]) -> Any:
    types = [_TYPES[n] for n in dict.fromkeys(names)]
    return types[0] if len(types) == 1 else Union[tuple(types)]  # noqa: UP007 (a runtime union of types)


def _shared_schemas() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dialects, prefix in SHARED.items():
        for i, suffix in enumerate(("Request", "Response", "Error")):
            out[prefix + suffix] = _union([DIALECT_SCHEMAS[d.name][i] for d in dialects])
    return out


# Component name -> the declared type (TypedDicts and lists are schemas too, so TypeAdapter for all).
SCHEMAS: dict[str, Any] = {
    "LegacyPostRequest": m.LegacyPostRequest,
    "LegacyPostResponse": m.LegacyPostResponse,
    **_TYPES,
    **_shared_schemas(),
    "TeiInfo": m.TeiInfo,
    "ModelList": m.ModelList,
    "Health": m.Health,
    "OpenApiDocument": dict[str, Any],
}


def _openapi30(node: Any) -> Any:
    """JSON Schema 2020-12 as pydantic writes it -> the OpenAPI 3.0 schema dialect."""
    if isinstance(node, list):
        return [_openapi30(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _openapi30(v) for k, v in node.items()}
    variants = node.get("anyOf")
    if variants and {"type": "null"} in variants:  # Optional[X] -> X, nullable
        rest = [v for v in variants if v != {"type": "null"}]
        del node["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            node = {**rest[0], **node}
        else:
            node["anyOf" if len(rest) > 1 else "allOf"] = rest
        node["nullable"] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "prefixItems" in node:  # fixed-length tuples: 3.0 knows only one schema for all items
        items = node.pop("prefixItems")
        node["items"] = items[0] if all(i == items[0] for i in items) else {"anyOf": items}
    if isinstance(node.get("examples"), list) and node["examples"]:
        node["example"] = node.pop("examples")[0]
    return node


def _components() -> dict[str, Any]:
    inputs = [(name, "validation", TypeAdapter(t)) for name, t in SCHEMAS.items()]
    tops, defs = TypeAdapter.json_schemas(inputs, ref_template=_REF)
    schemas = dict(defs.get("$defs", {}))
    for (name, _), schema in tops.items():
        if schema.get("$ref") != _REF.format(model=name):
            schemas[name] = schema
    return {name: _openapi30(schema) for name, schema in sorted(schemas.items())}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


ERRORS = {
    "400": "Malformed JSON, a wrong type, or a rule broken (INVALID_ARGUMENT); names the field and the limit.",
    "401": "The gRPC server wants an API key (UNAUTHENTICATED).",
    "403": "The API key was refused (PERMISSION_DENIED).",
    "413": "The body is larger than --max-body-bytes.",
    "404": "The body names a model the server does not serve (several loaded); the message lists them.",
    "429": "The server's queue is full (RESOURCE_EXHAUSTED): back off and retry.",
    "502": "Any other gRPC failure.",
    "503": "The gRPC server cannot be reached or is not ready (UNAVAILABLE).",
    "504": "No answer within the bridge's deadline (RERANKER_REST_DEADLINE_S).",
}
HEADERS = [
    {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[!-~]{1,64}$"},
        "description": "Forwarded to the gRPC server as `x-request-id` metadata (and used as the answer's id).",
    },
]


def _post(
    summary: str, description: str, request: str, response: str, error: str, params: list[Any] | None = None
) -> dict[str, Any]:
    errors = {status: _json(error, text) for status, text in ERRORS.items()}
    if error == "LegacyPostResponse":  # legacy 1 answers a bad request with HTTP 200 and its envelope
        del errors["400"]
    return {
        "post": {
            "summary": summary,
            "description": description,
            "parameters": (params or []) + HEADERS,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {"200": _json(response, "Scored."), **errors},
        }
    }


def _get(summary: str, response: str, description: str, **others: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": _json(response, description), **others}}}


MODEL_IN_PATH = {"name": "model", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}


def _route(route: Route) -> dict[str, Any]:
    """A rerank or score route's operation, from its dialects' declared schemas."""
    if route.dialects in SHARED:
        prefix = SHARED[route.dialects]
        request, response, error = prefix + "Request", prefix + "Response", prefix + "Error"
    else:
        request, response, error = DIALECT_SCHEMAS[route.dialects[0].name]
    params = [MODEL_IN_PATH] if "{model}" in route.path else None
    return _post(route.summary, route.description, request, response, error, params)


MODELS = _get(
    "The loaded models (OpenAI/Infinity list shape); the first is the server's default",
    "ModelList",
    "From the gRPC GetModelInfo.",
    **{status: _json("Error", ERRORS[status]) for status in ("401", "403", "502", "503", "504")},
)

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Reranker REST bridge",
        "version": "1.1.0",
        "description": "JSON over HTTP in front of the `reranker.v1.Reranker` gRPC service: the two legacy "
        "services' endpoints, TEI's and Infinity's `/rerank`, Cohere's `/v1/rerank` (also Jina's) and "
        "`/v2/rerank`. Every route calls the same gRPC `Rerank`. An `Authorization` header is forwarded as "
        "gRPC metadata.",
    },
    "paths": {
        "/bge-reranker-base/post": _post(
            "Legacy 1 (bge-reranker-base-api): raw logits",
            "`text_pairs` is a Python-literal string of `[query, passage]` pairs (as the original took it) or a "
            "JSON list of them; the string is parsed strictly and never evaluated. Success: `code` 200 and "
            "raw logits in input order. A bad request answers HTTP 200 with the legacy failure envelope "
            '(`"code": -1`, `"rerank_scores": []`, `text_pairs` echoed as received) plus `error`; overload, '
            "an unreachable server, deadlines, authentication and oversize bodies keep the envelope with "
            "their HTTP status.",
            "LegacyPostRequest",
            "LegacyPostResponse",
            "LegacyPostResponse",
        ),
        **{route.path: _route(route) for route in ROUTES},
        "/v1/models": MODELS,
        "/models": MODELS,
        "/info": _get(
            "The served model and limits, in TEI's shape",
            "TeiInfo",
            "From the gRPC GetModelInfo.",
            **{status: _json("Error", ERRORS[status]) for status in ("401", "403", "502", "503", "504")},
        ),
        "/health": _get(
            "Health: 200 only while the gRPC server reports SERVING for `reranker.v1.Reranker`",
            "Health",
            "Serving.",
            **{"503": _json("Health", "Not serving: loading, stopping, or unreachable.")},
        ),
        "/": {
            "get": {
                "summary": "Redirect to /docs",
                "responses": {"302": {"description": "Redirect to the Swagger UI at /docs."}},
            }
        },
        "/docs": {
            "get": {
                "summary": "Swagger UI",
                "responses": {"200": {"description": "HTML page", "content": {"text/html": {}}}},
            }
        },
        "/openapi.json": _get("This document", "OpenApiDocument", "The OpenAPI 3 document."),
    },
    "components": {"schemas": _components()},
}
