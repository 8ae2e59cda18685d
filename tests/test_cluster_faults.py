"""Faults in a cluster of real `ems serve` daemons on 127.0.0.1: a daemon killed with
SIGKILL under load and restarted, ZooKeeper stopped mid-run, a daemon paused with SIGSTOP.

The cache rules under test: a failed or slow node turns into misses within the client's
deadline, never into an exception or a wrong block, and the cluster serves again once
the node is back. Every hit is compared byte for byte with the block written under its
key (make_block).
"""
import os
import random
import signal
import threading
import time
import traceback

import pytest

import cluster_rig as rig
from test_cluster import (NODES, daemon_stats, make_blocks, read_blocks, read_until_all_hit,
                          start_cluster, wait_for, wrong_blocks)

import ems._core as core
from ems.client import PEER_BACKOFF_S, directory_shards

FAULT_TIMEOUT_MS = 300         # client deadline in the fault tests
LOAD_BATCH = 8                 # blocks written per step of a load thread
LOAD_SAMPLE = 48               # blocks read back per step
LOAD_PAUSE_S = 0.05            # between steps, so the load stays far below max_blocks
ZOOKEEPER_SESSION_S = 10.0     # the daemons' session timeout (membership default)
KILL_CLUSTER = "test-cluster-kill"   # ZooKeeper cluster name of the SIGKILL scenario


class Load:
    """One thread per client that writes new blocks and reads back a sample of all the
    blocks written so far, counting hits and misses per phase and recording every
    exception and every wrong block."""

    def __init__(self, clients: dict):
        self.written: list[tuple[bytes, bytes]] = []
        self.errors: list[str] = []
        self.wrong: list[str] = []
        self.phase = "before"
        self.counts = {phase: {"reads": 0, "hits": 0} for phase in ("before", "after")}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(node_id, client),
                                          name=f"load-{node_id}")
                         for node_id, client in clients.items()]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, node_id: str, client) -> None:
        rng = random.Random(node_id)
        step = 0
        try:
            while not self._stop.wait(LOAD_PAUSE_S):
                keys, blocks = make_blocks(f"load-{node_id}-{step}", LOAD_BATCH)
                step += 1
                client.put_many(keys, blocks)
                with self._lock:
                    self.written.extend(zip(keys, blocks))
                    sample = rng.sample(self.written, min(LOAD_SAMPLE, len(self.written)))
                    phase = self.phase

                sample_keys = [key for key, _ in sample]
                sample_blocks = [block for _, block in sample]
                hits, buffers = read_blocks(client, sample_keys, [len(b) for b in sample_blocks])
                bad = wrong_blocks(sample_keys, sample_blocks, hits, buffers)
                with self._lock:
                    self.counts[phase]["reads"] += len(sample)
                    self.counts[phase]["hits"] += hits.count(True)
                    self.wrong += [f"{node_id}: key {sample_keys[i].hex()}" for i in bad]
        except Exception:
            self.errors.append(f"{node_id}: {traceback.format_exc()}")


def shard_keys(membership_nodes: dict, keys: list[bytes], node_id: str) -> list[bytes]:
    """The keys whose directory shard is node_id."""
    nodes = sorted(membership_nodes.values(), key=lambda record: record.node_id)
    shards = directory_shards(core.tenant_keys("default", keys), nodes)
    return [key for key, shard in zip(keys, shards) if nodes[int(shard)].node_id == node_id]


def poll_put(client, keys, blocks, timeout: float) -> int:
    """Write until every block is stored or the deadline passes; returns the last count."""
    last = {"stored": 0}

    def attempt():
        last["stored"] = client.put_many(keys, blocks)
        return last["stored"] == len(keys)

    wait_for(attempt, timeout, interval=0.2)
    return last["stored"]


# ---- SIGKILL under load, then restart -------------------------------------------------------


