"""A 3-node cluster of real `ems serve` daemons on 127.0.0.1, reached through ems.connect.

Each daemon is a separate process (tests/cluster_rig.py). The cluster runs twice: once
with its membership in a real ZooKeeper, once with static peers. Every block is built by
make_block from its key, so a reader checks each hit byte for byte. The counters of the
clients (stats()) and of the daemons (STATS) show which path served a read: shared memory
of the local daemon, or a directory lookup and a TCP GET from the holder.
"""
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

import cluster_rig as rig
from conftest import make_block, make_key

import ems
import ems._core as core
from ems.errors import AuthenticationError

SECRET = rig.SECRET.encode()
CLUSTER = "test-cluster"       # ZooKeeper cluster name, apart from other tests' clusters
NODES = ["n1", "n2", "n3"]
TIMEOUT_MS = 1000              # client deadline per call
ANNOUNCE_WAIT_S = 5.0          # deadline for daemons to announce new keys to the directory
BLOCK_SIZES = (1024, 2000, 4096, 6000)


def block_size(i: int) -> int:
    """One of four sizes, so that a read of another key's block can fail on its length.

    Few sizes because each size class takes whole slabs, and a 64 MiB pool has 16.
    """
    return BLOCK_SIZES[i % len(BLOCK_SIZES)]


def make_blocks(tag: str, count: int) -> tuple[list[bytes], list[bytes]]:
    """Make `count` keys from `tag` and the block written under each."""
    keys = [make_key(i, tag) for i in range(count)]
    return keys, [make_block(key, 1, block_size(i)) for i, key in enumerate(keys)]


def read_blocks(client, keys: list[bytes], sizes: list[int]) -> tuple[list[bool], list]:
    """Read keys into fresh buffers of the given sizes; returns (hits, buffers)."""
    buffers = [bytearray(size) for size in sizes]
    return client.get_many_into(keys, buffers), buffers


def wrong_blocks(keys, blocks, hits, buffers) -> list[int]:
    """Indices of hits whose bytes differ from the block written under that key."""
    return [i for i, hit in enumerate(hits) if hit and bytes(buffers[i]) != blocks[i]]


def wait_for(predicate, timeout: float, interval: float = 0.1):
    """Call predicate until it returns a true value or `timeout` seconds pass; returns
    its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def read_until_all_hit(client, keys, blocks, timeout: float = ANNOUNCE_WAIT_S):
    """Read until every key hits or the deadline passes (new keys reach the directory
    a pump interval after the write); returns the last (hits, buffers)."""
    sizes = [len(block) for block in blocks]
    last = {}

    def attempt():
        last["result"] = read_blocks(client, keys, sizes)
        return all(last["result"][0])

    wait_for(attempt, timeout)
    return last["result"]


def daemon_stats(daemon: rig.DaemonProcess) -> dict:
    """The daemon's STATS over TCP."""
    conn = core.Connection("127.0.0.1", daemon.port, secret=SECRET, tenant="probe")
    try:
        return conn.stats()
    finally:
        conn.close()


class Cluster:
    """Running daemons, their membership settings and one client attached to each."""

    def __init__(self, kind: str, run_dir: str, daemons: list, membership: dict,
                 start_options: dict):
        self.kind = kind
        self.run_dir = run_dir
        self.daemons = {daemon.node_id: daemon for daemon in daemons}
        self.membership = membership          # ems.connect arguments
        self.start_options = start_options    # rig.start arguments
        self.clients = {}

    def start(self, node_id: str) -> None:
        """Start (or restart) node_id's daemon with the same port and socket."""
        rig.start(self.daemons[node_id], self.run_dir, capacity="64M", **self.start_options)

    def connect(self, node_id: str, **options):
        """A cluster-mode client attached to node_id's local socket."""
        options.setdefault("secret", SECRET)
        options.setdefault("timeout_ms", TIMEOUT_MS)
        return ems.connect("cluster", socket_path=self.daemons[node_id].socket_path,
                           **self.membership, **options)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        for daemon in self.daemons.values():
            rig.stop(daemon)


