"""Tests of spill capture through the bindings: Pool.set_spill_ring, take_evicted,
mark_spilled and the spill_* statistics.

Payloads come from make_block, which only one key can produce, so every captured block is
compared byte for byte with what was stored under its key.
"""

import mmap
import threading

import numpy as np
import pytest

import ems
from conftest import KiB, MiB, make_block, make_key
from ems.errors import (BufferNotWritableError, InvalidKeyError, PoolClosedError,
                        ReadOnlyPoolError)

SLAB = 64 * KiB
HEADER = ems._core.SPILL_RECORD_HEADER_BYTES
MIN_RING = SLAB + HEADER
FULL = 64  # blocks of 4000 bytes that fill small_pool: 4 slabs of 16 slots of 4032 bytes


def record_bytes(length):
    """Bytes one captured block takes in the ring: header and payload, 8-byte aligned."""
    return (HEADER + length + 7) // 8 * 8


@pytest.fixture
def small_pool(make_pool):
    """Four 64 KiB slabs, which FULL blocks of 4000 bytes fill."""
    return make_pool(4 * SLAB, slab_size=SLAB, max_blocks=256, pages="small")


def put_tracked(pool, stored, present, evicted, key, block):
    """Put `block` and append to `evicted` every key in `present` that the put evicted."""
    assert pool.put(key, block) is True
    stored[key] = block
    for other in [k for k in present if not pool.exists(k)]:
        present.remove(other)
        evicted.append(other)
    present.append(key)


def take_all(pool, buffer, max_blocks=1 << 20):
    """Drain the ring through `buffer` and return [(key, payload bytes)], oldest first."""
    taken = []
    while True:
        keys, lengths = pool.take_evicted(buffer, max_blocks)
        if not keys:
            return taken
        view = memoryview(buffer).cast("B")
        offset = 0
        for key, length in zip(keys, lengths):
            taken.append((key, bytes(view[offset:offset + length])))
            offset += length


def make_buffer(kind, nbytes):
    if kind == "bytearray":
        return bytearray(nbytes)
    if kind == "numpy":
        return np.zeros(nbytes, dtype=np.uint8)
    return mmap.mmap(-1, nbytes)


# ---- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 100, 4000, 30000, SLAB])
def test_round_trip_in_eviction_order(small_pool, size):
    # 300 puts overflow the data (for the larger sizes) or the 256-entry table (for the
    # smaller ones). The ring has room for every eviction.
    count = 300
    small_pool.set_spill_ring(max(MIN_RING, count * record_bytes(size)))
    stored, present, evicted = {}, [], []
    for i in range(count):
        key = make_key(i, f"size{size}")
        put_tracked(small_pool, stored, present, evicted, key, make_block(key, 1, size))
    assert len(evicted) >= count - 256

    taken = take_all(small_pool, bytearray(count * size))
    assert [key for key, _ in taken] == evicted
    for key, payload in taken:
        assert len(payload) == size
        assert payload == stored[key]
    stats = small_pool.stats()
    assert stats["spill_captured"] == len(evicted)
    assert stats["evictions"] == len(evicted)
    assert stats["spill_dropped"] == 0
    assert stats["spill_ring_used"] == 0


