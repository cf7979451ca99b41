from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LongDocuments(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LONG_DOCUMENTS_UNSPECIFIED: _ClassVar[LongDocuments]
    LONG_DOCUMENTS_TRUNCATE: _ClassVar[LongDocuments]
    LONG_DOCUMENTS_CHUNK: _ClassVar[LongDocuments]
    LONG_DOCUMENTS_TRUNCATE_LEFT: _ClassVar[LongDocuments]
LONG_DOCUMENTS_UNSPECIFIED: LongDocuments
LONG_DOCUMENTS_TRUNCATE: LongDocuments
LONG_DOCUMENTS_CHUNK: LongDocuments
LONG_DOCUMENTS_TRUNCATE_LEFT: LongDocuments

class Pair(_message.Message):
    __slots__ = ("query", "passage")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_FIELD_NUMBER: _ClassVar[int]
    query: str
    passage: str
    def __init__(self, query: _Optional[str] = ..., passage: _Optional[str] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "candidates", "pairs", "normalize", "top_n", "return_documents", "max_length", "model", "long_documents", "max_windows_per_doc", "request_id", "instruction", "query_max_length", "cutoff_layers", "compress_ratio", "compress_layers")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LONG_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOWS_PER_DOC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    QUERY_MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_LAYERS_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_RATIO_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_LAYERS_FIELD_NUMBER: _ClassVar[int]
    query: str
    candidates: _containers.RepeatedScalarFieldContainer[str]
    pairs: _containers.RepeatedCompositeFieldContainer[Pair]
    normalize: bool
    top_n: int
    return_documents: bool
    max_length: int
    model: str
    long_documents: LongDocuments
    max_windows_per_doc: int
    request_id: str
    instruction: str
    query_max_length: int
    cutoff_layers: _containers.RepeatedScalarFieldContainer[int]
    compress_ratio: int
    compress_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, query: _Optional[str] = ..., candidates: _Optional[_Iterable[str]] = ..., pairs: _Optional[_Iterable[_Union[Pair, _Mapping]]] = ..., normalize: _Optional[bool] = ..., top_n: _Optional[int] = ..., return_documents: _Optional[bool] = ..., max_length: _Optional[int] = ..., model: _Optional[str] = ..., long_documents: _Optional[_Union[LongDocuments, str]] = ..., max_windows_per_doc: _Optional[int] = ..., request_id: _Optional[str] = ..., instruction: _Optional[str] = ..., query_max_length: _Optional[int] = ..., cutoff_layers: _Optional[_Iterable[int]] = ..., compress_ratio: _Optional[int] = ..., compress_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class RankedCandidate(_message.Message):
    __slots__ = ("index", "score", "document")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    document: str
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., document: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("pairs", "tokens", "queue_ms", "inference_ms", "windows")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    pairs: int
    tokens: int
    queue_ms: float
    inference_ms: float
    windows: int
    def __init__(self, pairs: _Optional[int] = ..., tokens: _Optional[int] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., windows: _Optional[int] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("scores", "results", "model", "usage", "request_id")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    results: _containers.RepeatedCompositeFieldContainer[RankedCandidate]
    model: str
    usage: Usage
    request_id: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., results: _Optional[_Iterable[_Union[RankedCandidate, _Mapping]]] = ..., model: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RerankStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error", "draining")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: RerankResponse
    error: RequestError
    draining: DrainNotice
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[RerankResponse, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ..., draining: _Optional[_Union[DrainNotice, _Mapping]] = ...) -> None: ...

class DrainNotice(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RequestLimits(_message.Message):
    __slots__ = ("max_candidates", "max_text_chars", "max_length")
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    max_candidates: int
    max_text_chars: int
    max_length: int
    def __init__(self, max_candidates: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_length: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "device", "dtype", "max_length", "limits", "version", "batch_size", "models", "revision", "family", "default_instruction", "backend", "drift")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    dtype: str
    max_length: int
    limits: RequestLimits
    version: str
    batch_size: int
    models: _containers.RepeatedScalarFieldContainer[str]
    revision: str
    family: str
    default_instruction: str
    backend: str
    drift: ScoreDrift
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., max_length: _Optional[int] = ..., limits: _Optional[_Union[RequestLimits, _Mapping]] = ..., version: _Optional[str] = ..., batch_size: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., revision: _Optional[str] = ..., family: _Optional[str] = ..., default_instruction: _Optional[str] = ..., backend: _Optional[str] = ..., drift: _Optional[_Union[ScoreDrift, _Mapping]] = ...) -> None: ...

class ScoreDrift(_message.Message):
    __slots__ = ("pairs", "max_abs_diff", "rank_correlation")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    RANK_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    pairs: int
    max_abs_diff: float
    rank_correlation: float
    def __init__(self, pairs: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., rank_correlation: _Optional[float] = ...) -> None: ...
