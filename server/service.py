"""The Reranker servicer: validate, convert to pairs, score through the batcher, rank, respond."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server import __version__, tracing
from server.admission import Admission
from server.chunking import Limit, Splitter, WindowPlan, split_passages
from server.config import Config
from server.engine.batcher import Batcher
from server.errors import InvalidRequest, NotReady, UnknownModel, status_for
from server.inflight import Calls
from server.interceptors import MAX_REQUEST_ID_CHARS
from server.metrics import Metrics
from server.stream import answer_stream
from server.tokenize.options import Options
from server.tokenize.tokenizing import Tokenizing


class Engine(Protocol):
    """What the servicer needs from the model layer."""

    name: str
    path: str
    revision: str
    device: str
    dtype: str
    max_length: int
    parameters: int
    encoder: Any  # its tokenizing alone (server.tokenize), which a worker process can run without the weights

    family: str  # whose recipe scores it (README: the families table)
    default_instruction: str  # the instruction a request without one gets; "" where the family takes none

    def encode(self, pairs: Sequence[tuple[str, str]], options: Options | int | None = None) -> list[Any]: ...

    def refuse(self, options: Options) -> str | None: ...

    def splitter(self, options: Options, tokenizer: Any) -> Splitter: ...

    def thread_tokenizer(self) -> Any: ...

    def copy_tokenizer(self, threads: int) -> None: ...

    def warm_up(self, pairs: int = 1) -> None: ...


log = logging.getLogger(__name__)

TOKENIZE_SLICE = 128  # pairs per tokenizer call: big enough for the batched calls, small enough to spread
TOKENIZE_SLICE_CHARS = 256 * 1024  # characters per tokenizer call (about 30 ms of tokenizing on one core)


@dataclass(frozen=True)
class Scoring:
    """A loaded model and the batcher in front of it."""

    engine: Engine
    batcher: Batcher[Any]
    tokenizing: Tokenizing  # threads or worker processes: tokenizing overlaps the forward pass, off the loop
    batching: Any  # the budgets the batcher was given and where they came from (server.engine.model.Batching)
    shapes: str = ""  # how the device's shapes were warmed (server.engine.warm), for the startup line
    calls: Calls = field(default_factory=Calls)

    def unavailable(self) -> str:
        """Why this model cannot score now ("" when it can): no live tokenizer worker, its device loop ended, or its
        inference thread stuck on one batch past the bound."""
        return self.tokenizing.unavailable() or self.batcher.unavailable()

    async def split(self, pairs: list[tuple[str, str]], plan: WindowPlan, options: Options) -> Any:
        """Cut the passages too long for one pair into windows (long_documents=CHUNK), on the tokenizing pool."""

        def split() -> Any:  # on a tokenizing thread, with that thread's own tokenizer
            splitter = self.engine.splitter(options, self.engine.thread_tokenizer())
            return split_passages(splitter, pairs, plan)

        split_traced = tracing.on_thread("split", split, {"reranker.pairs": len(pairs)})
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing.executor, split_traced)

    async def encode(self, pairs: list[tuple[str, str]], options: Options) -> AsyncIterator[list[Any]]:
        """Tokenize a large request in slices, in parallel on the tokenizing threads (or workers); each slice in
        order as soon as it is done, so the batcher starts on the first while the rest are tokenized. A request has
        at most one slice per thread and one more queued at a time, so another caller's slice waits for about two
        slices, not for all of them."""
        loop, t = asyncio.get_running_loop(), self.tokenizing
        cuts = iter(slices(pairs))
        running: deque[asyncio.Future[list[Any]]] = deque()

        def more() -> None:
            cut = next(cuts, None)
            if cut is not None:
                encode = tracing.on_thread("tokenize", t.encode, {"reranker.pairs": cut.stop - cut.start})
                running.append(loop.run_in_executor(t.executor, encode, pairs[cut], options))

        for _ in range(t.parallel + 1):  # one queued behind those running: the threads never wait for the loop
            more()
        try:
            while running:
                part = await running[0]
                running.popleft()
                more()
                yield part
        finally:  # the caller is gone or a slice failed: slices not started yet are not tokenized at all
            for part in running:
                part.cancel()
                part.add_done_callback(_consume)

    async def retire(self, timeout_s: float, why: str) -> None:
        """Stop once the calls already using this model are answered (a replaced model: they finish on it, wherever
        they are: cutting windows, tokenizing, queued), then stop its batcher and tokenizing. Calls still running
        after `timeout_s` fail with UNAVAILABLE saying `why`."""
        self.calls.retired = why
        start = time.monotonic()
        try:
            if not await self.calls.wait_idle(timeout_s):
                log.warning("%d calls still running on a retired model after %.0f s: stopping it", self.calls.open,
                            timeout_s)  # fmt: skip
            await self.batcher.close_when_idle(max(0.0, timeout_s - (time.monotonic() - start)))
        finally:  # also when the server stops first: the old model's workers go with it
            await self.batcher.stop()
            await asyncio.to_thread(self.tokenizing.close)


def slices(pairs: list[tuple[str, str]]) -> list[slice]:
    """Consecutive slices of at most TOKENIZE_SLICE pairs and TOKENIZE_SLICE_CHARS characters (at least one pair):
    big enough for the batched tokenizer calls, small enough that long texts do not hold a thread for long."""
    out, start, chars = [], 0, 0
    for i, (q, p) in enumerate(pairs):
        if i > start and (i - start == TOKENIZE_SLICE or chars + len(q) + len(p) > TOKENIZE_SLICE_CHARS):
            out.append(slice(start, i))
            start, chars = i, 0
        chars += len(q) + len(p)
    out.append(slice(start, len(pairs)))
    return out


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a dropped slice's outcome, so that its error (if any) is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


def sigmoid(x: float) -> float:
    if x < -700.0:  # math.exp overflows past ~709
        return 0.0
    return 1.0 / (1.0 + math.exp(-x))


def _check_text(text: str, what: str, limit: int) -> None:
    if not text.strip():
        raise InvalidRequest(f"{what} is empty")
    if len(text) > limit:
        raise InvalidRequest(f"{what} has {len(text)} characters; the limit is {limit}")


def request_pairs(req: pb.RerankRequest, config: Config) -> tuple[list[tuple[str, str]], list[str]]:
    """The (query, passage) pairs and their documents, or InvalidRequest naming the broken rule."""
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id has {len(req.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
    if req.pairs and (req.query or req.candidates):
        raise InvalidRequest("use either query + candidates or pairs, not both")
    count = len(req.pairs) or len(req.candidates)
    if count == 0:
        if req.query and not req.query.strip():
            raise InvalidRequest("query is empty")
        raise InvalidRequest("no candidates: send query + candidates, or pairs")
    if count > config.max_candidates:
        raise InvalidRequest(f"{count} candidates/pairs; the limit is {config.max_candidates} per request")
    if req.max_length > config.max_length:
        raise InvalidRequest(f"max_length {req.max_length} is above the server's limit of {config.max_length} tokens")
    if req.query_max_length > (req.max_length or config.max_length):
        raise InvalidRequest(
            f"query_max_length {req.query_max_length} is above the pair's max_length of "
            f"{req.max_length or config.max_length} tokens"
        )
    if req.instruction:
        _check_text(req.instruction, "instruction", config.max_text_chars)
    if req.pairs:
        for i, p in enumerate(req.pairs):
            _check_text(p.query, f"pairs[{i}].query", config.max_text_chars)
            _check_text(p.passage, f"pairs[{i}].passage", config.max_text_chars)
        return [(p.query, p.passage) for p in req.pairs], [p.passage for p in req.pairs]
    _check_text(req.query, "query", config.max_text_chars)
    for i, c in enumerate(req.candidates):
        _check_text(c, f"candidates[{i}]", config.max_text_chars)
    return [(req.query, c) for c in req.candidates], list(req.candidates)


def request_options(req: pb.RerankRequest, engine: Engine) -> Options:
    """The request's own model settings, or InvalidRequest naming what its model does not take and why."""
    o = Options(
        max_length=req.max_length,
        query_max_length=req.query_max_length,
        instruction=req.instruction,
        cutoff_layers=tuple(req.cutoff_layers),
        compress_ratio=req.compress_ratio,
        compress_layers=tuple(req.compress_layers),
    )
    why = engine.refuse(o)
    if why is not None:
        raise InvalidRequest(why)
    return o


