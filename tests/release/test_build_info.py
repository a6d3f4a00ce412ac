"""Which build is installed, pure or mypyc-compiled, and that ``make test-compiled``
really runs the suite against the compiled one."""

from __future__ import annotations

import ast
import dataclasses
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import idemproxy.modes.http
import idemproxy.wire.http_server
from idemproxy import build_info

EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
REPO = Path(__file__).resolve().parents[2]


def test_compiled_modules_are_the_ones_python_imports_from_extensions() -> None:
    compiled = build_info.compiled_modules()

    for module in (idemproxy.modes.http, idemproxy.wire.http_server):
        assert (module.__name__ in compiled) == module.__file__.endswith(EXTENSION_SUFFIXES)
    assert "idemproxy.protocol.errors" not in compiled  # exceptions deriving from built-ins stay Python


def test_the_suite_runs_the_build_it_was_asked_for() -> None:
    compiled = set(build_info.compiled_modules())

    if os.environ.get("EXPECT_COMPILED") == "1":  # `make test-compiled`
        hot = {
            "idemproxy.modes.http",
            "idemproxy.ledger.ledger",
            "idemproxy.wire.http_server",
            "idemproxy.store.redis_mux",
        }
        assert hot <= compiled
    else:  # `make test`: the editable install, which must never pick up a stale compiled module
        assert compiled == set()


def test_require_compiled_fails_on_the_pure_build_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "idemproxy.build_info", "--require-compiled"],
        capture_output=True,
        text=True,
        check=False,
    )

    if build_info.compiled_modules():
        assert done.returncode == 0
        assert done.stdout.startswith(f"idemproxy {idemproxy.__version__}: compiled (")
    else:
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1
        assert "pure-Python build" in done.stderr


def test_unknown_arguments_are_refused() -> None:
    assert build_info.main(["--compiled"]) == 2


# -- what mypyc compiles differently from CPython, kept out of the compiled modules ---------------


def _compiled_sources() -> dict[str, ast.Module]:
    setup = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    listed = next(
        node.value
        for node in setup.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets)
    )
    names = ast.literal_eval(listed)
    return {name: ast.parse((REPO / "proxy" / f"{name}.py").read_text(encoding="utf-8")) for name in names}


