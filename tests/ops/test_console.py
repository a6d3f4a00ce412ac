"""The operator's console in a real browser (issue 24, item 2).

Headless Chromium (Debian's ``chromium``, driven by Selenium through Debian's
``chromium-driver``) against a real ``idemproxy run`` with a real SQLite ledger: an operator
signs in, sees the operations that need a person (the list updates by itself), opens one,
resolves it through the form, and the ledger and a retry through the proxy show the
resolution. Values a caller chose (key, caller, task) are shown as text, never as markup.
A screenshot of each page is written to ``test-artifacts/console/``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select

from tests.support.auth import ADMIN_TOKEN, EXECUTOR_TOKEN, auth_setup, bearer
from tests.support.browser import ARTIFACTS, Browser, Driver, chromium
from tests.support.processes import idemproxy_run
from tests.support.upstream import Upstream

SCREENSHOTS = ARTIFACTS / "console"
HOSTILE_KEY = "<script>alert('key')</script>\"quoted\" & 'single'"
HOSTILE_CALLER = '<script>alert("caller")</script> Zoë 東京 "q"'
HOSTILE_TASK = "<img src=x onerror=alert(1)> ü 'task'"


@dataclass(frozen=True)
class Proxy:
    url: str
    admin_url: str

    @property
    def console(self) -> str:
        return f"{self.admin_url}/_idem/console/"


@asynccontextmanager
async def running_proxy(upstream: Upstream, directory: Path, *, auth: bool) -> AsyncIterator[Proxy]:
    """``idemproxy run`` in front of ``upstream``, its ledger a SQLite file, admin on loopback."""
    settings: dict[str, Any] = {"routes": [{"prefix": "/", "name": "tools", "upstream": upstream.url}]}
    if auth:
        settings["auth"] = {"identities_file": str(auth_setup(directory))}
    async with idemproxy_run(settings, directory) as listening:
        yield Proxy(listening.url, listening.admin_url)


async def needs_attention(proxy: Proxy, key: str, headers: Mapping[str, str]) -> str:
    """An operation whose answer was lost on a route without a probe: NEEDS_ATTENTION. Its id."""
    async with aiohttp.ClientSession() as session:
        sent = {"Idempotency-Key": key, **headers}
        async with session.post(f"{proxy.url}/reset", json={"n": 1}, headers=sent) as lost:
            assert lost.status == 502, await lost.text()
        async with session.post(f"{proxy.url}/reset", json={"n": 1}, headers=sent) as retry:
            assert retry.status == 409, await retry.text()
            problem = await retry.json(content_type=None)
    assert problem["state"] == "NEEDS_ATTENTION", problem
    op_id: str = problem["operation"]
    return op_id


async def admin_view(proxy: Proxy, op_id: str, headers: Mapping[str, str]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.admin_url}/_idem/ops/{op_id}", headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        view: dict[str, Any] = await response.json()
        return view


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    with chromium() as driver:
        yield Browser(driver, SCREENSHOTS)


def row(op_id: str) -> Callable[[Driver], Any]:
    return expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, f'tr[data-operation="{op_id}"]'))


def submit(driver: Driver, form: str = "form") -> None:
    driver.find_element(By.CSS_SELECTOR, f"{form} button[type=submit]").click()


async def sign_in(browser: Browser, proxy: Proxy, hidden: str) -> None:
    """Without a session the console is the sign-in form; a wrong token is refused in words."""
    await browser.run(lambda driver: driver.get(proxy.console))
    await browser.element("form input#token")
    assert hidden not in await browser.run(lambda driver: driver.page_source)
    await browser.screenshot("login")
    await browser.run(lambda driver: driver.find_element(By.ID, "token").send_keys("not-a-token-0123456789"))
    await browser.run(submit)
    assert "not valid" in (await browser.element("#login-error")).text
    await browser.run(lambda driver: driver.find_element(By.ID, "token").send_keys(ADMIN_TOKEN))
    await browser.run(submit)
    await browser.until(
        lambda driver: "Signed in as admin" in driver.find_element(By.CSS_SELECTOR, ".who").text,
        "the console did not sign in",
    )


async def resolve_done(browser: Browser, op_id: str) -> None:
    """The operation's page (record, evidence trail, CLI command), then its form: done, 201."""
    await browser.run(lambda driver: driver.find_element(By.CSS_SELECTOR, f'a[href$="/ops/{op_id}"]').click())
    assert (await browser.element("h1 .op-id")).text == op_id
    trail = await browser.element("table.evidence-trail")
    assert "connection-lost" in trail.text, trail.text  # the lost answer
    assert "no reconcile method configured" in trail.text, trail.text  # why nothing automatic will settle it
    commands = await browser.run(lambda driver: driver.find_element(By.CSS_SELECTOR, "pre.command").text)
    assert f"resolve {op_id} --done" in commands
    await browser.screenshot("operation")

    def fill_in(driver: Driver) -> None:
        driver.find_element(By.ID, "outcome-done").click()
        status = driver.find_element(By.ID, "resolve-status")
        status.clear()
        status.send_keys("201")
        driver.find_element(By.ID, "resolve-body").send_keys('{"order": 1001, "filed": true}')
        driver.find_element(By.ID, "resolve-reason").send_keys("checked the order system: order 1001 exists")
        submit(driver, "form.resolve")

    await browser.run(fill_in)
    assert "COMPLETED" in (await browser.element(".notice")).text
    assert (await browser.element("#op-state")).text == "COMPLETED"
    await browser.screenshot("resolved")


