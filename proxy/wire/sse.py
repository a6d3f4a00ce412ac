"""An incremental Server-Sent Events parser, free of I/O.

Fed the bytes of a ``text/event-stream`` body as they arrive, it returns the
events completed so far (WHATWG HTML, "event stream interpretation"): ``data``
lines joined with newlines, ``event`` names, comments and ``id``/``retry``
ignored. Memory stays bounded: an event whose data exceeds ``max_data`` is
returned without its data, with its size and SHA-256 only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")
_LINE_SLACK = 64  # a line may exceed max_data by its field name and framing


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str  # "message" unless the stream named it
    data: bytes | None  # None when the data exceeded max_data
    size: int
    sha256: str


class SseParser:
    def __init__(self, max_data: int) -> None:
        self.max_data = max_data
        self._pending = b""  # the incomplete last line
        self._after_cr = False  # the last chunk ended in "\r", which may be half of "\r\n"
        self._long_line: bool | None = None  # inside an over-long line: True if it is data (counted)
        self._event = ""
        self._data = bytearray()
        self._digest = hashlib.sha256()
        self._size = 0
        self._has_data = False
        self._oversize = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events that ``chunk`` completes."""
        if not chunk:
            return []
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        lines = _LINE_END.split(self._pending + chunk)
        self._pending = lines.pop()
        events = []
        for line in lines:
            if self._long_line is not None:
                if self._long_line:
                    self._add(line)
                self._long_line = None
                continue
            event = self._line(line)
            if event is not None:
                events.append(event)
        if len(self._pending) > self.max_data + _LINE_SLACK:
            self._overflow()
        return events

    def _overflow(self) -> None:
        """The incomplete line is too long to keep: a data line is counted, any other dropped."""
        pending, self._pending = self._pending, b""
        if self._long_line is None:
            name, _, value = pending.partition(b":")
            self._long_line = name == b"data"
            if self._long_line:
                self._start_data()
                self._add(value.removeprefix(b" "))
        elif self._long_line:
            self._add(pending)

    def _line(self, line: bytes) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(b":"):  # a comment
            return None
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            self._start_data()
            self._add(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        return None  # id and retry only matter to a client that reconnects

    def _start_data(self) -> None:
        if self._has_data:
            self._add(b"\n")
        self._has_data = True

    def _add(self, part: bytes) -> None:
        self._size += len(part)
        self._digest.update(part)
        if self._oversize:
            return
        if self._size > self.max_data:
            self._oversize = True
            self._data = bytearray()
            return
        self._data += part

    def _dispatch(self) -> SseEvent | None:
        event = None
        if self._has_data:
            event = SseEvent(
                event=self._event or "message",
                data=None if self._oversize else bytes(self._data),
                size=self._size,
                sha256=self._digest.hexdigest(),
            )
        self._event = ""
        self._data = bytearray()
        self._digest = hashlib.sha256()
        self._size = 0
        self._has_data = False
        self._oversize = False
        return event
