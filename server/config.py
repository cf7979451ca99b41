"""The one configuration object: CLI flags whose defaults come from RERANKER_* variables."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import NoReturn

from server import __version__
from server.tracing import wanted as tracing_wanted

DEFAULT_MODEL = "BAAI/bge-reranker-base"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MODEL_TYPES = ("auto", "cross-encoder", "llm", "layerwise", "lightweight", "qwen3-reranker", "mxbai-rerank-v2")
DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")  # --dtype (server/engine/precision.py)


class ConfigError(ValueError):
    """A flag or environment value that cannot be used."""


def _model_name(spec: str) -> str:
    """A bare path or hub id is named after its last path part: /models/bge-reranker-base -> bge-reranker-base."""
    return spec.rstrip("/").rsplit("/", 1)[-1]


def parse_models(text: str) -> list[tuple[str, str]]:
    """`NAME=PATH_OR_ID` or `PATH_OR_ID` specs, comma-separated, as (name, path or id); the first is the default."""
    specs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, path = part.partition("=")
        name, path = (name.strip(), path.strip()) if sep else (_model_name(part), part)
        if not name or not path:
            raise ConfigError(f"model {part!r}: use NAME=PATH_OR_ID or a bare path or hub id")
        specs.append((name, path))
    if not specs:
        raise ConfigError("no model given: --model NAME=PATH_OR_ID (repeatable) or a bare path or hub id")
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two models are named alike in {names}: give each its own NAME=")
    return specs


def parse_dtypes(text: str, names: Sequence[str]) -> dict[str, str]:
    """--dtype: `VALUE` for every model, `NAME=VALUE` for one, comma-separated; returns {name: value}."""
    every, one = "auto", {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = (s.strip() for s in part.rpartition("="))
        if value.lower() not in DTYPES:
            raise ConfigError(f"dtype {part!r}: the value must be one of {', '.join(DTYPES)}")
        if sep and name not in names:
            raise ConfigError(f"dtype {part!r}: {name!r} is not one of the served models {list(names)}")
        if not sep and every != "auto":
            raise ConfigError(f"dtype {text!r}: one value for every model, then NAME=VALUE for single ones")
        if sep:
            one[name] = value.lower()
        else:
            every = value.lower()
    return {n: one.get(n, every) for n in names}


@dataclass(frozen=True)
class Config:
    model: str = DEFAULT_MODEL  # one or more models, comma-separated NAME=PATH_OR_ID or PATH_OR_ID; first = default
    device: str = "auto"
    fp16: bool | None = None  # None: fp16 on CUDA, fp32 on CPU
    host: str = "0.0.0.0"
    port: int = 50051
    max_length: int = 512
    batch_size: int = 0  # pairs per forward pass; 0 = sized for the device (CPU 32, CUDA from free memory)
    max_batch_tokens: int = 0  # padded tokens per forward pass; 0 = sized for the device (CPU 16384)
    tokenize_threads: int = 0  # 0 = half the cores, 1 to 8
    tokenize_workers: int = -1  # tokenizer processes; 0 = tokenize in this process's threads; -1 = auto (by device)
    cuda_graphs: str = "auto"  # auto/on: capture each shape bucket's forward on CUDA (eager where it fails); off
    max_wait_ms: float = 2.0
    max_queue_pairs: int = 8192
    max_candidates: int = 1000
    max_text_chars: int = 20000
    threads: int = 0  # inference threads on CPU (torch intra-op, ONNX Runtime); 0 = the cores this process may use
    grace_s: float = 10.0
    log_level: str = "INFO"
    rest_port: int = 0  # REST bridge in the same process; 0 = off
    log_json: bool = False  # one JSON object per log line
    metrics_port: int = 0  # Prometheus /metrics; 0 = off
    max_concurrent_rpcs: int = 0  # Rerank/GetModelInfo calls in flight; 0 = no cap
    api_key: str = field(default="", repr=False)  # "" = no authentication
    tls_cert: str = ""  # PEM files; both empty = plaintext
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA bundle: clients must present a certificate it signed
    watch_models: float = 0.0  # poll the model directories every N seconds and reload changed ones; 0 = off
    max_windows_per_doc: int = 64  # long_documents=CHUNK: windows one passage may be cut into
    max_windows_per_request: int = 4096  # long_documents=CHUNK: windows (pairs scored) in one request
    legacy1_model: str = ""  # the in-process bridge: model of legacy 1's route ("" = the default model)
    legacy2_model: str = ""  # the in-process bridge: model of legacy 2's routes ("" = the default model)
    rest_deadline_s: float = 30.0  # the in-process REST bridge's gRPC deadline (as rest_bridge --deadline-s)
    model_type: str = "auto"  # auto: the family known for certain (README: families), else refused; or a MODEL_TYPES
    cutoff_layer: int = 0  # layer-wise reranker: the layer whose head scores; 0 = the last layer (the class's default)
    trust_remote_code: bool = False  # run the Python code a model ships (config.json auto_map), e.g. jina-reranker-v2
    # Slow and vanished clients (server/connections.py, rest_bridge/guard.py).
    handshake_timeout_s: float = 10.0  # gRPC: TCP accept to HTTP/2 settings received, TLS included
    max_connections: int = 4000  # gRPC port: open connections; past it new ones are closed at once
    max_connection_idle_s: float = 300.0  # gRPC: GOAWAY to connections without a call this long; 0 = never
    rest_header_timeout_s: float = 10.0  # REST: connect (or the last response) to complete request headers
    rest_body_timeout_s: float = 30.0  # REST: complete headers to the whole body, else 408
    rest_max_connections: int = 1000  # REST port: open connections; past it 503 at once
    rest_auto_truncate: bool = True  # REST: a TEI /rerank body without `truncate` truncates (TEI's --auto-truncate)
    # Precision of the cross-encoders (server/engine/precision.py): a value for every model, NAME=VALUE for one.
    dtype: str = "auto"  # auto (CPU fp32, CUDA fp16 unless --no-fp16), fp32, bf16, fp16 (CUDA), int8 (CPU)
    max_drift: float = 0.0  # refuse a mode whose scores move from fp32 more than this on the drift sample; 0 = off
    min_rank_correlation: float = -1.0  # refuse a mode whose rank correlation with fp32 is below; -1 = off
    quantize_cache: str = ""  # where int8 conversions are kept, by revision; "" = ~/.cache/reranker-service/int8
    # OpenTelemetry traces: on when OTEL_TRACES_EXPORTER names an exporter (server/tracing.py); no flag of its own.
    tracing: bool = False

    def __post_init__(self) -> None:
        names = [n for n, _ in parse_models(self.model)]
        for route in ("legacy1_model", "legacy2_model"):
            if getattr(self, route) and getattr(self, route) not in names:
                raise ConfigError(f"{route} {getattr(self, route)!r} is not one of the served models {names}")
        if self.watch_models < 0:
            raise ConfigError(f"watch_models must be 0 (off) or a number of seconds, got {self.watch_models}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535 (0 picks a free port), got {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0..65535 (0 turns metrics off), got {self.metrics_port}")
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(f"metrics_port and port are both {self.port}; give metrics a port of its own")
        if self.max_concurrent_rpcs < 0:
            raise ConfigError(f"max_concurrent_rpcs must be 0 (no cap) or positive, got {self.max_concurrent_rpcs}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        self._check_security()
        if not 0 <= self.rest_port <= 65535:
            raise ConfigError(f"rest_port must be 0..65535 (0 turns the REST bridge off), got {self.rest_port}")
        positive = (
            "max_length",
            "max_candidates",
            "max_text_chars",
            "max_windows_per_doc",
            "max_windows_per_request",
            "rest_deadline_s",
            "handshake_timeout_s",
            "max_connections",
            "rest_header_timeout_s",
            "rest_body_timeout_s",
            "rest_max_connections",
        )
        if self.max_connection_idle_s < 0:
            raise ConfigError(f"max_connection_idle_s must be 0 (never) or positive, got {self.max_connection_idle_s}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("batch_size", "max_batch_tokens", "tokenize_threads", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (sized for the machine) or positive, got {getattr(self, name)}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ConfigError(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.tokenize_workers < -1:
            raise ConfigError(
                f"tokenize_workers must be auto, 0 (tokenize in-process) or a number of processes, "
                f"got {self.tokenize_workers}"
            )
        if self.max_queue_pairs < self.max_candidates:
            raise ConfigError(
                f"max_queue_pairs ({self.max_queue_pairs}) must be at least max_candidates "
                f"({self.max_candidates}), or a full-size request could never be queued"
            )
        if 0 < self.max_batch_tokens < self.max_length:
            raise ConfigError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_length ({self.max_length})"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.cutoff_layer < 0:
            raise ConfigError(f"cutoff_layer must be 0 (the model's last layer) or positive, got {self.cutoff_layer}")
        self._check_precision(names)

    def _check_precision(self, names: list[str]) -> None:
        parse_dtypes(self.dtype, names)
        if self.max_drift < 0:
            raise ConfigError(f"max_drift must be 0 (no bound) or a positive score difference, got {self.max_drift}")
        if not -1 <= self.min_rank_correlation <= 1:
            raise ConfigError(f"min_rank_correlation must be -1 (no bound) to 1, got {self.min_rank_correlation}")

    def _check_security(self) -> None:
        key = self.api_key
        if key and not (key.isascii() and key.isprintable() and key.strip() == key):
            raise ConfigError(
                "api_key must be printable ASCII without surrounding spaces (it travels as gRPC metadata)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("--tls-cert", "--tls-key") if self.tls_cert else ("--tls-key", "--tls-cert")
            raise ConfigError(f"{given} is set but {missing} is not: TLS needs both the certificate and its key")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key as well")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"--{name.replace('_', '-')} {path!r}: no such file")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @cached_property  # read on every request: parsed once
    def models(self) -> list[tuple[str, str]]:
        """(name, path or hub id) of every model to serve; the first is the default."""
        return parse_models(self.model)

    @cached_property
    def default_model(self) -> str:
        return self.models[0][0]

    def dtype_of(self, name: str) -> str:
        """The --dtype asked for model `name` (auto where none was)."""
        return parse_dtypes(self.dtype, [n for n, _ in self.models]).get(name, "auto")

    @property
    def tokenize_thread_count(self) -> int:
        return self.tokenize_threads or max(1, min(8, (os.cpu_count() or 2) // 2))

    @property
    def torch_threads(self) -> int:
        """--threads, or for 0 the cores this process may use (see usable_cpus), as torch itself would take.

        Measured on 2 calm cores, base shape (bench.modes --threads): 2 threads made 16.3 pairs/s at 16 clients
        against 7.4 with 1. Beside busy neighbours fewer threads answer sooner (bench/threads.py: 1.5x at the
        median), which `python -m server`'s passive OpenMP waits keep from becoming a collapse; there, or with
        other work on the cores, --threads sets fewer.
        """
        return self.threads or usable_cpus()


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def usable_cpus() -> int:
    """Cores this process may run on: its CPU affinity, capped by its cgroup's CPU limit (docker --cpus, Kubernetes).

    os.cpu_count() counts the host's cores: in a 2-CPU container on a 64-core node, 64 torch threads would share
    2 cores' worth of time and stall each other at every barrier.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(CGROUP_CPU_MAX, encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))  # rounded up: 1.5 CPUs -> 2 threads
    except (OSError, ValueError):  # no cgroup v2 here, or a file we cannot read: the affinity alone
        pass
    return cpus