@pytest.mark.parametrize("kind", ["bytearray", "numpy", "mmap"])
def test_round_trip_mixed_sizes_with_slab_moves(make_pool, kind):
    pool = make_pool(16 * SLAB, slab_size=SLAB, max_blocks=512, pages="small")
    pool.set_spill_ring(8 * SLAB)
    sizes = [512, 4096, 16384, 60000]
    stored, present, evicted = {}, [], []
    buffer = make_buffer(kind, 8 * SLAB)
    taken = []
    for i in range(600):
        key = make_key(i, "mixed")
        size = sizes[(i * 7 + i // 50) % 4] - i % 13
        put_tracked(pool, stored, present, evicted, key, make_block(key, 1, size))
        if i % 10 == 9:
            taken += take_all(pool, buffer)
    taken += take_all(pool, buffer)

    stats = pool.stats()
    assert stats["slab_moves"] > 0
    assert stats["spill_dropped"] == 0
    assert stats["spill_captured"] == stats["evictions"] == len(evicted)
    assert sorted(key for key, _ in taken) == sorted(evicted)
    for key, payload in taken:
        assert payload == stored[key]


def test_take_respects_max_blocks(small_pool):
    small_pool.set_spill_ring(MiB)
    stored, present, evicted = {}, [], []
    for i in range(FULL + 10):
        key = make_key(i, "max")
        put_tracked(small_pool, stored, present, evicted, key, make_block(key, 1, 4000))
    assert len(evicted) == 10

    buffer = bytearray(10 * 4000)
    assert small_pool.take_evicted(buffer, 0) == ([], [])
    keys, lengths = small_pool.take_evicted(buffer, 3)
    assert keys == evicted[:3]
    assert lengths == [4000] * 3
    assert bytes(buffer[4000:8000]) == stored[evicted[1]]
    keys, _ = small_pool.take_evicted(buffer, np.int64(100))
    assert keys == evicted[3:]


def test_take_small_buffer_keeps_record(small_pool):
    small_pool.set_spill_ring(MiB)
    stored, present, evicted = {}, [], []
    for i in range(FULL + 1):
        key = make_key(i, "small-buffer")
        put_tracked(small_pool, stored, present, evicted, key, make_block(key, 1, 4000))
    assert len(evicted) == 1
    used = small_pool.stats()["spill_ring_used"]
    assert used == record_bytes(4000)

    assert small_pool.take_evicted(bytearray(3999), 10) == ([], [])
    assert small_pool.take_evicted(bytearray(0), 10) == ([], [])
    assert small_pool.stats()["spill_ring_used"] == used

    buffer = bytearray(4000)
    keys, lengths = small_pool.take_evicted(buffer, 10)
    assert keys == evicted
    assert lengths == [4000]
    assert bytes(buffer) == stored[evicted[0]]


def test_concurrent_put_and_take(small_pool):
    small_pool.set_spill_ring(MiB)
    stored = {}
    for i in range(400):
        key = make_key(i, "thread")
        stored[key] = make_block(key, 1, 4000 + i % 64)
    taken = []
    done = threading.Event()

    def taker():
        buffer = bytearray(16 * 4096)
        while True:
            finished = done.is_set()
            keys, lengths = small_pool.take_evicted(buffer, 16)
            offset = 0
            for key, length in zip(keys, lengths):
                taken.append((key, bytes(buffer[offset:offset + length])))
                offset += length
            if finished and not keys:
                return

    thread = threading.Thread(target=taker)
    thread.start()
    for key, block in stored.items():
        small_pool.put(key, block)
    done.set()
    thread.join()

    stats = small_pool.stats()
    assert stats["evictions"] > 0
    assert taken
    assert len(taken) == stats["spill_captured"]
    assert stats["spill_captured"] + stats["spill_dropped"] == stats["evictions"]
    assert len({key for key, _ in taken}) == len(taken)
    for key, payload in taken:
        assert payload == stored[key]


# ---- what is not captured ----------------------------------------------------------


def test_deleted_and_spilled_not_captured(small_pool):
    small_pool.set_spill_ring(MiB)
    stored, present, evicted = {}, [], []
    for i in range(FULL):
        key = make_key(i, "skip")
        put_tracked(small_pool, stored, present, evicted, key, make_block(key, 1, 4000))
    deleted = [make_key(i, "skip") for i in range(3)]
    marked = [make_key(i, "skip") for i in range(3, 6)]
    for key in deleted:
        assert small_pool.delete(key) is True
        present.remove(key)
    assert small_pool.mark_spilled(marked + [make_key(99, "absent")]) == 3
    assert small_pool.mark_spilled(b"".join(marked)) == 3

    for i in range(FULL, 3 * FULL):
        key = make_key(i, "skip")
        put_tracked(small_pool, stored, present, evicted, key, make_block(key, 1, 4000))
    assert all(key in evicted for key in marked)

    taken = take_all(small_pool, bytearray(MiB))
    assert [key for key, _ in taken] == [key for key in evicted if key not in marked]
    stats = small_pool.stats()
    assert stats["spill_captured"] == len(evicted) - len(marked)
    assert stats["evictions"] == len(evicted)
    assert stats["deletes"] == len(deleted)


# ---- statistics and lifecycle -------------------------------------------------------


def test_stats_fields(small_pool):
    stats = small_pool.stats()
    for field in ("spill_captured", "spill_dropped", "spill_ring_bytes", "spill_ring_used"):
        assert stats[field] == 0

    small_pool.set_spill_ring(MIN_RING)
    assert small_pool.stats()["spill_ring_bytes"] == MIN_RING
    stored, present, evicted = {}, [], []
    for i in range(FULL + 20):
        key = make_key(i, "stats")
        put_tracked(small_pool, stored, present, evicted, key, make_block(key, 1, 4000))
    # The smallest ring has room for 16 records of 4000 bytes, so 4 evictions are dropped.
    stats = small_pool.stats()
    assert stats["evictions"] == 20
    assert stats["spill_captured"] == 16
    assert stats["spill_dropped"] == 4
    assert stats["spill_ring_used"] == 16 * record_bytes(4000)

    # Growing keeps every held block.
    small_pool.set_spill_ring(2 * MIN_RING)
    assert small_pool.stats()["spill_ring_used"] == 16 * record_bytes(4000)
    keys, _ = small_pool.take_evicted(bytearray(4000), 1)
    assert keys == evicted[:1]

    # Turning capture off drops the 15 still held.
    small_pool.set_spill_ring(0)
    stats = small_pool.stats()
    assert stats["spill_ring_bytes"] == 0
    assert stats["spill_ring_used"] == 0
    assert stats["spill_dropped"] == 4 + 15
    assert small_pool.take_evicted(bytearray(MiB), 10) == ([], [])


def test_close_with_held_blocks(make_pool):
    pool = make_pool(4 * SLAB, slab_size=SLAB, max_blocks=256, pages="small")
    pool.set_spill_ring(MiB)
    for i in range(FULL + 40):
        key = make_key(i, "close")
        pool.put(key, make_block(key, 1, 4000))
    assert pool.stats()["spill_ring_used"] > 0
    pool.close()
    with pytest.raises(PoolClosedError):
        pool.take_evicted(bytearray(4000), 1)
    with pytest.raises(PoolClosedError):
        pool.set_spill_ring(MiB)
    with pytest.raises(PoolClosedError):
        pool.mark_spilled([make_key(0, "close")])


# ---- bad input ------------------------------------------------------------------------


def test_set_spill_ring_rejects_bad_sizes(small_pool):
    with pytest.raises(ValueError, match=r"-1 bytes is negative.*65576"):
        small_pool.set_spill_ring(-1)
    with pytest.raises(ValueError, match=r"65575 bytes is too small.*65576 bytes"):
        small_pool.set_spill_ring(MIN_RING - 1)
    with pytest.raises(ValueError, match=r"exceeds the maximum"):
        small_pool.set_spill_ring(1 << 64)
    with pytest.raises(TypeError, match="nbytes must be an integer, got float"):
        small_pool.set_spill_ring(1.5)
    with pytest.raises(TypeError, match="got bool"):
        small_pool.set_spill_ring(True)
    assert small_pool.stats()["spill_ring_bytes"] == 0
    small_pool.set_spill_ring(np.uint32(MIN_RING))
    assert small_pool.stats()["spill_ring_bytes"] == MIN_RING


def test_take_evicted_rejects_bad_input(small_pool):
    small_pool.set_spill_ring(MiB)
    with pytest.raises(BufferNotWritableError, match="buffer of type bytes is read-only"):
        small_pool.take_evicted(b"\0" * 4000, 1)
    with pytest.raises(ValueError, match="read-only"):
        small_pool.take_evicted(memoryview(bytearray(4000)).toreadonly(), 1)
    with pytest.raises(TypeError, match="buffer must support the buffer protocol"):
        small_pool.take_evicted(object(), 1)
    with pytest.raises(ValueError, match="max_blocks -1 is negative"):
        small_pool.take_evicted(bytearray(10), -1)
    with pytest.raises(TypeError, match="max_blocks must be an integer, got str"):
        small_pool.take_evicted(bytearray(10), "1")
    with pytest.raises(InvalidKeyError):
        small_pool.mark_spilled([b"short"])


def test_attached_handle_rejects_spill_calls(small_pool):
    small_pool.set_spill_ring(MiB)
    reader = ems.Pool.attach(small_pool.name)
    try:
        with pytest.raises(ReadOnlyPoolError):
            reader.set_spill_ring(MiB)
        with pytest.raises(ReadOnlyPoolError):
            reader.take_evicted(bytearray(4000), 1)
        with pytest.raises(ReadOnlyPoolError):
            reader.mark_spilled([make_key(0)])
        assert reader.stats()["spill_ring_bytes"] == 0
    finally:
        reader.close()
    assert small_pool.stats()["spill_ring_bytes"] == MiB
