"""``idemproxy.config.settings``: where configuration comes from, and ``check-config``.

Precedence (flags over environment over file) for every top-level setting, the
environment's own values, and the CLI as a subprocess: ``idemproxy check-config`` on
valid, invalid and missing files, ``idemproxy run`` refusing an invalid one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from idemproxy.config.settings import (
    ConfigError,
    HostPort,
    Overrides,
    ProxyConfig,
    StoreConfig,
    load_config,
)
from tests.support.config_docs import FULL_FILE, UPSTREAM, write
from tests.support.processes import idemproxy_cli

# -- precedence: flags > environment > file -----------------------------------------------


def _listen(config: ProxyConfig) -> str:
    return str(config.listen)


def _admin(config: ProxyConfig) -> str:
    return str(config.admin_listen)


def _metrics(config: ProxyConfig) -> str:
    return str(config.metrics_listen)


def _store(config: ProxyConfig) -> str:
    return config.store.url


def _level(config: ProxyConfig) -> str:
    return config.log_level


_FIELDS = {
    # Overrides field -> (file key, environment variable, getter, (file value, env value, flag value))
    "listen": ("listen", "IDEMPROXY_LISTEN", _listen, ("10.0.0.1:1001", "10.0.0.2:1002", "10.0.0.3:1003")),
    "admin_listen": (
        "admin_listen",
        "IDEMPROXY_ADMIN_LISTEN",
        _admin,
        # Loopback: an exposed admin listener needs auth (tests/ops/test_admin_exposure.py).
        ("127.0.0.1:2001", "127.0.0.2:2002", "127.0.0.3:2003"),
    ),
    "metrics_listen": (
        "metrics_listen",
        "IDEMPROXY_METRICS_LISTEN",
        _metrics,
        ("10.0.0.1:3001", "10.0.0.2:3002", "10.0.0.3:3003"),
    ),
    "store": ("store", "IDEMPROXY_STORE", _store, ("redis://file:1", "redis://env:2", "redis://flag:3")),
    "log_level": ("log_level", "IDEMPROXY_LOG_LEVEL", _level, ("error", "warning", "debug")),
}


@pytest.mark.parametrize("field_name", list(_FIELDS))
@pytest.mark.parametrize(
    ("in_file", "in_env", "in_flags", "winner"),
    [
        pytest.param(True, False, False, 0, id="file-only"),
        pytest.param(True, True, False, 1, id="env-over-file"),
        pytest.param(True, False, True, 2, id="flag-over-file"),
        pytest.param(True, True, True, 2, id="flag-over-env-and-file"),
        pytest.param(False, True, False, 1, id="env-only"),
        pytest.param(False, True, True, 2, id="flag-over-env"),
    ],
)
def test_precedence(tmp_path: Path, field_name: str, in_file: bool, in_env: bool, in_flags: bool, winner: int) -> None:
    file_key, env_var, getter, values = _FIELDS[field_name]
    lines = [f"{file_key}: {values[0]!r}"] if in_file else []
    lines += ["routes:", f"  - {{prefix: /, upstream: '{UPSTREAM}'}}"]
    path = write(tmp_path, "\n".join(lines) + "\n")
    environ = {env_var: values[1]} if in_env else {}
    overrides = Overrides(**{field_name: values[2]}) if in_flags else None
    config = load_config(path, overrides, environ)
    assert getter(config) == values[winner]


def test_environment_store_keeps_file_store_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        store: {{url: "redis://file:1", key_prefix: tenant-a, socket_timeout: 5s, max_connections: 8}}
        routes: [{{prefix: /, upstream: "{UPSTREAM}"}}]
        """,
    )
    config = load_config(path, environ={"IDEMPROXY_STORE": "rediss://env:6380"})
    assert config.store == StoreConfig(
        url="rediss://env:6380", key_prefix="tenant-a", socket_timeout_s=5.0, max_connections=8
    )


def test_environ_argument_replaces_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, f'listen: "127.0.0.1:7000"\nroutes: [{{prefix: /, upstream: "{UPSTREAM}"}}]\n')
    monkeypatch.setenv("IDEMPROXY_LISTEN", "127.0.0.1:7777")
    assert load_config(path, environ={}).listen == HostPort("127.0.0.1", 7000)
    assert load_config(path).listen == HostPort("127.0.0.1", 7777)  # environ=None: the process's


