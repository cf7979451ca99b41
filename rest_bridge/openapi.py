"""The OpenAPI 3 document served at /openapi.json (and shown by Swagger UI at /docs)."""

from __future__ import annotations

from typing import Any

# Mirrors the server's defaults (--max-candidates, --max-text-chars); a server may be set up differently.
MAX_ITEMS = 1000
MAX_TEXT = 20000


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT, "pattern": r"\S"}
NUMBERS = {"type": "array", "items": {"type": "number"}}

ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthenticated"},
    "403": {"$ref": "#/components/responses/PermissionDenied"},
    "413": {"$ref": "#/components/responses/TooLarge"},
    "429": {"$ref": "#/components/responses/Overloaded"},
    "502": {"$ref": "#/components/responses/UpstreamError"},
    "503": {"$ref": "#/components/responses/Unavailable"},
    "504": {"$ref": "#/components/responses/DeadlineExceeded"},
}

HEADERS = [
    {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[!-~]{1,64}$"},
        "description": "Forwarded to the gRPC server as `x-request-id` metadata (and used as /v1/rerank's id).",
    },
]


def _post(summary: str, description: str, request: str, response: str, ok: str, errors: dict[str, Any]) -> dict:
    return {
        "post": {
            "summary": summary,
            "description": description,
            "parameters": HEADERS,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {"200": _json(_ref(response), ok), **errors},
        }
    }


