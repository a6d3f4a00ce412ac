"""``idemproxy check-config``: every problem in one pass, one line each, ``FILE:LINE: key.path: message``,
the nearest valid key for a misspelt one, and ``--explain``: the effective configuration with each
value's origin. Run through the real CLI (``main()``, and ``python -m idemproxy`` in a process)."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from idemproxy.cli import main
from tests.support.processes import idemproxy_cli

UPSTREAM = "http://tool:9000"
LISTEN_EXPECTED = "expected 'HOST:PORT' with a port from 1 to 65535"


def write(tmp_path: Path, text: str, name: str = "idemproxy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    """Exit status, stdout lines and stderr lines of ``idemproxy check-config [ARGS] PATH``."""
    code = main(["check-config", *args, str(path)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.fixture(autouse=True)
def _no_idemproxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("IDEMPROXY_"):
            monkeypatch.delenv(name)


# -- every problem, where it is ---------------------------------------------------------------------


THREE_ERRORS = f"""\
    listen: "127.0.0.1:8080"
    routes:
      - prefix: /tickets
        upstream: {UPSTREAM}
        retension: 12h
        reconcile:
          probe:
            url: "{{upstream}}/tickets?external_id={{nope}}"
            match: "tickets[0]"
      - prefix: /mail
        upstream: ftp://mail
    """


def test_three_different_errors_each_on_a_line_with_file_line_and_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, THREE_ERRORS)
    result = idemproxy_cli("check-config", path, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"idemproxy: {path}:5: routes[0].retension: unknown key; did you mean 'retention'?",
        f"idemproxy: {path}:8: routes[0].reconcile.probe.url: unknown placeholder {{nope}}; "
        "expected {upstream}, {key}, {op_id}, {caller}, {task} or {body.<field>}",
        f"idemproxy: {path}:11: routes[1].upstream: expected an http:// or https:// URL with a host, got 'ftp://mail'",
    ]


def test_the_proxy_refuses_the_same_file_with_the_same_lines(tmp_path: Path) -> None:
    path = write(tmp_path, THREE_ERRORS)
    checked = idemproxy_cli("check-config", path, cwd=tmp_path)
    ledger = tmp_path / "ledger.db"
    started = idemproxy_cli("run", "--config", path, "--store", f"sqlite:///{ledger}", cwd=tmp_path)
    assert started.returncode == 2
    assert started.stderr == checked.stderr
    assert started.stdout == ""
    assert not ledger.exists()


def test_every_section_is_reported_in_one_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        """\
        listen: "127.0.0.1:8080"
        admin_listen: "127.0.0.1:8080"
        store:
          url: sqlite:///ledger.db
          min_replicas_ack: 1
        headers:
          key: "not a header"
        route_defaults:
          lease: 1s
        routes:
          - prefix: /a
            key_mode: sometimes
            upstream_headers: {Host: tool, X-Token: "env:IDEMPROXY_TEST_UNSET_VARIABLE"}
            reconcile:
              probe: {url: "{upstream}/{nope}", match: "x", match_statuses: [200, 404]}
          - prefix: /a
            upstream: http://b
            mode: mcp
            mcp: {key_meta: "has space"}
        auth:
          identities:
            - name: "bad name!"
              tokens: [plain]
              scopes:
                - {routes: [nope], methods: "POST"}
        budgets:
          identity: {calls: 0/1m}
        """,
    )
    code, out, err = check(path, capsys)
    assert code == 2
    assert out == []
    where = [line.removeprefix(f"idemproxy: {path}:").split(": ")[:2] for line in err]
    assert where == [
        ["2", "admin_listen"],  # the same address as listen
        ["5", "store.min_replicas_ack"],  # SQLite has no replicas
        ["7", "headers.key"],
        ["11", "routes[0].upstream"],  # missing: the other keys of the route are still checked
        ["11", "routes[0].lease"],  # from route_defaults, too short for the timeouts
        ["12", "routes[0].key_mode"],
        ["13", "routes[0].upstream_headers.Host"],  # each header on its own
        ["13", "routes[0].upstream_headers.X-Token"],
        ["15", "routes[0].reconcile.probe.url"],  # each key of the block on its own
        ["15", "routes[0].reconcile.probe.absent_statuses"],
        ["16", "routes[1].lease"],
        ["16", "routes[1].prefix"],  # the same prefix, though routes[0] has problems
        ["16", "routes[1].name"],
        ["19", "routes[1].mcp.key_meta"],
        ["22", "auth.identities[0].name"],
        ["23", "auth.identities[0].tokens[0]"],
        ["25", "auth.identities[0].scopes[0].routes"],  # a route that does not exist (routes[0] is 'a')
        ["25", "auth.identities[0].scopes[0].methods"],  # checked though routes is wrong
        ["27", "budgets.identity.calls"],
    ]
    assert "got 1s (from route_defaults)" in err[4]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        pytest.param('lissten: "127.0.0.1:1"\n', 1, "lissten: unknown key; did you mean 'listen'?", id="top-level"),
        pytest.param("store: {url: 'sqlite:///l.db', socket_timout: 2s}\n", 1, "store.socket_timout", id="store"),
        pytest.param(
            "headers:\n  caler: X-Caller\n", 2, "headers.caler: unknown key; did you mean 'caller'?", id="hdr"
        ),
        pytest.param(
            "route_defaults:\n  max_attempt: 3\n",
            2,
            "route_defaults.max_attempt: unknown key; did you mean 'max_attempts'?",
            id="route-defaults",
        ),
        pytest.param(
            "routes:\n  - prefix: /\n    upstream: http://t\n    retension: 1h\n",
            4,
            "routes[0].retension: unknown key; did you mean 'retention'?",
            id="route",
        ),
        pytest.param(
            "routes:\n  - prefix: /\n    upstream: http://t\n    reconcile:\n"
            "      resend_safe: true\n      max_probe: 3\n",
            6,
            "routes[0].reconcile.max_probe: unknown key; did you mean 'max_probes'?",
            id="reconcile",
        ),
        pytest.param(
            "routes:\n  - prefix: /\n    upstream: http://t\n    reconcile:\n      probe:\n"
            "        url: '{upstream}/x'\n        mach: x\n",
            7,
            "routes[0].reconcile.probe.mach: unknown key; did you mean 'match'?",
            id="probe",
        ),
        pytest.param(
            "routes:\n  - prefix: /\n    upstream: http://t\n    mode: mcp\n    mcp:\n      key_mta: k\n",
            6,
            "routes[0].mcp.key_mta: unknown key; did you mean 'key_meta'?",
            id="mcp",
        ),
        pytest.param(
            "budgets:\n  identity:\n    call: 10/1m\n",
            3,
            "budgets.identity.call: unknown key; did you mean 'calls'?",
            id="budgets",
        ),
        pytest.param(
            "auth:\n  identities:\n    - name: a\n      tokns: []\n",
            4,
            "auth.identities[0].tokns: unknown key; did you mean 'tokens'?",
            id="auth",
        ),
        pytest.param(
            "headers:\n  zzz: X\n",
            2,
            "headers.zzz: unknown key; expected one of caller, key, task",
            id="nothing-close",
        ),
    ],
)
def test_a_misspelt_key_gets_the_nearest_valid_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, problem: str
) -> None:
    routes = "" if "routes:" in text else "\nroutes: [{prefix: /x, upstream: 'http://t'}]\n"
    path = write(tmp_path, text + routes)
    code, _, err = check(path, capsys)
    assert code == 2
    assert any(entry.startswith(f"idemproxy: {path}:{line}: {problem}") for entry in err), err


# -- YAML itself ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        pytest.param(
            "routes: [unclosed\n",
            2,
            "not valid YAML: while parsing a flow sequence at line 1: expected ',' or ']', but got '<stream end>' "
            "(column 1)",
            id="unclosed-flow",
        ),
        pytest.param(
            "listen: a: b\n", 1, "not valid YAML: mapping values are not allowed here (column 10)", id="colon"
        ),
        pytest.param(
            "routes:\n\t- prefix: /\n",
            2,
            "not valid YAML: while scanning for the next token: found character '\\t' that cannot start any token "
            "(column 1)",
            id="tab",
        ),
        pytest.param(
            "a: 1\nb: \x00\n",
            2,
            "not valid YAML: unacceptable character #x0000: special characters are not allowed",
            id="nul",
        ),
        pytest.param(
            "x: !!python/object/apply:os.system [true]\n",
            1,
            "not valid YAML: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system' (column 4)",
            id="python-tag",
        ),
    ],
)
def test_a_yaml_error_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, problem: str
) -> None:
    path = write(tmp_path, text)
    code, out, err = check(path, capsys)
    assert (code, out) == (2, [])
    assert err == [f"idemproxy: {path}:{line}: {problem}"]


def test_a_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: '\xe9'\n")
    code, _, err = check(path, capsys)
    assert code == 2
    assert err == [f"idemproxy: {path}: not valid YAML: not UTF-8 text (byte 9)"]


def test_a_key_written_twice_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        f"""\
        routes:
          - prefix: /tickets
            upstream: {UPSTREAM}
            retention: 1h
            retention: 2h
        """,
    )
    code, _, err = check(path, capsys)
    assert code == 2
    assert err == [
        f"idemproxy: {path}:5: routes[0].retention: duplicate key (also set at line 4); YAML keys must be unique"
    ]


def test_a_merge_key_is_not_a_duplicate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        f"""\
        routes:
          - &tickets {{prefix: /tickets, upstream: "{UPSTREAM}", retention: 1h}}
          - <<: *tickets
            prefix: /mail
            retension: 2h
        """,
    )
    code, _, err = check(path, capsys)
    assert code == 2
    assert err == [f"idemproxy: {path}:5: routes[1].retension: unknown key; did you mean 'retention'?"]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        pytest.param(  # each line 9 times the one before: line 6 is past 100000 nodes
            "l1: &l1 [x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]\n" for n in range(2, 9)),
            6,
            "not valid YAML for a configuration: its aliases expand to more than 100000 nodes",
            id="billion-laughs",
        ),
        pytest.param(
            "a: &a [*a]\n", 1, "not valid YAML for a configuration: an alias refers to itself", id="recursive"
        ),
    ],
)
def test_hostile_aliases_are_refused_quickly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, problem: str
) -> None:
    path = write(tmp_path, text)
    started = time.monotonic()
    code, _, err = check(path, capsys)
    assert time.monotonic() - started < 5
    assert code == 2
    assert err == [f"idemproxy: {path}:{line}: {problem}"]


# -- overrides ---------------------------------------------------------------------------------------


def test_a_bad_environment_value_is_named_by_its_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, f"listen: 'nowhere'\nroutes: [{{prefix: /, upstream: '{UPSTREAM}'}}]\n")
    monkeypatch.setenv("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:99999")
    monkeypatch.setenv("IDEMPROXY_LOG_LEVEL", "loud")
    # check-config checks the file as written ...
    code, _, err = check(path, capsys)
    assert code == 2
    assert err == [f"idemproxy: {path}:1: listen: {LISTEN_EXPECTED}, got 'nowhere'"]
    # ... and --explain, what `run` would use: the environment too, every problem of it at once.
    code, out, err = check(path, capsys, "--explain")
    assert (code, out) == (2, [])
    assert err == [
        f"idemproxy: {path}:1: listen: {LISTEN_EXPECTED}, got 'nowhere'",
        f"idemproxy: env IDEMPROXY_ADMIN_LISTEN: admin_listen: {LISTEN_EXPECTED}, got '127.0.0.1:99999'",
        "idemproxy: env IDEMPROXY_LOG_LEVEL: log_level: expected one of debug, info, warning, error, got str 'loud'",
    ]


def test_a_bad_flag_is_named_by_the_flag(tmp_path: Path) -> None:
    result = idemproxy_cli("run", "--upstream", UPSTREAM, "--listen", "nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"idemproxy: flag --listen: listen: {LISTEN_EXPECTED}, got 'nowhere'"]


# -- a valid file --------------------------------------------------------------------------------------


def test_a_valid_file_gets_a_short_ok_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f"routes:\n  - {{name: tickets, prefix: /tickets, upstream: '{UPSTREAM}'}}\n")
    code, out, err = check(path, capsys)
    assert (code, err) == (0, [])
    assert out == [f"{path}: OK: 1 route(s): tickets (/tickets -> {UPSTREAM})"]


EXPLAINED = f"""\
    listen: "127.0.0.1:9090"
    store: sqlite:///ledger.db
    route_defaults:
      retention: 12h
    routes:
      - name: tickets
        prefix: /tickets
        upstream: {UPSTREAM}
        read_timeout: 20s
        upstream_headers: {{Authorization: "Bearer do-not-print"}}
    """


def test_explain_says_where_each_value_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, EXPLAINED)
    monkeypatch.setenv("IDEMPROXY_LOG_LEVEL", "debug")
    monkeypatch.setenv("IDEMPROXY_STORE", "redis://:hunter2@redis:6379/0")
    code, out, err = check(path, capsys, "--explain")
    assert (code, err) == (0, [])
    assert out[0] == f"# {path}: OK; the effective configuration, each value's origin after '#'"
    rows = {" ".join(line.split("#")[0].split()): line.rsplit("# ", 1)[1] for line in out[1:] if "# " in line}
    assert rows["listen: 127.0.0.1:9090"] == f"{path}:1"  # from the file
    assert rows["log_level: debug"] == "env IDEMPROXY_LOG_LEVEL"  # from the environment
    assert rows["admin_listen: 127.0.0.1:8081"] == "default"
    assert rows["url: redis://:***@redis:6379/0"] == "env IDEMPROXY_STORE"  # over the file's; password masked
    assert rows["- name: tickets"] == f"{path}:6"
    assert rows["read_timeout: 20s"] == f"{path}:9"
    assert rows["retention: 12h"] == f"{path}:4"  # route_defaults
    assert rows["lease: 1m"] == "default"
    assert rows["upstream_headers: [Authorization]"] == f"{path}:10 (values not shown)"
    assert "do-not-print" not in "\n".join(out)
    assert "hunter2" not in "\n".join(out)
    # the order is the documented one, every time
    assert [line.split(":")[0] for line in out[1:] if not line.startswith(" ")] == [
        "listen",
        "admin_listen",
        "metrics_listen",
        "log_level",
        "shutdown_grace",
        "log_keys",
        "client_header_timeout",
        "client_body_timeout",
        "max_connections",
        "allow_unauthenticated_credential_use",
        "store",
        "headers",
        "routes",
        "auth",
        "budgets",
    ]
    code, again, _ = check(path, capsys, "--explain")
    assert again == out


def test_explain_exact_lines_in_a_process(tmp_path: Path) -> None:
    path = write(tmp_path, EXPLAINED)
    result = idemproxy_cli("check-config", "--explain", path, cwd=tmp_path, env={"IDEMPROXY_LOG_LEVEL": "warning"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "listen: 127.0.0.1:9090                               # " + f"{path}:1" in lines
    assert "log_level: warning                                   # env IDEMPROXY_LOG_LEVEL" in lines
    assert "shutdown_grace: 10s                                  # default" in lines
    assert "    retention: 12h                                   # " + f"{path}:4" in lines
