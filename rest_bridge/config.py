"""The bridge's configuration: CLI flags whose defaults come from RERANKER_* variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from server.tracing import wanted as tracing_wanted


@dataclass(frozen=True)
class BridgeConfig:
    grpc_target: str = "127.0.0.1:50051"
    host: str = "0.0.0.0"
    port: int = 6009
    deadline_s: float = 30.0  # gRPC deadline of each request
    max_body_bytes: int = 16 * 1024 * 1024  # larger bodies get 413
    max_pairs: int = 1000  # pairs in legacy 1's text_pairs (the server applies its own limit too)
    log_level: str = "INFO"
    legacy1_model: str = ""  # the model legacy 1's route asks for; "" = the server's default
    legacy2_model: str = ""  # the model legacy 2's routes ask for; "" = the server's default
    auto_truncate: bool = True  # TEI's --auto-truncate: a /rerank TEI body without `truncate` truncates
    # Slow and vanished clients (rest_bridge/guard.py).
    header_timeout_s: float = 10.0  # connect (or end of the last response) to complete request headers
    body_timeout_s: float = 30.0  # complete headers to the whole body
    max_connections: int = 1000  # open connections; past it, 503 at once
    # HTTPS on the bridge's own port.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # clients must present a certificate this CA signed
    # TLS to --grpc-target: on when grpc_ca is set; grpc_cert/grpc_key add a client certificate (mutual TLS).
    grpc_ca: str = ""
    grpc_cert: str = ""
    grpc_key: str = ""
    grpc_server_name: str = ""  # the name to verify in the server's certificate, when the target's differs
    api_key: str = field(default="", repr=False)  # sent on the bridge's own calls (the docs page's model list)
    metrics_port: int = 0  # Prometheus /metrics of the standalone bridge; 0 = off
    tracing: bool = False  # OpenTelemetry traces: on when OTEL_TRACES_EXPORTER names an exporter (server/tracing.py)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535 (0 picks a free port), got {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535 (0 turns metrics off), got {self.metrics_port}")
        positive = (
            "deadline_s",
            "max_body_bytes",
            "max_pairs",
            "header_timeout_s",
            "body_timeout_s",
            "max_connections",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self._check_tls()

    def _check_tls(self) -> None:
        for cert, key in (("tls_cert", "tls_key"), ("grpc_cert", "grpc_key")):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                raise ValueError(f"--{cert.replace('_', '-')} and --{key.replace('_', '-')} go together: set both")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (HTTPS) as well")
        if self.grpc_cert and not self.grpc_ca:
            raise ValueError("--grpc-cert needs --grpc-ca: the CA that signed the gRPC server's certificate")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "grpc_ca", "grpc_cert", "grpc_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"--{name.replace('_', '-')} {path!r}: no such file")


# Flag -> environment variable; `port` shares RERANKER_REST_PORT with `python -m server --rest-port`.
ENV_NAMES = {
    "grpc_target": "RERANKER_GRPC_TARGET",
    "host": "RERANKER_REST_HOST",
    "port": "RERANKER_REST_PORT",
    "deadline_s": "RERANKER_REST_DEADLINE_S",
    "max_body_bytes": "RERANKER_REST_MAX_BODY_BYTES",
    "max_pairs": "RERANKER_REST_MAX_PAIRS",
    "log_level": "RERANKER_LOG_LEVEL",
    "legacy1_model": "RERANKER_LEGACY1_MODEL",
    "legacy2_model": "RERANKER_LEGACY2_MODEL",
    "auto_truncate": "RERANKER_REST_AUTO_TRUNCATE",
    "header_timeout_s": "RERANKER_REST_HEADER_TIMEOUT_S",
    "body_timeout_s": "RERANKER_REST_BODY_TIMEOUT_S",
    "max_connections": "RERANKER_REST_MAX_CONNECTIONS",
    "tls_cert": "RERANKER_REST_TLS_CERT",
    "tls_key": "RERANKER_REST_TLS_KEY",
    "tls_client_ca": "RERANKER_REST_TLS_CLIENT_CA",
    "grpc_ca": "RERANKER_GRPC_CA",
    "grpc_cert": "RERANKER_GRPC_CERT",
    "grpc_key": "RERANKER_GRPC_KEY",
    "grpc_server_name": "RERANKER_GRPC_SERVER_NAME",
    "api_key": "RERANKER_API_KEY",
    "metrics_port": "RERANKER_BRIDGE_METRICS_PORT",
}

HELP = {
    "grpc_target": "host:port of the gRPC reranking server",
    "host": "address to bind",
    "port": "HTTP port; 0 picks a free one",
    "deadline_s": "gRPC deadline of each request, in seconds; then 504 (python -m server: --rest-deadline-s)",
    "max_body_bytes": "largest request body; larger ones get 413",
    "max_pairs": "most pairs in legacy text_pairs",
    "log_level": "DEBUG, INFO, WARNING, ERROR",
    "legacy1_model": "model that scores POST /bge-reranker-base/post; empty = the server's default",
    "legacy2_model": "model that scores legacy 2's POST /rerank {query, compare_to}; empty = the server's default",
    "auto_truncate": "true/false: what a TEI /rerank body without truncate does: truncate, or refuse an over-long text",
    "header_timeout_s": "seconds from connecting (or the last response) to complete request headers",
    "body_timeout_s": "seconds to receive the whole request body once the headers are in; then 408",
    "max_connections": "open connections; past it new ones get 503 at once",
    "tls_cert": "PEM certificate chain: serve HTTPS (with --tls-key)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA: require client certificates it signed (mutual TLS)",
    "grpc_ca": "PEM CA of the gRPC server's certificate: call --grpc-target over TLS",
    "grpc_cert": "PEM client certificate for mutual TLS to --grpc-target (with --grpc-key)",
    "grpc_key": "PEM private key of --grpc-cert",
    "grpc_server_name": "name to verify in the gRPC server's certificate when it differs from the target's",
    "api_key": "the server's API key, sent only on the bridge's own calls (the model list on /docs); callers send "
    "their own Authorization header",
    "metrics_port": "serve Prometheus /metrics (reranker_rest_*) on this port; 0 = off",
}


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean: use 1/true/yes/on or 0/false/no/off")


def load_bridge_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """Parse flags (falling back to RERANKER_* variables) into a BridgeConfig."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m rest_bridge",
        description="REST bridge to the gRPC reranking service (legacy, TEI, Infinity and Cohere endpoints, /docs).",
    )
    for f in fields(BridgeConfig):
        if f.name == "tracing":  # no flag: the OTEL_* variables say
            continue
        kind = parse_bool if isinstance(f.default, bool) else type(f.default)
        raw = env.get(ENV_NAMES[f.name], "")
        try:
            default = kind(raw) if raw else f.default
        except ValueError as exc:
            parser.error(f"{ENV_NAMES[f.name]}={raw!r}: {exc}")
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=default, help=f"{HELP[f.name]} (%(default)s; {ENV_NAMES[f.name]})")
    args = parser.parse_args(argv)
    try:
        values = {f.name: getattr(args, f.name) for f in fields(BridgeConfig) if f.name != "tracing"}
        return BridgeConfig(**values, tracing=tracing_wanted(env))
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
