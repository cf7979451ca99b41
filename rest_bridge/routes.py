"""Every rerank and score route: its path, the dialects it carries (the default first), and how the body picks one.

app.py adds them, openapi.py documents them, from this one table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from rest_bridge.dialects import COHERE_V1, COHERE_V2, INFINITY, LEGACY_2, TEI, Dialect
from rest_bridge.dialects_vendors import MIXEDBREAD, NIM, VOYAGE
from rest_bridge.dialects_vllm import VLLM_RERANK, VLLM_SCORE
from rest_bridge.handlers import dialect_route
from rest_bridge.recognise import V1_RERANK, V2_RERANK, rerank_candidates


@dataclass(frozen=True)
class Route:
    path: str
    dialects: tuple[Dialect[Any], ...]  # what the path carries; the first answers a body that fits several
    summary: str
    description: str
    pick: Callable[[dict[str, Any]], Sequence[Dialect[Any]]] | None = None  # the candidates for a body; None: all

    @property
    def own(self) -> bool:
        return len(self.dialects) == 1 and self.pick is None

    def handler(self) -> Callable[[web.Request], Any]:
        dialects = self.dialects
        return dialect_route(self.pick or (lambda body: dialects), dialects[0].error if self.own else None)


SHARED_RULE = (
    "Told apart by the body: a field another dialect reads and the chosen one does not is refused (400 naming it "
    "and whose it is); among the dialects whose fields cover the body, the first listed answers."
)
RERANK = Route(
    "/rerank",
    (LEGACY_2, TEI, INFINITY, VLLM_RERANK, VOYAGE),
    "Legacy 2, TEI, Infinity, vLLM or Voyage, told apart by the body",
    "`compare_to`: legacy 2, `{object: list, data}` sigmoid scores in input order. `texts`: TEI, an array of "
    "`{index, score, text?}` best first; without `truncate` it follows --auto-truncate (true: cut, as TEI now "
    "does), `truncate: false` refuses an over-long text with 413, `max_chunks_per_doc` scores its best window. "
    "`documents`: Infinity (the default), vLLM (any of its fields: `truncate_prompt_tokens`, `use_activation`, "
    "...) or Voyage (`top_k`, `truncation`). " + SHARED_RULE,
    rerank_candidates,
)
ROUTES: tuple[Route, ...] = (
    RERANK,
    Route("/reank", RERANK.dialects, RERANK.summary, RERANK.description, rerank_candidates),
    Route(
        "/v1/rerank",
        V1_RERANK,
        "Cohere v1 (and Jina), vLLM or Voyage rerank",
        "Cohere v1 by default (errors `{message}`); vLLM with any of its own fields (errors `{error: {...}}`); "
        "Voyage with `top_k` or `truncation` (errors `{detail}`). " + SHARED_RULE,
    ),
    Route(
        "/v2/rerank",
        V2_RERANK,
        "Cohere v2 or vLLM rerank",
        "Cohere v2 by default; vLLM with any of its own fields. " + SHARED_RULE,
    ),
    Route("/score", (VLLM_SCORE,), "vLLM score", "vLLM's score API: one pair of inputs, 1:1, 1:N or N:N."),
    Route("/v1/score", (VLLM_SCORE,), "vLLM score", "vLLM's score API (its /v1 path)."),
    Route("/v1/reranking", (MIXEDBREAD,), "Mixedbread rerank", "Mixedbread's reranking API; errors `{detail}`."),
    Route("/v1/ranking", (NIM,), "NVIDIA NIM ranking", "Raw logits, best first; errors in problem-details shape."),
    Route(
        "/v1/retrieval/{model}/reranking",
        (NIM,),
        "NVIDIA NIM ranking, the model in the path",
        "As /v1/ranking; the path's model (it may hold slashes) picks the model.",
    ),
    # Paths that always select one dialect, for clients that take a base URL.
    Route("/legacy2/rerank", (LEGACY_2,), "Legacy 2 only", "Legacy 2's `{query, compare_to}`."),
    Route("/tei/rerank", (TEI,), "TEI only", "TEI's `/rerank`."),
    Route("/infinity/rerank", (INFINITY,), "Infinity only", "Infinity's `/rerank`."),
    Route("/cohere/v1/rerank", (COHERE_V1,), "Cohere v1 only", "Cohere's v1 rerank."),
    Route("/jina/v1/rerank", (COHERE_V1,), "Jina only", "Jina's rerank (Cohere v1's shape)."),
    Route("/cohere/v2/rerank", (COHERE_V2,), "Cohere v2 only", "Cohere's v2 rerank."),
    Route("/vllm/rerank", (VLLM_RERANK,), "vLLM rerank only", "vLLM's rerank API."),
    Route("/vllm/v1/rerank", (VLLM_RERANK,), "vLLM rerank only", "vLLM's rerank API (its /v1 path)."),
    Route("/vllm/v2/rerank", (VLLM_RERANK,), "vLLM rerank only", "vLLM's rerank API (its /v2 path)."),
    Route("/vllm/score", (VLLM_SCORE,), "vLLM score only", "vLLM's score API."),
    Route("/vllm/v1/score", (VLLM_SCORE,), "vLLM score only", "vLLM's score API (its /v1 path)."),
    Route("/voyage/v1/rerank", (VOYAGE,), "Voyage only", "Voyage's rerank (base URL .../voyage/v1)."),
)


def add_routes(router: web.UrlDispatcher) -> None:
    for route in ROUTES:
        path = route.path.replace("{model}", "{model:.+}")  # NIM's model names hold slashes
        router.add_post(path, route.handler())
