"""The operator's console over HTTP (issue 24, item 2): who it answers, CSRF, headers, search.

The browser tests (``test_console.py``) show it working; these pin what it refuses: nothing
but its sign-in form and static files without credentials where the admin API asks for them,
no form accepted without its CSRF token or from another site, no session cookie that is not
HttpOnly and SameSite=Strict, nothing on a page that a caller's value could turn into markup.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from idemproxy.app import build_admin_app, build_proxy_app
from idemproxy.config.settings import StoreConfig
from idemproxy.lifecycle.records import State, StoredRequest
from idemproxy.ops.console_gate import HTMX_SHA256, HTMX_VERSION, SESSION_COOKIE
from idemproxy.store import Store, open_store
from tests.conftest import proxy_config, sqlite_url
from tests.support.auth import ADMIN_TOKEN, EXECUTOR_TOKEN, PLANNER_TOKEN, VERIFIER_TOKEN, auth_config, auth_setup
from tests.support.records import make_record, reserved
from tests.support.upstream import Upstream

Client = TestClient[Any, Any]
CONSOLE = "/_idem/console/"
CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')
LIVE = re.compile(r'hx-get="/_idem/console/live\?([^"]*)"')


@dataclass
class Console:
    proxy: Client
    admin: Client
    store: Store

    async def needs_attention(self, key: str, headers: dict[str, str] | None = None) -> str:
        sent = {"Idempotency-Key": key, **(headers or {})}
        assert (await self.proxy.post("/reset", json={"n": 1}, headers=sent)).status == 502
        retry = await self.proxy.post("/reset", json={"n": 1}, headers=sent)
        assert retry.status == 409
        op_id: str = (await retry.json(content_type=None))["operation"]
        record = await self.store.get(op_id)
        assert record is not None
        assert record.state is State.NEEDS_ATTENTION
        return op_id

    async def page(self, path: str = CONSOLE, **kwargs: Any) -> tuple[ClientResponse, str]:
        response = await self.admin.get(path, **kwargs)
        return response, await response.text()

    async def csrf(self, path: str = CONSOLE) -> str:
        _, html = await self.page(path)
        found = CSRF.search(html)
        assert found is not None, html
        return found.group(1)

    async def sign_in(self, token: str) -> ClientResponse:
        _, html = await self.page()  # the sign-in form, and its CSRF cookie
        found = CSRF.search(html)
        assert found is not None, html
        form = {"csrf": found.group(1), "token": token, "next": CONSOLE}
        return await self.admin.post("/_idem/console/login", data=form, allow_redirects=False)

    async def state(self, op_id: str) -> State:
        record = await self.store.get(op_id)
        assert record is not None
        return record.state


ConsoleFactory = Callable[..., Awaitable[Console]]


@pytest.fixture
async def make_console(
    aiohttp_client: Callable[..., Awaitable[Client]], tmp_path: Path, upstream: Upstream
) -> AsyncIterator[ConsoleFactory]:
    """``await make_console(auth=...)``: a proxy and its admin listener on a SQLite ledger."""
    stores: list[Store] = []

    async def factory(*, auth: bool) -> Console:
        url = sqlite_url(tmp_path)
        config = auth_config(upstream.url, url, auth_setup(tmp_path)) if auth else proxy_config(upstream.url, url)
        store = open_store(StoreConfig(url=url))
        await store.start()
        stores.append(store)
        proxy = await aiohttp_client(build_proxy_app(config, store, run_reconciler=False))
        admin = await aiohttp_client(build_admin_app(store, config))
        return Console(proxy, admin, store)

    yield factory
    for store in stores:
        await store.close()


@pytest.fixture
async def console(make_console: ConsoleFactory) -> Console:
    return await make_console(auth=False)


@pytest.fixture
async def guarded(make_console: ConsoleFactory) -> Console:
    return await make_console(auth=True)


def executor() -> dict[str, str]:
    return {"Authorization": f"Bearer {EXECUTOR_TOKEN}"}


# -- who it answers ----------------------------------------------------------------------------


async def test_without_credentials_the_console_shows_only_its_sign_in_form(guarded: Console) -> None:
    op_id = await guarded.needs_attention("order-1", executor())
    assert (await guarded.admin.get("/_idem/ops")).status == 401  # as the admin API
    for path in (CONSOLE, "/_idem/console/live", f"/_idem/console/ops/{op_id}", "/_idem/console/nope"):
        response, html = await guarded.page(path)
        assert response.status == 401, path
        assert 'name="token"' in html
        for shown in ("order-1", "NEEDS_ATTENTION", "executor", "/reset"):  # nothing of the ledger
            assert shown not in html, (path, shown)
    resolve = await guarded.admin.post(f"/_idem/console/ops/{op_id}/resolve", data={"outcome": "not_done"})
    assert resolve.status == 401
    assert await guarded.state(op_id) is State.NEEDS_ATTENTION
    # What a live update gets once its session is gone: htmx loads the page (the form) instead.
    live = await guarded.admin.get("/_idem/console/live", headers={"HX-Request": "true"})
    assert (live.status, live.headers["HX-Redirect"]) == (401, CONSOLE)


async def test_only_the_static_files_are_served_without_credentials(guarded: Console) -> None:
    _, html = await guarded.page()
    for url in re.findall(r'(?:href|src)="(/_idem/console/static/[^"]+)"', html):
        response = await guarded.admin.get(url)
        assert response.status == 200, url
        assert "immutable" in response.headers["Cache-Control"]
    assert (await guarded.admin.get("/_idem/console/static/../ops")).status == 401
    assert (await guarded.admin.get("/_idem/console/static/README.md")).status == 401


async def test_signing_in_sets_a_strict_http_only_session_cookie(guarded: Console) -> None:
    wrong = await guarded.sign_in("not-a-token-0123456789")
    assert wrong.status == 401
    assert "That token is not valid." in await wrong.text()
    assert SESSION_COOKIE not in wrong.cookies

    no_ops = await guarded.sign_in(PLANNER_TOKEN)
    assert no_ops.status == 403
    refused = await no_ops.text()
    assert "no access to the operations API" in refused
    assert 'name="token"' in refused  # the form again, to try another token
    assert SESSION_COOKIE not in no_ops.cookies

    signed_in = await guarded.sign_in(ADMIN_TOKEN)
    assert (signed_in.status, signed_in.headers["Location"]) == (303, CONSOLE)
    cookie = signed_in.cookies[SESSION_COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/_idem/console"
    assert not cookie["secure"]  # plain HTTP here; see below for TLS
    assert ADMIN_TOKEN not in cookie.value  # encoded, not as typed
    _, html = await guarded.page()
    assert "Signed in as <strong>admin</strong>" in html

    # Signing out clears the cookie: the console asks for credentials again.
    signed_out = await guarded.admin.post(
        "/_idem/console/logout", data={"csrf": CSRF.findall(html)[0]}, allow_redirects=False
    )
    assert signed_out.status == 303
    assert (await guarded.admin.get(CONSOLE)).status == 401


async def test_behind_tls_the_session_cookie_is_secure(guarded: Console) -> None:
    _, html = await guarded.page()
    form = {"csrf": CSRF.findall(html)[0], "token": ADMIN_TOKEN}
    response = await guarded.admin.post(
        "/_idem/console/login", data=form, headers={"X-Forwarded-Proto": "https"}, allow_redirects=False
    )
    assert response.status == 303
    assert response.cookies[SESSION_COOKIE]["secure"] is True


async def test_signing_in_goes_back_only_to_a_console_page(guarded: Console) -> None:
    for target, expected in (
        ("https://evil.example/", CONSOLE),
        ("//evil.example/_idem/console/", CONSOLE),
        ("/_idem/console//evil.example", CONSOLE),
        ("/_idem/console/?state=any", "/_idem/console/?state=any"),
    ):
        guarded.admin.session.cookie_jar.clear()
        _, html = await guarded.page()
        form = {"csrf": CSRF.findall(html)[0], "token": ADMIN_TOKEN, "next": target}
        response = await guarded.admin.post("/_idem/console/login", data=form, allow_redirects=False)
        assert response.headers["Location"] == expected, target
    # Asked for a page without a session, the form comes back to it (query included).
    guarded.admin.session.cookie_jar.clear()
    _, html = await guarded.page(CONSOLE, params={"state": "any", "key": "a&b"})
    assert 'name="next" value="/_idem/console/?state=any&amp;key=a%26b"' in html


async def test_an_ops_read_identity_sees_its_own_operations_and_cannot_resolve(guarded: Console) -> None:
    own = await guarded.needs_attention("verifier-1", {"Authorization": f"Bearer {VERIFIER_TOKEN}"})
    other = await guarded.needs_attention("executor-1", executor())
    assert (await guarded.sign_in(VERIFIER_TOKEN)).status == 303
    _, listing = await guarded.page()
    assert own in listing
    assert other not in listing
    response, html = await guarded.page(f"/_idem/console/ops/{other}")
    assert response.status == 403
    assert "may only see its own operations" in html
    _, page = await guarded.page(f"/_idem/console/ops/{own}")
    assert 'class="resolve"' not in page
    assert "that takes <code>ops: admin</code>" in page
    form = {"csrf": CSRF.findall(page)[0], "outcome": "not_done", "reason": "r"}
    refused = await guarded.admin.post(f"/_idem/console/ops/{own}/resolve", data=form)
    assert refused.status == 403
    assert "ops: admin" in await refused.text()
    assert await guarded.state(own) is State.NEEDS_ATTENTION


async def test_without_admin_auth_only_a_loopback_host_is_answered(console: Console) -> None:
    await console.needs_attention("order-1")
    rebound, html = await console.page(headers={"Host": "evil.example:8081"})
    assert rebound.status == 403
    assert "loopback" in html
    assert CSRF.search(html) is None
    for host in ("localhost", "127.0.0.1:8081", "[::1]:8081"):
        assert (await console.page(headers={"Host": host}))[0].status == 200, host


# -- forms ---------------------------------------------------------------------------------------


async def test_a_resolve_without_this_sessions_csrf_token_changes_nothing(guarded: Console) -> None:
    op_id = await guarded.needs_attention("order-1", executor())
    assert (await guarded.sign_in(ADMIN_TOKEN)).status == 303
    form = {"outcome": "not_done", "reason": "checked"}
    path = f"/_idem/console/ops/{op_id}/resolve"
    assert (await guarded.admin.post(path, data=form)).status == 403
    assert (await guarded.admin.post(path, data={**form, "csrf": "0" * 64})).status == 403
    # A token bound to another session (here: the sign-in form's, bound to no token) is refused too.
    guarded.admin.session.cookie_jar.clear()
    anonymous = await guarded.csrf()
    assert (await guarded.sign_in(ADMIN_TOKEN)).status == 303
    assert (await guarded.admin.post(path, data={**form, "csrf": anonymous})).status == 403
    assert await guarded.state(op_id) is State.NEEDS_ATTENTION


async def test_a_form_sent_from_another_site_is_refused(guarded: Console) -> None:
    op_id = await guarded.needs_attention("order-1", executor())
    assert (await guarded.sign_in(ADMIN_TOKEN)).status == 303
    form = {"csrf": await guarded.csrf(f"/_idem/console/ops/{op_id}"), "outcome": "not_done", "reason": "r"}
    path = f"/_idem/console/ops/{op_id}/resolve"
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
    ):
        response = await guarded.admin.post(path, data=form, headers=headers)
        assert response.status == 403, headers
        assert "another site" in await response.text()
    assert await guarded.state(op_id) is State.NEEDS_ATTENTION
    # The browser's own form ("Origin: null" under Referrer-Policy no-referrer) goes through.
    done = await guarded.admin.post(path, data=form, headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert done.status == 200
    assert await guarded.state(op_id) is State.RELEASED


async def test_the_sign_in_form_needs_its_csrf_token_and_nothing_else(guarded: Console) -> None:
    await guarded.page()
    response = await guarded.admin.post(
        "/_idem/console/login", data={"token": ADMIN_TOKEN, "csrf": "0" * 64}, allow_redirects=False
    )
    assert response.status == 403
    assert SESSION_COOKIE not in response.cookies
    stuffed = {f"field{number}": "x" for number in range(20)}
    too_many = await guarded.admin.post("/_idem/console/login", data=stuffed, allow_redirects=False)
    assert too_many.status == 400
    too_large = await guarded.admin.post("/_idem/console/login", data={"token": "x" * 10_000})
    assert too_large.status == 413


async def test_a_resolve_is_the_admin_apis_with_a_reason(console: Console) -> None:
    op_id = await console.needs_attention("order-1")
    path = f"/_idem/console/ops/{op_id}/resolve"
    csrf = await console.csrf(f"/_idem/console/ops/{op_id}")
    form = {"csrf": csrf, "outcome": "done", "status": "201", "body": '{"id": 42}', "by": "alice"}

    missing = await console.admin.post(path, data=form)
    assert missing.status == 400
    assert "Say why" in await missing.text()
    wrong_status = await console.admin.post(path, data={**form, "reason": "r", "status": "99"})
    assert wrong_status.status == 400
    assert await console.state(op_id) is State.NEEDS_ATTENTION

    done = await console.admin.post(path, data={**form, "reason": "saw ticket 42"}, allow_redirects=False)
    assert (done.status, done.headers["Location"]) == (303, f"/_idem/console/ops/{op_id}?resolved=1")
    record = await console.store.get(op_id)
    assert record is not None
    assert record.state is State.COMPLETED
    assert record.response is not None
    assert (record.response.status, record.response.body) == (201, b'{"id":42}')
    assert record.evidence[-1].detail["by"] == "alice"
    assert record.evidence[-1].detail["reason"] == "saw ticket 42"
    again = await console.admin.post(path, data={**form, "reason": "twice"})
    assert again.status == 409
    assert "can be resolved" in await again.text()


# -- what a page shows -----------------------------------------------------------------------------


async def test_every_console_answer_forbids_framing_inline_scripts_and_referrers(guarded: Console) -> None:
    op_id = await guarded.needs_attention("order-1", executor())
    answers = [await guarded.admin.get(CONSOLE), await guarded.admin.get("/_idem/console/static/console.css")]
    assert (await guarded.sign_in(ADMIN_TOKEN)).status == 303
    answers += [await guarded.admin.get(f"/_idem/console/ops/{op_id}"), await guarded.admin.get("/_idem/console/x")]
    assert [answer.status for answer in answers] == [401, 200, 200, 404]
    for answer in answers:
        policy = answer.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
    page = await answers[2].text()
    assert "<script>" not in page  # the only script is the vendored htmx, by URL
    assert ' style="' not in page
    assert re.search(r"\son[a-z]+=", page) is None


async def test_a_callers_values_are_escaped_on_every_page(console: Console) -> None:
    key = "<script>alert('k')</script>\"q\""
    headers = {"X-Idem-Caller": '<b onmouseover="x()">Zoë</b> 東京', "X-Agent-Task": "<img src=x onerror=y()> ü"}
    op_id = await console.needs_attention(key, headers)
    for path in (CONSOLE, "/_idem/console/?state=any", "/_idem/console/live", f"/_idem/console/ops/{op_id}"):
        _, html = await console.page(path)
        assert op_id in html, path
        assert "<script>alert" not in html
        assert "<b onmouseover" not in html
        assert "<img src=x" not in html
        assert "&lt;script&gt;alert(&#39;k&#39;)&lt;/script&gt;&#34;q&#34;" in html
        assert "&lt;b onmouseover=&#34;x()&#34;&gt;Zoë&lt;/b&gt; 東京" in html
        assert "&lt;img src=x onerror=y()&gt; ü" in html


async def test_the_page_shows_the_exact_cli_command(console: Console) -> None:
    op_id = await console.needs_attention("order-1")
    _, html = await console.page(f"/_idem/console/ops/{op_id}")
    admin = str(console.admin.make_url("")).rstrip("/")
    not_done = (
        f"idemproxy ops --admin {admin} resolve {op_id} --not-done --reason &#39;checked the tool: no effect&#39;"
    )
    assert not_done in html
    assert f"resolve {op_id} --done --status 200 --body &#39;{{}}&#39;" in html


async def test_the_page_shows_the_forwarded_request_with_credentials_redacted(console: Console) -> None:
    op_id = "5eed" + "0" * 28
    record = make_record(op_id).evolve(
        request=StoredRequest(headers=(("Authorization", "Bearer s3cret"), ("X-Trace", "<t1>")), body=b'{"n": 5}')
    )
    assert await console.store.reserve(record, reserved(record)) is None

    _, html = await console.page(f"/_idem/console/ops/{op_id}")

    assert "s3cret" not in html
    assert "<code>Authorization</code></td><td><code>[redacted]</code>" in html
    assert "<code>X-Trace</code></td><td><code>&lt;t1&gt;</code>" in html
    assert "{&#34;n&#34;: 5}" in html


async def test_search_by_key_caller_task_route_state_and_id(console: Console) -> None:
    first = await console.needs_attention("order-1001", {"X-Agent-Task": "t-1"})
    second = await console.needs_attention("refund-7", {"X-Idem-Caller": "billing"})

    async def found(**params: str) -> set[str]:
        response, html = await console.page(CONSOLE, params=params)
        assert response.status == 200, html
        return {op for op in (first, second) if f'data-operation="{op}"' in html}

    assert await found() == {first, second}
    assert await found(key="order") == {first}
    assert await found(caller="billing") == {second}
    assert await found(task="t-1") == {first}
    assert await found(route="root") == {first, second}
    assert await found(route="other") == set()
    assert await found(state="COMPLETED") == set()
    assert await found(state="any", key="refund") == {second}
    assert await found(operation=second) == {second}
    assert await found(key="refund-7", caller="billing", route="root") == {second}  # looked up by its id
    assert await found(key="refund", caller="billing", route="root") == {second}  # then as a substring
    form = {"csrf": await console.csrf(f"/_idem/console/ops/{first}"), "outcome": "not_done", "by": "a", "reason": "r"}
    assert (await console.admin.post(f"/_idem/console/ops/{first}/resolve", data=form)).status == 200
    assert await console.state(first) is State.RELEASED
    assert await found(operation=first) == {first}  # found by its id all the same
    assert await found(key="order") == set()
    response, html = await console.page(CONSOLE, params={"state": "bogus"})
    assert response.status == 400
    assert "Unknown state" in html


async def test_the_live_list_is_sent_again_only_when_it_changed(console: Console) -> None:
    await console.needs_attention("order-1")
    _, html = await console.page()
    found = LIVE.search(html)
    assert found is not None
    live = "/_idem/console/live?" + found.group(1).replace("&amp;", "&")
    unchanged = await console.admin.get(live, headers={"HX-Request": "true"})
    assert unchanged.status == 204
    added = await console.needs_attention("order-2")
    changed = await console.admin.get(live, headers={"HX-Request": "true"})
    assert changed.status == 200
    assert added in await changed.text()


def test_the_vendored_htmx_is_the_pinned_release() -> None:
    static = resources.files("idemproxy.ops").joinpath("static")
    assert hashlib.sha256(static.joinpath("htmx.min.js").read_bytes()).hexdigest() == HTMX_SHA256
    readme = static.joinpath("README.md").read_text(encoding="utf-8")
    assert f"htmx **{HTMX_VERSION}**" in readme
    assert HTMX_SHA256 in readme
