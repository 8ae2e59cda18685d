"""Rolling upgrades with `ems upgrade` against real `ems serve` daemons on 127.0.0.1.

The main test runs a 3-node cluster (membership in the real ZooKeeper) whose daemons start
as the previous protocol version (EMS_PROTO_MAX=1), puts a client load on it from separate
processes, some pinned to version 1 and some not (tests/upgrade_load.py), and upgrades
the nodes one at a time with `ems upgrade`. Its restart command (tests/upgrade_restart.py)
waits for the test before each restart, so that the test can check that every block
stored on a node that has not restarted since is still there, byte for byte. A block may
be lost only when it lived in the DRAM of a node that restarted after the block was
written. Smaller tests cover the dry run, a failed restart and draining a node of
protocol version 2, on two daemons with static peers.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import cluster_rig as rig
from conftest import make_block, make_key

import ems
import ems._core as core
from ems.cluster.membership import ZooKeeperMembership

SECRET = rig.SECRET.encode()
TESTS = os.path.dirname(os.path.abspath(__file__))
RESTART = os.path.join(TESTS, "upgrade_restart.py")
LOAD = os.path.join(TESTS, "upgrade_load.py")
TENANT = "load"               # the load workers' tenant
OLD = {"EMS_PROTO_MAX": "1"}  # environment of a daemon or client of the previous version
UPGRADE_TIMEOUT_S = 120.0     # bound of the whole `ems upgrade` run
SETTLE_S = 5.0                # time for the directory to be complete again after a restart


def run_upgrade(*args, timeout=UPGRADE_TIMEOUT_S):
    env = dict(os.environ, EMS_SECRET=rig.SECRET)
    return subprocess.run([sys.executable, "-m", "ems.cli", "upgrade", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def restart_cmd(run_dir: str) -> str:
    return f"{sys.executable} {RESTART} {run_dir} {{node}}"


def write_spec(run_dir, daemon, argv, env, gate):
    """Spec of upgrade_restart.py for the daemon, and its pid file."""
    pid_file = os.path.join(run_dir, f"{daemon.node_id}.pid")
    with open(pid_file, "w") as f:
        f.write(str(daemon.process.pid))
    spec = {"argv": argv, "env": env, "log": daemon.log_path, "pid_file": pid_file,
            "gate": gate}
    with open(os.path.join(run_dir, f"{daemon.node_id}.spec.json"), "w") as f:
        json.dump(spec, f)


def current_pid(run_dir, node_id) -> int:
    with open(os.path.join(run_dir, f"{node_id}.pid")) as f:
        return int(f.read())


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def stop_all(run_dir, daemons):
    """Stop every daemon the test started, whether the rig or the restart script did."""
    for daemon in daemons:
        pid_file = os.path.join(run_dir, f"{daemon.node_id}.pid")
        pid = current_pid(run_dir, daemon.node_id) if os.path.exists(pid_file) else None
        if pid is not None and (daemon.process is None or pid != daemon.process.pid) \
                and not pid_gone(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while not pid_gone(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
        rig.stop(daemon)    # reaps the first process


def connection(daemon, **options):
    options.setdefault("secret", SECRET)
    options.setdefault("tenant", TENANT)
    return core.Connection("127.0.0.1", daemon.port, **options)


def stats_of(daemon) -> dict:
    conn = connection(daemon, tenant="probe")
    try:
        return conn.stats()
    finally:
        conn.close()


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ---- the mixed-version cluster under load -------------------------------------------------

class Load:
    """The load workers: two of the previous version, two of this one."""

    WORKERS = [("old-a", True, "a"), ("old-b", True, "b"),
               ("new-c", False, "c"), ("new-a", False, "a")]

    def __init__(self, run_dir, daemons, zookeeper, cluster):
        self.run_dir = run_dir
        self.stop_file = os.path.join(run_dir, "load.stop")
        self.processes = {}
        names = [name for name, _, _ in self.WORKERS]
        for i, (name, old, node) in enumerate(self.WORKERS):
            peer = os.path.join(run_dir, f"{names[(i + 1) % len(names)]}.keys")
            env = dict(os.environ, EMS_SECRET=rig.SECRET, PYTHONPATH=os.pathsep.join(
                [TESTS, os.environ.get("PYTHONPATH", "")]))
            env.pop("EMS_PROTO_MIN", None)
            env.pop("EMS_PROTO_MAX", None)
            if old:
                env.update(OLD)
            argv = [sys.executable, LOAD, os.path.join(run_dir, name), self.stop_file,
                    daemons[node].socket_path, zookeeper, cluster, name, peer]
            log = open(os.path.join(run_dir, f"{name}.log"), "w")
            self.processes[name] = subprocess.Popen(argv, env=env, stdout=log,
                                                    stderr=subprocess.STDOUT)
            log.close()

    def records(self) -> list[dict]:
        """Every block the workers wrote so far, with its holders."""
        out = []
        for name in self.processes:
            path = os.path.join(self.run_dir, f"{name}.keys")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                data = f.read()
            out += [json.loads(line) for line in data[:data.rfind("\n") + 1].splitlines()]
        return out

    def stop(self) -> dict:
        open(self.stop_file, "w").close()
        summaries = {}
        for name, process in self.processes.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            path = os.path.join(self.run_dir, f"{name}.json")
            with open(path) as f:
                summaries[name] = json.load(f)
        return summaries

    def log(self, name) -> str:
        with open(os.path.join(self.run_dir, f"{name}.log")) as f:
            return f.read()


def stop_times(run_dir, restarted) -> dict:
    """Map each node whose restart began to the time its old process was gone, from
    upgrade_restart.py; infinity while it is still stopping."""
    times = {}
    for node_id in restarted:
        path = os.path.join(run_dir, f"{node_id}.stopped")
        if os.path.exists(path):
            with open(path) as f:
                times[node_id] = float(f.read())
        else:
            times[node_id] = float("inf")
    return times


def keepers(record, stopped: dict) -> list[str]:
    """The holders that must still store the block: those whose old process was not gone
    before the block was written (its time is taken before the write), so the block is not
    lost with a restarted node's DRAM."""
    return [node for node in record["holders"]
            if node not in stopped or record["t"] > stopped[node]]


