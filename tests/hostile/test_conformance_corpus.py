"""The conformance corpus (issue 22), against idemproxy and, differentially, against nginx.

Every case of ``tests/hostile/corpus.py`` is written, byte for byte, to a fresh connection to
the hostile stack's proxy listener (a real proxy in front of a recording tool, on a real
Redis ledger) and to a real nginx (``proxy_pass`` to a recording raw upstream, with the same
body limit and idle timeouts), all cases at once. Each connection is read until the server
closes it: a refusal closes at once, a keep-alive answer when the server's idle timeout (1 s
on both) runs out; nothing here sleeps.

- ``test_idemproxy_answers_as_the_corpus_says``: idemproxy's answers, whether the connection
  closes after the last one, and exactly what reached the tool (no more: a smuggled request
  never arrives as a request), case by case.
- ``test_idemproxy_is_not_more_lenient_than_nginx``: a case where nginx forwards nothing (or
  not the smuggled request) and idemproxy does fails, unless the case says why
  (``lenient_because``); a stale reason fails too. Stricter is fine, and recorded.
- ``test_a_real_proxy_process_answers_every_case_as_the_served_stack_does``: the whole corpus
  again through a real ``idemproxy run`` process: the same answers, closes and forwards.
- ``test_the_corpus_left_the_proxy_sound``: no internal error, nothing at the canary, nothing
  at the tool that no case sent, a ledger record for each side-effecting call that reached
  the tool and none for any other, and the proxy still serving.

The differential table is written to ``differential.txt`` (and ``differential.json``) in a
``conformance-corpus`` directory under pytest's temporary directory, and printed at the end of
the run.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from idemproxy.store.base import OpsQuery
from tests.hostile.conftest import CLIENT_TIMEOUT
from tests.hostile.corpus import CORPUS, Case, Tool
from tests.hostile.stack import ITEMS_MAX_BODY, Recorder, Stack, hostile_document, internal_errors, serving
from tests.support.nginx import NginxProxy, NginxUnavailable, Received, nginx_binary, nginx_proxy
from tests.support.processes import read_until
from tests.support.redis_server import RedisServer, free_port
from tests.support.wire import BOUND_S, Reply, connected

#: The stack and the runs share the module's event loop.
in_module_loop = pytest.mark.asyncio(loop_scope="module")

#: nginx's keep-alive, header and body timeouts, in seconds: the hostile stack's client timeouts.
IDLE_S = 1
#: Methods the hostile stack's routes pass through without a ledger record.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
NUMBERS = {case.name: f"{index:04d}" for index, case in enumerate(CORPUS)}
CASES = {case.name: case for case in CORPUS}
#: The case number in a target (``/items/c/0042``, in any form of target).
_NUMBERED = re.compile(r"/items/c/(\d{4})(?![0-9])")
_CASE_FIELD = b"x-case"


def test_the_corpus_is_well_formed() -> None:
    assert len(CASES) == len(CORPUS), "two cases share a name"
    for case in CORPUS:
        assert re.fullmatch(r"[a-z0-9.-]+", case.name), case.name
        assert case.reaches or not case.lenient_because, f"{case.name}: lenient_because, but nothing reaches the tool"
        if case.lenient_because is not None:
            assert len(case.lenient_because) >= 60, f"{case.name}: say specifically why idemproxy is more lenient"


# -- running a case ---------------------------------------------------------------------------------


def filled(data: bytes, number: str, canary: str) -> bytes:
    return data.replace(b"{id}", number.encode()).replace(b"{canary}", canary.encode())


def expected_tool(tool: Tool, number: str) -> Tool:
    return Tool(
        tool.method, tool.target.replace("{id}", number), tool.body.replace(b"{id}", number.encode()), tool.fields
    )


def assert_framed_by_the_proxy(tool: Tool) -> None:
    """What reached the tool carries one framing, the proxy's own, and no expectation."""
    received = [(name.lower(), value) for name, value in tool.fields]
    names = [name for name, _ in received]
    assert b"transfer-encoding" not in names, received
    assert b"expect" not in names, received
    assert [value for name, value in received if name == b"content-length"] in ([], [b"%d" % len(tool.body)]), received


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one server did with one case."""

    answers: tuple[str, ...]
    #: The connection closed right after the last answer (or without one).
    closes: bool
    #: What reached the tool behind the server, in arrival order.
    reached: tuple[Tool, ...] = ()

    @property
    def forwarded(self) -> frozenset[str]:
        """Which of the case's requests reached the tool: ``request``, ``second`` (a pipelined
        one) or ``smuggled`` (one hidden in the first one's body)."""
        return frozenset(_label(tool.target) for tool in self.reached)

    @property
    def verdict(self) -> str:
        if not self.reached:
            return "rejected"
        return "+".join(sorted(self.forwarded, key=["request", "second", "smuggled"].index)).replace(
            "request", "forwarded"
        )

    def describe(self) -> str:
        shown = " ".join(self.answers) or "(no answer)"
        return f"{self.verdict}: {shown}{', closed' if self.closes else ', kept open'}"


def _label(target: str) -> str:
    if "/smuggled" in target:
        return "smuggled"
    return "second" if "/second" in target else "request"


def _answer(reply: Reply) -> str:
    problem = reply.problem
    return f"{reply.status} {problem}" if problem else str(reply.status)


async def converse(port: int, data: bytes) -> tuple[tuple[str, ...], bool]:
    """Send ``data`` on a new connection and read every answer until the server closes it."""
    answers: list[str] = []
    async with connected(port) as caller:
        await caller.send(data)
        try:
            while True:
                reply = await caller.read_reply()
                if reply.status == 0:
                    return tuple(answers), not answers or answers[-1].startswith("1")
                answers.append(_answer(reply))
                if reply.status >= 200 and reply.closes:
                    rest = await caller.rest()
                    if rest:
                        answers.append(f"(then {len(rest)} more bytes)")
                    return tuple(answers), True
        except TimeoutError:
            return (*answers, f"(hung: not closed within {BOUND_S:g} s)"), False


def _number(target: str, fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in fields:
        if name.lower() == _CASE_FIELD:
            return value.decode("latin-1")
    found = _NUMBERED.search(target)
    return found.group(1) if found else None


def by_case(reached: Iterable[tuple[str | None, Tool]]) -> dict[str | None, list[Tool]]:
    grouped: dict[str | None, list[Tool]] = {}
    for number, tool in reached:
        grouped.setdefault(number, []).append(tool)
    return grouped


async def run_corpus(port: int, canary: str) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Every case at once, each on its own connection."""
    names = [case.name for case in CORPUS]
    conversations = await asyncio.gather(
        *(converse(port, filled(case.data, NUMBERS[case.name], canary)) for case in CORPUS)
    )
    return dict(zip(names, conversations, strict=True))


@dataclass(frozen=True, slots=True)
class Run:
    outcomes: dict[str, Outcome]
    #: Requests that reached the tool and name no case.
    unattributed: list[Tool]


def collect(conversations: dict[str, tuple[tuple[str, ...], bool]], reached: dict[str | None, list[Tool]]) -> Run:
    outcomes = {
        name: Outcome(answers, closes, tuple(reached.get(NUMBERS[name], ())))
        for name, (answers, closes) in conversations.items()
    }
    known = set(NUMBERS.values())
    unattributed = [tool for number, tools in reached.items() if number not in known for tool in tools]
    return Run(outcomes, unattributed)


# -- the two servers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdemproxyRun(Run):
    before_errors: float = 0.0
    #: Ledger records per case number (by the target they were recorded for).
    records: dict[str | None, int] | None = None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def idemproxy(stack: Stack) -> IdemproxyRun:
    before = await stack.mark()
    assert (before.recorded, before.records) == (0, 0), "the corpus needs the stack to itself"
    conversations = await run_corpus(stack.port, stack.canary_authority)
    reached = by_case(
        (_number(seen.raw_path, seen.headers), Tool(seen.method, seen.raw_path, seen.body, seen.headers))
        for seen in stack.recorder.seen()
    )
    records: dict[str | None, int] = {}
    for record in await stack.store.query(OpsQuery(limit=1000)):
        found = _NUMBERED.search(record.target)
        number = found.group(1) if found else None
        records[number] = records.get(number, 0) + 1
    run = collect(conversations, reached)
    return IdemproxyRun(run.outcomes, run.unattributed, before.errors, records)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def idemproxy_process(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The corpus through a real ``idemproxy run`` process configured as the hostile stack (its
    own recording tool and canary, its own keys in the same Redis)."""
    recorder, canary = Recorder("recorder"), Recorder("canary")
    async with serving(recorder.app()) as recorder.url, serving(canary.app()) as canary.url:
        port = free_port()
        document = hostile_document(
            recorder.url,
            {"url": redis_server.url, "key_prefix": "idem-process"},
            listen=f"127.0.0.1:{port}",
            admin_listen=f"127.0.0.1:{free_port()}",
            client_header_timeout=CLIENT_TIMEOUT,
            client_body_timeout=CLIENT_TIMEOUT,
        )
        path = tmp_path_factory.mktemp("corpus-process") / "idemproxy.yaml"
        path.write_text(yaml.safe_dump(document), encoding="utf-8")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "idemproxy", "run", "--config", str(path), stderr=asyncio.subprocess.PIPE
        )
        try:
            assert process.stderr is not None
            await read_until(process.stderr, b"idemproxy listening")
            drained = asyncio.ensure_future(process.stderr.read())  # a full pipe must never block it
            conversations = await run_corpus(port, canary.url.removeprefix("http://"))
            assert canary.requests == [], f"a request reached an unconfigured host: {canary.requests}"
        finally:
            process.kill()
            await process.wait()
        await drained
    reached = by_case(
        (_number(seen.raw_path, seen.headers), Tool(seen.method, seen.raw_path, seen.body, seen.headers))
        for seen in recorder.seen()
    )
    return collect(conversations, reached)


@pytest.fixture(scope="module")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxProxy]:
    missing = None
    try:
        nginx_binary()
    except NginxUnavailable as exc:
        missing = str(exc)
    if missing is not None:
        pytest.fail(missing, pytrace=False)  # not a skip: `make test` installs nginx
    with nginx_proxy(tmp_path_factory.mktemp("nginx"), max_body=ITEMS_MAX_BODY, idle_s=IDLE_S) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nginx(nginx_server: NginxProxy, stack: Stack) -> Run:
    conversations = await run_corpus(nginx_server.port, stack.canary_authority)

    def tool(received: Received) -> tuple[str | None, Tool]:
        fields = tuple(received.fields)
        return _number(received.target, fields), Tool(received.method, received.target, received.body, fields)

    return collect(conversations, by_case(map(tool, nginx_server.upstream.snapshot())))


