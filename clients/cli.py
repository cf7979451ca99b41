"""`python -m clients.python_client {rerank,health,info}`: call the service from a shell, print JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from clients._common import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, SERVICE_NAME, RerankerError
from clients.python_client import RerankerClient


def build_parser(prog: str = "python -m clients.python_client") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        action="append",
        help=f"host:port or dns:///name:port; repeat for several ip:port replicas (default {DEFAULT_TARGET})",
    )
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline in seconds (%(default)s)")
    common.add_argument("--api-key", help="sent as 'authorization: Bearer KEY'")
    common.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    common.add_argument("--root-certs", type=Path, help="PEM file of root certificates (implies --tls)")
    common.add_argument("--client-cert", type=Path, help="PEM client certificate for mutual TLS (with --client-key)")
    common.add_argument("--client-key", type=Path, help="PEM private key of --client-cert")

    p = argparse.ArgumentParser(prog=prog, description="Call the reranking service.")
    sub = p.add_subparsers(dest="command", required=True)
    rerank = sub.add_parser("rerank", parents=[common], help="rank candidates for a query; prints JSON")
    rerank.add_argument("--query", required=True)
    rerank.add_argument("--candidate", action="append", required=True, help="repeat once per candidate")
    rerank.add_argument("--top-n", type=int, help="keep the best N results")
    rerank.add_argument("--normalize", action="store_true", help="sigmoid scores in [0, 1] instead of raw logits")
    rerank.add_argument("--return-documents", action="store_true", help="include each candidate's text")
    rerank.add_argument("--max-length", type=int, help="tokens per pair (at most the server's limit)")
    rerank.add_argument("--model", default="", help="which loaded model scores it (default: the server's default)")
    rerank.add_argument(
        "--long-documents",
        choices=("truncate", "chunk", "truncate_left"),
        default="truncate",
        help="a passage too long for one pair: truncate it (%(default)s), score its best window, or keep its end",
    )
    rerank.add_argument("--instruction", default="", help="task instruction (Qwen3-Reranker, LLM rerankers)")
    rerank.add_argument("--query-max-length", type=int, help="tokens of the query per pair")
    health = sub.add_parser("health", parents=[common], help="grpc.health.v1 status; exit 0 only when SERVING")
    health.add_argument("--service", default=SERVICE_NAME, help="service to check (%(default)s; '' = server)")
    info = sub.add_parser("info", parents=[common], help="model, device, dtype, revision and request limits")
    info.add_argument("--model", default="", help="which loaded model to describe (default: the server's default)")
    return p


def run(args: argparse.Namespace) -> int:
    root_certs = args.root_certs.read_bytes() if args.root_certs else None
    with RerankerClient(
        args.target or DEFAULT_TARGET,
        timeout=args.timeout,
        api_key=args.api_key,
        tls=args.tls,
        root_certificates=root_certs,
        tls_client_cert=args.client_cert.read_bytes() if args.client_cert else None,
        tls_client_key=args.client_key.read_bytes() if args.client_key else None,
    ) as client:
        if args.command == "rerank":
            result = client.rerank(
                args.query,
                args.candidate,
                top_n=args.top_n,
                normalize=args.normalize,
                return_documents=args.return_documents,
                max_length=args.max_length,
                model=args.model,
                long_documents=args.long_documents,
                instruction=args.instruction,
                query_max_length=args.query_max_length,
            )
            _print(asdict(result))
            return 0
        if args.command == "health":
            status = client.health(args.service)
            _print({"status": status})
            return 0 if status == "SERVING" else 1
        _print(asdict(client.model_info(args.model)))
        return 0


def _print(value: object) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def main(argv: Sequence[str] | None = None, prog: str = "python -m clients.python_client") -> None:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        code = run(args)
    except RerankerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except (ValueError, OSError) as exc:  # a bad target list, an unreadable certificate file
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