def missing_blocks(daemons, records, stopped) -> list[str]:
    """Blocks that must be stored but are missing or wrong on the holder that keeps them,
    read straight from the holders' pools."""
    problems = []
    by_holder = {}
    for record in records:
        keep = keepers(record, stopped)
        if keep:
            by_holder.setdefault(keep[0], []).append(record)
    for node_id, batch in by_holder.items():
        conn = connection(daemons[node_id])
        try:
            keys = [bytes.fromhex(r["key"]) for r in batch]
            buffers = [bytearray(r["size"]) for r in batch]
            results = conn.get_many_into(keys, buffers, timeout_ms=5000)
        finally:
            conn.close()
        for record, key, buffer, result in zip(batch, keys, buffers, results):
            if result != record["size"] or bytes(buffer) != make_block(key, 1, record["size"]):
                problems.append(f"{record['key'][:16]} on {node_id}: result {result}")
    return problems


def node_v1_peers(daemon) -> dict | None:
    """The daemon's STATS once two node connections agreed on version 1, else None."""
    stats = stats_of(daemon)
    return stats if stats["hellos"]["1"]["node"] >= 2 else None


@pytest.fixture
def old_cluster(zookeeper, tmp_path):
    """Three daemons of the previous protocol version, registered in ZooKeeper."""
    run_dir = str(tmp_path)
    cluster = f"upgrade-{time.monotonic_ns()}"
    daemons = {d.node_id: d for d in rig.plan(run_dir, ["a", "b", "c"])}
    options = dict(zookeeper=zookeeper.hosts, extra=("--cluster", cluster))
    try:
        for daemon in daemons.values():
            rig.start(daemon, run_dir, env=OLD, **options)
            env = {**rig.daemon_env(run_dir), **OLD}
            write_spec(run_dir, daemon, rig.serve_args(daemon, **options), env, gate=True)
        yield run_dir, daemons, cluster
    finally:
        stop_all(run_dir, daemons.values())