def _env_name(field: str) -> str:
    return "RERANKER_" + field.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError("not a boolean: use 1/true/yes/on or 0/false/no/off")


def _workers(text: str) -> int:
    """--tokenize-workers: auto (-1) or a count."""
    return -1 if text.strip().lower() == "auto" else int(text)


def _env_defaults(env: Mapping[str, str]) -> dict[str, object]:
    """Config defaults overridden by RERANKER_<FIELD> variables, converted to each field's type."""
    values: dict[str, object] = {}
    for f in fields(Config):
        if f.name == "tracing":  # read from the OTEL_* variables by load_config
            continue
        raw = env.get(_env_name(f.name))
        if f.name == "model" and env.get("RERANKER_MODELS"):
            raw = env["RERANKER_MODELS"]  # the list form wins over the single model
        default = f.default
        if raw is None or raw == "":
            values[f.name] = default
        elif f.name == "fp16" and raw.strip().lower() == "auto":
            values[f.name] = None
        elif f.name == "tokenize_workers" and raw.strip().lower() == "auto":
            values[f.name] = -1
        elif f.name == "fp16" or isinstance(default, bool):
            try:
                values[f.name] = _parse_bool(raw)
            except ConfigError as exc:
                raise ConfigError(f"{_env_name(f.name)}={raw!r}: {exc}") from None
        else:
            try:
                values[f.name] = type(default)(raw)
            except ValueError:
                wanted = {int: "an integer", float: "a number"}.get(type(default), "valid")
                raise ConfigError(f"{_env_name(f.name)}={raw!r}: not {wanted}") from None
    return values