# -- the differential table ---------------------------------------------------------------------------


def relation(case: Case, ours: Outcome, theirs: Outcome) -> str:
    if ours.forwarded - theirs.forwarded:
        return "MORE LENIENT (reason given)" if case.lenient_because else "MORE LENIENT"
    if theirs.forwarded - ours.forwarded:
        return "stricter"
    return "alike"


class _Summary:
    """Prints the table at the end of the run (registered as a plugin by ``differential``)."""

    def __init__(self, title: str, lines: list[str]) -> None:
        self.title = title
        self.lines = lines

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.write_sep("=", self.title)
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def differential(
    idemproxy: IdemproxyRun,
    nginx: Run,
    nginx_server: NginxProxy,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> dict[str, tuple[Outcome, Outcome]]:
    """Each case's outcome on idemproxy and on nginx; writes and prints the table."""
    pairs = {case.name: (idemproxy.outcomes[case.name], nginx.outcomes[case.name]) for case in CORPUS}
    rows = [
        (case.group, case.name, ours.describe(), theirs.describe(), relation(case, ours, theirs))
        for case in CORPUS
        for ours, theirs in [pairs[case.name]]
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    header = ("group", "case", "idemproxy", nginx_server.version)
    lines = ["  ".join(text.ljust(width) for text, width in zip(header, widths, strict=False)) + "  relation"]
    lines += ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=False)) + "  " + row[4]
              for row in rows]  # fmt: skip
    counts = {name: sum(row[4].startswith(name) for row in rows) for name in ("alike", "stricter", "MORE LENIENT")}
    lines.append(
        f"{len(rows)} cases: {counts['alike']} alike, idemproxy stricter in {counts['stricter']}, "
        f"more lenient in {counts['MORE LENIENT']}"
    )
    for case in CORPUS:
        if case.lenient_because and relation(case, *pairs[case.name]).startswith("MORE"):
            lines.append(f"  {case.name}: more lenient because {case.lenient_because}")
    directory: Path = tmp_path_factory.mktemp("conformance-corpus")
    (directory / "differential.txt").write_text("\n".join(lines) + "\n")
    (directory / "differential.json").write_text(
        json.dumps(
            [
                {"group": group, "case": name, "idemproxy": ours, "nginx": theirs, "relation": rel}
                for group, name, ours, theirs, rel in rows
            ],
            indent=1,
        )
    )
    lines.append(f"(written to {directory}; nginx's reasons are in {nginx_server.error_log})")
    name = "idemproxy-conformance-corpus"
    if not pytestconfig.pluginmanager.has_plugin(name):
        title = f"conformance corpus: idemproxy vs {nginx_server.version}"
        pytestconfig.pluginmanager.register(_Summary(title, lines), name)
    return pairs


