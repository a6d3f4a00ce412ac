"""Real Redis topologies on loopback, for tests: a Redis Cluster and a Sentinel setup.

- ``RedisClusterTopology``: three masters (each with one replica unless
  ``replicas=0``), made a cluster by ``redis-cli --cluster create``.
- ``SentinelTopology``: one master, one replica and three sentinels watching
  them; ``failover()`` SIGKILLs the master (or asks for ``SENTINEL
  FAILOVER``) and waits until the sentinels promote the replica.

Every process runs in its own directory under the test's temporary path, on a
free port, and is SIGKILLed by ``stop()``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.crc import key_slot

from idemproxy.config.settings import StoreConfig
from idemproxy.store import open_store
from idemproxy.store.redis import RedisStore
from tests.support.records import new_op_id
from tests.support.redis_server import RedisServer, restartable_port

#: How long a topology may take to form, or a failover to complete.
SETTLE_S = 20.0


TopologyT = TypeVar("TopologyT", "RedisClusterTopology", "SentinelTopology")


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = SETTLE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def running(topology: TopologyT) -> Iterator[TopologyT]:
    """``topology`` started, and stopped (every process it started) on exit."""
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


def role(node: RedisNode) -> str:
    """``master``, ``slave`` or ``sentinel``."""
    reply = node.call("ROLE")
    assert isinstance(reply, list)
    return bytes(reply[0]).decode()


def link_up(replica: RedisNode) -> bool:
    with replica.client() as client:
        return bool(client.info("replication").get("master_link_status") == "up")


def online_replicas(master: RedisNode) -> set[int]:
    """Ports of the replicas ``master`` streams to: only those count for ``WAIT``. (After a
    sync, a master waits for the replica's first acknowledgment, up to a second, first.)"""
    with master.client() as client:
        replication = client.info("replication")
    return {
        int(value["port"])
        for name, value in replication.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    }


def wait_in_sync(master: RedisNode, replica: RedisNode) -> None:
    """Until ``replica`` has applied everything ``master`` wrote so far, and ``master`` knows it."""
    with master.client() as client:
        target = int(client.info("replication")["master_repl_offset"])

    def caught_up() -> bool:
        with replica.client() as client:
            replication = client.info("replication")
        applied = replication.get("master_link_status") == "up" and int(replication["slave_repl_offset"]) >= target
        return applied and replica.port in online_replicas(master)

    wait_until(caught_up, f"127.0.0.1:{replica.port} caught up with its master")


class RedisNode(RedisServer):
    """A redis-server with extra arguments (cluster mode, ``--replicaof``) or a sentinel."""

    def __init__(self, directory: Path, extra: list[str] | None = None, *, sentinel_of: int | None = None) -> None:
        super().__init__(directory)
        self.extra = extra or []
        self.sentinel_of = sentinel_of

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def call(self, *command: str | int) -> object:
        with self.client() as client:
            return client.execute_command(*command)

    def node_id(self) -> str:
        """The cluster node id (``CLUSTER MYID``)."""
        reply = self.call("CLUSTER", "MYID")
        assert isinstance(reply, bytes)
        return reply.decode()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server (SIGSTOP pauses it: a replica then misses writes)."""
        assert self.process is not None
        self.process.send_signal(signum)

    def start(self) -> None:
        if self.sentinel_of is not None:
            self._start_sentinel(self.sentinel_of)
            return
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                # These tests are about replication, not disks: fsyncs and the AOF
                # rewrite after a sync only delay replica acknowledgments (WAIT)
                # on a busy machine.
                "--appendonly", "no",
                "--save", "",
                "--protected-mode", "no",
                "--logfile", str(self.directory / "redis.log"),
                # Replicas sync at once (the default waits 5 s for more replicas to join).
                "--repl-diskless-sync-delay", "0",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_ready()

    def _start_sentinel(self, master_port: int) -> None:
        config = self.directory / "sentinel.conf"
        if not config.exists():  # a restarted sentinel keeps what it learned
            config.write_text(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.directory}\n"
                f"logfile {self.directory / 'redis.log'}\n"
                "protected-mode no\n"
                f"sentinel monitor {SentinelTopology.MASTER_NAME} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {SentinelTopology.MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {SentinelTopology.MASTER_NAME} 3000\n"
            )
        self.process = subprocess.Popen(
            [self.binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready()

    def replicate(self, master_port: int) -> None:
        """(Re)start as a replica of ``master_port``, keeping this node's port."""
        self.kill()
        self.extra = ["--replicaof", "127.0.0.1", str(master_port)]
        self.start()


class RedisClusterTopology:
    """Three masters covering all 16384 slots, each with ``replicas`` replicas."""

    MASTERS = 3

    def __init__(self, directory: Path, replicas: int = 1) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH; `make test` installs it (apt-get install redis-server)")
        self.cli = cli
        self.replicas = replicas
        count = self.MASTERS * (1 + replicas)
        self.nodes = [self._node(directory / f"node-{n}") for n in range(count)]
        self._slots: list[tuple[int, int, RedisNode]] = []

    @staticmethod
    def _node(directory: Path) -> RedisNode:
        return RedisNode(
            directory,
            [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(directory / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                # An explicit bus port: the default (port + 10000) may be taken, or above 65535;
                # below the ephemeral range, which connections made meanwhile may take from.
                "--cluster-port", str(restartable_port()),
            ],
        )  # fmt: skip

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:2])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                self.cli, "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=SETTLE_S,
        )  # fmt: skip
        wait_until(self._formed, "the cluster is formed")

    def _formed(self) -> bool:
        for node in self.nodes:
            info = str(node.call("CLUSTER", "INFO"))
            if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                return False
        replicas = self.replica_nodes()  # a replica may still be a master until it learns its own
        if len(replicas) != self.MASTERS * self.replicas:
            return False
        streamed_to = set().union(*(online_replicas(master) for master in self.master_nodes()))
        return all(link_up(node) and node.port in streamed_to for node in replicas)

    def running(self) -> list[RedisNode]:
        return [node for node in self.nodes if node.process is not None]

    def master_nodes(self) -> list[RedisNode]:
        return [node for node in self.running() if role(node) == "master"]

    def replica_nodes(self) -> list[RedisNode]:
        return [node for node in self.running() if role(node) == "slave"]

    def kill_master(self, master: RedisNode, *, paused: RedisNode | None = None) -> RedisNode:
        """SIGKILL ``master`` and wait until its replica has taken its slots over; the new master.

        ``paused``: its replica, paused (SIGSTOP) while the master took writes, woken only once
        the master is dead: it is promoted without them."""
        replica = paused or self.replica_of(master)
        master.kill()
        if paused is not None:
            paused.signal(signal.SIGCONT)
        self._slots.clear()

        def took_over() -> bool:
            infos = [str(node.call("CLUSTER", "INFO")) for node in self.running()]
            return role(replica) == "master" and all("cluster_state:ok" in info for info in infos)

        wait_until(took_over, "the replica took over")
        return replica

    def rejoin(self, node: RedisNode) -> None:
        """Restart a killed node: it rejoins as a replica (its nodes.conf remembers the cluster)."""
        node.start()
        wait_until(lambda: role(node) == "slave" and link_up(node), "the node rejoined as a replica")

    def replica_of(self, master: RedisNode) -> RedisNode:
        for node in self.replica_nodes():
            reply = node.call("ROLE")
            assert isinstance(reply, list)
            if int(reply[2]) == master.port:
                return node
        raise LookupError(f"no replica of 127.0.0.1:{master.port}")

    def migrate_slot(self, slot: int, source: RedisNode, target: RedisNode) -> None:
        """Move ``slot`` and its keys from master ``source`` to master ``target``, as
        ``redis-cli --cluster reshard`` does: no master changes."""
        source_id, target_id = source.node_id(), target.node_id()
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := source.call("CLUSTER", "GETKEYSINSLOT", slot, 100):
            assert isinstance(keys, list)
            source.call("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *(key.decode() for key in keys))
        for node in (target, source, *(node for node in self.master_nodes() if node not in (source, target))):
            node.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self._slots.clear()

    def node_for_key(self, key: str) -> RedisNode:
        """The master that owns ``key``'s slot (as ``CLUSTER SLOTS`` said when first asked)."""
        if not self._slots:
            shards = self.running()[0].call("CLUSTER", "SLOTS")
            assert isinstance(shards, list)
            for start, end, owner, *_ in shards:
                node = next(node for node in self.nodes if node.port == int(owner[1]))
                self._slots.append((int(start), int(end), node))
        slot = key_slot(key.encode())
        return next(node for start, end, node in self._slots if start <= slot <= end)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class SentinelTopology:
    """One master, one replica, three sentinels (quorum 2)."""

    MASTER_NAME = "idem-test"

    def __init__(self, directory: Path) -> None:
        self.master = RedisNode(directory / "master")
        self.replica = RedisNode(directory / "replica", ["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinels = [RedisNode(directory / f"sentinel-{n}", sentinel_of=self.master.port) for n in range(3)]
        self._all = [self.master, self.replica, *self.sentinels]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.MASTER_NAME}"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        wait_in_sync(self.master, self.replica)
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self._watching, "every sentinel sees the replica and the other sentinels")

    def _watching(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                state = client.sentinel_master(self.MASTER_NAME)
            if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                return False
        return True

    def master_port(self) -> int:
        """The master's port as the sentinels report it (a majority must agree)."""
        ports: list[int] = []
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    address = client.sentinel_get_master_addr_by_name(self.MASTER_NAME)
                ports.append(int(address[1]))
            except redis.RedisError:
                continue
        winner = max(set(ports), key=ports.count)
        if ports.count(winner) < 2:
            raise RuntimeError(f"the sentinels disagree about the master: {ports}")
        return winner

    def node(self, port: int) -> RedisNode:
        return next(node for node in (self.master, self.replica) if node.port == port)

    def failover(self, *, kill: bool = True, resume: RedisNode | None = None) -> tuple[RedisNode, RedisNode]:
        """Fail the master over to the replica; (old master, new master).

        ``kill``: SIGKILL the master (it stays down) and wait for the sentinels
        to notice and promote the replica. Otherwise ask for ``SENTINEL
        FAILOVER``: the old master keeps running, and accepting writes, until
        the sentinels make it a replica of the new one (some 8 s later).
        ``resume``: a replica paused (SIGSTOP) while the master took writes, woken only once
        the master is dead: it is promoted without them."""
        old = self.node(self.master_port())
        new = self.replica if old is self.master else self.master
        if kill:
            old.kill()
        else:
            self.sentinels[0].call("SENTINEL", "FAILOVER", self.MASTER_NAME)
        if resume is not None:
            resume.signal(signal.SIGCONT)
        wait_until(lambda: self.master_port() == new.port and role(new) == "master", "the replica is promoted")
        return old, new

    def stop(self) -> None:
        for node in self._all:
            node.kill()


@contextlib.asynccontextmanager
async def started_store(config: StoreConfig) -> AsyncIterator[RedisStore]:
    """The Redis store for ``config``, started, and closed on exit."""
    store = open_store(config)
    assert isinstance(store, RedisStore)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def started(url: str, **settings: Any) -> AsyncIterator[RedisStore]:
    """``started_store`` for the store at ``url`` with ``settings``."""
    async with started_store(StoreConfig(url=url, **settings)) as store:
        yield store


def op_id_on(cluster: RedisClusterTopology, master: RedisNode, store: RedisStore) -> str:
    """A fresh op id whose keys live on ``master``."""
    while True:
        op_id = new_op_id()
        if cluster.node_for_key(store.keys.record(op_id)) is master:
            return op_id
