"""The invariants every hostile request is checked against.

A refused request gets a problem+json 4xx; when the HTTP parser refuses the
framing (or the head's size) the connection is closed after the answer, since
nothing after broken framing can be trusted to be a request. Either way nothing
reached the tool, nothing was recorded, no request ever reached the canary,
and the proxy still serves the next well-formed request.
"""

from __future__ import annotations

from collections.abc import Collection

from idemproxy.protocol import PROBLEM_CONTENT_TYPE
from tests.hostile.stack import Stack
from tests.support.wire import Reply


def assert_refusal(reply: Reply, problems: Collection[str] | None = None, *, parser: bool = False) -> None:
    """``reply`` is a clear problem+json 4xx, one of ``problems`` (any problem if None). Where
    ``parser`` allows it, the parser refused the request: the connection is closed after the
    answer, or without one (a server may close while a huge request is still being sent)."""
    if reply.status == 0:
        assert parser, "the server closed the connection without an answer"
        return
    assert 400 <= reply.status < 500, reply
    assert reply.content_type == PROBLEM_CONTENT_TYPE, f"expected problem+json, got {reply}"
    if reply.body:  # an answer to HEAD has none
        problem = reply.problem
        assert problems is None or problem in problems, f"unexpected problem {problem!r}: {reply}"
    if parser and problems is None:
        assert reply.closed, "the connection must close after a refused framing"


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
