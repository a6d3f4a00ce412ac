"""A small ticket API standing in for a real tool: every POST files a ticket.

It is deliberately not idempotent, so duplicates through it are visible: it
prints a line for each, ``GET /tickets`` lists what was filed, and
``GET /tickets?external_id=K`` finds the ticket a given idempotency key created
(used by reconciliation). ``POST /notify`` sends a notification the same way
(``GET /notify`` lists them).

A request with ``X-Demo-Drop-Answer: 1`` is carried out, and then the
connection is dropped before the answer: the lost acknowledgment the
``make run`` demo shows idemproxy dealing with.

    python examples/ticket_tool.py --port 9000
"""

from __future__ import annotations

import argparse

from aiohttp import web

TICKETS = web.AppKey("tickets", list)
NOTIFICATIONS = web.AppKey("notifications", list)
DROP_ANSWER = "X-Demo-Drop-Answer"


def answer(request: web.Request, body: dict[str, object], status: int) -> web.Response:
    """``body`` as JSON; or, when the request asks for it, no answer at all: the effect is
    done, the connection ends."""
    if request.headers.get(DROP_ANSWER) == "1" and request.transport is not None:
        print(f"  ... and dropped the connection instead of answering {status}", flush=True)
        request.transport.abort()
    return web.json_response(body, status=status)


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
    print(f"filed ticket {ticket['id']} for key {ticket['external_id']}: {ticket['title']}", flush=True)
    return answer(request, ticket, 201)


async def list_tickets(request: web.Request) -> web.Response:
    return listing(request, request.app[TICKETS], "tickets")


async def get_ticket(request: web.Request) -> web.Response:
    ticket_id = int(request.match_info["ticket_id"])
    for ticket in request.app[TICKETS]:
        if ticket["id"] == ticket_id:
            return web.json_response(ticket)
    return web.json_response({"error": "no such ticket"}, status=404)


async def notify(request: web.Request) -> web.Response:
    try:
        payload = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be JSON"}, status=400)
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        return web.json_response({"error": "a string 'text' is required"}, status=400)
    notifications = request.app[NOTIFICATIONS]
    notification = {
        "id": len(notifications) + 1,
        "to": payload.get("to", "on-call"),
        "text": payload["text"],
        "external_id": request.headers.get("Idempotency-Key"),
    }
    notifications.append(notification)
    print(f"sent notification {notification['id']} for key {notification['external_id']}", flush=True)
    return answer(request, notification, 201)


async def list_notifications(request: web.Request) -> web.Response:
    return listing(request, request.app[NOTIFICATIONS], "notifications")


def listing(request: web.Request, items: list[dict[str, object]], name: str) -> web.Response:
    external_id = request.query.get("external_id")
    if external_id is not None:
        items = [item for item in items if item["external_id"] == external_id]
    return web.json_response({name: items, "count": len(items)})


def build_app() -> web.Application:
    app = web.Application()
    app[TICKETS] = []
    app[NOTIFICATIONS] = []
    app.router.add_post("/tickets", create_ticket)
    app.router.add_get("/tickets", list_tickets)
    app.router.add_get(r"/tickets/{ticket_id:\d+}", get_ticket)
    app.router.add_post("/notify", notify)
    app.router.add_get("/notify", list_notifications)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