def window_plan(req: pb.RerankRequest, config: Config) -> WindowPlan | None:
    """How to cut long passages into windows, or None when the request truncates them (the default)."""
    mode = req.long_documents
    known = pb.LongDocuments.values()
    if mode not in known:  # proto3 keeps a number it does not know; it must not fall back to truncating
        names = ", ".join(f"{pb.LongDocuments.Name(v)} ({v})" for v in known)
        raise InvalidRequest(f"long_documents {mode} is not one of the known values: {names}")
    if req.max_windows_per_doc and mode != pb.LONG_DOCUMENTS_CHUNK:
        raise InvalidRequest("max_windows_per_doc applies only with long_documents=LONG_DOCUMENTS_CHUNK")
    if mode not in (pb.LONG_DOCUMENTS_CHUNK, pb.LONG_DOCUMENTS_TRUNCATE_LEFT):
        return None
    asked, most = req.max_windows_per_doc, config.max_windows_per_doc
    if asked > most:
        raise InvalidRequest(
            f"max_windows_per_doc {asked} (max_chunks_per_doc over REST) is above the server's "
            f"limit of {most} windows per passage (--max-windows-per-doc)"
        )
    per_doc = Limit(asked, f"max_windows_per_doc {asked}, max_chunks_per_doc over REST") if asked else None
    per_request = Limit(config.max_windows_per_request, f"--max-windows-per-request {config.max_windows_per_request}")
    if config.max_queue_pairs < per_request.count:  # a request larger than the queue could never be queued
        per_request = Limit(config.max_queue_pairs, f"--max-queue-pairs {config.max_queue_pairs}")
    return WindowPlan(
        keep_end_only=mode == pb.LONG_DOCUMENTS_TRUNCATE_LEFT,
        per_doc=per_doc or Limit(most, f"--max-windows-per-doc {most}"),
        per_request=per_request,
        name="pairs[{}].passage" if req.pairs else "candidates[{}]",
    )


