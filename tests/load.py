"""Requests for load and fault tests, and the check that an answer is whole."""

from __future__ import annotations

from reranker_proto import reranker_pb2 as pb

QUERIES = ["what is panda?", "什么是函数计算", "how do rerankers work?", "gRPC health checking"]
PASSAGES = [
    "hi",
    "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
    "is a bear species endemic to China.",
    "函数计算是阿里云Serverless计算服务，提供专业的Serverless架构服务托管",
    "A reranker scores how relevant a passage is to a query.",
    "今天天气怎么样",
    "The quick brown fox jumps over the lazy dog.",
]


def rerank_request(i: int, candidates: int | None = None) -> pb.RerankRequest:
    """The i-th request of a load: 1 or 2 short candidates (or `candidates`), sometimes top_n and normalize."""
    n = candidates or 1 + i % 2
    return pb.RerankRequest(
        query=QUERIES[i % len(QUERIES)],
        candidates=[PASSAGES[(i + k) % len(PASSAGES)] for k in range(n)],
        top_n=i % 3,
        normalize=i % 2 == 0,
        return_documents=i % 5 == 0,
    )


def is_whole(req: pb.RerankRequest, resp: pb.RerankResponse) -> bool:
    """Every score, the ranked results cut to top_n, best first, documents when asked: no half answer."""
    n = len(req.candidates) or len(req.pairs)
    expected = min(req.top_n, n) if req.top_n else n
    ranked = [r.score for r in resp.results]
    return (
        len(resp.scores) == n
        and len(resp.results) == expected
        and ranked == sorted(ranked, reverse=True)
        and all(resp.scores[r.index] == r.score for r in resp.results)
        and all(bool(r.document) == req.return_documents for r in resp.results)
        and resp.usage.pairs == n
    )
