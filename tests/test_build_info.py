"""Which build is installed, pure or mypyc-compiled, and that ``make test-compiled``
really runs the suite against the compiled one."""

from __future__ import annotations

import ast
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import idemproxy.handler
import idemproxy.http_server
from idemproxy import build_info

EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
REPO = Path(__file__).resolve().parents[1]


def test_compiled_modules_are_the_ones_python_imports_from_extensions() -> None:
    compiled = build_info.compiled_modules()

    for module in (idemproxy.handler, idemproxy.http_server):
        assert (module.__name__ in compiled) == module.__file__.endswith(EXTENSION_SUFFIXES)
    assert "idemproxy.errors" not in compiled  # exceptions deriving from built-ins stay Python


def test_the_suite_runs_the_build_it_was_asked_for() -> None:
    compiled = set(build_info.compiled_modules())

    if os.environ.get("EXPECT_COMPILED") == "1":  # `make test-compiled`
        hot = {"idemproxy.handler", "idemproxy.ledger", "idemproxy.http_server", "idemproxy.store.redis_mux"}
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

    assert {"handler", "http_server", "store/redis_mux"} <= sources.keys()
    assert all(_functions(module) for module in sources.values())
