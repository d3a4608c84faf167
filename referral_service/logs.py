"""Logging: plain text for people, JSON lines for machines (``REFERRAL_LOG_FORMAT=json``).

Extra fields passed with ``extra={...}`` (method, code, duration_ms, request_id, user_id, ...)
are appended to text lines and become keys of JSON lines. Secrets never reach a log call.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k[0] != "_"}


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that does not make a write system call per line: lines collect in a
    buffer written out every ``interval`` seconds (by a daemon thread), when it passes
    ``capacity`` bytes, at once for WARNING and above, and at exit (``logging.shutdown``).
    Every call writes an access-log line, so at thousands of calls per second this is most of
    the cost of logging; at most ``interval`` seconds of INFO lines can be lost if the process
    is killed."""

    def __init__(self, stream: TextIO, interval: float = 0.2, capacity: int = 64 * 1024) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._size = 0
        self._capacity = capacity
        self._interval = interval
        self._stop_flushing = threading.Event()
        self._thread = threading.Thread(target=self._flush_periodically, name="log-flush", daemon=True)
        self._thread.start()
        # At exit logging.shutdown() flushes and closes every handler: nothing to register.

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)  # emit() runs under the handler's lock
        self._size += len(line)
        if record.levelno >= logging.WARNING or self._size >= self._capacity:
            self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._size = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the stream is gone (closed pipe at exit): nothing to do
            pass

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _flush_periodically(self) -> None:
        while not self._stop_flushing.wait(self._interval):
            if self._pending:
                self.flush()

    def close(self) -> None:
        self._stop_flushing.set()
        self.flush()
        super().close()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _text_value(value: object) -> str:
    """A value of a text line's ``key=value`` pairs, quoted when it has spaces, quotes or ``=``
    (``route="GET /v1/users/me"``), so that each pair reads back unambiguously."""
    text = value if isinstance(value, str) else str(value)
    if _NEEDS_QUOTES.search(text) is not None:
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; an extra that the message already says
    (named in the record's ``_in_message``, as access lines do) is not repeated."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            shown = getattr(record, "_in_message", ())
            pairs = [
                f"{k}={_text_value(v)}" for k, v in extras.items() if v not in (None, "") and k not in shown
            ]
            if pairs:
                line += " " + " ".join(pairs)
        return line


class _WorkerFilter(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def configure(level: str, fmt: str, worker: int | None = None) -> None:
    # Every call writes an access-log line: skip what logging would compute for each record and
    # nobody reads (the caller's frame, thread, process and task names); a tenth of the cost of
    # a cached look-up went there.
    logging._srcfile = None  # documented switch: no sys._getframe() per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False
    handler = BufferedStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(_WorkerFilter(worker))
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, BufferedStreamHandler):
            previous.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
