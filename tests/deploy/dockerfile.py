"""Just enough of a Dockerfile reader to run the build's steps outside a container.

Instructions are read with their continuation lines joined and comments
dropped; ``ENV`` is read as ``KEY=VALUE`` pairs with ``$VAR``/``${VAR}``
expansion; exec-form arguments (``["a", "b"]``) as JSON.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    value: str  # the rest of the line, continuations joined
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The stage's ``ENV`` on top of ``base``, in order, with variables expanded."""
        env = dict(base or {})
        for instruction in self.all("ENV"):
            for pair in shlex.split(instruction.value):
                key, sep, value = pair.partition("=")
                assert sep, f"line {instruction.line}: ENV {pair!r} is not KEY=VALUE"
                env[key] = expand(value, env)
        return env


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs declared before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def instructions(text: str) -> list[Instruction]:
    found: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continuation are dropped
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, value = " ".join(part for part in pending if part).partition(" ")
        found.append(Instruction(keyword.upper(), value.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def parse(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions(path.read_text(encoding="utf-8")):
        if instruction.keyword == "FROM":
            words = instruction.value.split()
            base = expand(words[0], args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {instruction.line}: only ARG may come before FROM"
            key, _, default = instruction.value.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(args, stages)


def exec_form(value: str) -> list[str]:
    """The JSON array of an exec-form instruction; AssertionError for shell form."""
    try:
        argv = json.loads(value)
    except json.JSONDecodeError:
        argv = None
    assert isinstance(argv, list), f"not exec form: {value!r}"
    assert all(isinstance(item, str) for item in argv), f"not exec form: {value!r}"
    return argv


def healthcheck(value: str) -> tuple[dict[str, str], list[str]]:
    """``HEALTHCHECK --opt=v ... CMD [...]`` as (options, exec-form command)."""
    options: dict[str, str] = {}
    rest = value
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, setting = option[2:].partition("=")
        options[key] = setting
        rest = rest.lstrip()
    keyword, _, command = rest.partition(" ")
    assert keyword.upper() == "CMD", f"HEALTHCHECK without CMD: {value!r}"
    return options, exec_form(command.strip())


def expand(value: str, env: Mapping[str, str]) -> str:
    return _VARIABLE.sub(lambda match: env.get(match.group(1) or match.group(2), ""), value)
