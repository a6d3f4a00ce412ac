"""The aiohttp session behind the adapters' clients, with an explicit lifecycle.

Unopened until first used (so clients can be built at import time), opened in
one event loop, closed once; closing again is harmless, reopening is an error.
A session passed in by the application is used but never closed here.
"""

from __future__ import annotations

import asyncio
import enum
from types import TracebackType
from typing import Self

import aiohttp


class ClientState(enum.Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


class ManagedSession:
    def __init__(self, owner: str, timeout: float, session: aiohttp.ClientSession | None = None) -> None:
        self.owner = owner
        self.state = ClientState.UNOPENED
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._owned = session is None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> aiohttp.ClientSession:
        if self.state is ClientState.CLOSED:
            raise RuntimeError(f"This {self.owner} is closed and cannot be reopened; create a new one.")
        loop = asyncio.get_running_loop()
        if self.state is ClientState.UNOPENED:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._loop = loop
            self.state = ClientState.OPENED
        elif loop is not self._loop:
            raise RuntimeError(f"This {self.owner} was opened in another event loop; create one per event loop.")
        assert self._session is not None
        return self._session

    async def close(self) -> None:
        if self.state is ClientState.OPENED and self._owned and self._session is not None:
            await self._session.close()
        self.state = ClientState.CLOSED


class SessionClient:
    """Open/close and ``async with`` for a client that owns a ``ManagedSession`` (``self._session``)."""

    _session: ManagedSession

    @property
    def state(self) -> ClientState:
        return self._session.state

    async def open(self) -> Self:
        await self._session.open()
        return self

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
