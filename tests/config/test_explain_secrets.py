"""``check-config --explain`` prints no secret a probe URL carries: userinfo and query values
are masked, placeholders stay (they are filled per operation, not secrets)."""

from __future__ import annotations

import pytest

from idemproxy.config.explain import _without_secrets


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://user:pw@api.example.com/tickets?external_id={key}&api_key=s3cret&flag",
            "https://***@api.example.com/tickets?external_id={key}&api_key=***&flag",
        ),
        ("{upstream}/tickets?key={key}", "{upstream}/tickets?key={key}"),
        ("/lookup", "/lookup"),
    ],
)
def test_probe_url_secrets_are_masked(url: str, shown: str) -> None:
    assert _without_secrets(url) == shown