def start_cluster(kind: str, run_dir: str, zookeeper=None, name: str = CLUSTER) -> Cluster:
    """Start the daemons of NODES with ZooKeeper (cluster `name`) or static peers."""
    daemons = rig.plan(run_dir, NODES)
    if kind == "zookeeper":
        membership = {"zookeeper": zookeeper.hosts, "cluster": name}
        start_options = {"zookeeper": zookeeper.hosts, "extra": ("--cluster", name)}
    else:
        membership = {"peers": ",".join(daemon.peer for daemon in daemons)}
        start_options = {"peers": membership["peers"]}
    cluster = Cluster(kind, run_dir, daemons, membership, start_options)
    try:
        for node_id in NODES:
            cluster.start(node_id)
        for node_id in NODES:
            cluster.clients[node_id] = cluster.connect(node_id)
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="module", params=["zookeeper", "static"])
def cluster(request, tmp_path_factory):
    """Three daemons and a client on each; the ZooKeeper run skips without ZooKeeper."""
    zookeeper = request.getfixturevalue("zookeeper") if request.param == "zookeeper" else None
    run_dir = str(tmp_path_factory.mktemp(f"cluster-{request.param}"))
    cluster = start_cluster(request.param, run_dir, zookeeper)
    yield cluster
    cluster.close()


# ---- data path across nodes ---------------------------------------------------------------


def test_clients_see_all_three_nodes(cluster):
    for node_id, client in cluster.clients.items():
        assert sorted(client.membership.nodes()) == NODES, node_id


def test_blocks_read_on_every_other_node(cluster):
    for writer in NODES:
        keys, blocks = make_blocks(f"{cluster.kind}-cross-{writer}", 120)
        stored = cluster.clients[writer].put_many(keys, blocks)
        assert stored == len(keys), f"writer {writer}"

        for reader in NODES:
            if reader == writer:
                continue
            hits, buffers = read_until_all_hit(cluster.clients[reader], keys, blocks)
            assert hits.count(True) == len(keys), f"written on {writer}, read on {reader}"
            assert wrong_blocks(keys, blocks, hits, buffers) == [], \
                f"written on {writer}, read on {reader}"


def test_cross_node_reads_go_through_directory_and_tcp(cluster):
    keys, blocks = make_blocks(f"{cluster.kind}-counters", 80)
    writer, reader = cluster.clients["n1"], cluster.clients["n2"]
    assert writer.put_many(keys, blocks) == len(keys)
    # Wait until the directory contains every key, so the counted read is a single pass.
    wait_for(lambda: all(reader.exists_many(keys)), ANNOUNCE_WAIT_S)

    writer_before = daemon_stats(cluster.daemons["n1"])
    shards_before = sum(daemon_stats(d)["dir_lookups"] for d in cluster.daemons.values())
    client_before = reader.stats()
    hits, buffers = read_blocks(reader, keys, [len(b) for b in blocks])
    writer_after = daemon_stats(cluster.daemons["n1"])
    shards_after = sum(daemon_stats(d)["dir_lookups"] for d in cluster.daemons.values())
    client_after = reader.stats()

    assert hits.count(True) == len(keys)
    assert wrong_blocks(keys, blocks, hits, buffers) == []
    assert client_after["remote_hits"] - client_before["remote_hits"] == len(keys)
    assert client_after["local_hits"] == client_before["local_hits"]
    assert client_after["shared_memory_hits"] == client_before["shared_memory_hits"]
    assert writer_after["remote_get_hits"] - writer_before["remote_get_hits"] == len(keys)
    assert shards_after - shards_before >= len(keys)


def test_writes_are_stored_by_the_local_daemon(cluster):
    keys, blocks = make_blocks(f"{cluster.kind}-local-put", 60)
    before = daemon_stats(cluster.daemons["n3"])
    client_before = cluster.clients["n3"].stats()

    assert cluster.clients["n3"].put_many(keys, blocks) == len(keys)

    after = daemon_stats(cluster.daemons["n3"])
    assert after["local_puts"] - before["local_puts"] == len(keys)
    assert after["blocks"] - before["blocks"] == len(keys)
    client_after = cluster.clients["n3"].stats()
    assert client_after["local_puts"] - client_before["local_puts"] == len(keys)
    assert client_after["remote_puts"] == client_before["remote_puts"]


