"""The rerank dialects: each one's request model, its gRPC RerankRequest, and its answer from the RerankResponse.

Pure translations, no I/O. `POST /rerank` tells legacy 2, TEI and Infinity apart by their list's key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from reranker_proto import reranker_pb2 as pb
from rest_bridge.errors import BadRequest
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

R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class Dialect(Generic[R]):
    name: str
    model: type[R]
    request: Callable[[R], pb.RerankRequest]
    answer: Callable[[R, pb.RerankResponse, str], Any]  # (parsed request, gRPC response, request id) -> JSON
    asked_model: Callable[[R], str] = lambda req: ""  # the model the body names; "" = none
    pinned_model: str = ""  # or: the BridgeConfig field that chooses the model for every call of this dialect


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


def _legacy_request(req: LegacyRerankRequest) -> pb.RerankRequest:
    return pb.RerankRequest(query=req.query, candidates=req.compare_to, normalize=True)


def _legacy_answer(req: LegacyRerankRequest, resp: pb.RerankResponse, request_id: str) -> LegacyRerankResponse:
    return {"object": "list", "data": list(resp.scores)}


LEGACY_2 = Dialect("legacy 2", LegacyRerankRequest, _legacy_request, _legacy_answer, pinned_model="legacy2_model")


# ---------------------------------------------------------------- TEI: {query, texts}


def _tei_request(req: TeiRerankRequest) -> pb.RerankRequest:
    if not req.truncate:
        mode = pb.LONG_DOCUMENTS_CHUNK  # TEI refuses an over-long text here; we score its windows instead
    elif req.truncation_direction.lower() == "left":
        mode = pb.LONG_DOCUMENTS_TRUNCATE_LEFT
    else:
        mode = pb.LONG_DOCUMENTS_TRUNCATE
    return pb.RerankRequest(query=req.query, candidates=req.texts, normalize=not req.raw_scores, long_documents=mode)


def _tei_answer(req: TeiRerankRequest, resp: pb.RerankResponse, request_id: str) -> list[TeiRank]:
    if req.return_text:
        return [{"index": r.index, "score": r.score, "text": req.texts[r.index]} for r in resp.results]
    return [{"index": r.index, "score": r.score} for r in resp.results]


TEI = Dialect("TEI", TeiRerankRequest, _tei_request, _tei_answer)


# ---------------------------------------------------------------- Infinity: {query, documents}


def _infinity_request(req: InfinityRerankRequest) -> pb.RerankRequest:
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


INFINITY = Dialect("Infinity", InfinityRerankRequest, _infinity_request, _infinity_answer, _infinity_model)

RERANK_DIALECTS = {"compare_to": LEGACY_2, "texts": TEI, "documents": INFINITY}


def rerank_dialect(body: dict[str, Any]) -> Dialect[Any]:
    """The dialect of a POST /rerank body, told by which list it carries."""
    keys = [key for key in RERANK_DIALECTS if key in body]
    if len(keys) == 1:
        return RERANK_DIALECTS[keys[0]]
    if keys:
        raise BadRequest(f"the body has {' and '.join(keys)}; send exactly one of them (see /docs)")
    raise BadRequest(
        '"compare_to" is required: POST /rerank takes legacy 2\'s {"query", "compare_to"}, '
        'TEI\'s {"query", "texts"} or Infinity\'s {"query", "documents"}'
    )


# ---------------------------------------------------------------- Cohere v1 (and Jina): /v1/rerank


def _v1_request(req: CohereV1RerankRequest) -> pb.RerankRequest:
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


COHERE_V1 = Dialect("Cohere v1", CohereV1RerankRequest, _v1_request, _v1_answer, lambda req: req.model or "")


# ---------------------------------------------------------------- Cohere v2: /v2/rerank


def _v2_request(req: CohereV2RerankRequest) -> pb.RerankRequest:
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


COHERE_V2 = Dialect("Cohere v2", CohereV2RerankRequest, _v2_request, _v2_answer, lambda req: req.model or "")
