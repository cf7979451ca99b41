"""vLLM's rerank and score APIs, as its protocol classes define them (vllm/entrypoints/pooling/scoring/protocol.py,
vllm/entrypoints/pooling/base/protocol.py): every field, with vLLM's defaults; the answers and error body likewise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import BeforeValidator, Field, PlainValidator, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from rest_bridge.models import MAX_ITEMS, Model, Query, Text, _problem, _Request, _required, _text, _verbatim


def _score_input(value: Any) -> str:
    if isinstance(value, dict):
        if "text" in value:
            return _text(value["text"])
        if "content" in value:
            raise _problem("is a multi-modal input; this server scores text")
        raise _problem('must be a string or an object with "text", got an object without it')
    return _text(value)


def _score_inputs(value: Any, info: ValidationInfo) -> list[str]:
    _required(value)
    items = value if isinstance(value, list) else [value]  # vLLM takes one input or a list
    if not items:
        raise _problem("is empty; send at least one text")
    if len(items) > MAX_ITEMS:
        raise _problem(f"has {len(items)} items; the limit is {MAX_ITEMS}")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_score_input(item))
        except PydanticCustomError as exc:
            raise _verbatim(f"{info.field_name}[{i}] {exc.message()}") from None
    return out


class VllmText(TypedDict):
    text: Text


_INPUT_SCHEMA = Text | VllmText | Annotated[list[Text | VllmText], Field(min_length=1, max_length=MAX_ITEMS)]
ScoreInputs = Annotated[list[str], PlainValidator(_score_inputs, json_schema_input_type=_INPUT_SCHEMA)]
ChatKwargs = dict[str, Any]


class _VllmRequest(_Request):
    """PoolingBasicRequestMixin, ClassifyRequestMixin and ScoringRequestMixin's fields."""

    model: Model | None = None
    user: str | None = Field(None, description="Accepted, as by vLLM; not used.")
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = Field(
        None,
        description="Cut each (query, document) pair to this many tokens (FlagReranker's max_length); -1: the "
        "model's limit; absent: a pair over the model's limit is refused, as vLLM does.",
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="With truncate_prompt_tokens: right (the default) keeps a document's start, left its end."
    )
    max_tokens_per_query: Annotated[int, Field(ge=0)] = Field(
        0, description="Cut the query to this many tokens (FlagReranker's query_max_length); 0: no query limit."
    )
    max_tokens_per_doc: Annotated[int, Field(ge=0)] = Field(
        0, description="0, or at least the pair limit: this server limits the pair, not the document alone."
    )
    use_activation: bool | None = Field(None, description="false: raw logits; true or absent: sigmoid scores.")
    instruction: str | None = Field(None, description="The reranker's task instruction (instruction-following models).")
    chat_template_kwargs: ChatKwargs | None = Field(
        None, description="Only `instruction` is read (it wins over the top-level field, as in vLLM)."
    )
    priority: int = Field(0, description="Accepted; no effect here: every request waits in one first-come queue.")
    request_id: Annotated[str, Field(max_length=128)] | None = Field(
        None, description="Forwarded to the gRPC server and returned as the answer's id."
    )
    cache_salt: str | None = Field(None, description="Accepted; no effect (no prefix cache).")
    padding: Literal["max_length", "do_not_pad"] | None = Field(
        None, description="Accepted; no effect on scores (padding is masked)."
    )
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="Refused when set: no multi-modal model.")
    max_chunks_per_doc: Annotated[int, Field(ge=1, le=2**32 - 1)] | None = Field(
        None, description="An extension: score a long document by its best window, at most this many windows."
    )

    @model_validator(mode="after")
    def _known_options(self) -> _VllmRequest:
        for key, value in (self.chat_template_kwargs or {}).items():
            if key != "instruction":
                raise _verbatim(f"chat_template_kwargs.{key} is not supported here; only instruction is read")
            if not isinstance(value, str):
                raise _verbatim("chat_template_kwargs.instruction must be a string")
        if self.mm_processor_kwargs:
            raise _verbatim("mm_processor_kwargs is not supported: this server scores text")
        if self.max_chunks_per_doc is not None and self.truncate_prompt_tokens is not None:
            raise _verbatim(
                "truncate_prompt_tokens cuts a long document, max_chunks_per_doc scores its windows: send one"
            )
        return self

    def instruction_text(self) -> str:
        """The instruction: chat_template_kwargs' wins over the top-level field, as vLLM merges them."""
        return (self.chat_template_kwargs or {}).get("instruction", self.instruction or "")


