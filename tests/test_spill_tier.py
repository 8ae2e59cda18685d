"""The spill tier under a real pool: evictions reach disk, DRAM misses come back from it.

Every test runs a real ems.Pool (small, so it evicts) over a real SpillStore directory,
through the embedded client that engines use. Payloads are derived from their keys, so any
block read back is checked byte for byte. The fixtures io_mode (io_uring and the
preadv/pwritev fallback) and small_tmpfs come from test_spill_store.py.
"""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import ems
from ems.client import EmbeddedClient
from ems.tiering import tier as tiering
from ems.tiering.store import SpillStore
from test_spill_store import io_mode, small_tmpfs  # noqa: F401 (fixtures)

POOL_BYTES = 4 << 20
SLAB = 1 << 20


def key(i: int, space: str = "t") -> bytes:
    return hashlib.blake2b(f"{space}-{i}".encode(), digest_size=32).digest()


def payload(i: int, size: int) -> bytes:
    seed = hashlib.blake2b(f"payload-{i}-{size}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def open_client(directory, io_mode="posix", policy="clock", quota=256 << 20,
                pool_bytes=POOL_BYTES, shared=False):
    pool = ems.Pool(pool_bytes, slab_size=SLAB, pages="small")
    tier = tiering.open_tier(pool, directory, quota, io=io_mode, policy=policy, shared=shared)
    return EmbeddedClient(pool, tier)


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def spilled(client, count):
    return client.tier.stats()["spills"] >= count


def fill(client, n, size, space="t"):
    """Put n blocks, more than DRAM holds, and wait until the evicted ones are on disk."""
    for i in range(n):
        client.put(key(i, space), payload(i, size))
    evicted = client.pool.stats()["evictions"]
    assert evicted > 0, "the test needs a pool small enough to evict"
    wait_for(lambda: spilled(client, evicted), what=f"{evicted} spills")
    return evicted


def read_all(client, n, size, space="t"):
    buffers = [bytearray(size) for _ in range(n)]
    found = client.get_many_into([key(i, space) for i in range(n)], buffers)
    return found, buffers


@pytest.mark.parametrize("size", [4096, 65536, 256 << 10, 1 << 20])
def test_spill_and_promote_round_trip(tmp_path, io_mode, size):
    n = (3 * POOL_BYTES) // size
    with open_client(tmp_path, io_mode) as client:
        evicted = fill(client, n, size)
        found, buffers = read_all(client, n, size)
        assert all(found), f"{found.count(False)} of {n} blocks lost"
        for i, buffer in enumerate(buffers):
            assert buffer == payload(i, size), f"block {i} differs"
        stats = client.tier.stats()
        assert stats["promotions"] >= 1
        assert stats["store"]["checksum_failures"] == 0
        assert client.pool.stats()["spill_dropped"] == 0
        assert evicted >= n - POOL_BYTES // size


def test_mixed_sizes_with_slab_moves(tmp_path, io_mode):
    sizes = [8192, 100_000, 300_000, 65536]
    n = 60
    with open_client(tmp_path, io_mode) as client:
        for i in range(n):
            client.put(key(i), payload(i, sizes[i % len(sizes)]))
        wait_for(lambda: spilled(client, client.pool.stats()["evictions"]), what="spills")
        for i in range(n):
            size = sizes[i % len(sizes)]
            buffer = bytearray(size)
            assert client.get_into(key(i), buffer), f"block {i} ({size} bytes) lost"
            assert buffer == payload(i, size)


def test_promoted_block_not_spilled_twice(tmp_path):
    size = 256 << 10
    with open_client(tmp_path) as client:
        fill(client, 40, size)
        assert not client.pool.exists(key(0)), "block 0 should have been evicted"
        buffer = bytearray(size)
        assert client.get_into(key(0), buffer)
        assert buffer == payload(0, size)
        assert client.pool.exists(key(0)), "a disk hit must be promoted into DRAM"

        before = client.pool.stats()
        for i in range(40, 60):   # evict again, block 0 included
            client.put(key(i), payload(i, size))
        assert not client.pool.exists(key(0)), "block 0 should have been evicted again"
        after = client.pool.stats()
        # Block 0 was marked as already on disk: its second eviction copied nothing, while
        # every other eviction was captured for the disk.
        evictions = after["evictions"] - before["evictions"]
        captured = after["spill_captured"] - before["spill_captured"]
        assert captured == evictions - 1


