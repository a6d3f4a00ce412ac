"""The invariants every hostile request is checked against.

A refused request gets a 4xx: problem+json when idemproxy's own code answers,
or aiohttp's plain-text ``400`` (and a closed connection) when its HTTP parser
refuses the framing before any of idemproxy's code runs. Either way nothing
reached the tool, nothing was recorded, no request ever reached the canary,
and the proxy still serves the next well-formed request.
"""

from __future__ import annotations

from collections.abc import Collection

from tests.hostile.stack import Stack
from tests.hostile.wire import PROBLEM, Reply


def assert_refusal(reply: Reply, problems: Collection[str] | None = None, *, parser: bool = False) -> None:
    """``reply`` is a clear 4xx: one of ``problems`` (any problem if None), or, where ``parser``
    allows it, aiohttp's own 400 for unparsable framing, after which it closes the connection
    (a close without an answer too: a server may close while a huge request is still being sent)."""
    if reply.status == 0:
        assert parser, "the server closed the connection without an answer"
        return
    assert 400 <= reply.status < 500, reply
    if reply.content_type == PROBLEM:
        if reply.body:  # an answer to HEAD has none
            problem = reply.problem
            assert problems is None or problem in problems, f"unexpected problem {problem!r}: {reply}"
        return
    assert parser, f"expected problem+json, got {reply}"
    assert reply.status == 400, reply
    assert reply.content_type == "text/plain", reply
    assert reply.closed, "aiohttp closes the connection after a framing error"


async def assert_refused(
    stack: Stack, data: bytes, problems: Collection[str] | None = None, *, parser: bool = False
) -> Reply:
    """Send ``data``; it must be refused, touch nothing, and leave the proxy serving."""
    before = await stack.mark()
    reply = await stack.send(data)
    assert_refusal(reply, problems, parser=parser)
    await stack.assert_untouched_since(before)
    await stack.assert_serving()
    return reply