@pytest.fixture(scope="module", params=["zookeeper", "static"])
def killed_and_restarted(request, tmp_path_factory):
    """Kill n2 with SIGKILL under a read/write load on all three nodes, restart it with
    the same node id and port, and record what the clients saw in each phase."""
    zookeeper = request.getfixturevalue("zookeeper") if request.param == "zookeeper" else None
    run_dir = str(tmp_path_factory.mktemp(f"kill-{request.param}"))
    cluster = start_cluster(request.param, run_dir, zookeeper, name=KILL_CLUSTER)
    victim = cluster.daemons["n2"]
    seen = {"kind": request.param}
    load_clients = {}
    try:
        # Blocks held by each node before the fault.
        seeds = {}
        for node_id in NODES:
            seeds[node_id] = make_blocks(f"seed-{request.param}-{node_id}", 90)
            assert cluster.clients[node_id].put_many(*seeds[node_id]) == 90
        members = cluster.clients["n1"].membership.nodes()

        load_clients = {node_id: cluster.connect(node_id, timeout_ms=FAULT_TIMEOUT_MS)
                        for node_id in NODES}
        with Load(load_clients) as load:
            time.sleep(1.0)
            rig.stop(victim, signal.SIGKILL)
            with load._lock:
                load.phase = "after"
            time.sleep(1.5)
        seen["load"] = load

        # Calls of a client whose local daemon is dead turn into misses.
        orphan = cluster.clients["n2"]
        keys, blocks = seeds["n1"]
        seen["orphan_errors"] = []
        for call, args in (("delete", (keys[0],)), ("put_many", (keys[:5], blocks[:5])),
                           ("exists_many", (keys,)), ("match_prefix", (keys,))):
            try:
                getattr(orphan, call)(*args)
            except Exception as exc:
                seen["orphan_errors"].append(f"{call}: {exc!r}")

        # With ZooKeeper, the node id is free again once n2's session expired.
        if zookeeper is not None:
            seen["left"] = wait_for(
                lambda: "n2" not in cluster.clients["n1"].membership.nodes(),
                ZOOKEEPER_SESSION_S + 10)
        restarted_at = time.monotonic()
        cluster.start("n2")
        seen["restarted_blocks"] = daemon_stats(victim)["blocks"]

        # The survivors serve each other's blocks.
        keys, blocks = seeds["n3"]
        hits, buffers = read_until_all_hit(cluster.clients["n1"], keys, blocks)
        seen["survivor_hits"] = hits.count(True)
        seen["survivor_wrong"] = wrong_blocks(keys, blocks, hits, buffers)

        # A new client of the restarted node writes, and another node reads the blocks.
        fresh = cluster.connect("n2")
        keys, blocks = make_blocks(f"after-restart-{request.param}", 50)
        seen["fresh_stored"] = fresh.put_many(keys, blocks)
        hits, buffers = read_until_all_hit(cluster.clients["n3"], keys, blocks)
        seen["fresh_read_hits"] = hits.count(True)
        seen["fresh_read_wrong"] = wrong_blocks(keys, blocks, hits, buffers)

        # Blocks held by the survivors whose directory shard is n2: readable only once
        # the survivors re-announced them to the restarted node's empty shard.
        survivor_blocks = [pair for node_id in ("n1", "n3") for pair in zip(*seeds[node_id])]
        by_key = dict(survivor_blocks)
        keys = shard_keys(members, [key for key, _ in survivor_blocks], "n2")
        blocks = [by_key[key] for key in keys]
        seen["shard_keys"] = len(keys)
        hits, buffers = read_until_all_hit(fresh, keys, blocks, timeout=10.0)
        seen["shard_hits"] = hits.count(True)
        seen["shard_wrong"] = wrong_blocks(keys, blocks, hits, buffers)
        seen["shard_wait_s"] = time.monotonic() - restarted_at
        fresh.close()

        # The client that was attached to n2 before the kill writes through it again.
        keys, blocks = make_blocks(f"old-client-{request.param}", 30)
        seen["old_client_stored"] = poll_put(cluster.clients["n2"], keys, blocks, 5.0)
        hits, buffers = read_until_all_hit(cluster.clients["n1"], keys, blocks)
        seen["old_client_read_hits"] = hits.count(True)
        seen["logs"] = {node_id: daemon.log() for node_id, daemon in cluster.daemons.items()}
        yield seen
    finally:
        for client in load_clients.values():
            client.close()
        cluster.close()


def log_tails(seen: dict) -> str:
    """The end of each daemon's log, for failure messages."""
    return "\n".join(f"--- {node_id}\n{log[-2500:]}" for node_id, log in seen["logs"].items())


def test_kill_under_load_raises_nothing(killed_and_restarted):
    assert killed_and_restarted["load"].errors == []


def test_kill_under_load_returns_no_wrong_block(killed_and_restarted):
    assert killed_and_restarted["load"].wrong == []


def test_kill_under_load_turns_into_misses(killed_and_restarted):
    counts = killed_and_restarted["load"].counts
    # Before the kill, a block written by another thread a moment ago can still miss
    # (it reaches the directory a pump interval later), so only hits are required.
    assert counts["before"]["hits"] > 0
    # The load went on after the kill: the survivors served hits, n2's blocks missed.
    assert counts["after"]["reads"] > 0
    assert 0 < counts["after"]["hits"] < counts["after"]["reads"]


def test_client_of_killed_node_raises_nothing(killed_and_restarted):
    assert killed_and_restarted["orphan_errors"] == []


def test_killed_node_leaves_zookeeper(killed_and_restarted):
    if killed_and_restarted["kind"] != "zookeeper":
        pytest.skip("static peers have no leave")
    assert killed_and_restarted["left"]


def test_restarted_node_starts_empty(killed_and_restarted):
    assert killed_and_restarted["restarted_blocks"] == 0


def test_survivors_serve_after_restart(killed_and_restarted):
    assert killed_and_restarted["survivor_hits"] == 90, log_tails(killed_and_restarted)
    assert killed_and_restarted["survivor_wrong"] == []


def test_writes_through_restarted_node(killed_and_restarted):
    assert killed_and_restarted["fresh_stored"] == 50
    assert killed_and_restarted["fresh_read_hits"] == 50
    assert killed_and_restarted["fresh_read_wrong"] == []


