"""docs/design.md's transitions table is ``ALLOWED``, row for row: the document the tests
cite cannot drift from the state machine."""

from __future__ import annotations

import re
from pathlib import Path

from idemproxy.lifecycle.records import State
from idemproxy.lifecycle.transitions import ALLOWED, Event

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"
ROW = re.compile(r"^\| (—|`[A-Z_]+`) \| `([a-z-]+)` \| (—|`[A-Z_]+`) \|")


def documented_edges() -> dict[tuple[State | None, Event], State | None]:
    text = DESIGN.read_text()
    table = text[text.index("<!-- transitions:") :].split("\n\n", 1)[0]
    edges: dict[tuple[State | None, Event], State | None] = {}
    for line in table.splitlines():
        if (row := ROW.match(line)) is None:
            continue
        before, event, after = (None if cell == "—" else cell.strip("`") for cell in row.groups())
        assert event is not None
        key = (None if before is None else State(before), Event(event))
        assert key not in edges, f"{line}: listed twice"
        edges[key] = None if after is None else State(after)
    return edges


def test_the_design_documents_every_allowed_transition_and_no_other() -> None:
    assert documented_edges() == ALLOWED


def test_every_test_the_design_cites_exists() -> None:
    cited = re.findall(r"`(tests/[\w/.-]+)`", DESIGN.read_text())
    repo = DESIGN.parents[1]

    assert cited
    assert [path for path in cited if not (repo / path).exists()] == []
