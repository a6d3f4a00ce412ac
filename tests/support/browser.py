"""A real browser for tests: Debian's headless Chromium, driven by Selenium through Debian's
chromedriver, with screenshots written to ``test-artifacts/``.

Selenium is synchronous: an async test runs each browser step in a thread (``Browser.run``),
so its event loop (and the tool server it hosts) keeps serving while the browser waits.
Without the browser the test fails with how to install it; it is never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = (
    "install with: sudo apt-get install chromium chromium-driver "
    "(or make test, which runs scripts/bootstrap.sh test-tools)"
)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
#: A laptop's screen.
WINDOW = (1366, 900)
WAIT_S = 15.0

T = TypeVar("T")
#: The browser a test drives.
Driver = webdriver.Chrome


def _installed(path: str, name: str) -> str:
    found = path if os.access(path, os.X_OK) else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed ({path} is missing): {INSTALL_HINT}", pytrace=False)
    return found


@contextlib.contextmanager
def chromium() -> Iterator[Driver]:
    """A headless Chromium the size of a laptop screen, its console messages kept."""
    options = webdriver.ChromeOptions()
    options.binary_location = _installed(CHROMIUM, "chromium")
    for argument in ("--headless=new", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    if os.geteuid() == 0:  # Chromium refuses to run as root inside its sandbox (CI runs as root)
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(_installed(CHROMEDRIVER, "chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


class Browser:
    """One browser for one test, each step run off the event loop."""

    def __init__(self, driver: Driver, artifacts: Path) -> None:
        self.driver = driver
        self.artifacts = artifacts
        artifacts.mkdir(parents=True, exist_ok=True)

    async def run(self, step: Callable[[Driver], T]) -> T:
        return await asyncio.to_thread(step, self.driver)

    async def until(self, condition: Callable[[Driver], T | None], message: str = "") -> T:
        """Wait (at most ``WAIT_S``) for ``condition`` to hold; its first true value."""

        def holds(driver: Driver) -> T | Literal[False]:
            return condition(driver) or False

        # An element of the page being replaced goes stale mid-look: look again, as for one not there yet.
        ignored = (NoSuchElementException, StaleElementReferenceException)
        return await self.run(
            lambda driver: WebDriverWait(driver, WAIT_S, ignored_exceptions=ignored).until(holds, message)
        )

    async def screenshot(self, name: str) -> Path:
        """The whole page (not only what the window shows), as ``ARTIFACTS/.../NAME.png``."""
        path = self.artifacts / f"{name}.png"

        def shoot(driver: Driver) -> bool:
            page, viewport = driver.execute_script(
                "return [document.documentElement.scrollHeight, window.innerHeight]"
            )  # the window is taller than its viewport by the browser's own frame
            driver.set_window_size(WINDOW[0], max(WINDOW[1], int(page) + WINDOW[1] - int(viewport)))
            try:
                return driver.save_screenshot(str(path))
            finally:
                driver.set_window_size(*WINDOW)

        assert await self.run(shoot), path
        return path

    async def element(self, css: str) -> WebElement:
        return await self.until(lambda driver: _visible(driver, css), f"no visible {css!r}")

    def console_messages(self) -> list[str]:
        """What the page logged to the browser's console since the last call (CSP refusals included)."""
        get_log: Callable[[str], list[dict[str, Any]]] = self.driver.get_log  # untyped in Selenium
        return [str(entry.get("message", "")) for entry in get_log("browser")]


def _visible(driver: Driver, css: str) -> WebElement | None:
    found = driver.find_elements("css selector", css)
    return found[0] if found and found[0].is_displayed() else None