async def test_an_operator_signs_in_sees_what_needs_a_person_and_resolves_it(
    upstream: Upstream, tmp_path: Path, browser: Browser
) -> None:
    async with running_proxy(upstream, tmp_path, auth=True) as proxy:
        agent = bearer(EXECUTOR_TOKEN)
        first = await needs_attention(proxy, "order-1001", {**agent, "X-Agent-Task": "checkout-7"})
        await sign_in(browser, proxy, hidden=first)

        listed = await browser.until(row(first), "the NEEDS_ATTENTION operation is not listed")
        for shown in ("NEEDS_ATTENTION", "order-1001", "checkout-7", "no reconcile method configured"):
            assert shown in listed.text
        # The list updates by itself: a second lost answer appears without a reload (an element
        # of the page before it is still there: a reloaded page would have replaced it).
        before = await browser.element("#search-key")
        second = await needs_attention(proxy, "order-1002", agent)
        await browser.until(row(second), "the list did not show the new operation by itself")
        assert await browser.run(lambda driver: before.is_displayed())
        await browser.screenshot("attention")
        refused = [line for line in browser.console_messages() if "Content Security Policy" in line]
        assert refused == [], refused  # htmx works within the policy (no inline script or style)

        await resolve_done(browser, first)

        # The ledger holds the resolution, with who and why, and a retry gets its answer.
        view = await admin_view(proxy, first, bearer(ADMIN_TOKEN))
        assert (view["state"], view["response"]["status"]) == ("COMPLETED", 201)
        assert view["response"]["body"] == '{"order":1001,"filed":true}'
        resolved = view["evidence"][-1]
        assert (resolved["by"], resolved["reason"]) == ("admin", "checked the order system: order 1001 exists")
        effects = upstream.count("/reset")
        retry = {"Idempotency-Key": "order-1001", **agent}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{proxy.url}/reset", json={"n": 1}, headers=retry) as replay,
        ):
            assert replay.status == 201
            assert await replay.json() == {"order": 1001, "filed": True}
        assert upstream.count("/reset") == effects  # answered from the ledger: nothing forwarded
        assert (await admin_view(proxy, second, bearer(ADMIN_TOKEN)))["state"] == "NEEDS_ATTENTION"


