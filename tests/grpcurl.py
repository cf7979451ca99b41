"""`python -m tests.grpcurl [-plaintext] [-H 'name: value'] [-d JSON] HOST:PORT SERVICE/METHOD`: what the README's
grpcurl lines do (protobuf's JSON mapping in and out, unary calls only), for machines without grpcurl, which no
package registry this project uses carries. tests/test_readme.py runs the README's grpcurl lines through it."""

from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2  # noqa: F401  (registers grpc.health.v1 in the default pool)

from reranker_proto import reranker_pb2  # noqa: F401  (registers reranker.v1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="grpcurl", prefix_chars="-")
    parser.add_argument("-plaintext", action="store_true")
    parser.add_argument("-H", action="append", default=[], dest="headers")
    parser.add_argument("-d", default="{}", dest="data")
    parser.add_argument("target")
    parser.add_argument("method")
    args = parser.parse_args()
    if not args.plaintext:
        parser.error("only -plaintext is supported here")
    service, _, name = args.method.rpartition("/")
    method = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    request = json_format.Parse(args.data, message_factory.GetMessageClass(method.input_type)())
    response_class = message_factory.GetMessageClass(method.output_type)
    metadata = [(k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in args.headers)]
    with grpc.insecure_channel(args.target) as channel:
        call = channel.unary_unary(
            f"/{service}/{name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        try:
            response = call(request, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            print(f"ERROR:\n  Code: {exc.code().name}\n  Message: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    print(json_format.MessageToJson(response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
