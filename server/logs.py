"""One-line logs, as text or JSON, tagged with the request id of the RPC being served."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

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


def setup_logging(level: str, as_json: bool) -> None:
    """Send every log line to stderr, formatted as text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings become log lines too, in the same format