def test_restarted_node_shard_rebuilt(killed_and_restarted):
    seen = killed_and_restarted
    assert seen["shard_keys"] > 0
    assert seen["shard_hits"] == seen["shard_keys"], \
        f"after {seen['shard_wait_s']:.1f} s\n{log_tails(seen)}"
    assert seen["shard_wrong"] == []


def test_old_client_of_restarted_node_writes_again(killed_and_restarted):
    assert killed_and_restarted["old_client_stored"] == 30
    assert killed_and_restarted["old_client_read_hits"] == 30


# ---- ZooKeeper stopped mid-run ---------------------------------------------------------------


@pytest.fixture
def own_zookeeper(tmp_path):
    """A ZooKeeper server of this test alone, because the test stops it."""
    from zookeeper_server import ZooKeeperMissing, ZooKeeperServer
    directory = tmp_path / "zookeeper"
    directory.mkdir()
    try:
        server = ZooKeeperServer(directory)
    except ZooKeeperMissing as exc:
        pytest.skip(f"no ZooKeeper server to test with: {exc}")
    with server:
        yield server


def test_zookeeper_stop_keeps_data_path(own_zookeeper, tmp_path):
    run_dir = str(tmp_path / "run")
    os.mkdir(run_dir)
    cluster = start_cluster("zookeeper", run_dir, own_zookeeper)
    try:
        before_keys, before_blocks = make_blocks("before-zookeeper-stop", 60)
        assert cluster.clients["n1"].put_many(before_keys, before_blocks) == 60

        own_zookeeper.stop()
        lost = "ZooKeeper connection lost; serving with the last membership of 3 nodes"
        for node_id, daemon in cluster.daemons.items():
            assert wait_for(lambda: lost in daemon.log(), 10.0), \
                f"{node_id} log:\n{daemon.log()[-2000:]}"

        # Blocks written before the outage are read through every other node.
        for reader in ("n2", "n3"):
            hits, buffers = read_until_all_hit(cluster.clients[reader], before_keys,
                                               before_blocks)
            assert hits.count(True) == 60, reader
            assert wrong_blocks(before_keys, before_blocks, hits, buffers) == [], reader

        # Blocks written during the outage too.
        keys, blocks = make_blocks("during-zookeeper-stop", 60)
        assert cluster.clients["n3"].put_many(keys, blocks) == 60
        for reader in ("n1", "n2"):
            hits, buffers = read_until_all_hit(cluster.clients[reader], keys, blocks)
            assert hits.count(True) == 60, reader
            assert wrong_blocks(keys, blocks, hits, buffers) == [], reader
        assert cluster.clients["n2"].match_prefix(before_keys + keys) == 120

        for node_id, client in cluster.clients.items():
            assert sorted(client.membership.nodes()) == NODES, node_id
        for daemon in cluster.daemons.values():
            assert daemon.process.poll() is None, daemon.log()[-2000:]
    finally:
        cluster.close()

    for node_id, daemon in cluster.daemons.items():
        assert daemon.process.returncode == 0, f"{node_id} log:\n{daemon.log()[-2000:]}"


# ---- SIGSTOP: a peer that stops responding ------------------------------------------------


@pytest.fixture
def static_cluster(tmp_path):
    cluster = start_cluster("static", str(tmp_path))
    yield cluster
    for daemon in cluster.daemons.values():
        if daemon.process is not None and daemon.process.poll() is None:
            os.kill(daemon.process.pid, signal.SIGCONT)
    cluster.close()


def test_stopped_peer_costs_at_most_deadline(static_cluster):
    cluster = static_cluster
    victim = cluster.daemons["n2"]
    keys, blocks = make_blocks("held-by-n2", 80)
    assert cluster.clients["n2"].put_many(keys, blocks) == 80
    reader = cluster.connect("n1", timeout_ms=FAULT_TIMEOUT_MS)
    try:
        hits, _ = read_until_all_hit(reader, keys, blocks)
        assert hits.count(True) == 80

        os.kill(victim.process.pid, signal.SIGSTOP)
        try:
            durations = []
            for _ in range(3):
                started = time.monotonic()
                hits, buffers = read_blocks(reader, keys, [len(b) for b in blocks])
                durations.append(time.monotonic() - started)
                assert hits.count(True) == 0
            # Let the client's back-off of the failed peer pass, so it tries n2 again.
            time.sleep(PEER_BACKOFF_S + 0.2)
            started = time.monotonic()
            hits, buffers = read_blocks(reader, keys, [len(b) for b in blocks])
            durations.append(time.monotonic() - started)
            assert hits.count(True) == 0
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)

        # One deadline per call, plus scheduling slack on a loaded machine.
        limit = 2 * FAULT_TIMEOUT_MS / 1000
        assert max(durations) < limit, durations
        assert reader.stats()["peer_errors"] > 0

        hits, buffers = read_until_all_hit(reader, keys, blocks)
        assert hits.count(True) == 80
        assert wrong_blocks(keys, blocks, hits, buffers) == []
    finally:
        reader.close()
