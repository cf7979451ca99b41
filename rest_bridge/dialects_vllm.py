"""vLLM's rerank API (/rerank, /v1/rerank, /v2/rerank) and score API (/score, /v1/score): thin mappings onto the
contract, with vLLM's truncation rules and error body.
"""

from __future__ import annotations

import time
from dataclasses import replace
from http import HTTPStatus
from typing import Any

from reranker_proto import reranker_pb2 as pb
from rest_bridge.config import BridgeConfig
from rest_bridge.dialects import Dialect, _top_n, _usage, body_model, doc_tokens_fit
from rest_bridge.errors import BadRequest
from rest_bridge.models_vllm import (
    VllmRerankRequest,
    VllmRerankResponse,
    VllmRerankResult,
    VllmScoreRequest,
    VllmScoreResponse,
    _VllmRequest,
)
from rest_bridge.truncation import REFUSE, Fit, best_window, truncate

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 422: "UnprocessableEntityError", 500: "InternalServerError"}


def vllm_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """vLLM's ErrorResponse: {"error": {message, type, param, code}}."""
    kind = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
    return status, {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _fit(req: _VllmRequest) -> Fit:
    if req.max_chunks_per_doc is not None:
        fit = best_window(req.max_chunks_per_doc)
    elif req.truncate_prompt_tokens is None:
        fit = REFUSE  # vLLM refuses a prompt longer than the model's context
    else:  # -1: the model's own limit, which max_length 0 means on the wire
        fit = truncate(req.truncation_side == "left", max(req.truncate_prompt_tokens, 0))
    return replace(fit, query_max_length=req.max_tokens_per_query)


def _limits(req: _VllmRequest, limit: int) -> None:
    asked = req.truncate_prompt_tokens
    if asked == 0:
        raise BadRequest("truncate_prompt_tokens must be -1 (the model's limit) or at least 1, got 0")
    if asked is not None and asked > limit:
        raise BadRequest(
            f"truncate_prompt_tokens value ({asked}) is greater than max_model_len ({limit}). "
            "Please, select a smaller truncation size."
        )
    pair = asked if asked and asked > 0 else limit
    if req.max_tokens_per_query >= pair:
        raise BadRequest(
            f"max_tokens_per_query ({req.max_tokens_per_query}) must be less than the pair limit ({pair} tokens, "
            "truncate_prompt_tokens or max_model_len): the document needs room beside the query"
        )
    doc_tokens_fit("max_tokens_per_doc", req.max_tokens_per_doc, pair)


def _too_long(what: str) -> Any:
    def message(req: _VllmRequest, index: int, limit: int) -> tuple[int, str]:
        return 400, (
            f"{what}[{index}] does not fit beside the query in this model's maximum context length of {limit} "
            "tokens; send truncate_prompt_tokens (-1 cuts at the model's limit) or max_chunks_per_doc (its best "
            "window scores)"
        )

    return message


def _grpc(req: _VllmRequest, **fields: Any) -> pb.RerankRequest:
    return _fit(req).to(
        pb.RerankRequest(
            normalize=req.use_activation is not False,
            instruction=req.instruction_text(),
            request_id=req.request_id or "",
            **fields,
        )
    )


# ---------------------------------------------------------------- rerank


def _rerank_request(req: VllmRerankRequest, config: BridgeConfig) -> pb.RerankRequest:
    return _grpc(req, query=req.query, candidates=req.documents, top_n=_top_n(req.top_n or None, len(req.documents)))


def _rerank_answer(req: VllmRerankRequest, resp: pb.RerankResponse, request_id: str) -> VllmRerankResponse:
    results: list[VllmRerankResult] = []
    for r in resp.results:
        if req.return_documents:
            results.append({"index": r.index, "document": {"text": req.documents[r.index]}, "relevance_score": r.score})
        else:
            results.append({"index": r.index, "relevance_score": r.score})
    return {"id": req.request_id or request_id, "model": resp.model, "usage": _usage(resp), "results": results}


VLLM_RERANK = Dialect(
    "vLLM rerank",
    VllmRerankRequest,
    _rerank_request,
    _rerank_answer,
    body_model,
    home="/vllm/v1/rerank",
    error=vllm_error,
    too_long=_too_long("documents"),
    limits=_limits,
)


# ---------------------------------------------------------------- score


def _score_request(req: VllmScoreRequest, config: BridgeConfig) -> pb.RerankRequest:
    first, second = req.sides()
    if len(first) == 1:  # 1:N
        return _grpc(req, query=first[0], candidates=second)
    return _grpc(req, pairs=[pb.Pair(query=q, passage=p) for q, p in zip(first, second, strict=True)])


def _score_answer(req: VllmScoreRequest, resp: pb.RerankResponse, request_id: str) -> VllmScoreResponse:
    return {
        "id": req.request_id or request_id,
        "object": "list",
        "created": int(time.time()),
        "model": resp.model,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(resp.scores)],
        "usage": {**_usage(resp), "completion_tokens": 0},  # type: ignore[typeddict-item]
    }


def _score_too_long(req: VllmScoreRequest, index: int, limit: int) -> tuple[int, str]:
    return _too_long(req.pair()[1])(req, index, limit)


VLLM_SCORE = Dialect(
    "vLLM score",
    VllmScoreRequest,
    _score_request,
    _score_answer,
    body_model,
    home="/vllm/score",
    error=vllm_error,
    too_long=_score_too_long,
    limits=_limits,
)