# -- the tests -------------------------------------------------------------------------------------------


@in_module_loop
@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
async def test_idemproxy_answers_as_the_corpus_says(case: Case, idemproxy: IdemproxyRun) -> None:
    number = NUMBERS[case.name]
    expected = Outcome(case.answers, case.closes, tuple(expected_tool(tool, number) for tool in case.reaches))
    outcome = idemproxy.outcomes[case.name]
    assert outcome == expected
    for wanted, reached in zip(expected.reached, outcome.reached, strict=True):
        assert_framed_by_the_proxy(reached)
        received = {(name.lower(), value) for name, value in reached.fields}
        missing = [(name, value) for name, value in wanted.fields if (name.lower(), value) not in received]
        assert not missing, f"the tool did not receive {missing}: {reached.fields}"


@in_module_loop
@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.name)
async def test_idemproxy_is_not_more_lenient_than_nginx(
    case: Case, differential: dict[str, tuple[Outcome, Outcome]]
) -> None:
    ours, theirs = differential[case.name]
    lenient = ours.forwarded - theirs.forwarded
    if case.lenient_because is None:
        assert not lenient, (
            f"idemproxy forwards {sorted(lenient)} where nginx does not (idemproxy: {ours.describe()}; "
            f"nginx: {theirs.describe()}): refuse it too, or say why not in the case's lenient_because"
        )
    else:
        assert lenient, f"lenient_because is stale: idemproxy {ours.describe()}; nginx {theirs.describe()}"


