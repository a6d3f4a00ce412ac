"""The problem collector every configuration reader shares: each problem is
reported with the key path it was found at (``routes[2].probe.url: ...``)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from idemproxy.config.convert import kind

T = TypeVar("T")

_SUB_PATH = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)*): (.*)$", re.DOTALL)


def unknown_key(key: Any, allowed: Iterable[str]) -> str:
    """What to say about a key that is not in ``allowed``: the nearest allowed key, if one is close."""
    choices = sorted(allowed)
    if close := difflib.get_close_matches(str(key), choices, n=1):
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of {', '.join(choices)}"


class NestedProblems(ValueError):
    """Several problems found in one key's value, each ``(sub key path, message)``
    (``""``: the value itself). ``Problems.value`` reports each on a line of its own,
    under ``key.sub.path``; as a plain ``ValueError`` its text names them all."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items
        super().__init__("; ".join(f"{sub}: {message}" if sub else message for sub, message in items))

    @classmethod
    def from_texts(cls, problems: list[str]) -> NestedProblems:
        """From ``"sub.path: message"`` texts; one that starts with no key path is the value's own."""
        items = []
        for problem in problems:
            match = _SUB_PATH.match(problem)
            items.append((match.group(1), match.group(2)) if match else ("", problem))
        return cls(items)


class Problems:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self._path: list[str] = []

    def path_of(self, key: str | None) -> str:
        """The full key path of ``key`` here (``None``: of where we are)."""
        path = ".".join([*self._path, key] if key is not None else self._path) or "(top level)"
        return path.replace(".[", "[")

    def fail(self, key: str | None, message: str) -> None:
        self.problems.append(f"{self.path_of(key)}: {message}")

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
                self.fail(str(key), unknown_key(key, allowed))
        return raw

    def value(self, data: Mapping[str, Any], key: str, default: T, convert: Callable[[Any], T]) -> T:
        if key not in data:
            return default
        try:
            return convert(data[key])
        except NestedProblems as nested:
            for sub, message in nested.items:
                self.fail(f"{key}.{sub}" if sub else key, message)
            return default
        except (ValueError, TypeError) as exc:
            self.fail(key, str(exc))
            return default

    def strings(self, raw: Any, key: str) -> list[str] | None:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            self.fail(key, f"expected a list of strings, got {kind(raw)}")
            return None
        return raw