@pytest.mark.parametrize(
    ("variable", "field_name"),
    [
        pytest.param("IDEMPROXY_LISTEN", "listen", id="listen"),
        pytest.param("IDEMPROXY_ADMIN_LISTEN", "admin_listen", id="admin-listen"),
        pytest.param("IDEMPROXY_STORE", "store", id="store"),
        pytest.param("IDEMPROXY_UPSTREAM", "upstream", id="upstream"),
        pytest.param("IDEMPROXY_LOG_LEVEL", "log_level", id="log-level"),
    ],
)
def test_overrides_from_env(variable: str, field_name: str) -> None:
    overrides = Overrides.from_env({variable: "value", "UNRELATED": "x"})
    assert getattr(overrides, field_name) == "value"
    assert [name for name in Overrides.__slots__ if getattr(overrides, name) is not None] == [field_name]


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        pytest.param("IDEMPROXY_LISTEN", "nonsense", "listen", id="listen"),
        pytest.param("IDEMPROXY_ADMIN_LISTEN", "host:99999", "admin_listen", id="admin-listen"),
        pytest.param("IDEMPROXY_STORE", "mysql://db", "store", id="store"),
        pytest.param("IDEMPROXY_LOG_LEVEL", "verbose", "log_level", id="log-level"),
        pytest.param("IDEMPROXY_UPSTREAM", "ftp://tool", "upstream", id="upstream"),
    ],
)
def test_invalid_environment_value_is_reported(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"IDEMPROXY_UPSTREAM": UPSTREAM, variable: value})
    (problem,) = info.value.problems
    assert problem.startswith(f"env {variable}: {key}: ")
    assert repr(value) in problem


# -- the CLI ----------------------------------------------------------------------------


def test_cli_check_config_valid(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_FILE)
    result = idemproxy_cli("check-config", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "2 route(s)" in result.stdout
    assert "tickets (/tickets -> https://tickets.internal:8443/api/v2)" in result.stdout
    assert result.stderr == ""


def test_cli_check_config_ignores_environment(tmp_path: Path) -> None:
    """check-config validates the file as written: IDEMPROXY_UPSTREAM must not make it fail."""
    path = write(tmp_path, FULL_FILE)
    result = idemproxy_cli("check-config", path, cwd=tmp_path, env={"IDEMPROXY_UPSTREAM": UPSTREAM})
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_cli_check_config_invalid(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        lissten: "127.0.0.1:8080"
        routes:
          - prefix: /tickets
            upstream: ftp://tool
          - prefix: /mail
            upstream: {UPSTREAM}
            lease: 10s
        """,
    )
    result = idemproxy_cli("check-config", path, cwd=tmp_path)
    assert result.returncode == 2
    assert "OK" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    where = [(1, "lissten"), (4, "routes[0].upstream"), (7, "routes[1].lease")]
    for line, (number, key) in zip(lines, where, strict=True):
        assert line.startswith(f"idemproxy: {path}:{number}: {key}: ")


def test_cli_check_config_missing_file(tmp_path: Path) -> None:
    result = idemproxy_cli("check-config", tmp_path / "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot read the file" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("file_text", "extra_args", "expected"),
    [
        pytest.param(
            "routes:\n  - prefix: /tickets\n    upstream: http://tool\n    key_mode: sometimes\n",
            [],
            "routes[0].key_mode: ",
            id="invalid-file",
        ),
        pytest.param(
            "routes:\n  - prefix: /tickets\n    upstream: http://tool\n",
            ["--upstream", UPSTREAM],
            "flag --upstream: upstream: cannot be combined",
            id="upstream-flag-with-routes",
        ),
        pytest.param(None, [], "routes: no routes configured", id="nothing-configured"),
        pytest.param(
            None, ["--upstream", UPSTREAM, "--listen", "nonsense"], "flag --listen: listen: ", id="bad-listen-flag"
        ),
    ],
)
def test_cli_run_with_invalid_config_exits_2_without_starting(
    tmp_path: Path, file_text: str | None, extra_args: list[str], expected: str
) -> None:
    ledger = tmp_path / "ledger.db"
    args: list[str | Path] = ["run", "--store", f"sqlite:///{ledger}", *extra_args]
    if file_text is not None:
        args += ["--config", write(tmp_path, file_text)]
    result = idemproxy_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert all(line.startswith("idemproxy: ") for line in result.stderr.splitlines())
    # nothing was started: no ledger opened (neither the configured one nor the default one)
    assert not ledger.exists()
    assert not (tmp_path / ".idemproxy").exists()
    assert result.stdout == ""
