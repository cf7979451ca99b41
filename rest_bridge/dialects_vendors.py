"""Voyage, Mixedbread and NVIDIA NIM: thin mappings onto the contract, each with its own answer and error body."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from reranker_proto import reranker_pb2 as pb
from rest_bridge.config import BridgeConfig
from rest_bridge.dialects import Dialect, _top_n, _usage, body_model
from rest_bridge.models_vendors import (
    MixedbreadRerankRequest,
    MixedbreadRerankResponse,
    MixedbreadResult,
    NimRankingRequest,
    NimRankingResponse,
    VoyageRerankRequest,
    VoyageRerankResponse,
    VoyageResult,
)
from rest_bridge.truncation import REFUSE, TRUNCATE


def detail_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """Voyage's and Mixedbread's error body, {"detail": ...}, what the voyageai SDK reads."""
    return status, {"detail": message}


def nim_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": message}


# ---------------------------------------------------------------- Voyage


def _voyage_request(req: VoyageRerankRequest, config: BridgeConfig) -> pb.RerankRequest:
    fit = TRUNCATE if req.truncation else REFUSE
    return fit.to(
        pb.RerankRequest(
            query=req.query, candidates=req.documents, normalize=True, top_n=_top_n(req.top_k, len(req.documents))
        )
    )


def _voyage_answer(req: VoyageRerankRequest, resp: pb.RerankResponse, request_id: str) -> VoyageRerankResponse:
    data: list[VoyageResult] = []
    for r in resp.results:
        item: VoyageResult = {"index": r.index, "relevance_score": r.score}
        if req.return_documents:
            item["document"] = req.documents[r.index]
        data.append(item)
    return {"object": "list", "data": data, "model": resp.model, "usage": {"total_tokens": resp.usage.tokens}}


def _voyage_too_long(req: VoyageRerankRequest, index: int, limit: int) -> tuple[int, str]:
    return 400, (
        f"The query and the document at index {index} together exceed the context length of {limit} tokens; "
        "set truncation to true to cut them"
    )


VOYAGE = Dialect(
    "Voyage",
    VoyageRerankRequest,
    _voyage_request,
    _voyage_answer,
    body_model,
    home="/voyage/v1/rerank",
    error=detail_error,
    too_long=_voyage_too_long,
)


# ---------------------------------------------------------------- Mixedbread


def _mixedbread_request(req: MixedbreadRerankRequest, config: BridgeConfig) -> pb.RerankRequest:
    texts = req.texts()  # Mixedbread truncates what does not fit
    return pb.RerankRequest(query=req.query, candidates=texts, normalize=True, top_n=_top_n(req.top_k, len(texts)))


def _mixedbread_answer(
    req: MixedbreadRerankRequest, resp: pb.RerankResponse, request_id: str
) -> MixedbreadRerankResponse:
    data: list[MixedbreadResult] = []
    for r in resp.results:
        item: MixedbreadResult = {"index": r.index, "score": r.score, "object": "rank_result"}
        if req.return_input:
            item["input"] = req.input[r.index]
        data.append(item)
    return {
        "usage": _usage(resp),
        "model": resp.model,
        "data": data,
        "object": "list",
        "top_k": req.top_k or len(req.input),
        "return_input": req.return_input,
    }


MIXEDBREAD = Dialect(
    "Mixedbread",
    MixedbreadRerankRequest,
    _mixedbread_request,
    _mixedbread_answer,
    body_model,
    home="/v1/reranking",
    error=detail_error,
)


# ---------------------------------------------------------------- NVIDIA NIM


def _nim_request(req: NimRankingRequest, config: BridgeConfig) -> pb.RerankRequest:
    fit = TRUNCATE if req.truncate == "END" else REFUSE
    passages = [p["text"] for p in req.passages]
    return fit.to(pb.RerankRequest(query=req.query["text"], candidates=passages, normalize=False))


def _nim_answer(req: NimRankingRequest, resp: pb.RerankResponse, request_id: str) -> NimRankingResponse:
    return {
        "rankings": [{"index": r.index, "logit": r.score} for r in resp.results],
        "usage": _usage(resp),
    }


def _nim_too_long(req: NimRankingRequest, index: int, limit: int) -> tuple[int, str]:
    return 400, (
        f"passages[{index}] exceeds the maximum token length of {limit} together with the query; send "
        '"truncate": "END" to cut it'
    )


NIM = Dialect(
    "NVIDIA NIM",
    NimRankingRequest,
    _nim_request,
    _nim_answer,
    body_model,
    home="/v1/ranking",
    error=nim_error,
    too_long=_nim_too_long,
)