class _Parser(argparse.ArgumentParser):
    """Errors in one line: the usage of 40-odd flags would bury the one that is wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The server's flags; every default comes from RERANKER_* environment variables."""
    d = _env_defaults(os.environ if env is None else env)
    p = _Parser(
        prog="python -m server",
        description="gRPC reranking service (FlagEmbedding cross-encoders). "
        "Every flag defaults to the RERANKER_<FLAG> environment variable, e.g. RERANKER_MODEL.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--model",
        action="append",
        help="a model to serve: NAME=PATH_OR_ID, or a Hugging Face id or local directory (named after its last "
        "part); repeat for several, the first is the default; RERANKER_MODELS takes a comma-separated list "
        f"(default: {d['model']})",
    )
    for n in (1, 2):
        p.add_argument(
            f"--legacy{n}-model",
            default=d[f"legacy{n}_model"],
            help=f"with --rest-port: the model that legacy {n}'s routes use (default: the default model)",
        )
    p.add_argument(
        "--watch-models",
        type=float,
        default=d["watch_models"],
        help="check the model directories every N seconds and swap in changed weights (SIGHUP does it at once); "
        "0 = off (%(default)s)",
    )
    p.add_argument("--device", default=d["device"], help="auto, cpu, cuda or cuda:N (%(default)s)")
    p.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=d["fp16"],
        help="half precision; default: on for CUDA, off for CPU",
    )
    p.add_argument("--host", default=d["host"], help="address to bind (%(default)s)")
    p.add_argument("--port", type=int, default=d["port"], help="gRPC port; 0 picks a free one (%(default)s)")
    p.add_argument("--max-length", type=int, default=d["max_length"], help="tokens per pair (%(default)s)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help="pairs per forward pass; 0 = sized for the device: 32 on CPU, up to 256 on CUDA (%(default)s)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=d["max_batch_tokens"],
        help="padded tokens per forward pass; 0 = sized for the device: 16384 on CPU, from free memory on CUDA "
        "(%(default)s)",
    )
    p.add_argument(
        "--tokenize-threads",
        type=int,
        default=d["tokenize_threads"],
        help="threads tokenizing requests; 0 = half the cores, 1 to 8 (%(default)s)",
    )
    p.add_argument(
        "--tokenize-workers",
        type=_workers,
        default=d["tokenize_workers"],
        help="tokenizer processes, so tokenizing never holds the GIL that drives the device; 0 = tokenize in "
        "--tokenize-threads threads of the server; auto = half the cores (2 to 8) on CUDA, 0 on CPU (default: "
        f"{'auto' if d['tokenize_workers'] == -1 else d['tokenize_workers']})",
    )
    p.add_argument(
        "--cuda-graphs",
        choices=("auto", "on", "off"),
        default=d["cuda_graphs"],
        help="on CUDA, capture each shape bucket's forward pass once and replay it (one call instead of hundreds of "
        "kernel launches); a model that cannot be captured runs eagerly, with one log line (%(default)s)",
    )
    p.add_argument("--max-wait-ms", type=float, default=d["max_wait_ms"], help="wait to fill a batch (%(default)s)")
    p.add_argument(
        "--max-queue-pairs", type=int, default=d["max_queue_pairs"], help="queued pairs before refusing (%(default)s)"
    )
    p.add_argument(
        "--max-candidates", type=int, default=d["max_candidates"], help="candidates or pairs per request (%(default)s)"
    )
    p.add_argument("--max-text-chars", type=int, default=d["max_text_chars"], help="characters per text (%(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=d["threads"],
        help="inference threads on CPU (torch, or ONNX Runtime for int8); 0 = the cores this process may use "
        "(its CPU affinity and cgroup limit) (%(default)s)",
    )
    p.add_argument("--grace-s", type=float, default=d["grace_s"], help="shutdown grace in seconds (%(default)s)")
    p.add_argument("--log-level", default=d["log_level"], help="DEBUG, INFO, WARNING, ERROR (%(default)s)")
    p.add_argument(
        "--log-json", action=argparse.BooleanOptionalAction, default=d["log_json"], help="one JSON object per log line"
    )
    p.add_argument(
        "--metrics-port", type=int, default=d["metrics_port"], help="Prometheus /metrics port; 0 = off (%(default)s)"
    )
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=d["max_concurrent_rpcs"],
        help="Rerank/GetModelInfo calls in flight before RESOURCE_EXHAUSTED; 0 = no cap (%(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=d["api_key"],
        help="require 'authorization: Bearer KEY' metadata (health and reflection excepted); "
        "prefer RERANKER_API_KEY, which does not show in the process list",
    )
    p.add_argument("--tls-cert", default=d["tls_cert"], help="PEM certificate chain; with --tls-key turns on TLS")
    p.add_argument("--tls-key", default=d["tls_key"], help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=d["tls_client_ca"], help="PEM CA: require client certificates (mTLS)")
    p.add_argument(
        "--rest-port",
        type=int,
        default=d["rest_port"],
        help="also serve the REST bridge (legacy, TEI, Infinity, Cohere routes) on this port, HTTPS with --tls-cert; "
        "0 = off (%(default)s)",
    )
    p.add_argument(
        "--rest-deadline-s",
        type=float,
        default=d["rest_deadline_s"],
        help="gRPC deadline of each REST bridge request, in seconds; then HTTP 504 (%(default)s)",
    )
    p.add_argument(
        "--max-windows-per-doc",
        type=int,
        default=d["max_windows_per_doc"],
        help="long_documents=CHUNK: most windows one passage is cut into (%(default)s)",
    )
    p.add_argument(
        "--max-windows-per-request",
        type=int,
        default=d["max_windows_per_request"],
        help="long_documents=CHUNK: most windows scored for one request (%(default)s)",
    )
    p.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default=d["model_type"],
        help="the reranker family whose recipe scores the model: cross-encoder (FlagReranker), llm (FlagLLMReranker, "
        "e.g. bge-reranker-v2-gemma), layerwise (LayerWiseFlagLLMReranker), lightweight "
        "(LightWeightFlagLLMReranker), qwen3-reranker (Qwen3-Reranker's chat template and yes/no head), "
        "mxbai-rerank-v2 (the mxbai-rerank package's prompt and 1/0 head); auto serves "
        "only a family it recognises for certain (README: the families table) (%(default)s)",
    )
    p.add_argument(
        "--cutoff-layer",
        type=int,
        default=d["cutoff_layer"],
        help="layer-wise reranker: the layer whose head gives the score; 0 = the last layer (%(default)s)",
    )
    p.add_argument(
        "--trust-remote-code",
        action=argparse.BooleanOptionalAction,
        default=d["trust_remote_code"],
        help="load a model whose config.json maps its classes to Python files shipped with it (auto_map, e.g. "
        "jina-reranker-v2): that code runs in the server with its permissions; off: such a model stops the server",
    )
    _add_connection_flags(p, d)
    _add_precision_flags(p, d)
    return p


