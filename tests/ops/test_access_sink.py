"""The access log's batching sink: lines are written at the end of the loop turn that made them."""

from __future__ import annotations

import asyncio
import io

import orjson

from idemproxy.logs import AccessSink


def written(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_of_one_turn_are_written_together_when_the_turn_ends() -> None:
    stream = io.StringIO()
    sink = AccessSink(stream)

    async def turn() -> tuple[str, str]:
        sink.write({"status": 201})
        sink.write({"status": 200, "note": 'a "quoted"\nline'})
        before = stream.getvalue()
        await asyncio.sleep(0)  # the turn ends
        return before, stream.getvalue()

    before, after = asyncio.run(turn())
    assert before == ""
    assert [line["status"] for line in written(stream)] == [201, 200]
    assert after.count("\n") == 2
    assert written(stream)[1]["note"] == 'a "quoted"\nline'  # one line per entry, whatever it holds


def test_each_new_loop_gets_its_lines_and_without_a_loop_they_are_written_at_once() -> None:
    stream = io.StringIO()
    sink = AccessSink(stream)

    async def one(status: int) -> None:
        sink.write({"status": status})
        await asyncio.sleep(0)

    asyncio.run(one(1))
    asyncio.run(one(2))  # the first loop is closed: the sink must not schedule on it
    sink.write({"status": 3})
    assert [line["status"] for line in written(stream)] == [1, 2, 3]
    assert all(line["msg"] == "request" and line["logger"] == "idemproxy.access" for line in written(stream))
