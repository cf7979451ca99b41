"""Every REST dialect's request and response, declared once: validation, error wording and OpenAPI come from here.

Requests are pydantic models (validated with `parse`, whose errors keep the bridge's wording). Responses are
TypedDicts: the handlers build plain dicts that `json.dumps` writes exactly as before, and their schemas
come from the same declarations. Text limits in the schemas are the server's defaults; the gRPC server
enforces its own (empty texts included), so one rule never lives in two places.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, NotRequired, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from rest_bridge.errors import BadRequest
from rest_bridge.literal import LiteralError, parse_text_pairs

# Mirror the server's defaults (--max-candidates, --max-text-chars); a server may be set up differently.
MAX_ITEMS = 1000
MAX_TEXT = 20000


def kind(value: Any) -> str:
    """How an error message names a JSON value's type."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _problem(message: str, value: Any = None) -> PydanticCustomError:
    """An error whose message follows the field's name, e.g. 'must be a string, got a number'."""
    return PydanticCustomError("bridge", message, {"kind": kind(value)})


def _verbatim(message: str) -> PydanticCustomError:
    """An error whose message names the field itself."""
    return PydanticCustomError("verbatim", "{message}", {"message": message})


def _text(value: Any) -> Any:
    if not isinstance(value, str):
        raise _problem("must be a string, got {kind}", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _problem("is not valid Unicode (a lone surrogate escape)") from None
    return value


def _required(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("missing", "is required")
    return value


def _texts(what: str, one: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        _required(value)
        if not isinstance(value, list):
            raise _problem(f"must be a list of {what}, got {{kind}}", value)
        if not value:
            raise _problem(f"is empty; send at least one {one}")
        return value

    return BeforeValidator(check)


_TEXT_SCHEMA = {"minLength": 1, "maxLength": MAX_TEXT, "pattern": r"\S"}
Text = Annotated[str, BeforeValidator(_text), Field(json_schema_extra=_TEXT_SCHEMA)]
Query = Annotated[Text, BeforeValidator(_required), Field(examples=["what is panda?"])]
_ITEMS = {"minItems": 1, "maxItems": MAX_ITEMS}
TextList = Annotated[list[Text], _texts("strings", "text"), Field(json_schema_extra=_ITEMS)]
TopN = Annotated[int, Field(ge=1, description="Keep only the best top_n results.")]
Model = Annotated[str, Field(description="Accepted and ignored: the response names the model the server runs.")]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], body: dict[str, Any], **context: Any) -> M:
    """Validate `body` as `model`, or BadRequest naming each problem (field, then what is wrong)."""
    try:
        return model.model_validate(body, context=context)
    except ValidationError as exc:
        raise BadRequest("; ".join(_describe(e) for e in exc.errors(include_url=False)[:3])) from None


def _where(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
}


def _describe(error: Any) -> str:
    where, kind_, ctx = _where(error["loc"]), error["type"], error.get("ctx") or {}
    if kind_ == "verbatim":
        return error["msg"]
    if kind_ == "missing":
        return f'"{where}" is required'
    if kind_ in _EXPECTED:
        return f"{where} must be {_EXPECTED[kind_]}, got {kind(error['input'])}"
    if kind_ == "greater_than_equal":
        return f"{where} must be at least {ctx['ge']}, got {error['input']}"
    if kind_ == "less_than_equal":
        return f"{where} must be at most {ctx['le']}, got {error['input']}"
    if kind_ == "literal_error":
        return f"{where} must be one of {ctx['expected']}, got {json.dumps(error['input'])}"
    message = error["msg"] if kind_ == "bridge" else error["msg"][0].lower() + error["msg"][1:]
    return f"{where} {message}" if where else message


# ---------------------------------------------------------------- errors and operations


class Error(TypedDict):
    """Every route's error, except legacy 1's envelope and Cohere's routes."""

    error: Annotated[str, Field(description="What was wrong, naming the field and the limit.")]
    status: Annotated[int, Field(description="The HTTP status again.")]


class CohereError(TypedDict):
    """Errors of /v1/rerank and /v2/rerank, in Cohere's shape."""

    message: Annotated[str, Field(description="What was wrong, naming the field and the limit.")]


class Health(TypedDict):
    status: Annotated[str, Field(examples=["SERVING"])]
    error: NotRequired[str]


class ModelCard(TypedDict):
    id: Annotated[str, Field(description="The name to send as `model`.", examples=["bge-reranker-base"])]
    object: Literal["model"]
    owned_by: str
    created: int
    capabilities: list[str]


class ModelList(TypedDict):
    """GET /v1/models: the loaded models, the server's default first (OpenAI's and Infinity's list shape)."""

    object: Literal["list"]
    data: list[ModelCard]


class TeiModelType(TypedDict):
    reranker: dict[str, Any]


class TeiInfo(TypedDict):
    """GET /info, in TEI's shape, from the gRPC GetModelInfo."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: TeiModelType
    max_concurrent_requests: Annotated[int, Field(description="0: the bridge sets no cap (see --max-concurrent-rpcs).")]
    max_input_length: Annotated[int, Field(description="Tokens per (query, text) pair.")]
    max_batch_tokens: Annotated[int, Field(description="batch_size x max_length (--max-batch-tokens may cap it).")]
    max_batch_requests: int | None
    max_client_batch_size: Annotated[int, Field(description="Texts per request (--max-candidates).")]
    auto_truncate: Annotated[
        bool, Field(description="What /rerank's TEI body does without `truncate` (--auto-truncate).")
    ]
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None


# ---------------------------------------------------------------- legacy 1: bge-reranker-base-api


def _legacy_pairs(value: Any, info: ValidationInfo) -> Any:
    max_pairs, max_chars = info.context["max_pairs"], info.context["max_chars"]
    _required(value)
    if isinstance(value, str):
        try:
            return parse_text_pairs(value, max_chars=max_chars, max_pairs=max_pairs)
        except LiteralError as exc:
            raise _verbatim(str(exc)) from None
    if not isinstance(value, list):
        raise _problem("must be a string like \"[['query', 'passage']]\" or a list, got {kind}", value)
    if not value:
        raise _problem("is an empty list; send at least one [query, passage] pair")
    if len(value) > max_pairs:
        raise _problem(f"has {len(value)} pairs; the limit is {max_pairs}")
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _verbatim(f"text_pairs[{i}] must be a [query, passage] list of two strings")
        for j, text in enumerate(pair):
            try:
                _text(text)
            except PydanticCustomError as exc:
                raise _verbatim(f"text_pairs[{i}][{j}] {exc.message()}") from None
    return value


_PAIR = Annotated[list[Text], Field(min_length=2, max_length=2)]
_LITERAL = Annotated[
    str,
    Field(
        description="Python literal of [query, passage] pairs, as the original took it; never evaluated.",
        examples=["[['what is panda?', 'hi'], ['what is panda?', 'A panda is a bear.']]"],
    ),
]


class LegacyPostRequest(_Request):
    # Validated by hand (one message per problem, as the original service's callers know them); typed for the schema.
    text_pairs: Annotated[
        Any,
        PlainValidator(
            _legacy_pairs, json_schema_input_type=_LITERAL | Annotated[list[_PAIR], Field(json_schema_extra=_ITEMS)]
        ),
    ]


class LegacyPostResponse(TypedDict):
    """Scored (code 200), or the legacy failure envelope (code -1, with `error`)."""

    text_pairs: Annotated[Any, Field(description="The parsed pairs; on failure, the input as received.")]
    rerank_scores: Annotated[list[float], Field(description="Raw logits, input order; empty on failure.")]
    request_time: NotRequired[Annotated[str, Field(examples=["2023-12-22 17:07:54"])]]
    response_time: NotRequired[Annotated[str, Field(examples=["2023-12-22 17:07:54"])]]
    code: Literal[200, -1]
    error: NotRequired[Annotated[str, Field(description="Only when code is -1: what was wrong.")]]


# ---------------------------------------------------------------- POST /rerank: legacy 2, TEI, Infinity


class LegacyRerankRequest(_Request):
    """Legacy 2 (fc3-bge-reranker-api): `compare_to`."""

    query: Query
    compare_to: Annotated[TextList, Field(examples=[["你好", "函数计算是阿里云Serverless计算服务"]])]


class LegacyRerankResponse(TypedDict):
    object: Literal["list"]
    data: Annotated[list[float], Field(description="Sigmoid scores, one per compare_to text, input order.")]


class TeiRerankRequest(_Request):
    """Text Embeddings Inference: `texts`."""

    query: Query
    texts: Annotated[TextList, Field(examples=[["Deep Learning is not...", "Deep learning is..."]])]
    raw_scores: bool = Field(False, description="Raw logits instead of sigmoid scores.")
    return_text: bool = Field(False, description="Copy each text into its result.")
    truncate: bool | None = Field(
        None,
        description="true: cut a text too long for one pair; false: refuse it (413), as TEI does; absent: the "
        "bridge's --auto-truncate (true by default, as TEI's).",
    )
    truncation_direction: Literal["right", "left", "Right", "Left"] = Field(
        "right", description="With truncate: keep the start (right) or the end (left) of a long text."
    )
    max_chunks_per_doc: Annotated[int, Field(ge=1, le=2**32 - 1)] | None = Field(
        None, description="An extension: score a long text by its best window, at most this many windows each."
    )


class TeiRank(TypedDict):
    index: Annotated[int, Field(ge=0)]
    score: float
    text: NotRequired[str]


class InfinityRerankRequest(BaseModel):
    """Infinity: `documents`; lax like Infinity's own models ("false" is false, "2" is 2)."""

    model_config = ConfigDict(extra="ignore")

    query: Query
    documents: Annotated[TextList, Field(examples=[["Munich is in Germany.", "The sky is blue."]])]
    return_documents: bool = False
    raw_scores: bool = Field(False, description="Raw logits instead of sigmoid scores.")
    top_n: TopN | None = None
    model: Model = "default/not-specified"


class InfinityResult(TypedDict):
    relevance_score: float
    index: Annotated[int, Field(ge=0)]
    document: str | None


class Usage(TypedDict):
    prompt_tokens: Annotated[int, Field(ge=0, description="Tokens fed to the model, every window counted.")]
    total_tokens: Annotated[int, Field(ge=0)]


class InfinityRerankResponse(TypedDict):
    object: Literal["rerank"]
    results: list[InfinityResult]
    model: str
    usage: Usage
    id: str
    created: int


# ---------------------------------------------------------------- Cohere (and Jina) /v1/rerank, Cohere /v2/rerank


class CohereDocument(TypedDict):
    """A document as an object: ranked on `text`, or on the fields that `rank_fields` names."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    text: Text


def _document(value: Any) -> Any:
    if isinstance(value, dict):
        return value  # its fields are checked against rank_fields once the whole request is read
    if not isinstance(value, str):
        raise _problem('must be a string or an object with "text", got {kind}', value)
    return _text(value)


Document = Annotated[Any, PlainValidator(_document, json_schema_input_type=Text | CohereDocument)]


class CohereV1RerankRequest(_Request):
    """Cohere v1 and Jina: `documents` of strings or objects."""

    model: Model | None = None
    query: Query
    documents: Annotated[
        list[Document],
        _texts("strings or {'text': ...} objects", "document"),
        Field(json_schema_extra=_ITEMS, examples=[["hi", "The giant panda is a bear species endemic to China."]]),
    ]
    top_n: TopN | None = None
    rank_fields: Annotated[list[str], Field(min_length=1)] | None = Field(
        None,
        description="Object fields to rank on, in order (default: text); several become 'key: value' lines.",
    )
    return_documents: bool | None = Field(False, description="Return each document as sent.")
    max_chunks_per_doc: Annotated[int, Field(ge=1, le=2**32 - 1)] | None = Field(  # a uint32 on the wire
        None, description="Score long documents by their best window, at most this many windows each."
    )
    raw_scores: bool | None = Field(False, description="Raw logits instead of sigmoid scores.")

    @model_validator(mode="after")
    def _fields_present(self) -> CohereV1RerankRequest:
        check_fields(self.documents, self.rank_fields, "documents")
        return self

    def texts(self) -> list[str]:
        """The text ranked for each document."""
        return ranked_texts(self.documents, self.rank_fields)


def check_fields(docs: list[Any], rank_fields: list[str] | None, where: str) -> None:
    """Every object in `docs` has the fields it is ranked on (`rank_fields`, default `text`)."""
    for i, doc in enumerate(docs):
        if isinstance(doc, dict):
            for name in rank_fields or ["text"]:
                if name not in doc:
                    raise _verbatim(f'{where}[{i}] is an object without "{name}"')
                _field_text(doc[name], f"{where}[{i}].{name}")


def ranked_texts(docs: list[Any], rank_fields: list[str] | None) -> list[str]:
    """The text ranked for each document: a string as is, an object's field, or several as 'field: value' lines."""
    fields = rank_fields or ["text"]
    out = []
    for doc in docs:
        if isinstance(doc, str):
            out.append(doc)
        elif len(fields) == 1:
            out.append(_as_text(doc[fields[0]]))
        else:
            out.append("\n".join(f"{name}: {_as_text(doc[name])}" for name in fields))
    return out


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _field_text(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _verbatim(f"{where} is not valid Unicode (a lone surrogate escape)") from None


class ApiVersion(TypedDict):
    version: str


class BilledUnits(TypedDict):
    search_units: Annotated[int, Field(description="One per 100 (query, window) pairs scored, as Cohere bills.")]


class CohereMeta(TypedDict):
    api_version: ApiVersion
    billed_units: BilledUnits


class CohereV1Result(TypedDict):
    index: Annotated[int, Field(ge=0)]
    relevance_score: float
    document: NotRequired[Annotated[dict[str, Any], Field(description="The document as sent (a string as {text}).")]]


class CohereV1RerankResponse(TypedDict):
    id: str
    results: list[CohereV1Result]
    meta: CohereMeta
    model: str
    usage: Usage


class CohereV2RerankRequest(_Request):
    """Cohere v2: `documents` of strings; long documents are scored by their best window."""

    model: Model | None = None
    query: Query
    documents: Annotated[TextList, Field(examples=[["hi", "The giant panda is a bear species endemic to China."]])]
    top_n: TopN | None = None
    max_tokens_per_doc: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Accepted; a long document is scored whole, window by window (--max-windows-per-doc)."
    )


class CohereV2Result(TypedDict):
    index: Annotated[int, Field(ge=0)]
    relevance_score: float


class CohereV2RerankResponse(TypedDict):
    id: str
    results: list[CohereV2Result]
    meta: CohereMeta
