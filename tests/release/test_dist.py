"""The release build: `make dist`'s sdist and wheel, installed as a user installs them.

The wheel goes into a clean virtual environment (not editable, not this run's)
with the runtime lock's dependencies, and is used from a folder outside the
checkout: `idemproxy --version`, `check-config` on the shipped example, and a
request through `idemproxy run`. Then the Redis client is removed: the embedded
store must still serve, and a Redis store must be refused in one line.
"""

from __future__ import annotations

import asyncio
import email
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


@dataclass(frozen=True)
class Installed:
    bin: Path
    cwd: Path  # outside the checkout: nothing imports from the source tree

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.cwd,
            env={"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.cwd)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _version() -> str:
    with (REPO / "pyproject.toml").open("rb") as file:
        version = tomllib.load(file)["project"]["version"]
    assert isinstance(version, str)
    return version


def _checked(command: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """What `make dist` runs for the pure build: python -m build without isolation, then twine check."""
    out = tmp_path_factory.mktemp("dist")
    environ = {key: value for key, value in os.environ.items() if key != "IDEMPROXY_COMPILE"}
    _checked([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)], env=environ)
    _checked([sys.executable, "-m", "twine", "check", "--strict", *map(str, out.iterdir())])
    (wheel,) = out.glob("idemproxy-*-py3-none-any.whl")
    (sdist,) = out.glob("idemproxy-*.tar.gz")
    return Dist(wheel, sdist)


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("user")
    venv = root / "venv"
    _checked([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _checked([*pip, "--require-hashes", "--only-binary=:all:", "-r", str(REPO / "requirements" / "runtime.txt")])
    _checked([*pip, "--no-deps", str(dist.wheel)])
    work = root / "work"
    work.mkdir()
    return Installed(venv / "bin", work)


def test_the_wheel_holds_the_package_and_its_data_and_no_tests(dist: Dist) -> None:
    names = zipfile.ZipFile(dist.wheel).namelist()
    for needed in (
        "idemproxy/cli.py",
        "idemproxy/py.typed",
        "idemproxy/openapi/admin.yaml",
        "idemproxy/adapters/mcp.py",
    ):
        assert needed in names
    assert not [name for name in names if name.startswith("tests/") or "/tests/" in name]
    assert not [name for name in names if name.endswith((".so", ".c", ".pyc"))], "the pure wheel compiles nothing"
    (metadata_name,) = (name for name in names if name.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(zipfile.ZipFile(dist.wheel).read(metadata_name))
    assert metadata["Version"] == _version()
    assert metadata["License-Expression"] == "Apache-2.0"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {"redis", "autogen", "camel", "mcp", "all"} <= extras
    requires = metadata.get_all("Requires-Dist") or []
    assert not [r for r in requires if r.startswith("redis") and "extra ==" not in r], "redis is an extra, not a must"
    assert "Typing :: Typed" in (metadata.get_all("Classifier") or [])
    assert metadata.get_all("Project-URL")


def test_the_sdist_builds_the_same_package(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as archive:
        names = {name.partition("/")[2] for name in archive.getnames()}
    assert {
        "pyproject.toml",
        "setup.py",
        "LICENSE",
        "CHANGELOG.md",
        "requirements/runtime.txt",
        "proxy/cli.py",
    } <= names
    assert not [name for name in names if name.startswith("tests/")]


def test_the_installed_wheel_reports_its_version_and_checks_the_example(installed: Installed) -> None:
    version = installed.run("idemproxy", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"idemproxy {_version()}"

    check = installed.run("idemproxy", "check-config", str(REPO / "examples" / "idemproxy.yaml"))
    assert check.returncode == 0, check.stderr

    where = installed.run("python", "-c", "import idemproxy; print(idemproxy.__file__)")
    assert "site-packages" in where.stdout, "the installed wheel, not the checkout"


async def test_without_the_redis_extra_the_embedded_store_serves_and_redis_is_refused_in_one_line(
    installed: Installed, upstream: Upstream
) -> None:
    removed = installed.run("python", "-m", "pip", "uninstall", "--yes", "--quiet", "redis", "hiredis")
    assert removed.returncode == 0, removed.stderr

    check = installed.run("idemproxy", "check-config", str(REPO / "examples" / "idemproxy.yaml"))
    assert check.returncode != 0
    assert "pip install 'idemproxy[redis]'" in check.stderr
    assert "Traceback" not in check.stderr

    refused = installed.run("idemproxy", "run", "--upstream", upstream.url, "--store", "redis://127.0.0.1:1/0")
    assert refused.returncode != 0
    assert "pip install 'idemproxy[redis]'" in refused.stderr
    assert "Traceback" not in refused.stderr

    listen, admin = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        str(installed.bin / "idemproxy"), "run", "--upstream", upstream.url,
        "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
        cwd=installed.cwd, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        async with asyncio.timeout(30):
            while b"idemproxy listening" not in (line := await process.stderr.readline()):
                assert line, "the proxy exited before it listened"
        async with aiohttp.ClientSession() as session:
            answers = []
            for _ in range(2):
                async with session.post(
                    f"http://127.0.0.1:{listen}/items", json={"n": 1}, headers={"Idempotency-Key": "release"}
                ) as response:
                    answers.append(
                        (response.status, await response.read(), response.headers.get("Idempotent-Replayed"))
                    )
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
    assert [status for status, *_ in answers] == [201, 201]
    assert answers[0][1] == answers[1][1]
    assert orjson.loads(answers[0][1])["effect"] == 1
    assert answers[1][2] == "true"
    assert upstream.count() == 1
    assert (installed.cwd / ".idemproxy" / "ledger.db").is_file(), "the embedded default store"
