"""Each dialect's truncation fields, mapped onto the contract's limits: FlagReranker's `max_length` (the pair) and
`query_max_length` (the query inside it), and `long_documents` for a passage that does not fit beside the query.

No dialect needs a mode of its own: refusing an over-long passage is CHUNK with one window per passage, which the
server refuses for a passage that needs more, naming it; `refused` turns that refusal into the dialect's words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

from reranker_proto import reranker_pb2 as pb


@dataclass(frozen=True)
class Fit:
    """How a request's passages meet the pair limit."""

    long_documents: int = pb.LONG_DOCUMENTS_TRUNCATE
    max_windows_per_doc: int = 0
    max_length: int = 0  # the pair's token limit; 0: the server's
    query_max_length: int = 0  # the query's token limit inside the pair; 0: the server's (3/4 of max_length)

    def to(self, req: pb.RerankRequest) -> pb.RerankRequest:
        req.long_documents = self.long_documents  # type: ignore[assignment]
        req.max_windows_per_doc = self.max_windows_per_doc
        req.max_length = self.max_length
        req.query_max_length = self.query_max_length
        return req


TRUNCATE = Fit()
TRUNCATE_LEFT = Fit(pb.LONG_DOCUMENTS_TRUNCATE_LEFT)
REFUSE = Fit(pb.LONG_DOCUMENTS_CHUNK, 1)  # one window each: the server refuses a passage that needs two


def truncate(left: bool = False, max_length: int = 0, query_max_length: int = 0) -> Fit:
    mode = pb.LONG_DOCUMENTS_TRUNCATE_LEFT if left else pb.LONG_DOCUMENTS_TRUNCATE
    return Fit(mode, 0, max_length, query_max_length)


def best_window(max_chunks_per_doc: int | None) -> Fit:
    """Score a long passage by its best window (at most this many; None: the server's --max-windows-per-doc)."""
    return Fit(pb.LONG_DOCUMENTS_CHUNK, max_chunks_per_doc or 0)


_NEEDS = re.compile(r"^(?:candidates\[(\d+)\]|pairs\[(\d+)\]\.passage) needs (\d+) windows")


def refused(req: pb.RerankRequest, exc: grpc.aio.AioRpcError) -> int | None:
    """The index of the passage the server refused under REFUSE for not fitting beside the query, else None."""
    if req.long_documents != pb.LONG_DOCUMENTS_CHUNK or req.max_windows_per_doc != 1:
        return None
    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return None
    found = _NEEDS.match(exc.details() or "")
    return int(found.group(1) or found.group(2)) if found else None
