"""The bridge's gRPC channel: plaintext, or TLS (optionally with a client certificate) to --grpc-target."""

from __future__ import annotations

from typing import Any

import grpc

from rest_bridge.config import BridgeConfig


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def open_channel(config: BridgeConfig, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """TLS when --grpc-ca is set: the server's certificate is verified against it (name: --grpc-server-name)."""
    if not config.grpc_ca:
        return grpc.aio.insecure_channel(config.grpc_target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(config.grpc_ca),
        private_key=_read(config.grpc_key) if config.grpc_key else None,
        certificate_chain=_read(config.grpc_cert) if config.grpc_cert else None,
    )
    if config.grpc_server_name:
        options = [*options, ("grpc.ssl_target_name_override", config.grpc_server_name)]
    return grpc.aio.secure_channel(config.grpc_target, credentials, options=options)