def _one_query(value: Any) -> Any:
    return _score_input(_required(value)) if isinstance(value, dict) else value


class VllmRerankRequest(_VllmRequest):
    """vLLM's rerank API: `query` and `documents` (strings or {"text"} objects)."""

    query: Annotated[Query, BeforeValidator(_one_query)]
    documents: Annotated[ScoreInputs, Field(examples=[["hi", "The giant panda is a bear species endemic to China."]])]
    top_n: Annotated[int, Field(ge=0, description="Keep the best top_n; 0 keeps all.")] = 0
    return_documents: bool = Field(
        True, description="An extension: false leaves `document` out (vLLM always sends it)."
    )


class VllmScoreRequest(_VllmRequest):
    """vLLM's score API: one pair of inputs, each one text or a list; 1:1, 1:N or N:N (zipped)."""

    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    items: ScoreInputs | None = None
    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None

    @model_validator(mode="after")
    def _one_pair(self) -> VllmScoreRequest:
        given = [name for name in type(self).model_fields if name in _SIDES and getattr(self, name) is not None]
        if len(given) != 2 or not any(a in given and b in given for a, b in _PAIRS):
            raise _verbatim(
                "send exactly one pair of inputs: queries + documents, queries + items, text_1 + text_2 or "
                f"data_1 + data_2 (got {', '.join(given) or 'none'})"
            )
        (a, b), (first, second) = self.pair(), self.sides()
        if len(first) > 1 and len(first) != len(second):
            raise _verbatim(f"Input lengths must be either 1:1, 1:N or N:N; got {len(first)}:{len(second)} ({a}:{b})")
        return self

    def pair(self) -> tuple[str, str]:
        """The names of the two inputs sent, e.g. ("queries", "documents")."""
        for a, b in _PAIRS:
            if getattr(self, a) is not None and getattr(self, b) is not None:
                return a, b
        raise AssertionError("validated: one pair is present")

    def sides(self) -> tuple[list[str], list[str]]:
        first, second = self.pair()
        return getattr(self, first), getattr(self, second)


_PAIRS = (("queries", "documents"), ("queries", "items"), ("text_1", "text_2"), ("data_1", "data_2"))
_SIDES = {name for pair in _PAIRS for name in pair}


class VllmUsage(TypedDict):
    prompt_tokens: Annotated[int, Field(ge=0, description="Tokens fed to the model.")]
    total_tokens: Annotated[int, Field(ge=0)]


class VllmDocument(TypedDict):
    text: str


class VllmRerankResult(TypedDict):
    index: Annotated[int, Field(ge=0)]
    document: NotRequired[VllmDocument]
    relevance_score: float


class VllmRerankResponse(TypedDict):
    id: str
    model: str
    usage: VllmUsage
    results: list[VllmRerankResult]


class VllmScoreData(TypedDict):
    index: Annotated[int, Field(ge=0)]
    object: Literal["score"]
    score: float


class VllmScoreUsage(VllmUsage):
    completion_tokens: int


class VllmScoreResponse(TypedDict):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: Annotated[list[VllmScoreData], Field(description="One score per pair, input order.")]
    usage: VllmScoreUsage


class VllmErrorInfo(TypedDict):
    message: Annotated[str, Field(description="What was wrong, naming the field and the limit.")]
    type: Annotated[str, Field(examples=["BadRequestError"])]
    param: str | None
    code: Annotated[int, Field(description="The HTTP status again.")]


class VllmError(TypedDict):
    """vLLM's ErrorResponse."""

    error: VllmErrorInfo
