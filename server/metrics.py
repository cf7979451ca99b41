"""Prometheus metrics, one registry per server (tests run several servers in one process)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from server.config import Config
from server.logs import dropped_lines

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _powers_of_two(low: int, high: int) -> tuple[float, ...]:
    """low, 2 low, 4 low, ... up to and including `high`."""
    out: list[float] = []
    value = low
    while value < high:
        out.append(value)
        value *= 2
    return (*out, high)


class _LogDrops(Collector):
    """The process's count of dropped log lines (logging is per process, the registry per server)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        help_text = "Log lines dropped because the log output was not being read (logging never blocks serving)"
        yield CounterMetricFamily("reranker_log_lines_dropped", help_text, value=dropped_lines())


class BusyClock(Collector):
    """Seconds the device was busy, by model: `reranker_busy_seconds_total`; its rate is the saturation signal.

    A batch is in flight from the start of its launch to the delivery of its scores. Pipelined batches overlap, and so
    do the batches of models that share the device, but the device runs them one after another: each moment with a
    batch in flight is credited once, to the model of the oldest such batch (the one the device is running), so the
    models' rates add up to the device's share of busy time, at most 1. Start and end are called on the event loop; a
    scrape reads from its own thread, hence the lock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._open: dict[int, str] = {}  # batches in flight, oldest first: id -> model
        self._ids = itertools.count()
        self._mark = clock()  # busy time before this is credited

    def track(self, model: str) -> None:
        """Export `model` at 0 before its first batch, so a rate over it starts from a sample."""
        with self._lock:
            self._seconds.setdefault(model, 0.0)

    def start(self, model: str) -> Callable[[], None]:
        """A batch of `model` starts now; call the result once, when its scores are in (or it failed)."""
        batch = next(self._ids)
        with self._lock:
            self._advance()
            self._open[batch] = model

        def end() -> None:
            with self._lock:
                self._advance()
                del self._open[batch]

        return end

    def seconds(self) -> dict[str, float]:
        """Busy seconds by model so far (a long batch shows up while it runs, not in one step when it ends)."""
        with self._lock:
            self._advance()
            return dict(self._seconds)

    def _advance(self) -> None:
        now = self._clock()
        if self._open:
            model = next(iter(self._open.values()))
            self._seconds[model] = self._seconds.get(model, 0.0) + (now - self._mark)
        self._mark = now

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "reranker_busy_seconds",
            "Seconds the device had a batch of this model in flight, no moment counted twice; rate() = share busy",
            labels=["model"],
        )
        for model, seconds in sorted(self.seconds().items()):
            family.add_metric([model], seconds)
        yield family


class Metrics:
    """Every reranker_* metric; `serve()` exposes them over HTTP at /metrics."""

    def __init__(self, config: Config) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "reranker_requests", "RPCs answered, by method and status code", ["method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "reranker_request_seconds", "Time to answer an RPC", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("reranker_requests_in_flight", "RPCs being served", registry=r)
        self.queue_seconds = Histogram(
            "reranker_queue_seconds",
            "Time a Rerank's pairs waited before their first forward pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "reranker_inference_seconds",
            "Forward-pass time of the batches that scored a Rerank",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "reranker_batch_size",
            "Pairs per forward pass",
            buckets=_powers_of_two(1, config.batch_size or 256),  # 0: sized at load, at most 256
            registry=r,
        )
        self.batch_tokens = Histogram(
            "reranker_batch_tokens",
            "Tokens (unpadded) per forward pass",
            buckets=_powers_of_two(64, config.max_batch_tokens or 131072),
            registry=r,
        )
        self.model_reloads = Counter(
            "reranker_model_reloads",
            "Model weight replacements (SIGHUP or --watch-models), by model and result (ok, failed)",
            ["model", "result"],
            registry=r,
        )
        self.tokenizer_worker_deaths = Counter(
            "reranker_tokenizer_worker_deaths_total",
            "Tokenizer worker processes that died (each is replaced; only the slice it held failed)",
            registry=r,
        )
        self.tokenizer_workers = Gauge(
            "reranker_tokenizer_workers",
            "Tokenizer worker processes running, by model (none for a model tokenizing in threads)",
            ["model"],
            registry=r,
        )
        self.tokenizer_worker_start_failures = Counter(
            "reranker_tokenizer_worker_start_failures",
            "Tokenizer worker starts that failed, by model (each is tried again, with a bounded back-off)",
            ["model"],
            registry=r,
        )
        r.register(_LogDrops())
        self.queue_pairs = Gauge("reranker_queue_pairs", "Pairs waiting for a forward pass", registry=r)
        self.serving = Gauge("reranker_serving", "1 while health says SERVING, 0 while loading or draining", registry=r)
        self.busy = BusyClock()
        r.register(self.busy)
        self.model_info = Info("reranker_model", "The model being served", registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def on_batch(self, pairs: int, tokens: int, seconds: float) -> None:
        """The Batcher's hook, called once per forward pass."""
        self.batch_size.observe(pairs)
        self.batch_tokens.observe(tokens)

    def watch_queue(self, queued_pairs: Callable[[], int]) -> None:
        self.queue_pairs.set_function(queued_pairs)  # read at scrape time, nothing on the request path

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on its own thread; returns the port (`port` 0 picks a free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def stop(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
