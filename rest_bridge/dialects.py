"""The rerank dialects: each one's request model, its gRPC RerankRequest, and its answer from the RerankResponse.

Pure translations, no I/O. Which dialect a body speaks on a shared path is rest_bridge/recognise.py's business.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from reranker_proto import reranker_pb2 as pb
from rest_bridge.config import BridgeConfig
from rest_bridge.errors import BadRequest, ErrorShape, cohere_error, generic_error
from rest_bridge.models import (
    CohereMeta,
    CohereV1RerankRequest,
    CohereV1RerankResponse,
    CohereV1Result,
    CohereV2RerankRequest,
    CohereV2RerankResponse,
    CohereV2Result,
    InfinityRerankRequest,
    InfinityRerankResponse,
    LegacyRerankRequest,
    LegacyRerankResponse,
    TeiRank,
    TeiRerankRequest,
    Usage,
)
from rest_bridge.truncation import REFUSE, best_window, truncate

R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class Dialect(Generic[R]):
    name: str
    model: type[R]
    request: Callable[[R, BridgeConfig], pb.RerankRequest]
    answer: Callable[[R, pb.RerankResponse, str], Any]  # (parsed request, gRPC response, request id) -> JSON
    asked_model: Callable[[R], str] = lambda req: ""  # the model the body names; "" = none
    pinned_model: str = ""  # or: the BridgeConfig field that chooses the model for every call of this dialect
    home: str = ""  # the path that always selects this dialect
    error: ErrorShape = generic_error  # its errors' HTTP status and body
    # A passage refused for not fitting beside the query: (request, its index, the pair limit) -> (status, message).
    too_long: Callable[[R, int, int], tuple[int, str]] | None = None
    # Rules that need the model's pair limit (max_length): (request, limit) -> None, or BadRequest naming the rule.
    limits: Callable[[R, int], None] | None = None

    @cached_property  # a frozen dataclass still takes it: cached_property writes the instance's __dict__
    def vocabulary(self) -> frozenset[str]:
        """The body fields this dialect reads (accepted ones with no effect included)."""
        return frozenset(self.model.model_fields)


def body_model(req: Any) -> str:
    """The model a body's `model` field names ("" when absent): the `asked_model` of most dialects."""
    return req.model or ""


def _top_n(top_n: int | None, count: int) -> int:
    return top_n if top_n is not None and top_n < count else 0  # 0: all (a huge top_n too)


def _usage(resp: pb.RerankResponse) -> Usage:
    return {"prompt_tokens": resp.usage.tokens, "total_tokens": resp.usage.tokens}


def _meta(resp: pb.RerankResponse, version: str) -> CohereMeta:
    # Cohere bills a search unit per 100 documents, each chunk of a long one counted as a document.
    windows = resp.usage.windows or resp.usage.pairs
    return {"api_version": {"version": version}, "billed_units": {"search_units": max(1, math.ceil(windows / 100))}}


LEGACY_1 = "legacy 1"  # bge-reranker-base-api: its text_pairs and envelope have a handler of their own


# ---------------------------------------------------------------- legacy 2: {query, compare_to}


def _legacy_request(req: LegacyRerankRequest, config: BridgeConfig) -> pb.RerankRequest:
    return pb.RerankRequest(query=req.query, candidates=req.compare_to, normalize=True)


def _legacy_answer(req: LegacyRerankRequest, resp: pb.RerankResponse, request_id: str) -> LegacyRerankResponse:
    return {"object": "list", "data": list(resp.scores)}


LEGACY_2 = Dialect(
    "legacy 2",
    LegacyRerankRequest,
    _legacy_request,
    _legacy_answer,
    pinned_model="legacy2_model",
    home="/legacy2/rerank",
)


# ---------------------------------------------------------------- TEI: {query, texts}


def _tei_request(req: TeiRerankRequest, config: BridgeConfig) -> pb.RerankRequest:
    if req.max_chunks_per_doc is not None:
        if req.truncate:
            raise BadRequest("truncate: true cuts a long text, max_chunks_per_doc scores its windows: send one of them")
        fit = best_window(req.max_chunks_per_doc)
    elif config.auto_truncate if req.truncate is None else req.truncate:
        fit = truncate(left=req.truncation_direction.lower() == "left")
    else:
        fit = REFUSE  # TEI answers 413 for a text longer than its max_input_length
    return fit.to(pb.RerankRequest(query=req.query, candidates=req.texts, normalize=not req.raw_scores))


def _tei_answer(req: TeiRerankRequest, resp: pb.RerankResponse, request_id: str) -> list[TeiRank]:
    if req.return_text:
        return [{"index": r.index, "score": r.score, "text": req.texts[r.index]} for r in resp.results]
    return [{"index": r.index, "score": r.score} for r in resp.results]