def _add_precision_flags(p: argparse.ArgumentParser, d: Mapping[str, object]) -> None:
    """Faster, approximate cross-encoder modes, and the drift an operator accepts from them."""
    p.add_argument(
        "--dtype",
        default=d["dtype"],
        help="precision of the cross-encoders: auto (CPU fp32, CUDA fp16 unless --no-fp16), fp32, bf16 (a CPU with "
        "avx512_bf16 or AMX, or a GPU that has it), fp16 (CUDA), int8 (CPU, ONNX Runtime; needs the [int8] extra); "
        "NAME=VALUE for one model, comma-separated (%(default)s)",
    )
    p.add_argument(
        "--max-drift",
        type=float,
        default=d["max_drift"],
        help="refuse to serve a bf16/fp16/int8 model whose scores differ from fp32's by more than this on the drift "
        "sample measured at load; 0 = no bound (%(default)s)",
    )
    p.add_argument(
        "--min-rank-correlation",
        type=float,
        default=d["min_rank_correlation"],
        help="refuse to serve a bf16/fp16/int8 model whose ranking of the drift sample correlates with fp32's "
        "(Spearman) less than this; -1 = no bound (%(default)s)",
    )
    p.add_argument(
        "--quantize-cache",
        default=d["quantize_cache"],
        help="directory of the int8 conversions, one per model revision (never the model's own directory); "
        "default: ~/.cache/reranker-service/int8",
    )


