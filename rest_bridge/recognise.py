"""Which dialect a body speaks: told by what it carries, on the paths several APIs share.

One rule everywhere: a field that some dialect reads but the chosen one does not is refused, naming whose it is,
never silently dropped; fields no dialect reads are ignored, as every one of these APIs ignores them. Among the
dialects whose vocabulary covers the body, the path's first (its documented default) answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from rest_bridge.dialects import COHERE_V1, COHERE_V2, INFINITY, LEGACY_2, TEI, Dialect
from rest_bridge.dialects_vendors import MIXEDBREAD, NIM, VOYAGE
from rest_bridge.dialects_vllm import VLLM_RERANK, VLLM_SCORE
from rest_bridge.errors import BadRequest

ALL: tuple[Dialect[Any], ...] = (
    LEGACY_2,
    TEI,
    INFINITY,
    COHERE_V1,
    COHERE_V2,
    VLLM_RERANK,
    VLLM_SCORE,
    VOYAGE,
    MIXEDBREAD,
    NIM,
)
EVERYONE = frozenset({"model"})  # sent by clients of every API (TEI's included), read where the dialect has one

# Shared paths: the dialects each may carry, the default first.
RERANK_LISTS: dict[str, tuple[Dialect[Any], ...]] = {
    "compare_to": (LEGACY_2,),
    "texts": (TEI,),
    "documents": (INFINITY, VLLM_RERANK, VOYAGE),
}
V1_RERANK = (COHERE_V1, VLLM_RERANK, VOYAGE)
V2_RERANK = (COHERE_V2, VLLM_RERANK)


@cache
def _owners() -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for dialect in ALL:
        for field in dialect.vocabulary - EVERYONE:
            owners.setdefault(field, []).append(dialect.name)
    return owners


def foreign(dialect: Dialect[Any], body: dict[str, Any]) -> list[str]:
    """The body's fields that other dialects read and this one does not."""
    owners = _owners()
    return [key for key in body if key in owners and key not in dialect.vocabulary and key not in EVERYONE]


def _whose(field: str) -> str:
    return f"{field} ({', '.join(_owners()[field])})"


def check_own(dialect: Dialect[Any], body: dict[str, Any]) -> None:
    """On a dialect's own path: refuse another dialect's fields."""
    strangers = foreign(dialect, body)
    if strangers:
        raise BadRequest(
            f"{', '.join(_whose(f) for f in strangers)} {'is' if len(strangers) == 1 else 'are'} not {dialect.name}'s: "
            f"this path speaks {dialect.name}; send those fields to their own API's path (see /docs)"
        )


def choose(candidates: Sequence[Dialect[Any]], body: dict[str, Any]) -> Dialect[Any]:
    """The first candidate whose vocabulary covers the body's fields; BadRequest naming whose fields clash."""
    for dialect in candidates:
        if not foreign(dialect, body):
            return dialect
    if len(candidates) == 1:
        check_own(candidates[0], body)
    clashing = sorted({f for d in candidates for f in foreign(d, body)})
    homes = ", ".join(f"{d.name} {d.home}" for d in candidates)
    raise BadRequest(
        f"the body mixes fields of different APIs: {', '.join(_whose(f) for f in clashing)}; send one API's fields, "
        f"or use its own path ({homes})"
    )


def rerank_candidates(body: dict[str, Any]) -> Sequence[Dialect[Any]]:
    """POST /rerank: legacy 2, TEI, or the {query, documents} dialects, told apart first by the body's list."""
    keys = [key for key in RERANK_LISTS if key in body]
    if len(keys) == 1:
        return RERANK_LISTS[keys[0]]
    if keys:
        raise BadRequest(f"the body has {' and '.join(keys)}; send exactly one of them (see /docs)")
    raise BadRequest(
        '"compare_to" is required: POST /rerank takes legacy 2\'s {"query", "compare_to"}, '
        'TEI\'s {"query", "texts"} or Infinity\'s, vLLM\'s or Voyage\'s {"query", "documents"}'
    )