async def test_values_a_caller_chose_are_shown_as_text_never_as_markup(
    upstream: Upstream, tmp_path: Path, browser: Browser
) -> None:
    async with running_proxy(upstream, tmp_path, auth=False) as proxy:
        hostile = {"X-Idem-Caller": HOSTILE_CALLER, "X-Agent-Task": HOSTILE_TASK}
        op_id = await needs_attention(proxy, HOSTILE_KEY, hostile)

        # The HTML as served: every value escaped.
        async with aiohttp.ClientSession() as session:
            for page in (proxy.console, f"{proxy.admin_url}/_idem/console/ops/{op_id}"):
                async with session.get(page) as response:
                    assert response.status == 200
                    html = await response.text()
                assert "<script>alert(" not in html
                assert "<img src=x" not in html
                assert "&lt;script&gt;alert(&#39;key&#39;)&lt;/script&gt;&#34;quoted&#34; &amp; &#39;single&#39;" in (
                    html
                )
                assert "&lt;script&gt;alert(&#34;caller&#34;)&lt;/script&gt; Zoë 東京 &#34;q&#34;" in html
                assert "&lt;img src=x onerror=alert(1)&gt; ü &#39;task&#39;" in html

        # In the browser: the list and the page show the values as text, and nothing ran.
        await browser.run(lambda driver: driver.get(proxy.console))
        listed = await browser.until(row(op_id), "the operation is not listed")
        assert listed.find_element(By.CSS_SELECTOR, "td.key").text == HOSTILE_KEY
        assert listed.find_element(By.CSS_SELECTOR, "td.caller").text == HOSTILE_CALLER
        assert listed.find_element(By.CSS_SELECTOR, "td.task").text == HOSTILE_TASK

        # The search form finds it by a piece of its key, in any state.
        def search(driver: Driver) -> None:
            Select(driver.find_element(By.ID, "search-state")).select_by_value("any")
            driver.find_element(By.ID, "search-key").send_keys('"quoted" &')
            submit(driver, "form.search")

        await browser.run(search)
        await browser.until(lambda driver: "key=" in driver.current_url, "the search was not sent")
        found = await browser.until(row(op_id), "the search did not find the operation")
        assert found.find_element(By.CSS_SELECTOR, "td.key").text == HOSTILE_KEY
        await browser.screenshot("search")

        await browser.run(lambda driver: driver.find_element(By.CSS_SELECTOR, f'a[href$="/ops/{op_id}"]').click())
        assert (await browser.element("#op-key")).text == HOSTILE_KEY
        assert (await browser.element("#op-caller")).text == HOSTILE_CALLER
        assert (await browser.element("#op-task")).text == HOSTILE_TASK
        source = await browser.run(lambda driver: driver.page_source)
        assert "<script>alert(" not in source
        assert "&lt;script&gt;alert('key')&lt;/script&gt;" in source
        assert "&lt;img src=x onerror=alert(1)&gt;" in source
        assert await browser.run(lambda driver: driver.find_elements(By.CSS_SELECTOR, "main script, main img")) == []
        assert await browser.run(_no_alert), "a caller's value ran as a script"
        await browser.screenshot("hostile")

        # Without admin authentication there is no sign-in: the form asks who resolves.
        def not_done(driver: Driver) -> None:
            driver.find_element(By.ID, "outcome-not-done").click()
            driver.find_element(By.ID, "resolve-by").send_keys("Zoë <oncall>")
            driver.find_element(By.ID, "resolve-reason").send_keys("no effect at the tool")
            submit(driver, "form.resolve")

        await browser.run(not_done)
        assert "RELEASED" in (await browser.element(".notice")).text
        view = await admin_view(proxy, op_id, {})
        assert view["state"] == "RELEASED"
        assert (view["evidence"][-1]["by"], view["evidence"][-1]["reason"]) == ("Zoë <oncall>", "no effect at the tool")


def _no_alert(driver: Driver) -> bool:
    try:
        driver.switch_to.alert  # noqa: B018  # raises when there is none
    except NoAlertPresentException:
        return True
    return False