def build_response(
    req: pb.RerankRequest, documents: list[str], raw: list[float], model: str, usage: pb.Usage
) -> pb.RerankResponse:
    scores = [sigmoid(s) for s in raw] if req.normalize else raw
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep input order
    if req.top_n:
        order = order[: req.top_n]
    results = [
        pb.RankedCandidate(index=i, score=scores[i], document=documents[i] if req.return_documents else "")
        for i in order
    ]
    return pb.RerankResponse(scores=scores, results=results, model=model, usage=usage, request_id=req.request_id)


class RerankerService(pb_grpc.RerankerServicer):
    """Answers Rerank, RerankStream and GetModelInfo for the models in `models` (filled as they load, swapped on
    reload)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.models: dict[str, Scoring] = {}  # one assignment swaps a model: calls in flight keep the old one
        self.metrics: Metrics | None = None
        self.admission = Admission(config.max_concurrent_rpcs)  # the interceptor shares it

    @property
    def scoring(self) -> Scoring | None:
        """The default model, once loaded."""
        return self.models.get(self.config.default_model)

    def _ready(self, name: str = "") -> tuple[str, Scoring]:
        name = name or self.config.default_model
        scoring = self.models.get(name)
        if scoring is not None:
            why = scoring.unavailable()
            if why:  # fail fast rather than queue behind what cannot score
                raise NotReady(f"model {name!r} cannot score now: {why}; retry shortly, or on another replica")
            return name, scoring
        if name in dict(self.config.models):
            raise NotReady(f"model {name!r} is still loading; retry shortly")
        raise UnknownModel(f"model {name!r} is not served here; loaded models: {', '.join(self.models) or 'none yet'}")

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        return await _answer(context, lambda: self._rerank(request))

    async def RerankStream(
        self, request_iterator: AsyncIterator[pb.RerankRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RerankStreamResponse]:
        await context.send_initial_metadata(())  # accepted: the client starts writing on these headers
        try:
            async for answer in answer_stream(request_iterator, self._rerank, self.admission):
                yield answer
        except Exception as exc:  # the stream's own end (drain), not one request's error
            code, message = status_for(exc)
            await context.abort(code, message)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return await _answer(context, lambda: self._model_info(request.model))

    async def _rerank(self, req: pb.RerankRequest) -> pb.RerankResponse:
        """One request, from a unary Rerank or from a RerankStream: validate, queue, score, rank."""
        pairs, documents = request_pairs(req, self.config)
        plan = window_plan(req, self.config)
        name, scoring = self._ready(req.model)
        options = request_options(req, scoring.engine)
        with scoring.calls:  # a reload retires this model only once the call is done with it
            return await self._score(req, pairs, documents, plan, options, name, scoring)

    async def _score(
        self,
        req: pb.RerankRequest,
        pairs: list[tuple[str, str]],
        documents: list[str],
        plan: WindowPlan | None,
        options: Options,
        name: str,
        scoring: Scoring,
    ) -> pb.RerankResponse:
        windows = None
        if plan is not None:  # cut on the tokenizing thread; the windows' count is known only after
            windows = await scoring.split(pairs, plan, options)
            pairs = windows.pairs
        # Queue places are reserved before tokenizing, so an overloaded server refuses at once.
        result = await scoring.batcher.submit_after(len(pairs), lambda: scoring.encode(pairs, options))
        tracing.batched(result, name, scoring.engine.device, len(documents))
        if self.metrics is not None:
            self.metrics.queue_seconds.observe(result.queue_s)
            self.metrics.inference_seconds.observe(result.inference_s)
        usage = pb.Usage(
            pairs=len(documents),
            windows=len(pairs),
            tokens=result.tokens,
            queue_ms=result.queue_s * 1e3,
            inference_ms=result.inference_s * 1e3,
        )
        scores = result.scores if windows is None else windows.best(result.scores, len(documents))
        with tracing.span("response"):
            return build_response(req, documents, scores, name, usage)

    async def _model_info(self, name: str) -> pb.GetModelInfoResponse:
        name, scoring = self._ready(name)
        engine, c = scoring.engine, self.config
        return pb.GetModelInfoResponse(
            model=name,
            device=engine.device,
            dtype=engine.dtype,
            max_length=engine.max_length,
            limits=pb.RequestLimits(
                max_candidates=c.max_candidates, max_text_chars=c.max_text_chars, max_length=c.max_length
            ),
            version=__version__,
            batch_size=scoring.batcher.limits.max_pairs,
            models=[n for n, _ in c.models],  # served: loaded, or still loading (then UNAVAILABLE)
            revision=engine.revision,
            family=engine.family,
            default_instruction=engine.default_instruction,
            backend=getattr(engine, "backend", "torch"),
            drift=_drift(getattr(engine, "drift", None)),
        )


def _drift(drift: Any) -> pb.ScoreDrift | None:
    """An approximate mode's drift (server.engine.drift.Drift) as GetModelInfo reports it; None for exact scores."""
    if drift is None:
        return None
    return pb.ScoreDrift(pairs=drift.pairs, max_abs_diff=drift.max_abs_diff, rank_correlation=drift.rank_correlation)


async def _answer(context: grpc.aio.ServicerContext, handler: Callable[[], Any]) -> Any:
    """Run `handler`, turning any error into the status the error table gives it."""
    try:
        return await handler()
    except Exception as exc:
        code, message = status_for(exc)
        await context.abort(code, message)
