"""``idemproxy.config.redis_urls``: the URL forms of a Redis Cluster and of Sentinel, read and
redacted, without servers.
"""

from __future__ import annotations

from typing import Any

import pytest

from idemproxy.config.redis_urls import Address, ClusterUrl, SentinelUrl, parse_topology_url, redacted
from idemproxy.config.settings import ConfigError, StoreConfig, parse_config

# -- URL forms (no servers) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (
            "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380,[::1]:26381/mymaster",
            SentinelUrl((Address("127.0.0.1", 26379), Address("127.0.0.1", 26380), Address("::1", 26381)), "mymaster"),
        ),
        (
            "rediss+sentinel://:p%40ss@s1,s2:5000/my-master.1/3?sentinel_password=x",
            SentinelUrl(
                (Address("s1", 26379), Address("s2", 5000)),
                "my-master.1",
                db=3,
                password="p@ss",
                sentinel_password="x",
                tls=True,
            ),
        ),
        (
            "redis+cluster://alice:secret@10.0.0.1:7000,10.0.0.2",
            ClusterUrl((Address("10.0.0.1", 7000), Address("10.0.0.2", 6379)), "alice", "secret"),
        ),
        ("rediss+cluster://node:7000/", ClusterUrl((Address("node", 7000),), tls=True)),
    ],
)
def test_topology_urls_parse(url: str, parsed: SentinelUrl | ClusterUrl) -> None:
    assert parse_topology_url(url) == parsed
    assert parse_config({"store": url, "routes": [{"prefix": "/", "upstream": "http://t"}]}).store.url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://", "at least one HOST[:PORT]"),
        ("redis+sentinel://s1:26379", "/MASTER_NAME[/DB]"),
        ("redis+sentinel://s1:26379/", "/MASTER_NAME[/DB]"),
        ("redis+sentinel://s1:26379/name/x", "database number"),
        ("redis+sentinel://s1:26379/a/1/2", "/MASTER_NAME[/DB]"),
        ("redis+sentinel://s1:26379/bad name", "master name"),
        ("redis+sentinel://s1:99999/m", "port from 1 to 65535"),
        ("redis+sentinel://s1:x/m", "HOST[:PORT] items"),
        ("redis+sentinel://s1,,s2/m", "HOST[:PORT] items"),
        ("redis+sentinel://s1,s1/m", "listed twice"),
        ("redis+sentinel://s1/m?ssl=true", "unknown store URL option 'ssl'"),
        ("redis+cluster://n1:7000/2", "only database 0"),
        ("redis+cluster://n1:7000?sentinel_password=x", "takes no options"),
        ("redis+cluster://:hunter2@n1:7000/5", "only database 0"),
    ],
)
def test_bad_topology_urls_are_named_by_check_config(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": url, "routes": [{"prefix": "/", "upstream": "http://t"}]})
    (problem,) = caught.value.problems
    assert problem.startswith("store.url: ")
    assert message in problem
    assert "hunter2" not in problem


def test_redacted_hides_every_password() -> None:
    assert redacted("redis+sentinel://u:pw@s1,s2/m?sentinel_password=spw") == (
        "redis+sentinel://u:***@s1,s2/m?sentinel_password=***"
    )
    assert redacted("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted("sqlite:///ledger.db") == "sqlite:///ledger.db"


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"min_replicas_ack": -1}, "store.min_replicas_ack: expected a whole number of replicas"),
        ({"min_replicas_ack": True}, "store.min_replicas_ack: expected a whole number of replicas"),
        ({"min_replicas_ack": 1}, "store.min_replicas_ack: needs a Redis store"),
        ({"url": "redis://r", "replica_ack_timeout": 0}, "store.replica_ack_timeout: expected a duration"),
    ],
)
def test_replica_ack_settings_are_checked(store: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"store": store, "routes": [{"prefix": "/", "upstream": "http://t"}]})


def test_replica_ack_settings_are_read() -> None:
    store = {"url": "redis+cluster://n1", "min_replicas_ack": 2, "replica_ack_timeout": "250ms"}
    config = parse_config({"store": store, "routes": [{"prefix": "/", "upstream": "http://t"}]})
    assert config.store == StoreConfig(url="redis+cluster://n1", min_replicas_ack=2, replica_ack_timeout_s=0.25)