def test_exists_and_match_prefix_count_disk(tmp_path):
    size = 256 << 10
    with open_client(tmp_path) as client:
        fill(client, 40, size)
        keys = [key(i) for i in range(40)]
        assert client.pool.match_prefix(keys) == 0   # the chain starts with evicted blocks
        assert client.match_prefix(keys) == 40
        assert all(client.exists_many(keys))
        assert client.match_prefix(keys + [key(999)] + keys) == 40
        assert not client.exists(key(999))


def test_restart_keeps_disk_blocks(tmp_path, io_mode):
    size = 64 << 10
    n = 200
    with open_client(tmp_path, io_mode) as client:
        fill(client, n, size)
        on_disk = [i for i in range(n) if not client.pool.exists(key(i))]
    assert on_disk
    with open_client(tmp_path, io_mode) as client:   # a new pool: DRAM starts empty
        found, buffers = read_all(client, n, size)
        for i in on_disk:
            assert found[i], f"spilled block {i} lost across the restart"
            assert buffers[i] == payload(i, size)


def test_prefetch_returns_at_once_and_fills_dram(tmp_path):
    size = 256 << 10
    with open_client(tmp_path) as client:
        fill(client, 40, size)
        cold = [key(i) for i in range(8)]
        assert not any(client.pool.exists_many(cold))
        started = time.monotonic()
        queued = client.prefetch(cold, protect=True)
        assert time.monotonic() - started < 0.05, "prefetch must not wait for the disk"
        assert queued == 8
        wait_for(lambda: all(client.pool.exists_many(cold)), what="prefetched blocks in DRAM")
        assert client.tier.stats()["prefetched"] == 8

        # Protected: filling DRAM again evicts everything else first.
        for i in range(100, 112):
            client.put(key(i), payload(i, size))
        assert all(client.pool.exists_many(cold)), "protected prefetched blocks were evicted"
        client.unprotect(cold)
        for i in range(200, 240):
            client.put(key(i), payload(i, size))
        assert not all(client.pool.exists_many(cold))


def test_prefetch_of_unknown_keys_is_harmless(tmp_path):
    with open_client(tmp_path) as client:
        assert client.prefetch([key(1, "nowhere")]) == 1
        wait_for(lambda: client.tier.stats().get("prefetch_misses", 0) == 1, what="a miss")
        assert not client.exists(key(1, "nowhere"))


def test_delete_removes_both_tiers(tmp_path):
    size = 256 << 10
    with open_client(tmp_path) as client:
        fill(client, 40, size)
        assert client.delete(key(0))
        assert not client.exists(key(0))
        assert not client.get_into(key(0), bytearray(size))