def _functions(module: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(module) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_no_bare_raise_after_an_await_in_an_except_block() -> None:
    """mypyc's bare ``raise`` after an ``await`` re-raises an exception it no longer holds
    (a cancelled drain crashed with "invalid exception object"): re-raise by name."""
    found = []
    for name, module in _compiled_sources().items():
        for handler in (node for node in ast.walk(module) if isinstance(node, ast.ExceptHandler)):
            awaited = False
            for node in (inner for statement in handler.body for inner in ast.walk(statement)):
                awaited = awaited or isinstance(node, ast.Await | ast.AsyncWith | ast.AsyncFor)
                if awaited and isinstance(node, ast.Raise) and node.exc is None:
                    found.append(f"{name}.py:{node.lineno}")
    assert found == []


def test_no_name_bound_by_except_clauses_of_different_types() -> None:
    """mypyc gives a name one type per function: a second ``except B as exc`` after
    ``except A as exc`` fails with "A object expected; got B"."""
    found = []
    for name, module in _compiled_sources().items():
        for function in _functions(module):
            types: dict[str, set[str]] = {}
            for handler in (node for node in ast.walk(function) if isinstance(node, ast.ExceptHandler)):
                if handler.name is not None and handler.type is not None:
                    types.setdefault(handler.name, set()).add(ast.unparse(handler.type))
            found += [f"{name}.py:{function.name} {bound}" for bound, seen in types.items() if len(seen) > 1]
    assert found == []


def test_compiled_source_is_found() -> None:
    sources = _compiled_sources()

    assert {"modes/http", "wire/http_server", "store/redis_mux"} <= sources.keys()
    assert all(_functions(module) for module in sources.values())


# -- dataclasses with an __init__ of their own (compiled, unlike the generated one) ----------------


def _own_init_dataclasses() -> list[tuple[str, ast.ClassDef]]:
    found = []
    for path in sorted((REPO / "proxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(decorator, ast.Call)
                and ast.unparse(decorator.func) == "dataclass"
                and any(k.arg == "init" and ast.unparse(k.value) == "False" for k in decorator.keywords)
                for decorator in node.decorator_list
            ):
                found.append((f"{path.relative_to(REPO)}:{node.name}", node))
    return found


def _assigned_in(init: ast.FunctionDef) -> list[str]:
    names = []
    for node in ast.walk(init):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "object.__setattr__":
            names.append(ast.literal_eval(node.args[1]))
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.attr for t in targets if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"]
    return names


def test_every_hand_written_dataclass_init_sets_each_field_once_with_the_declared_defaults() -> None:
    """``init=False`` dataclasses write ``__init__`` themselves (mypyc compiles it; the generated
    one stays interpreted): it must stay in step with the fields as they change."""
    checked, found = 0, []
    for name, cls in _own_init_dataclasses():
        fields = {
            node.target.id: node.value
            for node in cls.body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        }
        init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        assigned = _assigned_in(init)
        if sorted(assigned) != sorted(fields):
            found.append(f"{name}: sets {assigned}, fields are {list(fields)}")
        params = init.args.args[1:]
        with_defaults = [p.arg for p in params][len(params) - len(init.args.defaults) :]
        defaults = dict(zip(with_defaults, init.args.defaults, strict=True))
        if [p.arg for p in params] != [field for field in fields if field in {p.arg for p in params}]:
            found.append(f"{name}: parameters {[p.arg for p in params]} are not in field order")
        for param, default in defaults.items():
            declared = fields.get(param)
            if (
                declared is not None
                and not ast.unparse(declared).startswith("field(")
                and (ast.unparse(declared) != ast.unparse(default))
            ):
                found.append(f"{name}: {param} defaults to {ast.unparse(default)}, declared {ast.unparse(declared)}")
        checked += 1
    assert found == []
    assert checked >= 9  # the classes built on every request


def test_hand_written_dataclass_inits_behave_as_generated_ones() -> None:
    from idemproxy.lifecycle.records import Evidence, OperationRecord, RetryClass, State, StoredRequest, StoredResponse
    from idemproxy.protocol.keys import Scope

    scope = Scope("agent-1", "tickets", "k-1")
    assert scope == Scope(caller="agent-1", route="tickets", key="k-1", task=None)
    assert repr(scope) == "Scope(caller='agent-1', route='tickets', key='k-1', task=None)"
    assert Evidence(1, "sent").detail == {}
    assert Evidence(1, "sent").detail is not Evidence(1, "sent").detail  # a fresh dict each, as default_factory
    fields = ("fp", 1, "me", 5, "POST", "/t", 1, 2)
    record = OperationRecord("op", scope, State.PENDING, 1, *fields)
    assert (record.retry_class, record.response, record.evidence, record.attempt_ms) == (None, None, (), 0)
    assert record.evolve(fence=2) == OperationRecord("op", scope, State.PENDING, 2, *fields)

    # evolve names every field itself: each one must reach the copy, and only that one.
    first = OperationRecord(
        "op", scope, State.PENDING, 1, "fp", 1, "me", 5, "POST", "/t", 1, 2, RetryClass.READ_TIMEOUT,
        StoredResponse(201, (("a", "b"),), b"x", 1, "sha"), False, 1, 3, 4, StoredRequest((), b"q"),
        (Evidence(1, "sent"),),
    )  # fmt: skip
    second = OperationRecord(
        "op2", Scope("agent-2", "r", "k"), State.UNKNOWN, 2, "fp2", 2, "you", 6, "PUT", "/u", 7, 8,
        RetryClass.CONNECTION_LOST, None, True, 9, 10, 11, None, (),
    )  # fmt: skip
    for name in (field.name for field in dataclasses.fields(OperationRecord)):
        assert first.evolve(**{name: getattr(second, name)}) == dataclasses.replace(
            first, **{name: getattr(second, name)}
        )
    assert first.evolve() == first
