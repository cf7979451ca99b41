"""Qwen3-Reranker: our server against the model card's reference code on the same pairs (CPU), and what the two-row
head saves against full logits.

    python -m bench.qwen3 [--shape tiny|small] [--pairs 256] [--batch 32] [--clients 16]

Builds a random-weight Qwen3 reranker (`small`: 4 layers, hidden 256, Qwen3's 151,669-token vocabulary in the
model), makes `pairs` (query, passage) pairs of 30-250 tokens, and measures, one after the other:
- reference: the card's code in batches of `batch` (full logits at every position, then the last one's no/yes);
- engine: our forward passes over the same batches (the last token's hidden state times lm_head[yes] - lm_head[no]);
- server: a real in-process server on 127.0.0.1, `clients` concurrent gRPC clients splitting the pairs.
Each row reports pairs/s, the time per batch and the bytes of the scoring output of one batch (logits: rows x
width x vocabulary x 4; ours: rows x 4), and the largest difference in P(yes) against the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.common import QUERY, text_of_tokens


def _pairs(tok: Any, count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"{QUERY} {i % 8}", text_of_tokens(tok, rng.randint(30, 250), rng)) for i in range(count)]


def _reference(path: Path, pairs: list[tuple[str, str]], batch: int) -> tuple[list[float], float, int]:
    """P(yes) from the card's code, its seconds, and the bytes of one batch's logits (the largest)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.tokenize.chat import QWEN3_RERANKER as T

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    prefix = tok.encode(T.prefix, add_special_tokens=False)
    suffix = tok.encode(T.suffix, add_special_tokens=False)
    scores: list[float] = []
    biggest = 0
    start = time.perf_counter()
    for i in range(0, len(pairs), batch):
        part = pairs[i : i + batch]
        texts = [T.middle.format(instruction=T.default_instruction, query=q, document=d) for q, d in part]
        enc = tok(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                  max_length=512 - len(prefix) - len(suffix))  # fmt: skip
        enc["input_ids"] = [prefix + ids + suffix for ids in enc["input_ids"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inputs = tok.pad(enc, padding=True, return_tensors="pt", max_length=512)
        with torch.no_grad():
            logits = model(**inputs).logits
            biggest = max(biggest, logits.numel() * logits.element_size())
            last = logits[:, -1, :]
            pair = torch.stack([last[:, no], last[:, yes]], dim=1)
            scores += torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist()
    return scores, time.perf_counter() - start, biggest


def _engine(path: Path, pairs: list[tuple[str, str]], batch: int) -> tuple[list[float], float]:
    from server.config import Config
    from server.engine.qwen3 import Qwen3RerankerModel

    engine = Qwen3RerankerModel(Config(model=str(path)), str(path))
    engine.score(pairs[:2])  # warm
    scores: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(pairs), batch):
        scores += engine.score(pairs[i : i + batch])
    return [1 / (1 + math.exp(-s)) for s in scores], time.perf_counter() - start


async def _server(path: Path, pairs: list[tuple[str, str]], clients: int, batch: int) -> tuple[list[float], float]:
    import grpc

    from reranker_proto import reranker_pb2 as pb
    from reranker_proto import reranker_pb2_grpc as pb_grpc
    from server.app import RerankServer
    from server.config import Config

    srv = RerankServer(Config(model=str(path), host="127.0.0.1", port=0, batch_size=batch, grace_s=1.0))
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            await stub.Rerank(pb.RerankRequest(query="warm", candidates=["up"]))
            parts = [pairs[i::clients] for i in range(clients)]
            start = time.perf_counter()
            answers = await asyncio.gather(*(
                stub.Rerank(pb.RerankRequest(pairs=[pb.Pair(query=q, passage=p) for q, p in part], normalize=True))
                for part in parts
            ))  # fmt: skip
            elapsed = time.perf_counter() - start
    finally:
        await srv.stop(0)
    scores = [0.0] * len(pairs)
    for i, answer in enumerate(answers):
        for k, s in enumerate(answer.scores):
            scores[i + k * clients] = s
    return scores, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "small"), default="small")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from tools.make_model import build_qwen3_reranker

    with tempfile.TemporaryDirectory() as tmp:
        path = build_qwen3_reranker(Path(tmp) / "qwen3", shape=args.shape)
        pairs = _pairs(AutoTokenizer.from_pretrained(path), args.pairs, seed=0)
        ref, ref_s, logits_bytes = _reference(path, pairs, args.batch)
        ours, ours_s = _engine(path, pairs, args.batch)
        served, served_s = asyncio.run(_server(path, pairs, args.clients, args.batch))
    batches = math.ceil(args.pairs / args.batch)
    print(f"Qwen3-Reranker {args.shape}, {args.pairs} pairs of 30-250 tokens, batches of {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("| path | pairs/s | ms per batch | scoring output per batch | max abs diff in P(yes) |")
    print("| --- | ---: | ---: | ---: | ---: |")

    def diff(scores: list[float]) -> float:
        return max(abs(a - b) for a, b in zip(ref, scores, strict=True))

    rows = [
        ("reference (full logits)", ref_s, f"{logits_bytes / 2**20:,.0f} MiB", 0.0),
        ("our engine (yes - no head)", ours_s, f"{args.batch * 4} B", diff(ours)),
        (f"our server, {args.clients} gRPC clients", served_s, f"{args.batch * 4} B", diff(served)),
    ]
    for name, seconds, output, diff in rows:
        print(f"| {name} | {args.pairs / seconds:,.0f} | {seconds / batches * 1e3:,.0f} | {output} | {diff:.1e} |")


if __name__ == "__main__":
    main()
