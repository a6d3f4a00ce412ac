"""The problem collector every configuration reader shares: each problem is
reported with the key path it was found at (``routes[2].probe.url: ...``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from idemproxy.convert import kind

T = TypeVar("T")


class Problems:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self._path: list[str] = []

    def fail(self, key: str | None, message: str) -> None:
        path = ".".join([*self._path, key] if key is not None else self._path) or "(top level)"
        self.problems.append(f"{path.replace('.[', '[')}: {message}")

    @contextmanager
    def at(self, key: str) -> Iterator[None]:
        self._path.append(key)
        try:
            yield
        finally:
            self._path.pop()

    def mapping(self, raw: Any, allowed: frozenset[str]) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.fail(None, f"expected a mapping, got {kind(raw)}")
            return None
        for key in raw:
            if key not in allowed:
                self.fail(str(key), f"unknown key; expected one of {', '.join(sorted(allowed))}")
        return raw

    def value(self, data: Mapping[str, Any], key: str, default: T, convert: Callable[[Any], T]) -> T:
        if key not in data:
            return default
        try:
            return convert(data[key])
        except (ValueError, TypeError) as exc:
            self.fail(key, str(exc))
            return default

    def strings(self, raw: Any, key: str) -> list[str] | None:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            self.fail(key, f"expected a list of strings, got {kind(raw)}")
            return None
        return raw
