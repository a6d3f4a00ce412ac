"""What the console's pages show, computed from the operations API's own views (plain dicts:
``record_view`` of ``idemproxy.ops.admin``), so a page shows what ``GET /_idem/ops/{id}``
returns and no more. Pure functions: the search form, times, evidence lines, the exact
``idemproxy ops resolve`` commands, and the digest that tells a live list it changed.
"""

from __future__ import annotations

import hashlib
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import orjson

from idemproxy.lifecycle.records import State

#: The default search: what is waiting for a person.
ATTENTION = "attention"
ANY_STATE = "any"
ATTENTION_STATES = (State.NEEDS_ATTENTION, State.UNKNOWN)
STATE_CHOICES = (
    (ATTENTION, "Needs a person (NEEDS_ATTENTION, UNKNOWN)"),
    *((state.value, state.value) for state in State),
    (ANY_STATE, "Any state"),
)
_MAX_FIELD = 300
_EVIDENCE_LINE = 240


@dataclass(frozen=True, slots=True)
class Search:
    """The search form; an empty field does not filter."""

    state: str = ATTENTION
    key: str = ""
    caller: str = ""
    task: str = ""
    route: str = ""
    operation: str = ""

    @classmethod
    def of(cls, params: Mapping[str, str]) -> Search:
        values = {field.name: params.get(field.name, "").strip()[:_MAX_FIELD] for field in fields(cls)}
        values["state"] = values["state"] or ATTENTION
        return cls(**values)

    def params(self) -> dict[str, str]:
        """The non-empty fields, as a query string carries them."""
        return {field.name: getattr(self, field.name) for field in fields(self) if getattr(self, field.name)}

    @property
    def states(self) -> tuple[State | None, ...]:
        """The states to list; ``None`` is any. Raises ``ValueError`` for an unknown one."""
        if self.state == ATTENTION:
            return ATTENTION_STATES
        if self.state == ANY_STATE:
            return (None,)
        return (State(self.state.upper()),)

    def admits(self, view: Mapping[str, Any]) -> bool:
        """What the store's query cannot filter: the key (a substring), the state of a looked-up one."""
        states = self.states
        return self.key in view["key"] and (None in states or view["state"] in states)


def utc(ms: int | None) -> str:
    """Unix milliseconds as a UTC time a person reads."""
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def evidence_detail(entry: Mapping[str, Any]) -> list[tuple[str, str]]:
    """An evidence entry's fields beyond its time and kind, each as text."""
    return [(name, _text(value)) for name, value in entry.items() if name not in ("at_ms", "kind")]


def evidence_line(entry: Mapping[str, Any]) -> str:
    """One evidence entry on one line, shortened."""
    text = ", ".join(f"{name}={value}" for name, value in evidence_detail(entry))
    return text if len(text) <= _EVIDENCE_LINE else text[: _EVIDENCE_LINE - 1] + "\u2026"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def resolvable(view: Mapping[str, Any], now_ms: int) -> bool:
    """What the admin API would let an operator resolve (it checks again when asked)."""
    state = view["state"]
    expired = state == State.PENDING.value and view["lease_until_ms"] <= now_ms
    return state in (State.UNKNOWN.value, State.NEEDS_ATTENTION.value) or expired


def resolve_commands(view: Mapping[str, Any], admin_url: str) -> tuple[str, str]:
    """The ``idemproxy ops resolve`` commands that do what the form does: done, and not done."""
    base = f"idemproxy ops --admin {shlex.quote(admin_url)} resolve {shlex.quote(view['operation'])}"
    response = view.get("response") or {}
    stored = response.get("body")
    body = stored if isinstance(stored, str) else "{}"
    done = (
        f"{base} --done --status {int(response.get('status') or 200)} --body {shlex.quote(body)} "
        f"--reason {shlex.quote('checked the tool: the effect happened')}"
    )
    not_done = f"{base} --not-done --reason {shlex.quote('checked the tool: no effect')}"
    return done, not_done


def digest(views: list[dict[str, Any]], error: str | None) -> str:
    """What a live list shows, in 16 hex digits: it is sent again only when this changes."""
    shown = [(view["operation"], view["state"], view["updated_ms"], len(view["evidence"])) for view in views]
    return hashlib.sha256(orjson.dumps([shown, error])).hexdigest()[:16]