def test_flipped_byte_on_disk_is_a_miss(tmp_path):
    size = 64 << 10
    with open_client(tmp_path) as client:
        fill(client, 200, size)
        client.tier.store.publish()
        victim = next(i for i in range(200) if not client.pool.exists(key(i)))
        name, offset, _ = client.tier.store._index[key(victim)]
        path = os.path.join(tmp_path, name)
    with open(path, "r+b") as f:   # the store is closed: flip one payload byte
        f.seek(offset + 4096 + 100)
        byte = f.read(1)
        f.seek(offset + 4096 + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open_client(tmp_path) as client:
        buffer = bytearray(size)
        assert not client.get_into(key(victim), buffer)
        assert client.tier.stats()["store"]["checksum_failures"] == 1
        other = next(i for i in range(200) if i != victim and not client.pool.exists(key(i)))
        assert client.get_into(key(other), buffer)
        assert buffer == payload(other, size)


def test_session_policy_moves_whole_sessions_oldest_first(tmp_path, monkeypatch):
    monkeypatch.setattr(tiering, "HIGH_WATERMARK", 0.5)
    monkeypatch.setattr(tiering, "LOW_WATERMARK", 0.3)
    size = 128 << 10
    with open_client(tmp_path, policy="session") as client:
        sessions = {}
        for s in range(3):
            keys = [key(i, f"s{s}") for i in range(6)]
            client.put_many(keys, [payload(i, size) for i in range(6)])
            client.tier.touch(b"session-%d" % s, keys)
            sessions[s] = keys
            time.sleep(0.01)
        # 18 x 128 KiB = 2.25 MiB of 4 MiB: above the 50% mark, so the oldest session goes.
        wait_for(lambda: client.tier.stats().get("sessions_evicted", 0) >= 1,
                 what="a session moved down")
        assert not any(client.pool.exists_many(sessions[0])), "oldest session not moved whole"
        assert all(client.pool.exists_many(sessions[2])), "newest session was moved"
        # Moved, not lost: the blocks come back from disk.
        buffers = [bytearray(size) for _ in range(6)]
        assert all(client.get_many_into(sessions[0], buffers))
        assert [bytes(b) for b in buffers] == [payload(i, size) for i in range(6)]


def test_ring_full_drops_and_counts(tmp_path):
    pool = ems.Pool(POOL_BYTES, slab_size=SLAB, pages="small")
    store = SpillStore(tmp_path, 256 << 20, io="posix")
    tier = tiering.SpillTier(pool, store, ring_bytes=2 * SLAB)
    size = 256 << 10
    try:
        tier._closed = True       # stop the background drain so the ring overflows
        tier._wake.set()
        tier._thread.join()
        for i in range(60):
            pool.put(key(i), payload(i, size))
        stats = pool.stats()
        assert stats["spill_dropped"] > 0
        for i in range(60):   # DRAM blocks are intact
            got = pool.get(key(i))
            assert got is None or got == payload(i, size)
    finally:
        tier._closed = False
        tier.close()
        pool.close()


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="spill_bytes"):
        ems.connect("embedded", capacity_bytes=POOL_BYTES, spill_dir=str(tmp_path))
    pool = ems.Pool(POOL_BYTES, slab_size=SLAB, pages="small")
    try:
        with pytest.raises(ValueError, match="policy"):
            tiering.open_tier(pool, tmp_path, 1 << 30, policy="lru")
        with pytest.raises(ValueError, match="ring_bytes"):
            tiering.open_tier(pool, tmp_path, 1 << 30, ring_bytes=1024)
    finally:
        pool.close()


def test_connect_with_spill_dir(tmp_path):
    size = 256 << 10
    with ems.connect("embedded", capacity_bytes=POOL_BYTES, slab_size=SLAB, pages="small",
                     spill_dir=str(tmp_path), spill_bytes=64 << 20) as client:
        fill(client, 40, size)
        found, buffers = read_all(client, 40, size)
        assert all(found) and all(b == payload(i, size) for i, b in enumerate(buffers))
        assert client.stats()["spill"]["store"]["blocks"] > 0


_KILLED_WRITER = textwrap.dedent("""
    import hashlib, sys, time
    sys.path.insert(0, {tests!r})
    from test_spill_tier import key, open_client, payload
    client = open_client({directory!r}, pool_bytes=2 << 20)
    i = 0
    while True:
        client.put(key(i), payload(i, 64 << 10))
        i += 1
        if i == 200:
            print("spilling", flush=True)
""")