def test_same_host_reads_use_shared_memory(cluster):
    keys, blocks = make_blocks(f"{cluster.kind}-shm", 100)
    client = cluster.clients["n2"]
    assert client.put_many(keys, blocks) == len(keys)
    daemon_before = daemon_stats(cluster.daemons["n2"])
    shards_before = sum(daemon_stats(d)["dir_lookups"] for d in cluster.daemons.values())
    before = client.stats()

    hits, buffers = read_blocks(client, keys, [len(b) for b in blocks])

    after = client.stats()
    daemon_after = daemon_stats(cluster.daemons["n2"])
    shards_after = sum(daemon_stats(d)["dir_lookups"] for d in cluster.daemons.values())
    assert hits.count(True) == len(keys)
    assert wrong_blocks(keys, blocks, hits, buffers) == []
    assert after["local_hits"] - before["local_hits"] == len(keys)
    assert after["shared_memory_hits"] - before["shared_memory_hits"] == len(keys)
    assert after["remote_hits"] == before["remote_hits"]
    # Nothing crossed a socket: no TCP GET at the daemon, no directory lookup anywhere.
    assert daemon_after["remote_gets"] == daemon_before["remote_gets"]
    assert shards_after == shards_before


def test_match_prefix_across_nodes(cluster):
    # A chain of 90 keys: the first 30 written on n1, the next 30 on n2, the last 30 on n3.
    keys, blocks = make_blocks(f"{cluster.kind}-prefix", 90)
    for part, writer in enumerate(NODES):
        span = slice(30 * part, 30 * (part + 1))
        assert cluster.clients[writer].put_many(keys[span], blocks[span]) == 30
    absent = make_key(0, f"{cluster.kind}-prefix-absent")

    for node_id, client in cluster.clients.items():
        full = wait_for(lambda: client.match_prefix(keys) == len(keys), ANNOUNCE_WAIT_S)
        assert full, f"{node_id}: match_prefix {client.match_prefix(keys)} of {len(keys)}"
        assert client.match_prefix(keys[:45] + [absent] + keys[45:]) == 45, node_id
        assert client.match_prefix(keys[:75] + [absent]) == 75, node_id
        assert client.match_prefix([absent] + keys) == 0, node_id
        assert client.match_prefix(keys[30:60]) == 30, node_id


def test_exists_many_across_nodes(cluster):
    keys, blocks = make_blocks(f"{cluster.kind}-exists", 40)
    assert cluster.clients["n3"].put_many(keys, blocks) == len(keys)
    absent = [make_key(i, f"{cluster.kind}-exists-absent") for i in range(5)]

    reader = cluster.clients["n1"]
    assert wait_for(lambda: all(reader.exists_many(keys)), ANNOUNCE_WAIT_S)
    assert reader.exists_many(absent) == [False] * len(absent)


# ---- authentication -----------------------------------------------------------------------


@pytest.fixture
def no_secret_env(monkeypatch):
    """ems.connect falls back to EMS_SECRET and EMS_SECRET_FILE when secret is None."""
    monkeypatch.delenv("EMS_SECRET", raising=False)
    monkeypatch.delenv("EMS_SECRET_FILE", raising=False)


@pytest.mark.usefixtures("no_secret_env")
@pytest.mark.parametrize("mode", ["local", "cluster"])
@pytest.mark.parametrize("secret, message", [(None, "none was given"),
                                             (b"not-the-secret", "wrong cluster secret")])
def test_client_without_right_secret_rejected(cluster, mode, secret, message):
    daemon = cluster.daemons["n1"]
    failures_before = daemon_stats(daemon)["auth_failures"]
    threads_before = threading.active_count()
    options = cluster.membership if mode == "cluster" else {}

    with pytest.raises(AuthenticationError, match=message):
        ems.connect(mode, socket_path=daemon.socket_path, secret=secret, **options)

    if secret is not None:
        assert daemon_stats(daemon)["auth_failures"] == failures_before + 1
    # A cluster client that failed to attach must not leave its ZooKeeper session running.
    assert threading.active_count() == threads_before


def test_daemon_serves_after_rejected_clients(cluster, no_secret_env):
    daemon = cluster.daemons["n1"]
    for secret in (None, b"not-the-secret"):
        with pytest.raises(AuthenticationError):
            ems.connect("local", socket_path=daemon.socket_path, secret=secret)

    assert daemon.process.poll() is None
    keys, blocks = make_blocks(f"{cluster.kind}-after-auth", 20)
    with ems.connect("local", socket_path=daemon.socket_path, secret=SECRET) as client:
        assert client.put_many(keys, blocks) == len(keys)
        hits, buffers = read_blocks(client, keys, [len(b) for b in blocks])
    assert hits.count(True) == len(keys)
    assert wrong_blocks(keys, blocks, hits, buffers) == []


# ---- daemon lifecycle ---------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status, response.read().decode()


def series_labels(cluster, node_id: str) -> str:
    """Return the cluster and node labels of a daemon's series. Static peers run in the
    cluster named "default"."""
    name = CLUSTER if cluster.kind == "zookeeper" else "default"
    return f'cluster="{name}",node="{node_id}"'


