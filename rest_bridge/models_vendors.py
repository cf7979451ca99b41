"""Voyage's, Mixedbread's and NVIDIA NIM's rerank requests, answers and error bodies, as their APIs and published
clients define them (voyageai's Reranking, mixedbread's client.rerank, NIM's /v1/ranking).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import Field, model_validator
from typing_extensions import TypedDict

from rest_bridge.models import (
    _ITEMS,
    Document,
    Model,
    Query,
    Text,
    TextList,
    _Request,
    _texts,
    _verbatim,
    check_fields,
    ranked_texts,
)

TopK = Annotated[int, Field(ge=1, description="Keep only the best top_k results.")]


class DetailError(TypedDict):
    """Voyage's and Mixedbread's error body (FastAPI's)."""

    detail: Annotated[str, Field(description="What was wrong, naming the field and the limit.")]


# ---------------------------------------------------------------- Voyage


class VoyageRerankRequest(_Request):
    """Voyage AI's rerank: what `voyageai.Client.rerank` posts."""

    query: Query
    documents: Annotated[TextList, Field(examples=[["hi", "The giant panda is a bear species endemic to China."]])]
    model: Model | None = None
    top_k: TopK | None = None
    return_documents: bool = False
    truncation: bool = Field(True, description="true: cut what does not fit; false: refuse it (400), as Voyage does.")


class VoyageResult(TypedDict):
    index: Annotated[int, Field(ge=0)]
    relevance_score: float
    document: NotRequired[str]


class VoyageUsage(TypedDict):
    total_tokens: Annotated[int, Field(ge=0)]


class VoyageRerankResponse(TypedDict):
    object: Literal["list"]
    data: Annotated[list[VoyageResult], Field(description="Best first, cut to top_k.")]
    model: str
    usage: VoyageUsage


# ---------------------------------------------------------------- Mixedbread


class MixedbreadRerankRequest(_Request):
    """Mixedbread's /v1/reranking: what `mixedbread.Mixedbread().rerank` posts."""

    model: Model | None = None
    query: Query
    input: Annotated[
        list[Document],
        _texts("strings or objects", "document"),
        Field(json_schema_extra=_ITEMS, examples=[["hi", {"text": "The giant panda is a bear species."}]]),
    ]
    rank_fields: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="Object fields to rank on, in order (default: text); several become 'key: value' lines."
    )
    top_k: TopK | None = None
    return_input: bool = Field(False, description="Return each input as sent.")
    rewrite_query: bool = Field(False, description="Only false: this server scores the query as sent.")

    @model_validator(mode="after")
    def _fields_present(self) -> MixedbreadRerankRequest:
        if self.rewrite_query:
            raise _verbatim("rewrite_query is not supported: this server scores the query as sent; send false")
        check_fields(self.input, self.rank_fields, "input")
        return self

    def texts(self) -> list[str]:
        return ranked_texts(self.input, self.rank_fields)


class MixedbreadResult(TypedDict):
    index: Annotated[int, Field(ge=0)]
    score: float
    input: NotRequired[Annotated[Any, Field(description="With return_input: the input as sent.")]]
    object: Literal["rank_result"]


class MixedbreadUsage(TypedDict):
    prompt_tokens: Annotated[int, Field(ge=0)]
    total_tokens: Annotated[int, Field(ge=0)]


class MixedbreadRerankResponse(TypedDict):
    usage: MixedbreadUsage
    model: str
    data: Annotated[list[MixedbreadResult], Field(description="Best first, cut to top_k.")]
    object: Literal["list"]
    top_k: int
    return_input: bool


# ---------------------------------------------------------------- NVIDIA NIM


class NimText(TypedDict):
    text: Text


class NimRankingRequest(_Request):
    """NVIDIA's reranking NIM: POST /v1/ranking (and the per-model /v1/retrieval/{model}/reranking)."""

    model: Model | None = None
    query: NimText
    passages: Annotated[list[NimText], Field(min_length=1, json_schema_extra=_ITEMS)]
    truncate: Literal["NONE", "END"] = Field(
        "NONE", description="NONE: refuse a passage that does not fit (400), as NIM does; END: cut its end."
    )


class NimRanking(TypedDict):
    index: Annotated[int, Field(ge=0)]
    logit: Annotated[float, Field(description="The raw logit.")]


class NimUsage(TypedDict):
    prompt_tokens: Annotated[int, Field(ge=0)]
    total_tokens: Annotated[int, Field(ge=0)]


class NimRankingResponse(TypedDict):
    rankings: Annotated[list[NimRanking], Field(description="Every passage, best first.")]
    usage: NimUsage


class NimError(TypedDict):
    """NVIDIA's problem-details error body (what its LangChain client reads: status, title, detail)."""

    type: str
    title: str
    status: int
    detail: Annotated[str, Field(description="What was wrong, naming the field and the limit.")]
