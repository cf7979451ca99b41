"""(d) The naive server: one FlagReranker.compute_score per request, like legacy 1, on the same proto.

`python -m bench.naive_server --model DIR --port N [--workers 1]`
One worker thread by default: compute_score calls in parallel threads share one tokenizer (the Rust
tokenizer raises "Already borrowed" when two calls change its truncation at once) and oversubscribe the
cores, so a legacy one-model server effectively serves requests one at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402

from reranker_proto import reranker_pb2 as pb  # noqa: E402
from reranker_proto import reranker_pb2_grpc as pb_grpc  # noqa: E402


class NaiveReranker(pb_grpc.RerankerServicer):
    def __init__(self, model_dir: str) -> None:
        from FlagEmbedding import FlagReranker

        self.model = model_dir
        self.flag = FlagReranker(model_dir, devices=["cpu"], use_fp16=False, batch_size=32)

    def Rerank(self, request: pb.RerankRequest, context: grpc.ServicerContext) -> pb.RerankResponse:
        if request.pairs:
            pairs = [[p.query, p.passage] for p in request.pairs]
        else:
            pairs = [[request.query, c] for c in request.candidates]
        scores = self.flag.compute_score(pairs, normalize=request.normalize)
        scores = scores if isinstance(scores, list) else [scores]  # one pair gives a bare float
        return pb.RerankResponse(scores=scores, model=self.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    service = NaiveReranker(args.model)
    service.flag.compute_score([["warm up", "a short passage to warm up the model"]] * 2)
    server = grpc.server(ThreadPoolExecutor(args.workers))
    pb_grpc.add_RerankerServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"naive server listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    server.wait_for_termination()  # SIGTERM ends the process


if __name__ == "__main__":
    main()