def _add_connection_flags(p: argparse.ArgumentParser, d: Mapping[str, object]) -> None:
    """Bounds on slow, idle and excess connections, on both ports."""
    p.add_argument(
        "--handshake-timeout-s",
        type=float,
        default=d["handshake_timeout_s"],
        help="gRPC: seconds from connect to a complete HTTP/2 (and TLS) handshake (%(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=d["max_connections"],
        help="gRPC: open connections; past it new ones are closed at once (%(default)s)",
    )
    p.add_argument(
        "--max-connection-idle-s",
        type=float,
        default=d["max_connection_idle_s"],
        help="gRPC: close connections without a call for this long; 0 = never (%(default)s)",
    )
    p.add_argument(
        "--rest-header-timeout-s",
        type=float,
        default=d["rest_header_timeout_s"],
        help="REST: seconds from connect (or the last response) to complete request headers (%(default)s)",
    )
    p.add_argument(
        "--rest-body-timeout-s",
        type=float,
        default=d["rest_body_timeout_s"],
        help="REST: seconds to receive the whole body once the headers are in; then 408 (%(default)s)",
    )
    p.add_argument(
        "--rest-max-connections",
        type=int,
        default=d["rest_max_connections"],
        help="REST: open connections; past it new ones get 503 at once (%(default)s)",
    )
    p.add_argument(
        "--rest-auto-truncate",
        action=argparse.BooleanOptionalAction,
        default=d["rest_auto_truncate"],
        help="REST: a TEI /rerank body without truncate is truncated (TEI's --auto-truncate); off: an over-long "
        "text is refused (%(default)s)",
    )


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Parse flags (falling back to RERANKER_* variables) into a Config."""
    parser = build_parser(env)
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    args.model = ",".join(args.model) if args.model else _env_defaults(env)["model"]
    args.tracing = tracing_wanted(env)
    try:
        return Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    except ConfigError as exc:
        parser.error(_as_flag(str(exc)))
        raise  # unreachable: parser.error exits


def _as_flag(message: str) -> str:
    """'max_length must be ...' -> '--max-length (RERANKER_MAX_LENGTH) must be ...': the names a user typed."""
    name, sep, rest = message.partition(" ")
    if sep and name in {f.name for f in fields(Config)}:
        return f"--{name.replace('_', '-')} ({_env_name(name)}) {rest}"
    return message
