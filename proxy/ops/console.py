"""The operator's console: ``/_idem/console`` on the admin listener, for a person with a browser.

- ``/_idem/console/``: the operations that need a person (NEEDS_ATTENTION and UNKNOWN) with
  their latest evidence, and a search by key, caller, task, route, state or operation id;
  the list updates itself (htmx polls ``/_idem/console/live`` every 2 s, and gets a new
  list only when it changed).
- ``/_idem/console/ops/{id}``: one operation as ``GET /_idem/ops/{id}`` shows it (the same
  view, so the same redactions: never the stored request's headers or body), its evidence
  trail, the exact ``idemproxy ops resolve`` commands, and a form that resolves it (done,
  with the response to replay, or not done) with a reason.

The pages ask the operations API's own functions (``Desk``), with its access checks: an
identity with ``ops: read`` sees its own operations and cannot resolve. Sign-in, sessions
and CSRF are ``console_gate``'s. Server-rendered (Jinja2, autoescaped); the only script is
the vendored htmx, and everything works without it but the live list.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web

from idemproxy.edge.auth import ExpectHandler
from idemproxy.ops import console_views as views
from idemproxy.ops.console_gate import (
    ASSETS_KEY,
    HOME,
    LOGIN,
    LOGIN_NEXT,
    PREFIX,
    Assets,
    bearer_token,
    clear_session,
    console_gate,
    csrf_valid,
    may_resolve,
    page_context,
    set_session,
    viewer,
)
from idemproxy.protocol.errors import InvalidResolution, OperationNotFound, ProblemError
from idemproxy.protocol.keys import Scope, operation_id
from idemproxy.store.base import OpsQuery

__all__ = ["Desk", "mount_console"]

#: Rows a list shows at most; a key search looks through up to ``_SCAN`` operations for them.
_ROWS = 200
_SCAN = 1000
_MAX_REASON = 2000
_MAX_BY = 200
_LIVE_EVERY_S = 2


@dataclass(frozen=True, slots=True)
class Desk:
    """What the console asks of the operations API (``idemproxy.ops.admin``), with the API's
    access checks and views; each raises the API's problems (``Forbidden``, ``InvalidQuery``, ...)."""

    #: The query ``GET /_idem/ops`` makes of these parameters (validated).
    parse_query: Callable[[Mapping[str, str]], OpsQuery]
    #: The full views (``GET /_idem/ops/{id}``) of the operations the query finds that the identity may see.
    find: Callable[[web.Request, OpsQuery], Awaitable[list[dict[str, Any]]]]
    #: One operation's view, if the identity may see it.
    show: Callable[[web.Request, str], Awaitable[dict[str, Any]]]
    #: ``POST /_idem/ops/{id}/resolve`` with this payload; the resolved operation's view.
    resolve: Callable[[web.Request, str, dict[str, Any]], Awaitable[dict[str, Any]]]


DESK_KEY = web.AppKey("console_desk", Desk)


def mount_console(app: web.Application, desk: Desk, expect: ExpectHandler) -> None:
    """The console's pages on the admin app, behind its authentication (``console_gate`` goes
    first among the app's middlewares: it must run before the authentication it feeds)."""
    app.middlewares.insert(0, console_gate())
    app[DESK_KEY] = desk
    app[ASSETS_KEY] = assets = Assets()
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("idemproxy.ops", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=True),
        undefined=jinja2.StrictUndefined,
        default_helpers=False,
    )
    env.globals.update(asset=assets.url, prefix=PREFIX, live_every_s=_LIVE_EVERY_S, state_choices=views.STATE_CHOICES)
    env.filters.update(utc=views.utc, evidence_line=views.evidence_line, evidence_detail=views.evidence_detail)
    app.router.add_get(PREFIX, _to_home, expect_handler=expect)
    app.router.add_get(HOME, operations_page, name="console-home", expect_handler=expect)
    app.router.add_get(PREFIX + "/live", live_operations, expect_handler=expect)
    app.router.add_get(PREFIX + "/ops/{op_id}", operation_page, name="console-operation", expect_handler=expect)
    app.router.add_post(PREFIX + "/ops/{op_id}/resolve", resolve_operation, expect_handler=expect)
    app.router.add_get(LOGIN, _to_home, expect_handler=expect)
    app.router.add_post(LOGIN, login, expect_handler=expect)
    app.router.add_post(PREFIX + "/logout", logout, expect_handler=expect)