def test_rolling_upgrade_under_mixed_load(zookeeper, old_cluster):
    run_dir, daemons, cluster = old_cluster
    members = ZooKeeperMembership(zookeeper.hosts, cluster)
    try:
        assert wait_for(lambda: len(members.nodes()) == 3, 10)
        for record in members.nodes().values():
            assert (record.proto_min, record.proto_max) == (1, 1)
        # A client of this version meets an old daemon at version 1.
        assert connection(daemons["a"]).version == 1

        load = Load(run_dir, daemons, zookeeper.hosts, cluster)
        try:
            assert wait_for(lambda: len(load.records()) >= 40, 20), "the load did not start"
            upgrade = subprocess.Popen(
                [sys.executable, "-m", "ems.cli", "upgrade", "--zookeeper", zookeeper.hosts,
                 "--cluster", cluster, "--restart-cmd", restart_cmd(run_dir), "--timeout", "60",
                 "--pause", "1", "--timeout-ms", "2000"],
                env=dict(os.environ, EMS_SECRET=rig.SECRET), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            restarted = {}      # node id -> time.time() its restart began
            problems = {}       # node id -> blocks missing before its restart
            mixed_stats = None
            deadline = time.monotonic() + UPGRADE_TIMEOUT_S
            while upgrade.poll() is None and time.monotonic() < deadline:
                for node_id in daemons:
                    ready = os.path.join(run_dir, f"{node_id}.ready")
                    if node_id in restarted or not os.path.exists(ready):
                        continue
                    # Before each restart: every block on a node that has not restarted
                    # since it was written is still there.
                    problems[node_id] = missing_blocks(daemons, load.records(),
                                                       stop_times(run_dir, restarted))
                    if node_id == "b":   # a runs version 2, b and c version 1
                        mixed_stats = wait_for(lambda: node_v1_peers(daemons["a"]), 5)
                    restarted[node_id] = time.time()
                    open(os.path.join(run_dir, f"{node_id}.go"), "w").close()
                time.sleep(0.05)
            if upgrade.poll() is None:
                upgrade.kill()
            out, err = upgrade.communicate()
            time.sleep(1.0)     # writes and reads on the upgraded cluster
        finally:
            summaries = load.stop()

        assert upgrade.returncode == 0, f"{out}\n{err}"
        assert sorted(restarted) == ["a", "b", "c"]
        # Each old daemon stopped cleanly on SIGTERM under the load.
        for daemon in daemons.values():
            assert daemon.process.wait(5) == 0, daemon.log()
            assert f"node {daemon.node_id} stopped" in daemon.log()
        assert "upgraded 3 of 3 nodes" in out
        assert out.count("drain: skipped, protocol version 1 has no DRAIN") == 3

        # No call raised and no read returned another block's bytes.
        for name, summary in summaries.items():
            assert summary["error"] is None, f"{name}: {summary['error']}\n{load.log(name)}"
            assert summary["wrong"] == [], name
            assert summary["rounds"] > 20, name
            assert summary["hits"] > 0, name
        assert summaries["old-a"]["protocol"] == 1
        assert summaries["new-c"]["protocol"] == core.PROTO_VERSION_MAX

        # Before each restart and after the last, every block that lived on a node that
        # had not restarted since it was written was still stored.
        for node_id, missing in problems.items():
            assert missing == [], f"before restarting {node_id}"
        records = load.records()
        stopped = stop_times(run_dir, restarted)
        assert missing_blocks(daemons, records, stopped) == []
        survivors = [r for r in records if keepers(r, stopped)]
        assert len(survivors) > 20

        # Mixed pairs agreed on version 1: the old daemons and old clients with the
        # upgraded node a.
        assert mixed_stats, "b and c did not connect to the upgraded a"
        hellos = mixed_stats["hellos"]
        assert hellos["1"]["node"] >= 2, hellos       # the pumps of b and c
        assert hellos["1"]["client"] > 0, hellos      # old workers
        assert hellos["2"]["client"] > 0, hellos      # new workers

        # After the upgrade: every record shows the build's range, new pairs agree on 2,
        # and c, restarted last, met only new daemons.
        assert wait_for(lambda: all(r.proto_max == core.PROTO_VERSION_MAX
                                    for r in members.nodes().values()), 10)
        assert sorted(members.nodes()) == ["a", "b", "c"]
        for daemon in daemons.values():
            assert connection(daemon).version == core.PROTO_VERSION_MAX
            assert connection(daemon, proto_max=1).version == 1
        hellos = stats_of(daemons["c"])["hellos"]
        assert hellos["1"]["node"] == 0, hellos
        assert hellos["2"]["node"] >= 2, hellos
        assert "connected to node a at protocol version 2" in daemons["c"].log()

        # The surviving blocks read through the cluster client, once the other nodes have
        # re-announced their keys to the restarted shards.
        client = ems.connect("cluster", zookeeper=zookeeper.hosts, cluster=cluster,
                             secret=SECRET, tenant=TENANT, timeout_ms=2000)
        try:
            keys = [bytes.fromhex(r["key"]) for r in survivors]

            def all_hit():
                buffers = [bytearray(r["size"]) for r in survivors]
                hits = client.get_many_into(keys, buffers)
                return all(hits) and all(bytes(b) == make_block(k, 1, len(b))
                                         for k, b in zip(keys, buffers))

            assert wait_for(all_hit, SETTLE_S, 0.2)

            # A drained node of version 2 publishes it, and new writes go elsewhere.
            node = connection(daemons["a"], role="node", tenant="probe")
            assert node.drain() >= 0
            assert wait_for(lambda: members.nodes()["a"].draining, 5)
            puts_before = stats_of(daemons["a"])["puts"]
            fresh = [make_key(i, "after-drain") for i in range(30)]
            assert wait_for(lambda: client.membership.nodes()["a"].draining, 5)
            stored = client.put_many(fresh, [make_block(k, 1, 2048) for k in fresh])
            assert stored == len(fresh)
            assert stats_of(daemons["a"])["puts"] == puts_before
            node.drain(False)
            assert wait_for(lambda: not members.nodes()["a"].draining, 5)
            node.close()
        finally:
            client.close()
    finally:
        members.close()


# ---- options, failures and draining on two static peers ----------------------------------

@pytest.fixture(scope="module")
def static_pair(tmp_path_factory):
    """Two daemons of this version with static peers."""
    run_dir = str(tmp_path_factory.mktemp("upgrade-static"))
    daemons = {d.node_id: d for d in rig.plan(run_dir, ["p", "q"])}
    peers = ",".join(d.peer for d in daemons.values())
    try:
        for daemon in daemons.values():
            rig.start(daemon, run_dir, peers=peers)
            write_spec(run_dir, daemon, rig.serve_args(daemon, peers=peers),
                       rig.daemon_env(run_dir), gate=False)
        yield run_dir, daemons, peers
    finally:
        stop_all(run_dir, daemons.values())


def test_upgrade_dry_run_changes_nothing(static_pair):
    run_dir, daemons, peers = static_pair
    pids = {n: current_pid(run_dir, n) for n in daemons}
    done = run_upgrade("--peers", peers, "--restart-cmd", "systemctl restart ems@{node}",
                       "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would drain node p, run: systemctl restart ems@p" in done.stdout
    assert "would drain node q, run: systemctl restart ems@q" in done.stdout
    assert "dry run: nothing was drained or restarted" in done.stdout
    for node_id, daemon in daemons.items():
        assert current_pid(run_dir, node_id) == pids[node_id]
        assert not pid_gone(pids[node_id])
        assert stats_of(daemon)["draining"] == 0


def test_upgrade_stops_at_failed_restart(static_pair):
    run_dir, daemons, peers = static_pair
    done = run_upgrade("--peers", peers, "--restart-cmd", "echo cannot restart {node}; exit 3",
                       "--pause", "0")
    assert done.returncode == 1
    assert "restart command of node p exited with 3" in done.stderr
    assert "cannot restart p" in done.stderr
    assert "stopped at node p: upgraded 0 of 2 nodes; not upgraded: p, q" in done.stdout
    # The node still runs its old process, which stores blocks again.
    assert "the old process still runs: draining ended" in done.stdout
    assert stats_of(daemons["p"])["draining"] == 0
    conn = connection(daemons["p"])
    key = make_key(0, "after failed restart")
    assert conn.put_many([key], [make_block(key, 1, 2048)]) == [0]


def test_upgrade_rejects_bad_template(static_pair):
    _, _, peers = static_pair
    done = run_upgrade("--peers", peers, "--restart-cmd", "restart {nodes}", "--dry-run")
    assert done.returncode == 2
    assert "--restart-cmd" in done.stderr
    assert "{node}, {host}, {port}" in done.stderr


def test_upgrade_drains_and_restarts_node(static_pair):
    run_dir, daemons, peers = static_pair
    old_pid = current_pid(run_dir, "p")
    key = make_key(1, "before restart")
    stored = connection(daemons["q"])
    assert stored.put_many([key], [make_block(key, 1, 2048)]) == [0]

    done = run_upgrade("--peers", peers, "--nodes", "p", "--restart-cmd", restart_cmd(run_dir),
                       "--metrics-port", str(daemons["p"].metrics_port), "--timeout", "60",
                       "--pause", "0")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "drain: no new blocks stored, no request in flight" in done.stdout
    assert "/healthz ok" in done.stdout
    assert "upgraded 1 of 1 nodes" in done.stdout
    assert pid_gone(old_pid)
    assert "draining, asked by" in daemons["p"].log()
    new = connection(daemons["p"])
    assert new.version == core.PROTO_VERSION_MAX
    assert new.stats()["draining"] == 0
    # q was not restarted, so its block is still there.
    buffer = bytearray(2048)
    assert stored.get_many_into([key], [buffer]) == [2048]
    assert buffer == make_block(key, 1, 2048)
