"""Structured JSON logs: one object per line, extra fields included.

Access lines (one per request) skip the ``logging`` machinery, which costs
more than the rest of a replayed request's bookkeeping: ``AccessSink`` encodes
them with orjson and writes the lines of one event-loop turn at once.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from typing import Any, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        entry.update((key, value) for key, value in record.__dict__.items() if key not in _STANDARD)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class AccessSink:
    """Access lines in the same JSON shape as ``JsonFormatter``'s, batched per loop turn.

    A line can be lost only with the process, within the turn that produced it."""

    def __init__(self, stream: TextIO, logger: str = "idemproxy.access") -> None:
        self._stream = stream
        self._logger = logger
        self._lines: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Every line's fields after "ts", encoded once (os.getpid is a system call).
        self._fixed = b""
        self._encode_fixed()

    def _encode_fixed(self) -> None:  # also after a fork: see _after_fork
        fixed = {"level": "info", "logger": self._logger, "pid": os.getpid(), "msg": "request"}
        self._fixed = b"," + orjson.dumps(fixed)[1:-1]

    def write(self, entry: dict[str, Any]) -> None:
        # {"ts":..,<fixed fields>,<entry's fields>}: JsonFormatter's shape without a dict per line.
        fields = orjson.dumps(entry, default=str)
        line = b'{"ts":%.3f%s%s' % (time.time(), self._fixed, b"," + fields[1:] if len(fields) > 2 else b"}")
        self._lines.append(line)
        if len(self._lines) == 1:
            # The loop of the last turn, while it runs: on Python 3.11 asyncio.get_running_loop
            # makes a system call (getpid). Lines are written on the event loop's thread.
            loop = self._loop
            if loop is None or not loop.is_running():
                try:
                    loop = self._loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop: write at once
                    self.flush()
                    return
            loop.call_soon(self.flush)

    def flush(self) -> None:
        if not self._lines:
            return
        text = b"\n".join(self._lines).decode() + "\n"
        self._lines = []
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken log stream must not fail requests
            pass


class _Sinks:
    #: Set by ``configure_logging``; until then access lines go through ``logging``.
    access: AccessSink | None = None


SINKS = _Sinks()


def _after_fork() -> None:
    if SINKS.access is not None:
        SINKS.access._encode_fixed()  # a new pid


os.register_at_fork(after_in_child=_after_fork)


class RefusedRequestFilter(logging.Filter):
    """aiohttp (the admin listener) logs every request its parser refuses (already
    answered 400) at ERROR with a traceback: a caller sending garbage could flood the logs and
    page whoever watches errors. Such a record becomes one warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "refused a request the HTTP parser could not read", ()
            record.exc_info, record.exc_text = None, None
            record.error = f"{type(exc).__name__}: {exc.message}"
        return True


class RepeatFilter(logging.Filter):
    """At most one line per ``interval_s`` for each warning (by logger and message template):
    an outage makes every request, renewal and reconciler pass warn the same thing, several
    times a second per worker. The next line that passes says how many were held back
    (``suppressed``). Errors always pass."""

    def __init__(self, interval_s: float = 10.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.suppressed = last[1]
        self._seen[key] = (now, 0)
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.server").addFilter(RefusedRequestFilter())
    SINKS.access = AccessSink(sys.stderr)
    atexit.register(SINKS.access.flush)
