"""The lock files: every install comes from them, and they match pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCKS = REPO / "requirements"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^ ;\\]+)(?: ;(?P<marker>[^\\]+))?")


def pins(lock: Path) -> dict[str, Version]:
    """Package name to pinned version; a package pinned per Python version keeps its first pin."""
    found: dict[str, Version] = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        if match := PIN.match(line):
            found.setdefault(canonicalize_name(match["name"]), Version(match["version"]))
    return found


def pyproject() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def locks_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "locks.py"), "--root", str(root), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_lock_matches_pyproject() -> None:
    result = locks_check(REPO)
    assert result.returncode == 0, result.stderr


def test_a_dependency_changed_without_make_lock_fails_the_check(tmp_path: Path) -> None:
    shutil.copytree(LOCKS, tmp_path / "requirements")
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"orjson>=3.9",' in text
    (tmp_path / "pyproject.toml").write_text(text.replace('"orjson>=3.9",', '"orjson>=3.10",'), encoding="utf-8")

    result = locks_check(tmp_path)

    assert result.returncode == 1
    stale = {line.split(":")[1].strip() for line in result.stderr.splitlines()}
    # Every project set is stale; the tool sets (uv, the build backend) do not read the dependency tables.
    assert stale == {"requirements/dev.txt", "requirements/runtime.txt", "requirements/image-build.txt"}
    assert "run `make lock`" in result.stderr


def test_a_missing_lock_fails_the_check(tmp_path: Path) -> None:
    shutil.copytree(LOCKS, tmp_path / "requirements")
    shutil.copyfile(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "requirements" / "runtime.txt").unlink()

    result = locks_check(tmp_path)

    assert result.returncode == 1
    assert "requirements/runtime.txt: missing" in result.stderr


def test_every_pin_is_hashed() -> None:
    for lock in LOCKS.glob("*.txt"):
        entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text(encoding="utf-8"))
        for entry in entries:
            if PIN.match(entry):
                assert "--hash=sha256:" in entry, f"{lock.name}: {entry.splitlines()[0]} has no hash"


def test_the_dev_lock_satisfies_every_range_in_pyproject() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    locked = pins(LOCKS / "dev.txt")
    checked = 0
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "idemproxy" or (requirement.marker and not requirement.marker.evaluate()):
            continue
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is not in requirements/dev.txt"
        assert requirement.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} vs {line}"
        checked += 1
    assert checked >= 30


@pytest.mark.parametrize("narrow", ["runtime.txt", "image-build.txt", "build-system.txt"])
def test_the_narrower_sets_pin_what_the_suite_ran_against(narrow: str) -> None:
    dev, subset = pins(LOCKS / "dev.txt"), pins(LOCKS / narrow)
    assert subset
    assert {name: version for name, version in subset.items() if dev.get(name) != version} == {}


def test_the_runtime_lock_needs_no_compiler_tools() -> None:
    runtime = pins(LOCKS / "runtime.txt")
    assert {"aiohttp", "redis", "hiredis", "orjson", "uvloop"} <= set(runtime)
    assert not {"mypy", "setuptools", "pip", "pytest"} & set(runtime)


def test_installs_come_from_the_locks() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    installs = re.findall(r"pip install ([^\\&\n]+)", dockerfile)
    assert len(installs) == 3
    for install in installs:
        locked = "--require-hashes" in install and "-r requirements/" in install
        own_wheel = install.strip() == "--no-deps /opt/wheels/idemproxy-*.whl"
        assert locked or own_wheel, install
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for install in re.findall(r"pip install ([^\n]+)", makefile):
        assert "--no-deps" in install, f"the Makefile installs something besides the project itself: {install}"
    assert "bootstrap.sh sync" in makefile


def test_the_release_version_is_the_same_everywhere() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    version = project["version"]
    assert f"ARG VERSION={version}\n" in (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", _changelog(), re.MULTILINE)
    chart = (REPO / "helm" / "idemproxy" / "Chart.yaml").read_text(encoding="utf-8")
    assert f'appVersion: "{version}"' in chart


def _changelog() -> str:
    return (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
