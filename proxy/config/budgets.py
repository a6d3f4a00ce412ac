"""The budgets in a configuration: caps on side-effecting calls per window and on
attempts per operation, validated.

Two places set them:

- top-level ``budgets``: ``identity`` (the caps every identity gets: ``calls``
  and ``attempts_per_operation``) and ``task`` (``calls`` per ``X-Agent-Task``
  value, shared by every identity working on that task);
- an identity's own ``budgets`` (in ``auth``), which replaces the defaults key
  by key; ``unlimited`` lifts a cap for that identity.

A rate is written ``LIMIT/WINDOW``: ``100/1m`` allows 100 calls in any sliding
minute. The readers report through the configuration's own problem collector
(``key_paths.Problems``), so every bad key is named
with its path; ``idemproxy.edge.budgets`` enforces what they return.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from idemproxy.config.convert import kind, positive_int
from idemproxy.config.key_paths import Problems
from idemproxy.config.units import parse_duration

T = TypeVar("T")

#: Each charge in a window is kept until it slides out; this bounds one counter's memory.
MAX_LIMIT = 100_000
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S.*?)\s*$")
_RATE_EXAMPLE = "'LIMIT/WINDOW' such as '100/1m' (at most LIMIT calls in any sliding WINDOW)"


class Uncapped(Enum):
    """An identity's ``unlimited``: no cap, whatever the default."""

    UNLIMITED = "unlimited"


UNLIMITED = Uncapped.UNLIMITED


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` charges in any ``window_s`` seconds (a sliding window)."""

    limit: int
    window_s: float

    @property
    def window_ms(self) -> int:
        return round(self.window_s * 1000)

    def __str__(self) -> str:
        return f"{self.limit}/{self.window_s:g}s"


@dataclass(frozen=True, slots=True)
class CallerBudget:
    """The caps one identity works under; ``None`` is no cap."""

    calls: Rate | None = None
    attempts_per_operation: int | None = None


@dataclass(frozen=True, slots=True)
class BudgetOverride:
    """An identity's own ``budgets``: a field left ``None`` keeps the default,
    ``UNLIMITED`` lifts it."""

    calls: Rate | Uncapped | None = None
    attempts_per_operation: int | Uncapped | None = None

    def over(self, default: CallerBudget) -> CallerBudget:
        return CallerBudget(
            calls=_pick(self.calls, default.calls),
            attempts_per_operation=_pick(self.attempts_per_operation, default.attempts_per_operation),
        )


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    identity: CallerBudget = field(default_factory=CallerBudget)  # every identity's default
    task: Rate | None = None  # per X-Agent-Task value, shared by every identity

    @property
    def configured(self) -> bool:
        return self.task is not None or self.identity != CallerBudget()


def _pick(own: T | Uncapped | None, default: T | None) -> T | None:
    if own is None:
        return default
    return None if own is UNLIMITED else own


# -- values --------------------------------------------------------------------------------


def parse_rate(value: Any) -> Rate:
    """``"100/1m"`` -> ``Rate(100, 60.0)``; raises ``ValueError`` saying what was expected."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"expected {_RATE_EXAMPLE}, got {kind(value)}")
    limit = int(match.group(1))
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"the limit must be from 1 to {MAX_LIMIT}, got {limit} in {value!r}")
    try:
        window_s = parse_duration(match.group(2))
    except ValueError:
        raise ValueError(f"expected {_RATE_EXAMPLE}; {match.group(2)!r} is not a duration") from None
    if window_s < 0.001:
        raise ValueError(f"the window must be at least 1ms, got {match.group(2)!r} in {value!r}")
    return Rate(limit, window_s)


def _default_rate(value: Any) -> Rate:
    if value == UNLIMITED.value:
        raise ValueError("'unlimited' lifts a default in one identity's own budgets; here, leave the key out")
    return parse_rate(value)


def _or_unlimited(convert: Callable[[Any], T]) -> Callable[[Any], T | Uncapped]:
    def read(value: Any) -> T | Uncapped:
        if value == UNLIMITED.value:
            return UNLIMITED
        try:
            return convert(value)
        except ValueError as exc:
            raise ValueError(f"{exc}; or 'unlimited' for no cap") from None

    return read


# -- readers -------------------------------------------------------------------------------


_BUDGETS_KEYS = frozenset({"identity", "task"})
_CALLER_KEYS = frozenset({"calls", "attempts_per_operation"})
_TASK_KEYS = frozenset({"calls"})


def read_budgets(out: Problems, raw: Any) -> BudgetConfig:
    """The top-level ``budgets`` section."""
    data = out.mapping(raw, _BUDGETS_KEYS)
    if data is None:
        return BudgetConfig()
    identity = CallerBudget()
    if "identity" in data:
        with out.at("identity"):
            caller = out.mapping(data["identity"], _CALLER_KEYS)
            if caller is not None:
                identity = CallerBudget(
                    calls=_read(out, caller, "calls", _default_rate),
                    attempts_per_operation=_read(out, caller, "attempts_per_operation", positive_int),
                )
    task: Rate | None = None
    if "task" in data:
        with out.at("task"):
            per_task = out.mapping(data["task"], _TASK_KEYS)
            if per_task is not None and "calls" not in per_task:
                out.fail("calls", f"is required: {_RATE_EXAMPLE}")
            elif per_task is not None:
                task = _read(out, per_task, "calls", parse_rate)
    return BudgetConfig(identity, task)


def read_override(out: Problems, raw: Any) -> BudgetOverride | None:
    """An identity's own ``budgets``."""
    data = out.mapping(raw, _CALLER_KEYS)
    if data is None:
        return None
    return BudgetOverride(
        calls=_read(out, data, "calls", _or_unlimited(parse_rate)),
        attempts_per_operation=_read(out, data, "attempts_per_operation", _or_unlimited(positive_int)),
    )


def _read(out: Problems, data: dict[str, Any], key: str, convert: Callable[[Any], T]) -> T | None:
    if key not in data:
        return None
    try:
        return convert(data[key])
    except (ValueError, TypeError) as exc:
        out.fail(key, str(exc))
        return None
