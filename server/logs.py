"""One-line logs, as text or JSON, tagged with the request id of the RPC being served.

Logging never blocks serving: a line is formatted where it is logged (the request id is known there) and put on
a bounded queue; one thread writes the queue to stderr. When stderr is not being read (a stalled log pipe), the
queue fills and further lines are dropped and counted (reranker_log_lines_dropped_total); once writing works
again one line says how many.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any, TextIO

QUEUE_LINES = 1000  # lines waiting to be written (a few hundred KB) before new ones are dropped
REPORT_EVERY_S = 5.0  # at most one "lines dropped" line this often, while drops go on
FLUSH_S = 2.0  # at exit, how long the lines still queued may take to be written

# Set by the interceptor for the duration of one RPC; each RPC runs in its own asyncio task.
request_id: ContextVar[str] = ContextVar("request_id", default="")


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call whose key=value fields are rendered by either formatter."""
    return {"fields": values}


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=') else text


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802  (logging's name)
        values: dict[str, Any] = dict(getattr(record, "fields", {}))
        rid = request_id.get()
        if rid:
            values.setdefault("request_id", rid)
        line = super().formatMessage(record)
        return line + "".join(f" {k}={_text_value(v)}" for k, v in values.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, the fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict[str, Any] = {"ts": ts, "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        rid = request_id.get()
        if rid:
            out["request_id"] = rid
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _Drops:
    """Lines dropped so far, and how many of them a log line has already reported."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = 0
        self.reported = 0
        self.reported_at = -REPORT_EVERY_S


_drops = _Drops()
_listener: _Writer | None = None


def dropped_lines() -> int:
    """Log lines dropped in this process because the output was not being read."""
    return _drops.total


class _Enqueue(logging.handlers.QueueHandler):
    """Formats the line here, in the caller's context, and queues it without waiting: a full queue drops it."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        line = self.format(record)
        record = copy.copy(record)  # other handlers (tests' capture) still see the original
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = line, None, None, None, None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with _drops.lock:
                _drops.total += 1


class _Writer(logging.handlers.QueueListener):
    """The one thread that writes; after a write succeeds it reports lines dropped meanwhile."""

    def __init__(self, lines: queue.Queue[Any], out: logging.Handler, formatter: logging.Formatter) -> None:
        super().__init__(lines, out)
        self._out = out
        self._formatter = formatter

    def handle(self, record: logging.LogRecord) -> None:
        self._out.handle(record)
        now = time.monotonic()
        with _drops.lock:
            missed = _drops.total - _drops.reported
            if not missed or now - _drops.reported_at < REPORT_EVERY_S:
                return
            _drops.reported, _drops.reported_at = _drops.total, now
        note = logging.LogRecord(
            "server.logs", logging.WARNING, __file__, 0,
            "%d log lines were dropped: the log output (stderr) was not being read, and logging does not wait",
            (missed,), None,
        )  # fmt: skip
        self._out.handle(logging.makeLogRecord({"msg": self._formatter.format(note), "levelno": logging.WARNING}))

    def flush(self, timeout_s: float) -> None:
        """Write what is queued, waiting at most `timeout_s` (the output may still be stalled)."""
        try:
            self.queue.put(self._sentinel, timeout=timeout_s)
        except queue.Full:
            return
        if self._thread is not None:
            self._thread.join(timeout_s)


def flush_logging(timeout_s: float = FLUSH_S) -> None:
    """Write the lines still queued (bounded); later lines are written directly (at exit, nothing else runs)."""
    global _listener
    writer, _listener = _listener, None
    if writer is not None:
        writer.flush(timeout_s)


def setup_logging(level: str, as_json: bool, stream: TextIO | None = None) -> None:
    """Send every log line to stderr (or `stream`), formatted as text or JSON, through a bounded queue."""
    global _listener
    flush_logging()
    formatter: logging.Formatter = JsonFormatter() if as_json else TextFormatter()
    out = logging.StreamHandler(stream or sys.stderr)
    out.setFormatter(logging.Formatter("%(message)s"))  # lines arrive formatted
    lines: queue.Queue[Any] = queue.Queue(QUEUE_LINES)
    front = _Enqueue(lines)
    front.setFormatter(formatter)
    _listener = _Writer(lines, out, formatter)
    _listener.start()
    logging.basicConfig(level=level.upper(), handlers=[front], force=True)
    logging.captureWarnings(True)  # library warnings become log lines too, in the same format
    atexit.register(flush_logging)
