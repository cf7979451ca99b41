"""The bridge's configuration: CLI flags whose defaults come from RERANKER_* variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields


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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535 (0 picks a free port), got {self.port}")
        for name in ("deadline_s", "max_body_bytes", "max_pairs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


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
}


def load_bridge_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> BridgeConfig:
    """Parse flags (falling back to RERANKER_* variables) into a BridgeConfig."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m rest_bridge",
        description="REST bridge to the gRPC reranking service (legacy, TEI, Infinity and Cohere endpoints, /docs).",
    )
    for f in fields(BridgeConfig):
        kind = type(f.default)
        raw = env.get(ENV_NAMES[f.name], "")
        try:
            default = kind(raw) if raw else f.default
        except ValueError as exc:
            parser.error(f"{ENV_NAMES[f.name]}={raw!r}: {exc}")
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=default, help=f"{HELP[f.name]} (%(default)s; {ENV_NAMES[f.name]})")
    args = parser.parse_args(argv)
    try:
        return BridgeConfig(**{f.name: getattr(args, f.name) for f in fields(BridgeConfig)})
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
