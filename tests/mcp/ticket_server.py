"""A real MCP server (the ``mcp`` SDK's FastMCP over Streamable HTTP) that counts its side effects.

Tools:

- ``create_ticket(title, steps=0, delay=0)``: files a ticket (one effect), after reporting
  ``steps`` progress notifications when the caller asked for progress and sleeping ``delay``
  seconds; answers ``{"id": n, "title": title}``;
- ``explode(reason)``: performs an effect, then raises: the tool's answer is ``isError: true``;
- ``list_tickets()``: reads, no effect.

Each server runs uvicorn in its own thread with its own event loop, so the tests'
loop, the proxy and the MCP client never share one with it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from pydantic import Field

KEY_META = "io.idemproxy/idempotency-key"


@dataclass
class Tickets:
    """What the tools did; safe to read from the test's thread."""

    filed: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)  # the idempotency key each filing arrived with
    explosions: int = 0
    reads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def file(self, title: str, key: str | None) -> dict[str, Any]:
        with self._lock:
            ticket = {"id": len(self.filed) + 1, "title": title}
            self.filed.append(ticket)
            self.keys.append(key)
            return ticket

    def titled(self, title: str) -> int:
        return sum(1 for ticket in self.filed if ticket["title"] == title)

    def reset(self) -> None:
        with self._lock:
            self.filed.clear()
            self.keys.clear()
            self.explosions = 0
            self.reads = 0


def ticket_server(tickets: Tickets, *, stateless: bool, json_response: bool) -> FastMCP:
    server = FastMCP("tickets", stateless_http=stateless, json_response=json_response, log_level="WARNING")

    @server.tool()
    async def create_ticket(
        title: Annotated[str, Field(description="What the ticket is about.")],
        ctx: Context,
        steps: Annotated[int, Field(description="Progress notifications to send first.")] = 0,
        delay: Annotated[float, Field(description="Seconds to work before filing.")] = 0.0,
    ) -> dict[str, Any]:
        """File a ticket in the tracker."""
        for step in range(steps):
            await ctx.report_progress(step + 1, steps, f"step {step + 1}")
        if delay:
            await asyncio.sleep(delay)
        meta = ctx.request_context.meta
        extra = (meta.model_extra if meta is not None else None) or {}
        return tickets.file(title, extra.get(KEY_META))

    @server.tool()
    def explode(reason: Annotated[str, Field(description="Why it fails.")]) -> str:
        """Perform an effect, then fail."""
        tickets.explosions += 1
        raise RuntimeError(f"exploded: {reason}")

    @server.tool()
    def list_tickets() -> list[dict[str, Any]]:
        """The tickets filed so far."""
        tickets.reads += 1
        return list(tickets.filed)

    return server


class ServerThread:
    """An ASGI app served by uvicorn on a free loopback port, in a thread of its own."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="mcp-ticket-server", daemon=True)
        self.url = ""

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the MCP server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
