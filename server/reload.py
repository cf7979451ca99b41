"""Replace a model's weights without downtime: on SIGHUP, or when its directory changes (--watch-models).

A changed model is loaded beside the old one, warmed up, and swapped in with one dict assignment: calls already
submitted finish on the old weights (its batcher drains, then stops), new calls get the new ones, health stays
SERVING. A model that fails to load leaves the old one serving. Costs two copies of that model in memory meanwhile.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import logging
import os
from typing import Any, Protocol

from server.config import Config
from server.metrics import Metrics
from server.service import RerankerService, Scoring


class Host(Protocol):
    """What the reloader needs of the server (server.app.RerankServer)."""

    config: Config
    service: RerankerService
    metrics: Metrics

    async def load_engine(self, name: str, spec: str) -> object: ...

    async def serve_model(self, name: str, engine: Any) -> Scoring: ...

    async def refresh_health(self) -> None: ...


log = logging.getLogger(__name__)

RETIRE_TIMEOUT_S = 300.0  # a replaced model's batcher waits this long at most for its calls in flight


_NO_FILES = hashlib.blake2b(digest_size=6).hexdigest()  # the revision of a hub id (server.engine.model.revision)


def _revision_on_disk(path: str) -> str | None:
    from server.engine.model import revision

    return revision(path) if os.path.isdir(path) else None


def _explain(exc: Exception, path: str) -> str:
    """The load error; json's own names only a line and column, so name the files of `path` that do not parse."""
    if not isinstance(exc, json.JSONDecodeError):
        return str(exc)
    broken = []
    for f in sorted(glob.glob(os.path.join(glob.escape(path), "*.json"))):
        try:
            with open(f, "rb") as fh:
                json.load(fh)
        except ValueError as err:
            broken.append(f"{f} is not valid JSON: {err}")
        except OSError:
            continue  # gone or unreadable since the load: not the file the load tripped on
    return "; ".join(broken) or f"a JSON file of {path} is not valid JSON ({exc})"


class ModelReloader:
    """Checks the served models' directories and swaps in the ones whose files changed."""

    def __init__(self, server: Host) -> None:
        self._server = server
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._started = False
        self._pending = False  # a SIGHUP arrived while the models were loading

    def start(self) -> None:
        """Once every model is loaded: watch the directories (--watch-models), run a reload asked for meanwhile."""
        self._started = True
        if self._server.config.watch_models > 0 and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._server.config.watch_models))
        if self._pending:
            self._pending = False
            self._spawn(self.reload())

    def request(self) -> None:
        """SIGHUP: check every model now (a check already running is followed by this one); while the models are
        still loading, once they are."""
        if self._started:
            self._spawn(self.reload())
        elif not self._pending:
            self._pending = True
            log.info("SIGHUP while the models load: they are checked for changed files once loaded")

    async def reload(self) -> dict[str, str]:
        """Reload every model whose files changed; returns {name: "ok" | "failed" | "unchanged"}."""
        async with self._lock:
            return {name: await self._reload_one(name) for name, _ in self._server.config.models}

    async def _reload_one(self, name: str) -> str:
        srv = self._server
        current = srv.service.models.get(name)
        if current is None:
            return "unchanged"
        try:
            on_disk = await asyncio.to_thread(_revision_on_disk, current.engine.path)
            if on_disk is None and current.engine.revision != _NO_FILES:
                log.error("reload of model %s: its directory %s is gone (deleted, renamed or unmounted); still "
                          "serving revision %s", name, current.engine.path, current.engine.revision)  # fmt: skip
                srv.metrics.model_reloads.labels(name, "failed").inc()
                return "failed"
            if on_disk in (None, current.engine.revision):
                return "unchanged"  # same files, or a hub id: nothing on disk to watch
            engine: Any = await srv.load_engine(name, current.engine.path)
            fresh = await srv.serve_model(name, engine)
        except Exception as exc:
            reason = await asyncio.to_thread(_explain, exc, current.engine.path)
            log.error("reload of model %s failed, still serving revision %s: %s", name, current.engine.revision, reason)
            srv.metrics.model_reloads.labels(name, "failed").inc()
            return "failed"
        srv.service.models[name] = fresh  # the swap: calls from now on get the new weights
        await srv.refresh_health()  # the new model's workers may be up where the old one's were not
        srv.metrics.model_reloads.labels(name, "ok").inc()
        log.info("model %s reloaded: revision %s -> %s", name, current.engine.revision, engine.revision)
        why = (
            f"model {name} was reloaded (revision {current.engine.revision} -> {engine.revision}) while this call was "
            f"on the old weights, which were retired after {RETIRE_TIMEOUT_S:.0f} s"
        )
        self._spawn(current.retire(RETIRE_TIMEOUT_S, why))
        return "ok"

    async def _watch(self, interval_s: float) -> None:
        """Reload a directory once its files changed and then stayed unchanged for one interval (copy finished)."""
        from server.engine.model import files_signature

        def signatures() -> dict[str, object]:
            return {n: files_signature(s.engine.path) for n, s in self._server.service.models.items()}

        seen = await asyncio.to_thread(signatures)  # the files the served weights were loaded from
        changing: dict[str, object] = {}
        while True:
            await asyncio.sleep(interval_s)
            now = await asyncio.to_thread(signatures)
            settled = [n for n, sig in now.items() if changing.get(n) == sig]
            changing = {n: sig for n, sig in now.items() if sig != seen.get(n) and n not in settled}
            if settled:
                await self.reload()
                seen |= {n: now[n] for n in settled}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        tasks = [t for t in (self._watcher, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watcher = None
