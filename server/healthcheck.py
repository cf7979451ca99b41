"""`python -m server.healthcheck`: exit 0 only when the server's grpc.health.v1 answers SERVING.

The container's HEALTHCHECK runs it; it imports neither torch nor the model code, so it starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import load_config


def check(target: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status name for `service` at `target`, or the gRPC error code name when the call fails."""
    with grpc.insecure_channel(target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _local_target() -> str:
    config = load_config([])  # the same RERANKER_* variables the server started with
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
    args = parser.parse_args(argv)
    target = args.target or _local_target()
    status = check(target, args.service, args.timeout)
    print(f"{target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