# -- the list -------------------------------------------------------------------------------


async def operations_page(request: web.Request) -> web.Response:
    viewer(request)
    search = views.Search.of(request.query)
    found, error = await _search(request, search)
    context = {**page_context(request), **_list_context(search, found, error)}
    return aiohttp_jinja2.render_template("operations.html", request, context, status=400 if error else 200)


async def live_operations(request: web.Request) -> web.Response:
    """The list again, for htmx; 204 (nothing to swap) while it shows the same."""
    viewer(request)
    search = views.Search.of(request.query)
    found, error = await _search(request, search)
    context = _list_context(search, found, error)
    if request.query.get("shown") == context["digest"]:
        return web.Response(status=204)
    return aiohttp_jinja2.render_template("_operations.html", request, {**page_context(request), **context})


def _list_context(search: views.Search, found: list[dict[str, Any]], error: str | None) -> dict[str, Any]:
    digest = views.digest(found, error)
    return {
        "search": search,
        "operations": found[:_ROWS],
        "truncated": len(found) > _ROWS,
        "error": error,
        "digest": digest,
        "live_query": {**search.params(), "shown": digest},
        "attention": search.state == views.ATTENTION,
    }


async def _search(request: web.Request, search: views.Search) -> tuple[list[dict[str, Any]], str | None]:
    """The operations the search finds (oldest update first: the longest waiting), or why none."""
    desk = request.app[DESK_KEY]
    try:
        states = search.states
    except ValueError:
        return [], f"Unknown state {search.state!r}."
    try:
        if search.operation:  # that one operation, whatever its state
            return await _look_up(request, desk, search, search.operation), None
        found = []
        if search.key and search.caller and search.route:  # the very key first: it names one operation
            found = await _look_up(request, desk, search, operation_id(Scope(search.caller, search.route, search.key)))
        if not found:
            for state in states:
                params = {"route": search.route, "task": search.task, "caller": search.caller}
                params = {name: value for name, value in params.items() if value}
                params["limit"] = str(_SCAN if search.key else _ROWS + 1)
                if state is not None:
                    params["state"] = state.value
                found += await desk.find(request, desk.parse_query(params))
    except ProblemError as exc:
        if exc.status >= 500:
            raise
        return [], exc.detail
    found = [view for view in found if search.admits(view)]
    return sorted(found, key=lambda view: (view["updated_ms"], view["operation"])), None


async def _look_up(request: web.Request, desk: Desk, search: views.Search, op_id: str) -> list[dict[str, Any]]:
    """The operation ``op_id``, if it matches the search's caller, route and task."""
    try:
        view = await desk.show(request, op_id)
    except OperationNotFound:
        return []
    wanted = {"task": search.task, "caller": search.caller, "route": search.route}
    return [view] if all(not value or view[name] == value for name, value in wanted.items()) else []


# -- one operation --------------------------------------------------------------------------


async def operation_page(request: web.Request) -> web.Response:
    viewer(request)
    view = await request.app[DESK_KEY].show(request, request.match_info["op_id"])
    return _operation_response(request, view, form={}, error=None, status=200)


