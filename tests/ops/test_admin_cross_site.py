"""The admin API without authentication (bound to loopback) against the operator's own browser
(the trust issue's "operator API never answers unauthenticated beyond loopback", to its end).

A page on another site that the operator has open can make the browser send "simple" requests
to 127.0.0.1 without asking (a form, or text/plain), and can re-point its own name at
127.0.0.1 to read the answers as same-origin (DNS rebinding). Neither may read or settle an
operation: the admin API takes bodies only as ``application/json`` (which needs a CORS
preflight it never grants) and answers only requests addressed to a loopback host.
"""

from __future__ import annotations

import pytest

from idemproxy.lifecycle.records import State
from tests.support.admin_ops import Ops, problem

RESOLVE = b'{"outcome": "not_done", "by": "attacker", "reason": "cross-site"}'


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
async def test_a_cross_site_post_cannot_resolve_an_operation(ops: Ops, content_type: str | None) -> None:
    op_id = await ops.needs_attention("k-cross-site")
    headers = {} if content_type is None else {"Content-Type": content_type}

    response = await ops.admin.post(f"/_idem/ops/{op_id}/resolve", data=RESOLVE, headers=headers)

    await problem(response, 415, "unsupported-media-type")
    assert (await ops.record(op_id)).state is State.NEEDS_ATTENTION


@pytest.mark.parametrize("content_type", ["text/plain", None])
async def test_a_cross_site_post_cannot_confirm_a_ledger_loss(ops: Ops, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}

    response = await ops.admin.post("/_idem/ledger/confirm", data=b"", headers=headers)

    await problem(response, 415, "unsupported-media-type")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8081", "10.0.0.7:8081", "127.0.0.1.evil.example"])
async def test_a_rebound_name_reads_and_settles_nothing(ops: Ops, host: str) -> None:
    op_id = await ops.needs_attention("k-rebound")
    headers = {"Host": host}

    listing = await ops.admin.get("/_idem/ops", headers=headers)
    resolving = await ops.admin.post(
        f"/_idem/ops/{op_id}/resolve", data=RESOLVE, headers={**headers, "Content-Type": "application/json"}
    )

    for refused in (listing, resolving):
        body = await problem(refused, 403, "forbidden")
        assert "loopback" in body["detail"]
    assert (await ops.record(op_id)).state is State.NEEDS_ATTENTION


@pytest.mark.parametrize("host", ["127.0.0.1:8081", "localhost:8081", "LOCALHOST", "[::1]:8081", "127.1.2.3"])
async def test_requests_addressed_to_loopback_are_answered(ops: Ops, host: str) -> None:
    listing = await ops.admin.get("/_idem/ops", headers={"Host": host})

    assert listing.status == 200