@in_module_loop
async def test_a_real_proxy_process_answers_every_case_as_the_served_stack_does(
    idemproxy: IdemproxyRun, idemproxy_process: Run
) -> None:
    """The same code as ``idemproxy run`` starts it (its supervisor, uvloop, its own server
    options): every case answered the same, closed the same, and the same reached the tool."""
    differ = {
        name: f"stack {ours.describe()} / process {idemproxy_process.outcomes[name].describe()}"
        for name, ours in idemproxy.outcomes.items()
        if (ours.answers, ours.closes, ours.forwarded)
        != (
            idemproxy_process.outcomes[name].answers,
            idemproxy_process.outcomes[name].closes,
            idemproxy_process.outcomes[name].forwarded,
        )
    }
    assert differ == {}
    assert idemproxy_process.unattributed == []


@in_module_loop
async def test_the_corpus_left_the_proxy_sound(idemproxy: IdemproxyRun, stack: Stack) -> None:
    assert stack.canary.requests == [], "a request reached the host no route names"
    assert internal_errors() == idemproxy.before_errors, "the proxy answered with internal-error (a bug; see the log)"
    assert idemproxy.unattributed == [], "requests reached the tool that no case sent"
    expected = {
        NUMBERS[case.name]: count
        for case in CORPUS
        if (count := sum(tool.method not in SAFE_METHODS for tool in case.reaches))
    }
    assert idemproxy.records == expected, "ledger records per case number"
    await stack.assert_serving()
