"""Server lifecycle: bind, report NOT_SERVING while loading, warm up, SERVING, drain on stop."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server import __version__
from server.config import Config, ConfigError
from server.connections import LocalSocket, connection_options, ensure_fd_limit
from server.engine.batcher import Batcher, BatchLimits
from server.engine.warm import prepare
from server.interceptors import ServerInterceptor
from server.logs import fields
from server.metrics import Metrics
from server.reload import ModelReloader
from server.service import RerankerService, Scoring
from server.tokenize.tokenizing import Tokenizing, worker_count
from server.tokenize.workers import WorkerEvents

if TYPE_CHECKING:
    from server.engine.model import Batching

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reranker"].full_name  # reranker.v1.Reranker
HEALTH_SERVICES = ("", SERVICE_NAME)
HEALTH_POLL_S = 1.0  # how often health looks at what no event reports (a stopped device loop, a stuck batch)
REFUSALS_S = 0.25  # after the drain, at least this long for grpc's stop: calls that just arrived get UNAVAILABLE


def model_health_name(model: str) -> str:
    """The health service name of one model: NOT_SERVING while it cannot score (say, no tokenizer worker)."""
    return f"{SERVICE_NAME}/{model}"


MAX_RECEIVE_CAP = 256 * 1024 * 1024
_FIELD_OVERHEAD = 16  # protobuf tag + length varint, per text and per pair message


def max_receive_bytes(config: Config) -> int:
    """The largest valid request (pairs form, every text at its limit, 4 UTF-8 bytes a character), capped."""
    text = config.max_text_chars * 4 + _FIELD_OVERHEAD
    largest = config.max_candidates * (2 * text + _FIELD_OVERHEAD) + 64 * 1024  # + the small fields
    return min(largest, MAX_RECEIVE_CAP)


def _read_pem(path: str, flag: str, marker: bytes) -> bytes:
    """The file's bytes; ConfigError unless it is readable PEM of the right kind (gRPC's own error is vague)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{flag} {path!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise ConfigError(f"{flag} {path!r} is not a PEM file with a {marker.decode().strip('- ')}")
    return data


def _server_credentials(c: Config) -> grpc.ServerCredentials:
    cert = _read_pem(c.tls_cert, "--tls-cert", b"CERTIFICATE-----")
    key = _read_pem(c.tls_key, "--tls-key", b"PRIVATE KEY-----")
    ca = _read_pem(c.tls_client_ca, "--tls-client-ca", b"CERTIFICATE-----") if c.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _yield_to_event_loop() -> None:
    """Run inference, and the torch threads it starts, at lower priority: on a busy CPU the loop still answers."""
    # Refusals, health checks and deadlines need the event loop, which needs little CPU. Under overload on 2 busy
    # cores this cut refusal latency p50 from 8-17 ms to 3-4 ms and p99 from 101-117 ms to 58 ms.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _precision(engine: Any) -> str:
    """An approximate mode's backend, drift and conversion, for the startup line ("" for fp32)."""
    drift = getattr(engine, "drift", None)
    if drift is None:
        return ""
    conversion = getattr(engine, "conversion", "")
    return f", {engine.backend}, {drift.describe()}" + (f", converted model {conversion}" if conversion else "")


class RerankServer:
    """One gRPC server around one model. `start()` returns once SERVING; `stop()` drains and closes."""

    def __init__(self, config: Config, engine: object | None = None, engines: dict[str, object] | None = None) -> None:
        self.config = config
        # Tests pass loaded models (by name; `engine`: the default one) to skip loading.
        self._engines = dict(engines or {}) | ({config.default_model: engine} if engine is not None else {})
        self.metrics = Metrics(config)
        self.service = RerankerService(config)
        self.service.metrics = self.metrics
        self.health = health_aio.HealthServicer()
        self.interceptor = ServerInterceptor(config, self.metrics, self.service.admission)
        self.server = grpc.aio.server(
            interceptors=[self.interceptor],
            options=[("grpc.max_receive_message_length", max_receive_bytes(config)), *connection_options(config)],
        )
        self.port = 0
        self.local_target = ""  # with --rest-port: the Unix socket the in-process bridge calls (server/connections.py)
        self._local = LocalSocket()
        self.metrics_port = 0
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer", initializer=_yield_to_event_loop)
        # Waits for the device's results, so the infer thread can queue the next batch meanwhile.
        self._collect_pool = ThreadPoolExecutor(1, thread_name_prefix="collect")
        self.reloader = ModelReloader(self)
        self._loaded = False
        self._health_watch: asyncio.Task[None] | None = None
        self._health_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def bind(self) -> int:
        """Listen and answer health (NOT_SERVING) before the model is loaded."""
        pb_grpc.add_RerankerServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        for name in (*HEALTH_SERVICES, *(model_health_name(m) for m, _ in self.config.models)):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        c = self.config
        address = f"{c.host}:{c.port}"
        try:
            if c.tls:
                self.port = self.server.add_secure_port(address, _server_credentials(c))
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            raise ConfigError(
                f"cannot listen on {address} for gRPC: the port is in use or the address is not this machine's"
                + (", or the TLS certificate and key do not match" if c.tls else "")
            ) from None
        if c.rest_port:
            self.local_target = self._local.bind(self.server)
        ensure_fd_limit(c)
        if c.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(c.host, c.metrics_port)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {c.host}:{c.metrics_port}: {exc.strerror}") from None
        await self.server.start()
        return self.port

    async def load(self) -> None:
        """Load and warm up every model off the event loop, then report SERVING."""
        for name, spec in self.config.models:
            engine = self._engines.pop(name, None) or await self.load_engine(name, spec)
            self.service.models[name] = await self.serve_model(name, engine)
        default = self.service.models[self.config.default_model]
        self.metrics.watch_queue(lambda: sum(s.batcher.queued_pairs for s in self.service.models.values()))
        engine = default.engine
        device, dtype = str(engine.device), str(engine.dtype)
        self.metrics.model_info.info(
            {"model": self.config.default_model, "models": ",".join(self.service.models), "device": device,
             "dtype": dtype, "version": __version__}
        )  # fmt: skip
        self.reloader.start()
        self._loaded = True
        await self.refresh_health()
        self._health_watch = asyncio.get_running_loop().create_task(self._watch_health(), name="health-watch")
        log.info(
            "serving",
            extra=fields(model=self.config.default_model, device=device, dtype=dtype, **self._startup_fields()),
        )

    async def load_engine(self, name: str, spec: str) -> object:
        """Load one model on a thread of its own: a reload does not hold up the inference thread."""
        from server.engine.load import load_engine  # torch is imported only when a model is loaded

        return await asyncio.to_thread(load_engine, self.config, spec, name)

    async def serve_model(self, name: str, engine: Any) -> Scoring:
        """Warm `engine` up and put a batcher in front of it; models on this device share its inference thread."""
        c = self.config
        b = engine.batching(c)  # before the warm-up: on CUDA it is sized from the memory free
        workers = worker_count(c.tokenize_workers, str(engine.device).startswith("cuda"))
        tokenizing = Tokenizing(engine, c.tokenize_thread_count, workers, self._worker_events(name))
        if tokenizing.workers is not None:
            self.metrics.tokenizer_workers.labels(name).set_function(lambda w=tokenizing.workers: w.live)
        try:
            await asyncio.to_thread(tokenizing.start)
            ready = partial(prepare, engine, b, c.cuda_graphs)  # on the device's thread: CUDA graphs are per thread
            shapes = await asyncio.get_running_loop().run_in_executor(self._infer_pool, ready)
        except BaseException:
            tokenizing.close()
            raise
        window = max(1024, 8 * b.batch_size)  # room to sort a few batches' worth by length
        limits = BatchLimits(b.batch_size, b.max_batch_tokens, c.max_wait_ms / 1e3, c.max_queue_pairs, window)
        # Each model's worker awaits its launch before queuing another, so models alternate on the one thread.
        self.metrics.busy.track(name)
        batcher: Batcher[Any] = Batcher(
            engine.launch,
            self._infer_pool,
            limits,
            on_batch=self.metrics.on_batch,
            collect_executor=self._collect_pool,
            group=_forward_settings,
            on_launch=partial(self.metrics.busy.start, name),  # one clock per device: the models share its thread
        )
        batcher.start()
        self.metrics.on_model(name, engine)
        return Scoring(engine, batcher, tokenizing, b, shapes)

    def _worker_events(self, name: str) -> WorkerEvents:
        """Count a model's worker deaths and failed starts; re-check health when its live workers change."""
        self._loop = asyncio.get_running_loop()
        return WorkerEvents(
            died=self.metrics.tokenizer_worker_deaths.inc,
            start_failed=self.metrics.tokenizer_worker_start_failures.labels(name).inc,
            changed=self._health_changed,
        )

    def _health_changed(self) -> None:
        """From a worker's thread: refresh health on the event loop."""
        try:
            asyncio.run_coroutine_threadsafe(self.refresh_health(), self._loop)  # type: ignore[arg-type]
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    async def _watch_health(self) -> None:
        """What no event reports (a device loop that ended, an inference thread stuck on one batch): looked at every
        HEALTH_POLL_S, health refreshed when it changes."""
        last: dict[str, str] = {}
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            now = {n: s.unavailable() for n, s in self.service.models.items()}
            if {n: bool(w) for n, w in now.items()} != {n: bool(w) for n, w in last.items()}:
                for name, why in now.items():
                    if why and not last.get(name):
                        log.error("model %s cannot score: %s; health NOT_SERVING until it can", name, why)
                await self.refresh_health()
            last = now

    async def refresh_health(self) -> None:
        """Each model SERVING while it can score; the server's names while any model can (none before loading)."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        async with self._health_lock:  # refreshes from several threads land in order, the last one wins
            able = {n: not s.unavailable() for n, s in self.service.models.items()}
            for name, _ in self.config.models:
                await self.health.set(model_health_name(name), serving if able.get(name) else not_serving)
            overall = serving if self._loaded and any(able.values()) else not_serving
            for name in HEALTH_SERVICES:
                await self.health.set(name, overall)
            self.metrics.serving.set(overall == serving and not self.service.admission.draining)

    @property
    def batching(self) -> Batching | None:
        """The default model's batch budgets, once it is loaded (a reload may change them)."""
        return self.service.scoring.batching if self.service.scoring else None

    def batcher(self, name: str = "") -> Batcher[Any] | None:
        """The batcher of a model (default: the default model), None until it is loaded."""
        scoring = self.service.models.get(name or self.config.default_model)
        return scoring.batcher if scoring else None

    def _startup_fields(self) -> dict[str, object]:
        """Ports and limits for the one startup line; never the API key itself."""
        c, b = self.config, self.batching
        return {
            "models": ", ".join(
                f"{n}={s.engine.path} ({s.engine.device}, {s.engine.dtype}, {_millions(s.engine.parameters)} params"
                f"{_precision(s.engine)})"
                for n, s in self.service.models.items()
            ),
            "grpc_port": self.port,
            "metrics_port": self.metrics_port,
            "rest_port": c.rest_port,  # the in-process REST bridge (server/__main__.py), 0 = off
            "tls": "mutual" if c.tls_client_ca else c.tls,
            "api_key": bool(c.api_key),
            "max_length": c.max_length,
            "batch_size": b.batch_size if b else c.batch_size,
            "max_batch_tokens": b.max_batch_tokens if b else c.max_batch_tokens,
            "batching": b.source if b else "",
            "tokenize": self.service.scoring.tokenizing.describe() if self.service.scoring else "",
            "threads": c.torch_threads,  # inference threads on CPU (--threads)
            "shapes": self.service.scoring.shapes if self.service.scoring else "",
            "max_wait_ms": c.max_wait_ms,
            "max_queue_pairs": c.max_queue_pairs,
            "max_candidates": c.max_candidates,
            "max_text_chars": c.max_text_chars,
            "max_receive_bytes": max_receive_bytes(c),
            "max_concurrent_rpcs": c.max_concurrent_rpcs,
            "max_connections": c.max_connections,
            "handshake_timeout_s": c.handshake_timeout_s,
            "max_connection_idle_s": c.max_connection_idle_s,
            "grace_s": c.grace_s,
            "watch_models_s": c.watch_models,
            "tracing": c.tracing,  # OpenTelemetry, from OTEL_TRACES_EXPORTER
            "version": __version__,
        }

    async def start(self) -> int:
        port = await self.bind()
        await self.load()
        return port

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new RPCs, let in-flight ones finish within the grace period."""
        grace = self.config.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        if await self.interceptor.drain(grace):
            # All work is done; still open are refusals being answered and health watches. grpc's stop sends
            # GOAWAY (no new calls), lets the refusals end (a call cut off here would read CANCELLED, which callers
            # do not retry), and cancels the watches after a moment.
            await self.server.stop(min(1.0, max(REFUSALS_S, deadline - time.monotonic())))
        else:
            log.warning("the grace period of %.1f s ended with calls in flight: cutting them off", grace)
            await self.server.stop(0)
        if self._health_watch is not None:
            self._health_watch.cancel()
        await self.reloader.stop()
        for scoring in self.service.models.values():
            await scoring.batcher.stop()
            # A stopped or stuck worker is killed rather than waited for past the grace period.
            await asyncio.to_thread(scoring.tokenizing.close, max(0.0, deadline - time.monotonic()))
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._collect_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop()
        self._local.remove()


def _forward_settings(item: Any) -> Any:
    """A tokenized pair's forward-pass settings (server.tokenize.prompted.Prompted.forward): pairs whose settings
    differ share no batch."""
    return getattr(item, "forward", None)