def _operation_response(
    request: web.Request, view: dict[str, Any], *, form: Mapping[str, str], error: str | None, status: int
) -> web.Response:
    done, not_done = views.resolve_commands(view, f"{request.scheme}://{request.host}")
    resolvable = views.resolvable(view, int(time.time() * 1000))
    context = {
        **page_context(request),
        "op": view,
        "resolvable": resolvable,
        "can_resolve": resolvable and may_resolve(request),
        "may_resolve": may_resolve(request),
        "command_done": done,
        "command_not_done": not_done,
        "form": form,
        "error": error,
        "resolved": request.query.get("resolved") == "1",
    }
    return aiohttp_jinja2.render_template("operation.html", request, context, status=status)


async def resolve_operation(request: web.Request) -> web.Response:
    """The resolve form: done (with the response to replay) or not done, with a reason."""
    who = viewer(request)
    desk = request.app[DESK_KEY]
    op_id = request.match_info["op_id"]
    form = {name: value for name, value in (await request.post()).items() if isinstance(value, str)}
    if not csrf_valid(request, form.get("csrf")):
        return _refused(request, "The form expired or did not come from this console; load the page and try again.")
    try:
        payload = _resolution(form, who)
        await desk.resolve(request, op_id, payload)
    except ProblemError as exc:
        if exc.status >= 500 or isinstance(exc, OperationNotFound):
            raise
        view = await desk.show(request, op_id)
        return _operation_response(request, view, form=form, error=exc.detail, status=exc.status)
    return web.Response(status=303, headers={"Location": f"{PREFIX}/ops/{op_id}?resolved=1"})


def _resolution(form: Mapping[str, str], who: str | None) -> dict[str, Any]:
    """The admin API's resolve payload for the form (as ``idemproxy ops resolve`` builds it)."""
    reason = form.get("reason", "").strip()
    if not reason:
        raise InvalidResolution("Say why: the reason is kept with the operation's evidence.")
    if len(reason) > _MAX_REASON:
        raise InvalidResolution(f"The reason is limited to {_MAX_REASON} characters.")
    by = who or form.get("by", "").strip()
    if not by or len(by) > _MAX_BY:
        raise InvalidResolution(f"Say who resolves it (at most {_MAX_BY} characters).")
    outcome = form.get("outcome")
    if outcome == "not_done":
        return {"outcome": "not_done", "by": by, "reason": reason}
    if outcome != "done":
        raise InvalidResolution("Choose whether the effect happened (done) or not (not done).")
    status = form.get("status", "").strip() or "200"
    if not (status.isascii() and status.isdigit() and 200 <= int(status) <= 599):
        raise InvalidResolution(f"The status to replay must be an HTTP status from 200 to 599, not {status!r}.")
    response: dict[str, Any] = {"status": int(status)}
    if body := form.get("body", ""):
        try:  # as the CLI's --body: JSON text is sent as JSON, anything else as text
            response["body"] = orjson.loads(body)
        except orjson.JSONDecodeError:
            response["body"] = body
    return {"outcome": "done", "by": by, "reason": reason, "response": response}


# -- signing in and out -----------------------------------------------------------------------


async def login(request: web.Request) -> web.Response:
    """Reached once the admin authentication accepted the sign-in form's token (or with
    authentication off, where there is nothing to sign in to)."""
    who = viewer(request)
    response = web.Response(status=303, headers={"Location": request.get(LOGIN_NEXT, HOME)})
    token = bearer_token(request)
    if who is not None and token is not None:
        set_session(response, request, token)
    return response


async def logout(request: web.Request) -> web.Response:
    viewer(request)
    form = await request.post()
    if not csrf_valid(request, form.get("csrf")):
        return _refused(request, "The form expired or did not come from this console; load the page and try again.")
    response = web.Response(status=303, headers={"Location": HOME})
    clear_session(response, request)
    return response


async def _to_home(request: web.Request) -> web.Response:
    viewer(request)
    return web.Response(status=303, headers={"Location": HOME})


def _refused(request: web.Request, detail: str) -> web.Response:
    context = {**page_context(request), "title": "Refused", "detail": detail, "status": 403}
    return aiohttp_jinja2.render_template("error.html", request, context, status=403)
