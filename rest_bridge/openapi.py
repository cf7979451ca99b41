"""The OpenAPI 3.0 document served at /openapi.json (and shown by Swagger UI at /docs).

Every schema comes from the declarations in rest_bridge/models.py; this module only lays out the paths and
turns pydantic's JSON Schema (2020-12) into OpenAPI 3.0's dialect, which the bundled Swagger UI 4 reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

from pydantic import TypeAdapter

from rest_bridge import models as m
from rest_bridge import models_vendors as mo
from rest_bridge import models_vllm as mv
from rest_bridge.dialects import COHERE_V1, COHERE_V2, INFINITY, LEGACY_1, LEGACY_2, TEI
from rest_bridge.dialects_vendors import MIXEDBREAD, NIM, VOYAGE
from rest_bridge.dialects_vllm import VLLM_RERANK, VLLM_SCORE
from rest_bridge.recognise import RERANK_LISTS, V1_RERANK, V2_RERANK, rerank_candidates
from rest_bridge.routes import RERANK, ROUTES, Route
from server import __version__

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
    "401": "The server has an API key and the request sent none, or a wrong one: send `Authorization: Bearer <key>`.",
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


# Swagger UI groups operations by tag: one per dialect, named by its Dialect's name, plus the operational routes.
OPERATIONS_TAG = "operations"
TAGS = {
    LEGACY_1: "bge-reranker-base-api's `POST /bge-reranker-base/post`, unchanged.",
    LEGACY_2.name: "fc3-bge-reranker-api's `POST /rerank` `{query, compare_to}` (its README spells it `/reank`).",
    TEI.name: "Text Embeddings Inference: `POST /rerank` `{query, texts}`, `GET /info`.",
    INFINITY.name: "Infinity: `POST /rerank` `{query, documents}`, `GET /models`.",
    COHERE_V1.name: "Cohere's v1 rerank, also Jina's shape.",
    COHERE_V2.name: "Cohere's v2 rerank.",
    VLLM_RERANK.name: "vLLM's rerank API: `/rerank`, `/v1/rerank`, `/v2/rerank` (told by its fields) and `/vllm/...`.",
    VLLM_SCORE.name: "vLLM's score API: `/score`, `/v1/score` and `/vllm/...`.",
    VOYAGE.name: "Voyage AI's rerank: `/v1/rerank`, `/rerank` (told by `top_k` or `truncation`), `/voyage/v1/rerank`.",
    MIXEDBREAD.name: "Mixedbread's `POST /v1/reranking`.",
    NIM.name: "NVIDIA's reranking NIM: `POST /v1/ranking` and `/v1/retrieval/{model}/reranking`.",
    OPERATIONS_TAG: "Health, the model list, this page. Health and the pages need no API key.",
}
NO_KEY: list[dict[str, list[str]]] = []  # an operation's `security` when the API key does not apply


def _post(
    summary: str,
    description: str,
    request: str,
    response: str,
    error: str,
    tags: Sequence[str] = (),
    params: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    errors = {status: _json(error, text) for status, text in ERRORS.items()}
    if error == "LegacyPostResponse":  # legacy 1 answers a bad request with HTTP 200 and its envelope
        del errors["400"]
    return {
        "post": {
            "tags": list(tags),
            "summary": summary,
            "description": description,
            "parameters": [*params, *HEADERS],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {"200": _json(response, "Scored."), **errors},
        }
    }


def _get(
    summary: str, response: str, description: str, tags: Sequence[str] = (OPERATIONS_TAG,), **others: dict[str, Any]
) -> dict[str, Any]:
    return {
        "get": {"tags": list(tags), "summary": summary, "responses": {"200": _json(response, description), **others}}
    }


def _legacy_spelling(item: dict[str, Any], of: str, by: str, tag: str) -> dict[str, Any]:
    """`item` (a path's operations) again under a legacy path: deprecated, under `tag`, pointing at the path to use."""
    marked = {}
    for method, op in item.items():
        note = f"**Legacy spelling** of `{method.upper()} {of}`, kept for {by}; new callers use `{of}`."
        summary = f"Legacy spelling of {of}: {op['summary']}"
        marked[method] = {**op, "summary": summary, "description": f"{note}\n\n{op['description']}"}
        marked[method] |= {"tags": [tag], "deprecated": True}
    return marked


MODEL_IN_PATH = {"name": "model", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}


def _route(route: Route) -> dict[str, Any]:
    """A rerank or score route's operation, from its dialects' declared schemas."""
    if route.dialects in SHARED:
        prefix = SHARED[route.dialects]
        request, response, error = prefix + "Request", prefix + "Response", prefix + "Error"
    else:
        request, response, error = DIALECT_SCHEMAS[route.dialects[0].name]
    params = [MODEL_IN_PATH] if "{model}" in route.path else []
    # Swagger UI shows an operation under each of its tags: a shared path goes under its default dialect(s) only
    # (/rerank: one per list key), the others it carries are named in its description and have paths of their own.
    defaults = [group[0] for group in RERANK_LISTS.values()] if route.pick is rerank_candidates else route.dialects[:1]
    tags = [d.name for d in defaults]
    item = _post(route.summary, route.description, request, response, error, tags, params)
    if route.path == "/reank":
        return _legacy_spelling(
            item, "/rerank", "fc3-bge-reranker-api's callers (its README spells it so)", LEGACY_2.name
        )
    return item


UPSTREAM_ERRORS = {status: _json("Error", ERRORS[status]) for status in ("401", "403", "502", "503", "504")}


def _models(tags: Sequence[str]) -> dict[str, Any]:
    return _get(
        "The loaded models (OpenAI/Infinity list shape); the first is the server's default",
        "ModelList",
        "From the gRPC GetModelInfo.",
        tags,
        **UPSTREAM_ERRORS,
    )


DESCRIPTION = (
    "JSON over HTTP in front of the `reranker.v1.Reranker` gRPC service: the two legacy services' endpoints, TEI's "
    "and Infinity's `/rerank`, Cohere's `/v1/rerank` (also Jina's) and `/v2/rerank`, vLLM's rerank and score APIs, "
    "Voyage's, Mixedbread's and NVIDIA NIM's rerank. Shared paths tell dialects apart by the body; every dialect "
    "also has a path of its own. Every route calls the same gRPC `Rerank`.\n\n"
    "**API key.** When the server runs with `--api-key` (`RERANKER_API_KEY`), every route but `/health` and these "
    "pages needs the header `Authorization: Bearer <key>` (the **Authorize** button sends it from this page); the "
    "bridge forwards it to the gRPC server as metadata. Without a key, any value or none works."
)

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Reranker REST bridge", "version": __version__, "description": DESCRIPTION},
    "security": [{"bearer": []}],
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
            tags=(LEGACY_1,),
        ),
        **{route.path: _route(route) for route in ROUTES},
        "/v1/models": _models((OPERATIONS_TAG,)),
        "/models": _models((INFINITY.name,)),
        "/info": _get(
            "The served model and limits, in TEI's shape",
            "TeiInfo",
            "From the gRPC GetModelInfo.",
            (TEI.name,),
            **UPSTREAM_ERRORS,
        ),
        "/health": _get(
            "Health: 200 only while the gRPC server reports SERVING for `reranker.v1.Reranker`",
            "Health",
            "Serving.",
            **{"503": _json("Health", "Not serving: loading, stopping, or unreachable.")},
        ),
        "/": {
            "get": {
                "tags": [OPERATIONS_TAG],
                "summary": "Redirect to /docs",
                "responses": {"302": {"description": "Redirect to the Swagger UI at /docs."}},
            }
        },
        "/docs": {
            "get": {
                "tags": [OPERATIONS_TAG],
                "summary": "Swagger UI",
                "responses": {"200": {"description": "HTML page", "content": {"text/html": {}}}},
            }
        },
        "/openapi.json": _get("This document", "OpenApiDocument", "The OpenAPI 3 document."),
    },
    "components": {
        "schemas": _components(),
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The server's API key (`--api-key`, `RERANKER_API_KEY`), sent as `Authorization: "
                "Bearer <key>`. Needed only when the server has one.",
            }
        },
    },
}
for _path in ("/health", "/", "/docs", "/openapi.json"):  # what the server's API key never guards
    for _op in OPENAPI["paths"][_path].values():
        _op["security"] = NO_KEY
_used = [tag for item in OPENAPI["paths"].values() for op in item.values() for tag in op.get("tags", ())]
OPENAPI["tags"] = [{"name": t, "description": TAGS.get(t, "")} for t in dict.fromkeys(_used)]
# One dialect per route, where a route has one: what its requests are counted under before the body says more.
ROUTE_DIALECTS = {
    path: op["tags"][0]
    for path, item in OPENAPI["paths"].items()
    for op in item.values()
    if len(op["tags"]) == 1 and op["tags"] != [OPERATIONS_TAG]
} | {route.path: route.dialects[0].name for route in ROUTES if route.pick is None}  # a shared path's default


def document(models: Sequence[str]) -> dict[str, Any]:
    """OPENAPI with the loaded models (one line each, from GetModelInfo) added to its description."""
    if not models:
        served = "**Models:** not known yet (the gRPC server is loading or cannot be reached; reload this page)."
    else:
        served = "**Models** (the first is the default):\n" + "\n".join(f"- {line}" for line in models)
    return {**OPENAPI, "info": {**OPENAPI["info"], "description": f"{DESCRIPTION}\n\n{served}"}}