def test_metrics_endpoint_serves_prometheus_text(cluster):
    for node_id, daemon in cluster.daemons.items():
        status, text = http_get(daemon.metrics_port, "/metrics")
        labels = series_labels(cluster, node_id)
        assert status == 200, node_id
        assert f'ems_pool_capacity_bytes{{{labels},tier="dram"}} 6.7108864e+07' \
            in text, node_id
        assert f'ems_cluster_nodes{{{labels}}} 3.0' in text, node_id


def test_activation_not_enforced_without_key(cluster):
    """Daemons without --manage-public-key serve and report that activation is off."""
    for node_id, daemon in cluster.daemons.items():
        status, text = http_get(daemon.metrics_port, "/activation")
        assert status == 200, node_id
        document = json.loads(text)
        assert document["state"] == "not_enforced", node_id
        assert document["serving"] is True, node_id
        assert document["enforced"] is False, node_id
        assert document["node_id"] == node_id
        _, metrics = http_get(daemon.metrics_port, "/metrics")
        assert f'ems_serving{{{series_labels(cluster, node_id)}}} 1.0' in metrics, node_id
        assert daemon.log().count("activation is not enforced") == 1, node_id


def test_healthz_ok_while_running(cluster):
    for node_id, daemon in cluster.daemons.items():
        assert http_get(daemon.metrics_port, "/healthz") == (200, "ok\n"), node_id


def test_sigterm_stops_daemon_cleanly(tmp_path):
    run_dir = str(tmp_path)
    (daemon,) = rig.plan(run_dir, ["solo"])
    rig.start(daemon, run_dir, capacity="16M")
    assert http_get(daemon.metrics_port, "/healthz") == (200, "ok\n")

    code = rig.stop(daemon, signal.SIGTERM)

    log = daemon.log()
    assert code == 0, log
    assert "node solo stopping" in log
    assert "node solo stopped" in log
    assert "Traceback" not in log
    assert not os.path.exists(daemon.socket_path)
    with pytest.raises(urllib.error.URLError):
        http_get(daemon.metrics_port, "/healthz")


def test_cluster_client_with_wrong_secret_fails_at_connect(tmp_path):
    """Without a local socket, a wrong secret must fail at connect, not as silent misses."""
    run_dir = str(tmp_path)
    (daemon,) = rig.plan(run_dir, ["solo"])
    rig.start(daemon, run_dir, peers=daemon.peer, capacity="32M")
    try:
        with pytest.raises(AuthenticationError, match="wrong cluster secret"):
            ems.connect("cluster", peers=daemon.peer, secret=b"not-the-secret")
        client = ems.connect("cluster", peers=daemon.peer, secret=rig.SECRET.encode())
        client.close()
    finally:
        rig.stop(daemon)


def test_daemon_refuses_a_node_id_missing_from_peers(tmp_path):
    run_dir = str(tmp_path)
    (daemon,) = rig.plan(run_dir, ["lost"])
    with pytest.raises(RuntimeError, match="is not in --peers"):
        rig.start(daemon, run_dir, peers="other=127.0.0.1:1", capacity="32M", timeout=15)


def test_daemon_refuses_its_id_listed_at_another_port(tmp_path):
    run_dir = str(tmp_path)
    (daemon,) = rig.plan(run_dir, ["twin"])
    with pytest.raises(RuntimeError, match="lists node 'twin' at 127.0.0.1:1"):
        rig.start(daemon, run_dir, peers="twin=127.0.0.1:1", capacity="32M", timeout=15)


def test_remote_wrong_buffer_size_raises(tmp_path):
    """A wrong buffer size is the caller's mistake on the remote path too, as on Pool."""
    run_dir = str(tmp_path)
    (daemon,) = rig.plan(run_dir, ["size"])
    rig.start(daemon, run_dir, peers=daemon.peer, capacity="32M")
    try:
        with ems.connect("cluster", peers=daemon.peer, secret=SECRET) as client:
            key = make_key(1, "size")
            assert client.put(key, make_block(key, 1, 4096))
            deadline = time.monotonic() + ANNOUNCE_WAIT_S
            while not client.exists(key) and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(ems.errors.BufferSizeError, match="4000 bytes"):
                client.get_into(key, bytearray(4000))
            out = bytearray(4096)
            assert client.get_into(key, out)
            assert bytes(out) == make_block(key, 1, 4096)
    finally:
        rig.stop(daemon)