def test_kill_while_spilling_returns_no_wrong_block(tmp_path):
    """SIGKILL a process in the middle of spilling; what the next one reads is exact."""
    code = _KILLED_WRITER.format(tests=os.path.dirname(__file__), directory=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "spilling"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open_client(tmp_path) as client:
        n = 2000
        size = 64 << 10
        found, buffers = read_all(client, n, size)
        assert sum(found) > 0, "nothing published before the kill survived"
        for i, ok in enumerate(found):
            if ok:
                assert buffers[i] == payload(i, size), f"block {i} is wrong after the kill"


def test_full_disk_stops_spilling_and_serving_goes_on(small_tmpfs, io_mode):
    size = 64 << 10
    with open_client(small_tmpfs, io_mode, quota=64 << 20) as client:
        for i in range(300):
            client.put(key(i), payload(i, size))
        wait_for(lambda: not client.tier.stats()["store"]["spilling"], what="spilling stopped")
        assert client.tier.stats()["store"]["enospc"] >= 1
        for i in range(300, 340):   # still serving: DRAM puts and gets work
            client.put(key(i), payload(i, size))
        buffer = bytearray(size)
        assert client.get_into(key(339), buffer) and buffer == payload(339, size)


def test_delete_of_a_block_just_evicted_sticks(tmp_path):
    """A block still in the eviction ring when it is deleted never reaches the disk."""
    size = 64 << 10
    with open_client(tmp_path) as client:
        filler = 0
        for t in range(30):
            victim = key(t, "victim")
            client.put(victim, payload(t, size))
            while client.pool.exists(victim):
                client.put(key(filler, "filler"), payload(filler, size))
                filler += 1
            assert client.delete(victim)
            time.sleep(0.03)   # past a background drain
            assert not client.get_into(victim, bytearray(size)), f"deleted block {t} came back"


def test_delete_then_new_value_is_read_back(tmp_path):
    size = 64 << 10
    new = b"\x5a" * size
    with open_client(tmp_path) as client:
        fill(client, 200, size)
        assert not client.pool.exists(key(0))
        assert client.delete(key(0))
        client.put(key(0), new)
        fill(client, 200, size, space="more")
        buffer = bytearray(size)
        assert client.get_into(key(0), buffer)
        assert buffer == new


def test_promotion_does_not_undo_a_delete(tmp_path, monkeypatch):
    """A delete landing between a disk read and its promotion wins."""
    size = 256 << 10
    with open_client(tmp_path) as client:
        fill(client, 40, size)
        read = client.tier.store.get_many_into

        def read_then_delete(keys, buffers):
            found = read(keys, buffers)
            client.tier.delete(list(keys))
            return found

        monkeypatch.setattr(client.tier.store, "get_many_into", read_then_delete)
        assert client.get_into(key(0), bytearray(size))   # read before the delete
        monkeypatch.undo()
        assert not client.pool.exists(key(0)), "the promotion put a deleted key back"
        assert not client.exists(key(0))


def test_disk_hit_into_wrong_size_buffer_is_refused(tmp_path):
    size = 64 << 10
    with open_client(tmp_path) as client:
        fill(client, 200, size)
        assert not client.pool.exists(key(0))
        with pytest.raises(ems.errors.BufferSizeError, match=str(size)):
            client.get_into(key(0), bytearray(size + 4096))
        assert not client.pool.exists(key(0)), "a wrong-size block was promoted"
        buffer = bytearray(size)
        assert client.get_into(key(0), buffer)
        assert buffer == payload(0, size)


def test_session_policy_keeps_dram_when_disk_refuses(tmp_path, monkeypatch):
    """After ENOSPC the session policy stops: moving sessions would only drop them."""
    monkeypatch.setattr(tiering, "HIGH_WATERMARK", 0.5)
    monkeypatch.setattr(tiering, "LOW_WATERMARK", 0.3)
    size = 128 << 10
    with open_client(tmp_path, policy="session") as client:
        client.tier.store._spilling = False   # as after ENOSPC
        keys = [key(i) for i in range(20)]
        client.put_many(keys, [payload(i, size) for i in range(20)])
        client.tier.touch(b"only-session", keys)
        time.sleep(0.2)
        assert client.tier.stats()["sessions_evicted"] == 0
        assert all(client.pool.exists_many(keys))


def test_small_quota_gets_small_segments(tmp_path):
    with open_client(tmp_path, quota=16 << 20) as client:
        assert client.tier.store.segment_bytes == 2 << 20


def test_read_during_drain_hits(tmp_path, monkeypatch):
    """A reader that misses while the background thread writes its block from the ring to
    disk waits for that write and then finds the block."""
    size = 256 << 10
    with open_client(tmp_path) as client:
        put_many = client.tier.store.put_many
        writing, release = threading.Event(), threading.Event()

        def slow_put_many(keys, views):
            if threading.current_thread().name == "ems-spill":
                writing.set()
                release.wait(10)
            return put_many(keys, views)

        monkeypatch.setattr(client.tier.store, "put_many", slow_put_many)
        for i in range(40):   # evicts the first blocks into the ring
            client.put(key(i), payload(i, size))
        client.tier.kick()
        assert writing.wait(10), "the background thread did not start a drain"
        # The first block left the ring with the drain that is now blocked: it is in
        # neither DRAM nor the store yet.
        assert not client.pool.exists(key(0))
        assert not client.tier.store.exists_many([key(0)])[0]
        threading.Timer(0.2, release.set).start()
        buffer = bytearray(size)
        assert client.get_into(key(0), buffer), "a block being spilled was a miss"
        assert buffer == payload(0, size)
