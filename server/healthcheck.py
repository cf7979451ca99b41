"""`python -m server.healthcheck`: exit 0 only when the server's grpc.health.v1 answers SERVING.

The container's HEALTHCHECK (and the TLS variant's Kubernetes probes) run it; it imports neither torch nor the
model code, so it starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import Config, ConfigError, load_config


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS trusting `ca`; with `cert` and `key`, a client certificate too (for a mutual-TLS server)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca),
        private_key=_read(key) if key else None,
        certificate_chain=_read(cert) if cert else None,
    )


def check(
    target: str,
    service: str = "",
    timeout: float = 3.0,
    tls: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> str:
    """The health status name for `service` at `target`, or the gRPC error code name when the call fails."""
    options = [("grpc.ssl_target_name_override", server_name)] if tls is not None and server_name else []
    channel = grpc.secure_channel(target, tls, options) if tls is not None else grpc.insecure_channel(target)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _local_target(config: Config) -> str:
    host = "127.0.0.1" if config.host in ("", "0.0.0.0", "::") else config.host
    return f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        default=None,
        help="host:port to ask; default: where the server binds (RERANKER_HOST, RERANKER_PORT), 0.0.0.0 as 127.0.0.1",
    )
    parser.add_argument("--service", default="", help='service name to ask about ("" = the whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds before giving up (%(default)s)")
    parser.add_argument("--tls-ca", default="", help="PEM CA of the server's certificate: ask over TLS")
    parser.add_argument("--tls-cert", default="", help="PEM client certificate, for a mutual-TLS server")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-server-name", default="localhost", help="name to verify in the server's certificate (%(default)s)"
    )
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        config = load_config([])  # the same RERANKER_* variables the server started with
    except ConfigError as exc:  # one line, as the server says it (which then did not start either)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    target = args.target or _local_target(config)
    try:
        tls = credentials(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    except OSError as exc:
        parser.error(f"cannot read a TLS file: {exc}")
    status = check(target, args.service, args.timeout, tls, args.tls_server_name)
    print(f"{target}: {status}")
    if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and tls is None:
        # A TLS port closes a plaintext connection (or waits for a handshake): it reads as one of these two.
        known = config.tls and not args.target
        why = "the server serves TLS (RERANKER_TLS_CERT is set)" if known else "the server may need TLS"
        print(f"asked in plaintext; {why}: pass --tls-ca, and for mutual TLS --tls-cert and --tls-key")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