def _tei_too_long(req: TeiRerankRequest, index: int, limit: int) -> tuple[int, str]:
    return 413, (
        f"Input validation error: texts[{index}] does not fit beside the query in {limit} tokens (max_input_length); "
        "send truncate: true to cut it, or max_chunks_per_doc to score it by its best window"
    )


TEI = Dialect("TEI", TeiRerankRequest, _tei_request, _tei_answer, home="/tei/rerank", too_long=_tei_too_long)


# ---------------------------------------------------------------- Infinity: {query, documents}


def _infinity_request(req: InfinityRerankRequest, config: BridgeConfig) -> pb.RerankRequest:
    return pb.RerankRequest(
        query=req.query,
        candidates=req.documents,
        normalize=not req.raw_scores,
        top_n=_top_n(req.top_n, len(req.documents)),
    )


def _infinity_answer(req: InfinityRerankRequest, resp: pb.RerankResponse, request_id: str) -> InfinityRerankResponse:
    docs = req.documents if req.return_documents else None
    return {
        "object": "rerank",
        "results": [
            {"relevance_score": r.score, "index": r.index, "document": docs[r.index] if docs else None}
            for r in resp.results
        ],
        "model": resp.model,
        "usage": _usage(resp),
        "id": request_id,
        "created": int(time.time()),
    }


def _infinity_model(req: InfinityRerankRequest) -> str:
    return "" if req.model == "default/not-specified" else req.model  # Infinity's placeholder: none named


INFINITY = Dialect(
    "Infinity", InfinityRerankRequest, _infinity_request, _infinity_answer, _infinity_model, home="/infinity/rerank"
)


# ---------------------------------------------------------------- Cohere v1 (and Jina): /v1/rerank


def _v1_request(req: CohereV1RerankRequest, config: BridgeConfig) -> pb.RerankRequest:
    texts = req.texts()
    chunks = req.max_chunks_per_doc
    return pb.RerankRequest(
        query=req.query,
        candidates=texts,
        normalize=not req.raw_scores,
        top_n=_top_n(req.top_n, len(texts)),
        long_documents=pb.LONG_DOCUMENTS_CHUNK if chunks else pb.LONG_DOCUMENTS_TRUNCATE,
        max_windows_per_doc=chunks or 0,
    )


def _v1_answer(req: CohereV1RerankRequest, resp: pb.RerankResponse, request_id: str) -> CohereV1RerankResponse:
    results: list[CohereV1Result] = []
    for r in resp.results:
        item: CohereV1Result = {"index": r.index, "relevance_score": r.score}
        if req.return_documents:
            doc = req.documents[r.index]
            item["document"] = {"text": doc} if isinstance(doc, str) else doc
        results.append(item)
    return {"id": request_id, "results": results, "meta": _meta(resp, "1"), "model": resp.model, "usage": _usage(resp)}


COHERE_V1 = Dialect(
    "Cohere v1",
    CohereV1RerankRequest,
    _v1_request,
    _v1_answer,
    body_model,
    home="/cohere/v1/rerank",
    error=cohere_error,
)


# ---------------------------------------------------------------- Cohere v2: /v2/rerank


def _v2_request(req: CohereV2RerankRequest, config: BridgeConfig) -> pb.RerankRequest:
    # Cohere v2 reads up to max_tokens_per_doc (4096 by default) of a document, far beyond one pair: score windows.
    return pb.RerankRequest(
        query=req.query,
        candidates=req.documents,
        normalize=True,
        top_n=_top_n(req.top_n, len(req.documents)),
        long_documents=pb.LONG_DOCUMENTS_CHUNK,
    )


def _v2_answer(req: CohereV2RerankRequest, resp: pb.RerankResponse, request_id: str) -> CohereV2RerankResponse:
    results: list[CohereV2Result] = [{"index": r.index, "relevance_score": r.score} for r in resp.results]
    return {"id": request_id, "results": results, "meta": _meta(resp, "2")}


def doc_tokens_fit(field: str, asked: int | None, limit: int) -> None:
    """A per-document token limit is honoured only where it cannot bind: FlagReranker limits the pair, not the text."""
    if asked and asked < limit:
        raise BadRequest(
            f"{field} {asked} is below the model's pair limit of {limit} tokens: this server cuts the (query, "
            f"document) pair at {limit} tokens, not the document alone, so a smaller {field} cannot be honoured; "
            f"send at least {limit}, or leave it out"
        )


COHERE_V2 = Dialect(
    "Cohere v2",
    CohereV2RerankRequest,
    _v2_request,
    _v2_answer,
    body_model,
    home="/cohere/v2/rerank",
    error=cohere_error,
    limits=lambda req, limit: doc_tokens_fit("max_tokens_per_doc", req.max_tokens_per_doc, limit),
)
