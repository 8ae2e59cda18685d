"""`ems uninstall` against real daemons and a real ZooKeeper: what it stops and deletes,
what it leaves alone, --dry-run, and the refusal to delete a cluster with live members."""
import json
import os
import subprocess
import sys
import time

import pytest
from kazoo.client import KazooClient

import cluster_rig as rig
from ems.daemon_record import process_start_ticks
from ems.tiering.store import SpillStore

EMS = [sys.executable, "-m", "ems.cli"]


def uninstall(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*EMS, "uninstall", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def write_segments(directory: str, count: int = 3) -> list[str]:
    """Spill `count` blocks into `directory` the way a daemon does; return the file names."""
    store = SpillStore(directory, quota_bytes=64 << 20, io="posix", segment_bytes=8192)
    try:
        store.put_many([bytes([i]) * 32 for i in range(count)], [b"x" * 5000] * count)
    finally:
        store.close()
    return sorted(os.listdir(directory))


@pytest.fixture
def zk(zookeeper):
    client = KazooClient(hosts=zookeeper.hosts)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


def test_uninstall_cluster_and_host(zookeeper, zk, tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    spill = str(tmp_path / "spill-a")
    os.makedirs(spill)
    segments = write_segments(spill)
    assert segments
    unrelated = [tmp_path / "run" / "engine.conf", tmp_path / "keep.txt"]
    for path in unrelated:
        path.write_text("not EMS's\n")
    cluster = "uninstall-all"
    a, b = rig.plan(run_dir, ["a", "b"])
    rig.start(a, run_dir, zookeeper=zookeeper.hosts,
              extra=("--cluster", cluster, "--spill-dir", spill, "--spill-size", "64M"))
    rig.start(b, run_dir, zookeeper=zookeeper.hosts, extra=("--cluster", cluster))
    try:
        assert sorted(zk.get_children(f"/ems/clusters/{cluster}/nodes")) == ["a", "b"]
        records = sorted(n for n in os.listdir(run_dir) if n.endswith(".daemon"))
        assert records == ["ems-a.daemon", "ems-b.daemon"]

        dry = uninstall("--run-dir", run_dir, "--zookeeper", zookeeper.hosts,
                        "--cluster", cluster, "--dry-run")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "would" in dry.stdout
        assert "stop daemon a" in dry.stdout
        assert "stop daemon b" in dry.stdout
        assert spill in dry.stdout
        assert "EMS reserves none itself" in dry.stdout
        assert a.process.poll() is None
        assert b.process.poll() is None
        assert zk.exists(f"/ems/clusters/{cluster}/nodes/a") is not None
        assert sorted(os.listdir(spill)) == segments

        done = uninstall("--run-dir", run_dir, "--zookeeper", zookeeper.hosts,
                         "--cluster", cluster, "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert a.process.wait(10) == 0
        assert b.process.wait(10) == 0
    finally:
        rig.stop(a)
        rig.stop(b)
    assert "stopped daemon a" in done.stdout
    assert "stopped daemon b" in done.stdout
    assert zk.exists(f"/ems/clusters/{cluster}") is None
    assert not os.path.exists(spill)
    assert not os.path.exists(a.socket_path)
    assert not os.path.exists(b.socket_path)
    assert sorted(os.listdir(run_dir)) == ["a.log", "b.log", "engine.conf"]
    for path in unrelated:
        assert path.read_text() == "not EMS's\n"


def test_live_member_blocks_delete(zookeeper, zk, tmp_path):
    """A member on another host (here: another run directory) keeps the cluster's records
    unless --force; its daemon is not touched either way."""
    run_dir = str(tmp_path / "other-host")
    os.makedirs(run_dir)
    cluster = "uninstall-live"
    (x,) = rig.plan(run_dir, ["x"])
    rig.start(x, run_dir, zookeeper=zookeeper.hosts, extra=("--cluster", cluster))
    empty_run_dir = str(tmp_path / "this-host")
    os.makedirs(empty_run_dir)
    try:
        refused = uninstall("--run-dir", empty_run_dir, "--zookeeper", zookeeper.hosts,
                            "--cluster", cluster, "--yes")
        assert refused.returncode == 1
        assert "live members" in refused.stderr
        assert "x" in refused.stderr
        assert zk.exists(f"/ems/clusters/{cluster}/nodes/x") is not None

        forced = uninstall("--run-dir", empty_run_dir, "--zookeeper", zookeeper.hosts,
                           "--cluster", cluster, "--yes", "--force")
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert zk.exists(f"/ems/clusters/{cluster}") is None
        assert x.process.poll() is None
    finally:
        assert rig.stop(x) == 0


def test_spill_dir_keeps_other_files(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    mixed = tmp_path / "mixed"
    os.makedirs(mixed)
    write_segments(str(mixed))
    (mixed / "notes.txt").write_text("mine\n")
    (mixed / "00000000000000000001-fake.seg").write_text("named like a segment\n")
    foreign = tmp_path / "foreign"
    os.makedirs(foreign)
    (foreign / "data.bin").write_bytes(b"\x00" * 10)

    result = uninstall("--run-dir", run_dir, "--spill-dir", str(mixed), "--spill-dir",
                       str(foreign), "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(mixed)) == ["00000000000000000001-fake.seg", "notes.txt"]
    assert os.listdir(foreign) == ["data.bin"]
    assert "not an EMS spill directory" in result.stdout


def test_reused_pid_is_not_signalled(tmp_path):
    """A record whose pid now belongs to another process (its start time differs) is a
    stopped daemon: its record goes, the process stays."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    other = subprocess.Popen(["sleep", "60"])
    try:
        record = {"pid": other.pid, "start_ticks": process_start_ticks(other.pid) - 1,
                  "node_id": "old", "cluster": "default", "socket": None, "spill_dir": None}
        (run_dir / "ems-old.daemon").write_text(json.dumps(record))
        result = uninstall("--run-dir", str(run_dir), "--yes")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "stopped daemon old" in result.stdout
        time.sleep(0.2)
        assert other.poll() is None
        assert not (run_dir / "ems-old.daemon").exists()
    finally:
        other.kill()
        other.wait()


def test_confirmation_required(tmp_path):
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    (run_dir / "ems-gone.daemon").write_text(json.dumps({"pid": 2 ** 22 + 1,
                                                         "node_id": "gone"}))
    result = uninstall("--run-dir", str(run_dir))
    assert result.returncode == 1
    assert "nothing removed" in result.stdout
    assert (run_dir / "ems-gone.daemon").exists()
