"""JSON with integers of any size kept exact.

orjson reads integers beyond 64 bits as floats, so two different tool arguments
could look equal; these read and write them exactly, at orjson's speed for
everything else. The MCP mode and the MCP adapter read and write messages with them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_DIGIT_RUN = re.compile(rb"\d{19,}")  # every integer beyond 64 bits has 19+ digits


def loads(body: bytes) -> Any:
    """JSON, with integers of any size read exactly; ``ValueError`` if it is not JSON."""
    if not _LONG_DIGIT_RUN.search(body):
        return orjson.loads(body)  # refuses nesting deeper than 1024 itself
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # integers beyond 64 bits
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
