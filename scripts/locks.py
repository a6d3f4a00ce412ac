"""The lock files in ``requirements/``: one per install set, pinned and hashed.

    python scripts/locks.py compile [--upgrade] UV   regenerate every lock with the uv binary UV
    python scripts/locks.py check                    fail when a lock is missing or older than pyproject.toml

Each lock starts with a digest of what it was compiled from (the project's
dependency tables and the set's extras); ``check`` recomputes it, so a change
to ``pyproject.toml`` without ``make lock`` fails ``make lint`` and the suite.
The narrower sets are compiled under the dev set as a constraint, so every set
pins the versions the suite ran against. Standard library only: it runs before
any environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = Path("requirements")
DIGEST_PREFIX = "# inputs-sha256: "
COMPILE_COMMAND = "make lock"
#: The oldest Python the project supports; the locks are universal from it upwards.
PYTHON_FLOOR = "3.11"


@dataclass(frozen=True)
class LockSet:
    name: str
    purpose: str
    extras: tuple[str, ...] = ()
    #: Requirement lines compiled instead of the project's own (the tool and build-system sets).
    requirements: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return LOCKS / f"{self.name}.txt"


def _build_system(pyproject: dict[str, object]) -> tuple[str, ...]:
    table = pyproject.get("build-system", {})
    assert isinstance(table, dict)
    return tuple(table.get("requires", ()))


def lock_sets(pyproject: dict[str, object]) -> tuple[LockSet, ...]:
    """Dev first: the others are compiled under it as a constraint."""
    return (
        LockSet(
            "dev",
            "make setup/test/lint/compiled/bench/dist and CI: every extra, the test, lint, compile and release tools",
            extras=("test", "lint", "compile", "release", "all"),
        ),
        LockSet("runtime", "what `idemproxy run` needs, Redis included: the image's final stage", extras=("redis",)),
        LockSet("image-build", "the image's build stage: the runtime set and mypyc", extras=("redis", "compile")),
        LockSet(
            "build-system",
            "the build backend for a source distribution that has no wheel (uv --build-constraints)",
            requirements=_build_system(pyproject),
        ),
        LockSet("uv", "the installer and lock tool the make targets bootstrap", requirements=("uv",)),
    )


def load(root: Path) -> dict[str, object]:
    with (root / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def inputs_digest(pyproject: dict[str, object], lock_set: LockSet) -> str:
    project = pyproject["project"]
    assert isinstance(project, dict)
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "set": [lock_set.name, list(lock_set.extras), list(lock_set.requirements)],
    }
    if lock_set.requirements:  # a tool set depends on its own lines alone
        inputs = {"set": inputs["set"]}
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    if not lock.is_file():
        return None
    first = lock.read_text(encoding="utf-8").partition("\n")[0]
    return first.removeprefix(DIGEST_PREFIX) if first.startswith(DIGEST_PREFIX) else None


def stale(root: Path) -> list[str]:
    """One line per lock that does not match ``pyproject.toml``."""
    pyproject = load(root)
    problems = []
    for lock_set in lock_sets(pyproject):
        recorded = recorded_digest(root / lock_set.path)
        if recorded is None:
            problems.append(f"{lock_set.path}: missing, or without its '{DIGEST_PREFIX.strip()}' line")
        elif recorded != inputs_digest(pyproject, lock_set):
            problems.append(f"{lock_set.path}: compiled from another pyproject.toml")
    return problems


def compile_all(root: Path, uv: str, *, upgrade: bool) -> None:
    pyproject = load(root)
    (root / LOCKS).mkdir(exist_ok=True)
    dev = root / LOCKS / "dev.txt"
    for lock_set in lock_sets(pyproject):
        target = root / lock_set.path
        with tempfile.TemporaryDirectory() as scratch:
            output = Path(scratch) / target.name
            if target.is_file() and not upgrade:
                # uv keeps the pins it finds in the output file unless asked to upgrade.
                output.write_text(target.read_text(encoding="utf-8"), encoding="utf-8")
            command = [
                uv, "pip", "compile", "--quiet", "--universal", "--python-version", PYTHON_FLOOR,
                "--generate-hashes", "--custom-compile-command", COMPILE_COMMAND, "--output-file", str(output),
            ]  # fmt: skip
            if upgrade:
                command.append("--upgrade")
            if lock_set.requirements:
                source = Path(scratch) / f"{lock_set.name}.in"
                source.write_text("\n".join(lock_set.requirements) + "\n", encoding="utf-8")
                command.append(str(source))
            else:
                command += ["pyproject.toml", *(f"--extra={extra}" for extra in lock_set.extras)]
            if lock_set.name not in ("dev", "uv"):
                command += ["--constraint", str(dev)]
            subprocess.run(command, cwd=root, check=True)
            # The comments name the scratch input ("via -r /tmp/tmpXXXX/uv.in"): a path of this
            # machine that changes every run; name it as the lock set instead.
            body = output.read_text(encoding="utf-8").replace(f"{scratch}/", "")
        header = f"{DIGEST_PREFIX}{inputs_digest(pyproject, lock_set)}\n# {lock_set.name}: {lock_set.purpose}\n"
        target.write_text(header + body, encoding="utf-8")
        print(f"locks: wrote {lock_set.path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the project folder (default: this checkout)")
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="regenerate every lock")
    compile_parser.add_argument("uv", help="the uv binary to compile with")
    compile_parser.add_argument("--upgrade", action="store_true", help="take the newest versions the ranges allow")
    commands.add_parser("check", help="fail when a lock does not match pyproject.toml")
    args = parser.parse_args(argv)
    if args.command == "compile":
        compile_all(args.root, args.uv, upgrade=args.upgrade)
        return 0
    problems = stale(args.root)
    for problem in problems:
        print(f"locks: {problem}; run `make lock` and commit requirements/ with pyproject.toml", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
