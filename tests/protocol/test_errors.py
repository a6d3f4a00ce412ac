"""``idemproxy.protocol.errors``: every problem is RFC 9457 problem+json with a stable type."""

from __future__ import annotations

import json
import re

import pytest

from idemproxy.protocol import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX, errors
from idemproxy.protocol.errors import ProblemError


def all_subclasses(cls: type[ProblemError]) -> list[type[ProblemError]]:
    found: list[type[ProblemError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(all_subclasses(sub))
    return found


SUBCLASSES = all_subclasses(ProblemError)

#: The HTTP status every problem class must carry (the tree in the module docstring).
EXPECTED_STATUS: dict[type[ProblemError], int] = {
    errors.BadRequest: 400,
    errors.MissingKey: 400,
    errors.MissingTask: 400,
    errors.InvalidKey: 400,
    errors.AmbiguousHeader: 400,
    errors.InvalidTarget: 400,
    errors.AbsoluteFormRefused: 400,
    errors.IncompleteBody: 400,
    errors.UnsupportedTransferCoding: 400,
    errors.InvalidHeader: 400,
    errors.MalformedRequest: 400,
    errors.TargetTooLong: 414,
    errors.ExpectationFailed: 417,
    errors.HeaderFieldsTooLarge: 431,
    errors.HttpVersionNotSupported: 505,
    errors.RequestTimeout: 408,
    errors.NoRoute: 404,
    errors.OperationNotFound: 404,
    errors.InvalidResolution: 400,
    errors.AmbiguousOperationId: 400,
    errors.InvalidQuery: 400,
    errors.InvalidTransition: 409,
    errors.MethodNotAllowed: 405,
    errors.BodyTooLarge: 413,
    errors.FingerprintMismatch: 422,
    errors.Conflict: 409,
    errors.InFlight: 409,
    errors.OutcomeUnknown: 409,
    errors.NeedsAttention: 409,
    errors.ResponseNotStored: 409,
    errors.AttemptsExhausted: 429,
    errors.BudgetExceeded: 429,
    errors.UpstreamError: 502,
    errors.UpstreamUnreachable: 502,
    errors.UpstreamConnectionLost: 502,
    errors.UpstreamTimeout: 504,
    errors.LedgerUnavailable: 503,
    errors.LedgerLost: 503,
    errors.LeaseLost: 503,
    errors.InternalError: 500,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.UnsupportedMediaType: 415,
}

_CLASS_PARAMS = [pytest.param(cls, id=cls.__name__) for cls in SUBCLASSES]


def test_subclasses_found() -> None:
    # guards the recursion: nested subclasses (MissingKey under BadRequest) must be found
    assert errors.MissingKey in SUBCLASSES
    assert errors.UpstreamTimeout in SUBCLASSES
    assert ProblemError not in SUBCLASSES


def test_status_table_covers_every_subclass() -> None:
    """A new problem class must be added to EXPECTED_STATUS (and so be reviewed here)."""
    assert set(SUBCLASSES) == set(EXPECTED_STATUS)


@pytest.mark.parametrize("cls", _CLASS_PARAMS)
def test_status_matches_class(cls: type[ProblemError]) -> None:
    assert cls.status == EXPECTED_STATUS[cls]
    assert cls("x").status == EXPECTED_STATUS[cls]


@pytest.mark.parametrize("cls", _CLASS_PARAMS)
def test_to_json_is_problem_json(cls: type[ProblemError]) -> None:
    exc = cls("Something specific went wrong.")
    body = json.loads(exc.to_json())
    assert body == {
        "type": f"urn:idemproxy:problem:{cls.slug}",
        "title": cls.title,
        "status": EXPECTED_STATUS[cls],
        "detail": "Something specific went wrong.",
    }
    assert exc.type_uri == PROBLEM_TYPE_PREFIX + cls.slug
    assert isinstance(body["title"], str)
    assert body["title"]


@pytest.mark.parametrize("cls", _CLASS_PARAMS)
def test_to_json_with_instance_and_extensions(cls: type[ProblemError]) -> None:
    exc = cls("detail text", headers={"Retry-After": "1"}, operation="op-1", attempt=2, state="PENDING")
    body = json.loads(exc.to_json(instance="/tickets/7"))
    assert body["instance"] == "/tickets/7"
    assert body["operation"] == "op-1"
    assert body["attempt"] == 2
    assert body["state"] == "PENDING"
    # the standard members are still there, untouched by the extensions
    assert body["type"] == f"urn:idemproxy:problem:{cls.slug}"
    assert body["status"] == EXPECTED_STATUS[cls]
    assert body["detail"] == "detail text"
    assert exc.headers == {"Retry-After": "1"}


@pytest.mark.parametrize("cls", _CLASS_PARAMS)
def test_is_an_exception_carrying_the_detail(cls: type[ProblemError]) -> None:
    exc = cls("the detail")
    assert str(exc) == "the detail"
    assert exc.detail == "the detail"
    assert exc.headers == {}
    with pytest.raises(ProblemError, match="the detail"):
        raise exc


@pytest.mark.parametrize("cls", _CLASS_PARAMS)
def test_slug_is_kebab_case(cls: type[ProblemError]) -> None:
    assert re.fullmatch(r"[a-z]+(?:-[a-z]+)*", cls.slug)


def test_slugs_are_unique() -> None:
    slugs = [cls.slug for cls in SUBCLASSES]
    duplicates = sorted({slug for slug in slugs if slugs.count(slug) > 1})
    assert duplicates == []
    assert len({cls("x").type_uri for cls in SUBCLASSES}) == len(SUBCLASSES)


def test_content_type_constant() -> None:
    assert PROBLEM_CONTENT_TYPE == "application/problem+json"