LEGACY_RERANK = _post(
    "Legacy 2 (fc3-bge-reranker-api): sigmoid scores",
    "Scores `query` against each of `compare_to`; `data` holds sigmoid scores in [0, 1], in input order.",
    "LegacyRerankRequest",
    "LegacyRerankResponse",
    "One score per `compare_to` text, input order.",
    ERRORS,
)

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Reranker REST bridge",
        "version": "1.0.0",
        "description": "JSON over HTTP in front of the `reranker.v1.Reranker` gRPC service: the two legacy "
        "services' endpoints and a Cohere/Jina-compatible `/v1/rerank`. Every route calls the same gRPC "
        "`Rerank`. An `Authorization` header is forwarded as gRPC metadata.",
    },
    "paths": {
        "/bge-reranker-base/post": _post(
            "Legacy 1 (bge-reranker-base-api): raw logits",
            "`text_pairs` is a Python-literal string of `[query, passage]` pairs (as the original took it) or a "
            "JSON list of them; the string is parsed strictly and never evaluated. Success: `code` 200 and "
            "raw logits in input order. A bad request answers HTTP 200 with the legacy failure envelope "
            '(`"code": -1`, `"rerank_scores": []`, `text_pairs` echoed as received) plus `error`; overload, '
            "an unreachable server, deadlines, authentication and oversize bodies keep the envelope with "
            "their HTTP status (429, 503, 504, 401/403, 413).",
            "LegacyPostRequest",
            "LegacyPostResponse",
            "Scored (`code` 200) or refused (`code` -1, `error` says why).",
            {
                k: _json(_ref("LegacyPostResponse"), "The legacy failure envelope.")
                for k in ("401", "403", "413", "429", "502", "503", "504")
            },
        ),
        "/rerank": LEGACY_RERANK,
        "/reank": LEGACY_RERANK,
        "/v1/rerank": _post(
            "Cohere/Jina-compatible rerank",
            "Results best first, cut to `top_n`. Scores are sigmoid in [0, 1] unless `raw_scores` is true. "
            '`documents` may be strings or `{"text": ...}` objects. `model` is accepted and ignored: the '
            "response names the model the server runs.",
            "V1RerankRequest",
            "V1RerankResponse",
            "Ranked results.",
            ERRORS,
        ),
        "/health": {
            "get": {
                "summary": "Health",
                "description": "200 only while the gRPC server reports SERVING for `reranker.v1.Reranker`.",
                "responses": {
                    "200": _json(_ref("Health"), "Serving."),
                    "503": _json(_ref("Health"), "Not serving: loading, stopping, or unreachable."),
                },
            }
        },
        "/": {
            "get": {
                "summary": "Redirect to /docs",
                "responses": {"302": {"description": "Redirect to the Swagger UI at /docs."}},
            }
        },
        "/docs": {
            "get": {
                "summary": "Swagger UI",
                "responses": {"200": {"description": "HTML page", "content": {"text/html": {"schema": {}}}}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "The OpenAPI 3 document.")},
            }
        },
    },
    "components": {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "status"],
                "properties": {
                    "error": {"type": "string", "description": "What was wrong, naming the field and limit."},
                    "status": {"type": "integer", "description": "The HTTP status again."},
                },
            },
            "LegacyPostRequest": {
                "type": "object",
                "required": ["text_pairs"],
                "properties": {
                    "text_pairs": {
                        "oneOf": [
                            {
                                "type": "string",
                                "description": "Python literal, e.g. \"[['what is panda?', 'hi']]\"",
                                "example": "[['what is panda?', 'hi'], ['what is panda?', 'A panda is a bear.']]",
                            },
                            {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": MAX_ITEMS,
                                "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": TEXT},
                            },
                        ]
                    }
                },
            },
            "LegacyPostResponse": {
                "type": "object",
                "required": ["text_pairs", "rerank_scores", "code"],
                "properties": {
                    "text_pairs": {"description": "The parsed pairs; on failure, the input as received."},
                    "rerank_scores": {**NUMBERS, "description": "Raw logits, input order; empty on failure."},
                    "request_time": {"type": "string", "example": "2023-12-22 17:07:54"},
                    "response_time": {"type": "string", "example": "2023-12-22 17:07:54"},
                    "code": {"type": "integer", "enum": [200, -1]},
                    "error": {"type": "string", "description": "Only when code is -1: what was wrong."},
                },
            },
            "LegacyRerankRequest": {
                "type": "object",
                "required": ["query", "compare_to"],
                "properties": {
                    "query": {**TEXT, "example": "什么是函数计算"},
                    "compare_to": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_ITEMS,
                        "items": TEXT,
                        "example": ["你好", "函数计算是阿里云Serverless计算服务，提供专业的Serverless架构服务托管"],
                    },
                },
            },
            "LegacyRerankResponse": {
                "type": "object",
                "required": ["object", "data"],
                "properties": {"object": {"type": "string", "enum": ["list"]}, "data": NUMBERS},
            },
            "V1RerankRequest": {
                "type": "object",
                "required": ["query", "documents"],
                "properties": {
                    "model": {"type": "string", "nullable": True},
                    "query": {**TEXT, "example": "what is panda?"},
                    "documents": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_ITEMS,
                        "items": {
                            "oneOf": [
                                TEXT,
                                {"type": "object", "required": ["text"], "properties": {"text": TEXT}},
                            ]
                        },
                        "example": ["hi", "The giant panda is a bear species endemic to China."],
                    },
                    "top_n": {"type": "integer", "minimum": 1, "nullable": True},
                    "return_documents": {"type": "boolean", "default": False, "nullable": True},
                    "raw_scores": {
                        "type": "boolean",
                        "default": False,
                        "nullable": True,
                        "description": "Raw logits instead of sigmoid scores.",
                    },
                },
            },
            "V1RerankResponse": {
                "type": "object",
                "required": ["id", "model", "results", "usage"],
                "properties": {
                    "id": {"type": "string"},
                    "model": {"type": "string"},
                    "results": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["index", "relevance_score"],
                            "properties": {
                                "index": {"type": "integer", "minimum": 0},
                                "relevance_score": {"type": "number"},
                                "document": {
                                    "type": "object",
                                    "required": ["text"],
                                    "properties": {"text": {"type": "string"}},
                                },
                            },
                        },
                    },
                    "usage": {
                        "type": "object",
                        "required": ["prompt_tokens", "total_tokens"],
                        "properties": {
                            "prompt_tokens": {"type": "integer", "minimum": 0},
                            "total_tokens": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
            "Health": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"type": "string", "example": "SERVING"},
                    "error": {"type": "string"},
                },
            },
        },
        "responses": {
            name: _json(_ref("Error"), description)
            for name, description in {
                "BadRequest": "Malformed JSON, a wrong type, or a rule broken (INVALID_ARGUMENT); names the problem.",
                "Unauthenticated": "The gRPC server wants an API key (UNAUTHENTICATED).",
                "PermissionDenied": "The API key was refused (PERMISSION_DENIED).",
                "TooLarge": "The body is larger than --max-body-bytes.",
                "Overloaded": "The server's queue is full (RESOURCE_EXHAUSTED): back off and retry.",
                "UpstreamError": "Any other gRPC failure.",
                "Unavailable": "The gRPC server cannot be reached or is not ready (UNAVAILABLE).",
                "DeadlineExceeded": "No answer within the deadline (DEADLINE_EXCEEDED).",
            }.items()
        },
    },
}
