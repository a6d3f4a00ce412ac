"""A small ticket API standing in for a real tool: every POST files a ticket.

It is deliberately not idempotent, so duplicates through it are visible:
``GET /tickets`` lists what was filed, and ``GET /tickets?external_id=K``
finds the ticket a given idempotency key created (used by reconciliation).

    python examples/ticket_tool.py --port 9000
"""

from __future__ import annotations

import argparse

from aiohttp import web

TICKETS = web.AppKey("tickets", list)


async def create_ticket(request: web.Request) -> web.Response:
    try:
        payload = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be JSON"}, status=400)
    if not isinstance(payload, dict) or not isinstance(payload.get("title"), str):
        return web.json_response({"error": "a string 'title' is required"}, status=400)
    tickets = request.app[TICKETS]
    ticket = {
        "id": len(tickets) + 1,
        "title": payload["title"],
        "external_id": request.headers.get("Idempotency-Key"),
    }
    tickets.append(ticket)
    return web.json_response(ticket, status=201)


async def list_tickets(request: web.Request) -> web.Response:
    tickets = request.app[TICKETS]
    external_id = request.query.get("external_id")
    if external_id is not None:
        tickets = [ticket for ticket in tickets if ticket["external_id"] == external_id]
    return web.json_response({"tickets": tickets, "count": len(tickets)})


async def get_ticket(request: web.Request) -> web.Response:
    ticket_id = int(request.match_info["ticket_id"])
    for ticket in request.app[TICKETS]:
        if ticket["id"] == ticket_id:
            return web.json_response(ticket)
    return web.json_response({"error": "no such ticket"}, status=404)


def build_app() -> web.Application:
    app = web.Application()
    app[TICKETS] = []
    app.router.add_post("/tickets", create_ticket)
    app.router.add_get("/tickets", list_tickets)
    app.router.add_get(r"/tickets/{ticket_id:\d+}", get_ticket)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
