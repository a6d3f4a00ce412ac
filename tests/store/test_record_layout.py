"""One declaration per record (``lifecycle.records``), and the store layouts named after it."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sqlite3
import typing
from pathlib import Path

import msgpack
import pytest
from hypothesis import given

from idemproxy.lifecycle.records import RECORD_FIELDS, Evidence, OperationRecord, State, record_fields
from idemproxy.store import codec, redis_record, redis_schema
from idemproxy.store.base import RecordNotStorable
from idemproxy.store.sqlite import SqliteStore
from tests.store.layout_v1 import V1_RECORDS
from tests.store.test_redis_record import records


def test_the_field_list_is_the_declaration_in_its_order() -> None:
    assert tuple(field.name for field in dataclasses.fields(OperationRecord)) == RECORD_FIELDS
    assert RECORD_FIELDS[:4] == ("op_id", "scope", "state", "fence")
    assert RECORD_FIELDS[-1] == "evidence"


@given(records, records)
def test_evolve_is_dataclasses_replace(first: OperationRecord, second: OperationRecord) -> None:
    for name in RECORD_FIELDS:
        change = {name: getattr(second, name)}
        assert first.evolve(**change) == dataclasses.replace(first, **change)
    assert first.evolve() == first
    everything = {name: getattr(second, name) for name in RECORD_FIELDS}
    assert first.evolve(**everything) == second


def test_evolve_refuses_a_field_the_record_does_not_have() -> None:
    record = next(iter(V1_RECORDS.values()))

    with pytest.raises(TypeError, match="'lease'"):
        record.evolve(state=State.RELEASED, lease=0)


def test_a_layout_can_only_name_fields_the_record_has() -> None:
    assert record_fields("state", "fence") == ("state", "fence")
    with pytest.raises(ValueError, match="'s'"):
        record_fields("state", "s")


# -- SQLite --------------------------------------------------------------------------------------


async def test_the_sqlite_columns_are_the_codecs_named_after_the_record_fields(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ledger.sqlite3")
    await store.start()
    await store.close()
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        columns = {name: kind for _, name, kind, *_ in db.execute("PRAGMA table_info(operations)")}

    assert list(columns) == [
        "op_id",
        *codec.COLUMN_FIELDS,
        codec.META,
        codec.BODY,
        codec.REQUEST_BODY,
        codec.EVIDENCE,
        "due_ms",
        "updated_ms",
        "expires_ms",
    ]
    declared = typing.get_type_hints(OperationRecord)
    for name in codec.COLUMN_FIELDS:  # each typed as the record declares it
        assert columns[name] == ("INTEGER" if declared[name] is int else "TEXT"), name
    assert set(codec.V1_COLUMNS.values()) == {*codec.WRITTEN_FIELDS, codec.EVIDENCE}


@given(records)
def test_a_record_round_trips_through_the_sqlite_codec(record: OperationRecord) -> None:
    fields = codec.encode(record)

    assert list(fields) == list(codec.WRITTEN_FIELDS)
    assert codec.decode(record.op_id, fields) == record.evolve(evidence=())


# -- Redis -----------------------------------------------------------------------------------------


def test_the_scripts_call_the_record_elements_by_name() -> None:
    assert redis_schema._RECORD == "local STATE, FENCE, OWNER, LEASE_UNTIL_MS, EVIDENCE = 1, 2, 3, 4, 8\n"
    for script in (redis_schema.RESERVE, redis_schema.TRANSITION, redis_schema.RENEW, redis_schema.NOTE):
        assert script.startswith(redis_schema._RECORD)
        assert not re.search(r"(current|unpack\(raw\))\[\d", script), script
    assert redis_schema.UNRESERVE.startswith(redis_schema._RECORD)
    assert redis_record.FIELDS[: len(redis_record.ELEMENT_FIELDS)] == redis_record.ELEMENT_FIELDS


def test_evidence_that_cannot_be_packed_leaves_the_next_one_packed_alone() -> None:
    """The evidence packer is reused: a failed ``pack`` must not leave bytes behind."""
    good = Evidence(1, "completed", {"status": 201})
    with pytest.raises(RecordNotStorable):
        redis_record.pack_evidence(Evidence(1, "probe", {"n": 2**70}))

    assert redis_record.pack_evidence(good) == msgpack.packb([1, "completed", {"status": 201}], use_bin_type=True)
