"""Daemons with a spill tier: real `ems serve` processes, real directories, loopback TCP.

A daemon's pool is kept small (16 MiB), so the blocks written through it are evicted to its
spill directory. Reads then come back from disk through the daemon's miss handler, over the
local socket and over TCP. Payloads derive from their keys and are checked byte
for byte.
"""
import hashlib
import time
import urllib.request

import pytest

import cluster_rig as rig
import ems

SIZE = 256 << 10
N = 160            # 40 MiB of blocks through a 16 MiB pool


def key(i: int) -> bytes:
    return hashlib.blake2b(f"daemon-spill-{i}".encode(), digest_size=32).digest()


def payload(i: int) -> bytes:
    seed = hashlib.blake2b(f"daemon-spill-payload-{i}".encode()).digest()
    return (seed * (SIZE // len(seed) + 1))[:SIZE]


def spill_args(directory, shared=False):
    args = ("--spill-dir", str(directory), "--spill-size", "1G", "--slab-size", "1M")
    return args + (("--spill-shared",) if shared else ())


def local_client(daemon):
    return ems.connect("local", socket_path=daemon.socket_path, secret=rig.SECRET.encode())


def read_back(client, indices, batch=16):
    """Read in batches of 4 MiB, as an engine reads a request's blocks: one batch that
    promotes more than DRAM holds would evict its own first blocks again."""
    back = []
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        buffers = [bytearray(SIZE) for _ in chunk]
        found = client.get_many_into([key(i) for i in chunk], buffers)
        wrong = [i for i, ok, b in zip(chunk, found, buffers) if ok and b != payload(i)]
        assert not wrong, f"blocks {wrong[:5]} came back wrong"
        back.extend(i for i, ok in zip(chunk, found) if ok)
    return back


def metrics(daemon) -> str:
    url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str, tier: str = "disk") -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'tier="{tier}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} with tier={tier} not exposed")


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path)


def test_spill_serve_and_survive_restart(run_dir, tmp_path):
    (a,) = rig.plan(run_dir, ["a"])
    spill = tmp_path / "spill"
    rig.start(a, run_dir, peers=a.peer, capacity="16M", extra=spill_args(spill))
    try:
        with local_client(a) as client:
            assert client.put_many([key(i) for i in range(N)], [payload(i) for i in range(N)]) == N
            wait_for(lambda: metric(metrics(a), "ems_tier_spills_total") > 0, what="spills")
            # Through shared memory the early blocks are gone; the daemon's tier has them.
            assert read_back(client, list(range(N))) == list(range(N))
            assert client.stats()["local_tier_hits"] > 0
            assert client.match_prefix([key(i) for i in range(N)]) == N
            text = metrics(a)
            assert metric(text, "ems_pool_hits_total") > 0
            assert metric(text, "ems_tier_promotions_total") > 0
            assert metric(text, "ems_pool_used_bytes") > 0
            assert metric(text, "ems_tier_checksum_failures_total") == 0
        assert rig.stop(a) == 0
        # A restart empties DRAM; the spill directory is indexed again.
        rig.start(a, run_dir, peers=a.peer, capacity="16M", extra=spill_args(spill))
        with local_client(a) as client:
            back = read_back(client, list(range(N)))
            assert len(back) >= N - 16 * 4, f"only {len(back)} of {N} blocks survived"
    finally:
        rig.stop(a)


def test_remote_get_reads_holder_tier(run_dir, tmp_path):
    a, b = rig.plan(run_dir, ["a", "b"])
    peers = ",".join(d.peer for d in (a, b))
    rig.start(a, run_dir, peers=peers, capacity="16M", extra=spill_args(tmp_path / "a"))
    rig.start(b, run_dir, peers=peers, capacity="16M")
    try:
        with local_client(a) as client:
            client.put_many([key(i) for i in range(N)], [payload(i) for i in range(N)])
            wait_for(lambda: metric(metrics(a), "ems_tier_spills_total") > 0, what="spills")
        conn = ems._core.Connection("127.0.0.1", a.port, secret=rig.SECRET.encode())
        try:
            for start in range(0, N, 16):
                chunk = range(start, start + 16)
                buffers = [bytearray(SIZE) for _ in chunk]
                results = conn.get_many_into([key(i) for i in chunk], buffers)
                assert all(r == SIZE for r in results), "TCP GET missed blocks on a's disk"
                assert all(b == payload(i) for i, b in zip(chunk, buffers))
        finally:
            conn.close()
    finally:
        rig.stop(a)
        rig.stop(b)


def test_two_daemons_share_one_spill_directory(run_dir, tmp_path):
    a, b = rig.plan(run_dir, ["a", "b"])
    shared = tmp_path / "shared"
    rig.start(a, run_dir, peers=a.peer, capacity="16M", extra=spill_args(shared, True))
    rig.start(b, run_dir, peers=b.peer, capacity="16M", extra=spill_args(shared, True))
    try:
        with local_client(a) as client:
            client.put_many([key(i) for i in range(N)], [payload(i) for i in range(N)])
        # a publishes its segment when idle (or on stop); b then reads a's blocks.
        assert rig.stop(a) == 0
        with local_client(b) as client:
            back = read_back(client, list(range(N)))
            assert len(back) >= N - 16 * 4, f"b read only {len(back)} of a's {N} blocks"
            assert metric(metrics(b), "ems_pool_hits_total") > 0
    finally:
        rig.stop(a)
        rig.stop(b)


def test_prefetch_through_local_daemon(run_dir, tmp_path):
    (a,) = rig.plan(run_dir, ["a"])
    rig.start(a, run_dir, peers=a.peer, capacity="16M", extra=spill_args(tmp_path / "s"))
    try:
        with local_client(a) as client:
            client.put_many([key(i) for i in range(N)], [payload(i) for i in range(N)])
            wait_for(lambda: metric(metrics(a), "ems_tier_spills_total") > 0, what="spills")
            cold = [key(i) for i in range(8)]
            reader = client._reader
            assert not any(reader.exists_many(ems._core.tenant_keys("default", cold)))
            started = time.monotonic()
            assert client.prefetch(cold) == 8
            assert time.monotonic() - started < 0.5
            wait_for(lambda: all(reader.exists_many(ems._core.tenant_keys("default", cold))),
                     what="prefetched blocks in shared memory")
            assert metric(metrics(a), "ems_tier_prefetched_total") >= 8
    finally:
        rig.stop(a)


def test_serve_refuses_spill_dir_without_size(run_dir, tmp_path):
    (a,) = rig.plan(run_dir, ["a"])
    with pytest.raises(RuntimeError, match="--spill-size"):
        rig.start(a, run_dir, peers=a.peer, extra=("--spill-dir", str(tmp_path / "s")),
                  timeout=10)


def test_delete_through_daemon_reaches_disk(run_dir, tmp_path):
    (a,) = rig.plan(run_dir, ["a"])
    rig.start(a, run_dir, peers=a.peer, capacity="16M", extra=spill_args(tmp_path / "s"))
    try:
        with local_client(a) as client:
            client.put_many([key(i) for i in range(N)], [payload(i) for i in range(N)])
            wait_for(lambda: metric(metrics(a), "ems_tier_spills_total") > 0, what="spills")
            assert client.delete(key(0))                  # on disk only
            assert read_back(client, [0, 1]) == [1]
            assert read_back(client, [1]) == [1]          # promoted into DRAM
            assert client.delete(key(1))                  # in DRAM and on disk
            assert read_back(client, [1]) == []
            assert not client.delete(key(0))
    finally:
        rig.stop(a)
