"""Unit tests of every ems.Pool call on an owner pool, plus waste and eviction checks."""

import os

import numpy as np
import pytest

import ems
from conftest import ArrayInterfaceOnly, KiB, MiB, TensorLike, make_block, make_key


def fill(pool, count, size, tag="k"):
    """Put `count` blocks of `size` bytes and return {key: block}."""
    stored = {}
    for i in range(count):
        key = make_key(i, tag)
        block = make_block(key, 1, size)
        assert pool.put(key, block) is True
        stored[key] = block
    return stored


def check_blocks(pool, stored):
    """Assert every block still in the pool equals what was stored; return the hit count."""
    hits = 0
    for key, block in stored.items():
        got = pool.get(key)
        if got is None:
            continue
        hits += 1
        assert got == block
    return hits


# ---- properties and construction --------------------------------------------------


def test_pool_properties(make_pool):
    pool = make_pool(4 * MiB, slab_size=256 * KiB, pages="small")
    assert pool.capacity == 4 * MiB
    assert pool.slab_size == 256 * KiB
    assert pool.max_block_size == 256 * KiB
    assert pool.max_blocks == 4 * MiB // (16 * KiB)
    assert pool.page_kind == "small"
    assert pool.is_owner is True
    assert pool.closed is False
    assert isinstance(pool.name, str)
    assert isinstance(pool.fd, int)
    assert pool.fd >= 0


def test_pool_capacity_rounds_down(make_pool):
    pool = make_pool(4 * MiB + 100 * KiB, slab_size=256 * KiB)
    assert pool.capacity == 4 * MiB


def test_pool_default_slab_size(make_pool):
    # capacity / 16 rounded down to a power of two, clamped to 1 MiB..32 MiB.
    assert make_pool(64 * MiB).slab_size == 4 * MiB
    assert make_pool(4 * MiB).slab_size == 1 * MiB
    assert make_pool(100 * MiB).slab_size == 4 * MiB


def test_pool_max_blocks_minimum(make_pool):
    pool = make_pool(256 * KiB, slab_size=64 * KiB)
    assert pool.max_blocks == 64


def test_pool_max_blocks_explicit(make_pool):
    pool = make_pool(4 * MiB, slab_size=256 * KiB, max_blocks=1000)
    assert pool.max_blocks == 1000
    assert pool.stats()["max_blocks"] == 1000


# ---- single-key calls -------------------------------------------------------------


def test_put_get(pool):
    key = make_key(0)
    block = make_block(key, 1, 5000)
    assert pool.put(key, block) is True
    assert pool.get(key) == block


def test_get_miss(pool):
    assert pool.get(make_key(0)) is None


def test_put_idempotent(pool):
    key = make_key(0)
    first = make_block(key, 1, 5000)
    second = make_block(key, 2, 7000)
    assert pool.put(key, first) is True
    assert pool.put(key, second) is False
    assert pool.get(key) == first
    assert pool.length(key) == 5000
    stats = pool.stats()
    assert stats["puts"] == 1
    assert stats["put_exists"] == 1


@pytest.mark.parametrize("source", ["bytes", "bytearray", "memoryview", "numpy"])
def test_put_sources(pool, source):
    key = make_key(0)
    block = make_block(key, 1, 4096)
    data = {
        "bytes": lambda: block,
        "bytearray": lambda: bytearray(block),
        "memoryview": lambda: memoryview(block),
        "numpy": lambda: np.frombuffer(block, dtype=np.uint32).copy(),
    }[source]()
    assert pool.put(key, data) is True
    assert pool.get(key) == block


def _numpy_key(key):
    return np.frombuffer(key, dtype=np.uint8).copy()


@pytest.mark.parametrize("key_type", [bytes, bytearray, memoryview, _numpy_key])
def test_key_types(pool, key_type):
    key = make_key(0)
    block = make_block(key, 1, 100)
    assert pool.put(key_type(key), block) is True
    assert pool.get(key_type(key)) == block
    assert pool.exists(key_type(key)) is True


def test_put_max_block_size(pool):
    key = make_key(0)
    block = make_block(key, 1, pool.max_block_size)
    assert pool.put(key, block) is True
    assert pool.get(key) == block


def test_put_one_byte(pool):
    key = make_key(0)
    assert pool.put(key, b"x") is True
    assert pool.get(key) == b"x"
    assert pool.length(key) == 1


def _destination(kind, size):
    if kind == "bytearray":
        return bytearray(size)
    if kind == "memoryview":
        return memoryview(bytearray(size))
    if kind == "numpy_uint8":
        return np.zeros(size, dtype=np.uint8)
    if kind == "numpy_float32_2d":
        return np.zeros((4, size // 16), dtype=np.float32)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["bytearray", "memoryview", "numpy_uint8", "numpy_float32_2d"]
)
def test_get_into_destinations(pool, kind):
    key = make_key(0)
    block = make_block(key, 1, 8192)
    pool.put(key, block)
    dst = _destination(kind, 8192)
    assert pool.get_into(key, dst) is True
    assert bytes(memoryview(dst).cast("B")) == block


def test_get_into_torch(pool):
    torch = pytest.importorskip("torch")
    key = make_key(0)
    block = make_block(key, 1, 8192)
    pool.put(key, block)
    dst = torch.zeros(2048, dtype=torch.float32)
    assert pool.get_into(key, dst) is True
    assert dst.numpy().tobytes() == block


def test_get_into_array_interface(pool):
    key = make_key(0)
    block = make_block(key, 1, 8192)
    pool.put(key, block)
    array = np.zeros(2048, dtype=np.float32)
    assert pool.get_into(key, ArrayInterfaceOnly(array)) is True
    assert array.tobytes() == block


def test_get_into_tensor_like(pool):
    key = make_key(0)
    block = make_block(key, 1, 8192)
    pool.put(key, block)
    array = np.zeros((2, 1024), dtype=np.float32)
    assert pool.get_into(key, TensorLike(array)) is True
    assert array.tobytes() == block


def test_get_many_into_tensor_like_split(pool):
    keys = [make_key(i) for i in range(2)]
    blocks = [make_block(k, 1, 4096) for k in keys]
    pool.put_many(keys, blocks)
    array = np.zeros((2, 1024), dtype=np.float32)
    assert pool.get_many_into(keys, TensorLike(array)) == [True, True]
    assert array.tobytes() == b"".join(blocks)


def test_put_tensor_like(pool):
    key = make_key(0)
    block = make_block(key, 1, 4096)
    array = np.frombuffer(block, dtype=np.float32).copy()
    assert pool.put(key, TensorLike(array)) is True
    assert pool.get(key) == block


def test_get_into_miss(pool):
    dst = bytearray(b"\xaa" * 100)
    assert pool.get_into(make_key(0), dst) is False


def test_get_into_slice_of_larger_buffer(pool):
    key = make_key(0)
    block = make_block(key, 1, 3000)
    pool.put(key, block)
    big = bytearray(10000)
    assert pool.get_into(key, memoryview(big)[1000:4000]) is True
    assert bytes(big[1000:4000]) == block
    assert big[:1000] == bytearray(1000)
    assert big[4000:] == bytearray(6000)


def test_exists(pool):
    key = make_key(0)
    assert pool.exists(key) is False
    pool.put(key, b"abc")
    assert pool.exists(key) is True


def test_exists_counts_no_hit(pool):
    key = make_key(0)
    pool.put(key, b"abc")
    pool.exists(key)
    pool.exists(make_key(1))
    stats = pool.stats()
    assert stats["hits"] == 0
    assert stats["misses"] == 0


def test_length(pool):
    key = make_key(0)
    assert pool.length(key) is None
    pool.put(key, bytes(12345))
    assert pool.length(key) == 12345


def test_delete(pool):
    key = make_key(0)
    other = make_key(1)
    pool.put(key, b"abc")
    pool.put(other, b"def")
    assert pool.delete(key) is True
    assert pool.get(key) is None
    assert pool.exists(key) is False
    assert pool.delete(key) is False
    assert pool.get(other) == b"def"
    assert pool.stats()["deletes"] == 1


def test_delete_then_put_new_value(pool):
    key = make_key(0)
    pool.put(key, make_block(key, 1, 2000))
    pool.delete(key)
    assert pool.put(key, make_block(key, 2, 3000)) is True
    assert pool.get(key) == make_block(key, 2, 3000)


def test_hit_miss_counters(pool):
    key = make_key(0)
    pool.put(key, b"abc")
    pool.get(key)
    pool.get_into(key, bytearray(3))
    pool.get(make_key(1))
    stats = pool.stats()
    assert stats["hits"] == 2
    assert stats["misses"] == 1


# ---- batch calls ------------------------------------------------------------------


def _batch_keys(form, keys):
    if form == "list":
        return list(keys)
    if form == "tuple":
        return tuple(keys)
    if form == "bytes":
        return b"".join(keys)
    if form == "numpy":
        return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
    raise AssertionError(form)


KEY_FORMS = ["list", "tuple", "bytes", "numpy"]


@pytest.mark.parametrize("form", KEY_FORMS)
def test_put_many(pool, form):
    keys = [make_key(i) for i in range(8)]
    blocks = [make_block(k, 1, 1000 + 100 * i) for i, k in enumerate(keys)]
    assert pool.put_many(_batch_keys(form, keys), blocks) == 8
    for key, block in zip(keys, blocks):
        assert pool.get(key) == block


def test_put_many_counts_new_only(pool):
    keys = [make_key(i) for i in range(4)]
    blocks = [make_block(k, 1, 500) for k in keys]
    pool.put(keys[1], blocks[1])
    assert pool.put_many(keys, blocks) == 3
    assert pool.put_many(keys, blocks) == 0


def test_put_many_repeated_key(pool):
    key = make_key(0)
    first = make_block(key, 1, 500)
    second = make_block(key, 2, 600)
    assert pool.put_many([key, key], [first, second]) == 1
    assert pool.get(key) == first


def test_put_many_length_mismatch(pool):
    keys = [make_key(i) for i in range(3)]
    with pytest.raises(ValueError):
        pool.put_many(keys, [b"a", b"b"])


@pytest.mark.parametrize("form", KEY_FORMS)
def test_exists_many(pool, form):
    keys = [make_key(i) for i in range(6)]
    for key in keys[::2]:
        pool.put(key, b"v")
    assert pool.exists_many(_batch_keys(form, keys)) == [
        True, False, True, False, True, False
    ]


def test_exists_many_empty(pool):
    assert pool.exists_many([]) == []


@pytest.mark.parametrize("form", KEY_FORMS)
def test_get_many_into_list(pool, form):
    keys = [make_key(i) for i in range(5)]
    blocks = [make_block(k, 1, 2000 + i) for i, k in enumerate(keys)]
    for key, block in zip(keys[:4], blocks[:4]):
        pool.put(key, block)
    bufs = [bytearray(len(b)) for b in blocks]
    assert pool.get_many_into(_batch_keys(form, keys), bufs) == [
        True, True, True, True, False
    ]
    for buf, block in zip(bufs[:4], blocks[:4]):
        assert bytes(buf) == block


def test_get_many_into_mixed_buffers(pool):
    keys = [make_key(i) for i in range(3)]
    blocks = [make_block(k, 1, 4096) for k in keys]
    pool.put_many(keys, blocks)
    bufs = [bytearray(4096), np.zeros(1024, dtype=np.int32), memoryview(bytearray(4096))]
    assert pool.get_many_into(keys, bufs) == [True, True, True]
    for buf, block in zip(bufs, blocks):
        assert bytes(memoryview(buf).cast("B")) == block


@pytest.mark.parametrize("form", KEY_FORMS)
def test_get_many_into_split(pool, form):
    keys = [make_key(i) for i in range(4)]
    blocks = [make_block(k, 1, 4096) for k in keys]
    for key, block in zip(keys[1:], blocks[1:]):
        pool.put(key, block)
    dst = np.zeros((4, 4096), dtype=np.uint8)
    assert pool.get_many_into(_batch_keys(form, keys), dst) == [False, True, True, True]
    for i in range(1, 4):
        assert dst[i].tobytes() == blocks[i]


def test_get_many_into_split_torch(pool):
    torch = pytest.importorskip("torch")
    keys = [make_key(i) for i in range(3)]
    blocks = [make_block(k, 1, 4096) for k in keys]
    pool.put_many(keys, blocks)
    dst = torch.zeros((3, 1024), dtype=torch.float32)
    assert pool.get_many_into(keys, dst) == [True, True, True]
    assert dst.numpy().tobytes() == b"".join(blocks)


def test_get_many_into_split_indivisible(pool):
    keys = [make_key(i) for i in range(3)]
    with pytest.raises(ems.errors.BufferSizeError):
        pool.get_many_into(keys, bytearray(1000))


def test_get_many_into_buffer_count_mismatch(pool):
    keys = [make_key(i) for i in range(3)]
    with pytest.raises(ValueError):
        pool.get_many_into(keys, [bytearray(10), bytearray(10)])


@pytest.mark.parametrize("form", KEY_FORMS)
def test_match_prefix(pool, form):
    keys = [make_key(i) for i in range(6)]
    for key in keys[:3] + keys[4:]:
        pool.put(key, b"v")
    assert pool.match_prefix(_batch_keys(form, keys)) == 3
    assert pool.match_prefix(_batch_keys(form, keys[:2])) == 2
    assert pool.match_prefix(_batch_keys(form, keys[3:])) == 0


def test_match_prefix_empty(pool):
    assert pool.match_prefix([]) == 0


@pytest.mark.parametrize("form", KEY_FORMS)
def test_protect_unprotect(pool, form):
    keys = [make_key(i) for i in range(4)]
    for key in keys[:3]:
        pool.put(key, b"v")
    assert pool.protect(_batch_keys(form, keys)) == 3
    assert pool.unprotect(_batch_keys(form, keys)) == 3
    assert pool.unprotect(_batch_keys(form, keys[3:])) == 0


# ---- reservations -----------------------------------------------------------------


def test_reserve_commit(pool):
    key = make_key(0)
    block = make_block(key, 1, 6000)
    res = pool.reserve(key, 6000)
    assert res.exists is False
    assert len(res.buffer) == 6000
    assert res.buffer.readonly is False
    res.buffer[:] = block
    assert pool.exists(key) is False
    res.commit()
    assert pool.get(key) == block


def test_reserve_abort(pool):
    key = make_key(0)
    res = pool.reserve(key, 6000)
    res.buffer[:] = bytes(6000)
    res.abort()
    assert pool.exists(key) is False
    assert pool.stats()["blocks"] == 0


def test_reserve_context_commit(pool):
    key = make_key(0)
    block = make_block(key, 1, 6000)
    with pool.reserve(key, 6000) as res:
        res.buffer[:] = block
    assert pool.get(key) == block


def test_reserve_context_abort(pool):
    key = make_key(0)
    with pytest.raises(RuntimeError, match="fill failed"):
        with pool.reserve(key, 6000) as res:
            res.buffer[:100] = bytes(100)
            raise RuntimeError("fill failed")
    assert pool.exists(key) is False
    assert pool.stats()["blocks"] == 0


def test_reserve_numpy_fill(pool):
    key = make_key(0)
    with pool.reserve(key, 4096) as res:
        np.frombuffer(res.buffer, dtype=np.uint8)[:] = 7
    assert pool.get(key) == b"\x07" * 4096


def test_reserve_existing(pool):
    key = make_key(0)
    block = make_block(key, 1, 6000)
    pool.put(key, block)
    with pool.reserve(key, 6000) as res:
        assert res.exists is True
    assert pool.get(key) == block
    assert pool.stats()["blocks"] == 1


def test_reserve_existing_other_length(pool):
    key = make_key(0)
    block = make_block(key, 1, 6000)
    pool.put(key, block)
    res = pool.reserve(key, 100)
    assert res.exists is True
    res.commit()
    assert pool.get(key) == block


# ---- stats, close, context manager ------------------------------------------------


STAT_KEYS = {
    "capacity_bytes", "slab_size", "slabs", "free_slabs", "max_blocks", "blocks",
    "bytes_used", "bytes_free", "bytes_wasted", "metadata_bytes",
    "metadata_bytes_per_block", "hits", "misses", "puts", "put_exists", "evictions",
    "deletes", "slab_moves", "pool_full", "reader_hits", "reader_misses", "reader_retries",
    "spill_captured", "spill_dropped", "spill_ring_bytes", "spill_ring_used",
    "page_kind", "is_owner", "classes",
}
CLASS_KEYS = {
    "size_class", "slot_size", "slabs", "blocks", "payload_bytes", "wasted_bytes",
    "evictions",
}


def test_stats_empty(pool):
    stats = pool.stats()
    assert set(stats) >= STAT_KEYS
    assert stats["capacity_bytes"] == 4 * MiB
    assert stats["slab_size"] == 256 * KiB
    assert stats["slabs"] == 16
    assert stats["free_slabs"] == 16
    assert stats["blocks"] == 0
    assert stats["bytes_used"] == 0
    assert stats["bytes_wasted"] == 0
    assert stats["page_kind"] == "small"
    assert stats["classes"] == []
    assert stats["metadata_bytes"] > 0
    assert stats["metadata_bytes_per_block"] <= 64


def test_stats_after_puts(pool):
    keys = [make_key(i) for i in range(10)]
    for key in keys:
        pool.put(key, bytes(3000))
    stats = pool.stats()
    assert stats["blocks"] == 10
    assert stats["bytes_used"] == 30000
    assert stats["puts"] == 10
    assert stats["free_slabs"] == 15
    assert len(stats["classes"]) == 1
    row = stats["classes"][0]
    assert set(row) >= CLASS_KEYS
    assert row["blocks"] == 10
    assert row["slabs"] == 1
    assert row["payload_bytes"] == 30000
    assert row["slot_size"] >= 3000
    assert row["slot_size"] % 64 == 0


def test_close(make_pool):
    pool = make_pool(1 * MiB, slab_size=64 * KiB)
    pool.close()
    assert pool.closed is True


def test_close_open_reservation(make_pool):
    pool = make_pool(1 * MiB, slab_size=64 * KiB)
    res = pool.reserve(make_key(0), 100)
    pool.close()
    assert pool.closed is True
    res.abort()


def test_close_twice(make_pool):
    pool = make_pool(1 * MiB, slab_size=64 * KiB)
    pool.close()
    pool.close()
    assert pool.closed is True


def test_context_manager():
    key = make_key(0)
    with ems.Pool(1 * MiB, slab_size=64 * KiB) as pool:
        pool.put(key, b"abc")
        assert pool.get(key) == b"abc"
    assert pool.closed is True


def test_context_manager_exception():
    with pytest.raises(KeyError):
        with ems.Pool(1 * MiB, slab_size=64 * KiB) as pool:
            raise KeyError("x")
    assert pool.closed is True


# ---- attached reader in the same process ------------------------------------------


def test_attach_reads(pool):
    keys = [make_key(i) for i in range(4)]
    blocks = [make_block(k, 1, 3000) for k in keys]
    pool.put_many(keys, blocks)
    reader = ems.Pool.attach(pool.name)
    try:
        assert reader.is_owner is False
        assert reader.capacity == pool.capacity
        assert reader.slab_size == pool.slab_size
        assert reader.page_kind == pool.page_kind
        assert reader.get(keys[0]) == blocks[0]
        dst = bytearray(3000)
        assert reader.get_into(keys[1], dst) is True
        assert bytes(dst) == blocks[1]
        assert reader.exists(keys[2]) is True
        assert reader.length(keys[3]) == 3000
        assert reader.exists_many(keys) == [True] * 4
        assert reader.match_prefix(keys) == 4
        split = bytearray(4 * 3000)
        assert reader.get_many_into(keys, split) == [True] * 4
        assert bytes(split) == b"".join(blocks)
        assert reader.get(make_key(99)) is None
    finally:
        reader.close()


def test_attach_fd(pool):
    key = make_key(0)
    pool.put(key, b"abc")
    reader = ems.Pool.attach(pool.fd)
    try:
        assert reader.get(key) == b"abc"
    finally:
        reader.close()


def test_attach_sees_later_writes(pool):
    reader = ems.Pool.attach(pool.name)
    try:
        key = make_key(0)
        assert reader.get(key) is None
        pool.put(key, b"abc")
        assert reader.get(key) == b"abc"
        pool.delete(key)
        assert reader.get(key) is None
    finally:
        reader.close()


def test_attach_after_owner_close(make_pool):
    pool = make_pool(1 * MiB, slab_size=64 * KiB)
    key = make_key(0)
    pool.put(key, b"abc")
    reader = ems.Pool.attach(pool.name)
    try:
        pool.close()
        assert reader.get(key) is None
    finally:
        reader.close()


def test_name_explicit(make_pool):
    name = f"ems-test-{os.getpid()}-explicit"
    pool = make_pool(1 * MiB, slab_size=64 * KiB, name=name)
    assert pool.name == name
    pool.put(make_key(0), b"abc")
    reader = ems.Pool.attach(name)
    try:
        assert reader.get(make_key(0)) == b"abc"
    finally:
        reader.close()


def test_name_in_use(make_pool):
    name = f"ems-test-{os.getpid()}-twice"
    make_pool(1 * MiB, slab_size=64 * KiB, name=name)
    with pytest.raises(ValueError) as info:
        make_pool(1 * MiB, slab_size=64 * KiB, name=name)
    assert name in str(info.value)


def test_name_reusable_after_close(make_pool):
    name = f"ems-test-{os.getpid()}-reuse"
    make_pool(1 * MiB, slab_size=64 * KiB, name=name).close()
    with pytest.raises(ems.errors.AttachError):
        ems.Pool.attach(name)
    pool = make_pool(1 * MiB, slab_size=64 * KiB, name=name)
    assert pool.name == name


@pytest.mark.parametrize("name", ["", "a/b", "x" * 101, "sp ace"])
def test_name_invalid(name):
    with pytest.raises(ValueError) as info:
        ems.Pool(1 * MiB, slab_size=64 * KiB, name=name)
    assert repr(name) in str(info.value)


def test_fork_child_read_only(pool):
    key = make_key(0)
    pool.put(key, b"parent")
    pid = os.fork()
    if pid == 0:
        # Child: reads work, writes raise ReadOnlyPoolError. Exit codes report failures.
        code = 0
        try:
            if pool.get(key) != b"parent":
                code = 2
            elif pool.is_owner:
                code = 3
            else:
                try:
                    pool.put(make_key(1), b"child")
                    code = 4
                except ems.errors.ReadOnlyPoolError:
                    code = 0
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.is_owner is True
    assert pool.exists(make_key(1)) is False
    assert pool.put(make_key(2), b"owner") is True


# ---- space efficiency -------------------------------------------------------------


@pytest.mark.parametrize(
    "size,slab_size",
    [
        (4 * KiB, 128 * KiB),
        (16 * KiB, 512 * KiB),
        (64 * KiB, 2 * MiB),
        (256 * KiB, 8 * MiB),
        (100_000, 4 * MiB),
        (1_000_000, 32 * MiB),
    ],
)
def test_waste_uniform(make_pool, size, slab_size):
    assert size <= slab_size // 32
    capacity = max(8 * MiB, min(4 * slab_size, 64 * MiB))
    pool = make_pool(capacity, slab_size=slab_size, max_blocks=capacity // size + 64)
    count = capacity // size + capacity // size // 4
    payload = bytes(range(256)) * (size // 256 + 2)
    for i in range(count):
        pool.put(make_key(i), payload[i % 256:i % 256 + size])
    stats = pool.stats()
    assert stats["evictions"] > 0
    assert stats["free_slabs"] == 0
    assert stats["bytes_wasted"] / stats["capacity_bytes"] < 0.05
    assert stats["bytes_used"] == stats["blocks"] * size
    assert stats["metadata_bytes_per_block"] <= 64
    assert len(stats["classes"]) == 1
    row = stats["classes"][0]
    assert row["slabs"] == stats["slabs"]
    assert row["blocks"] == stats["blocks"]
    assert row["payload_bytes"] == stats["bytes_used"]
    assert row["wasted_bytes"] == stats["bytes_wasted"]
    assert row["evictions"] == stats["evictions"]
    assert row["slot_size"] >= size
    assert row["slot_size"] - size <= size // 64 + 64
    assert row["blocks"] <= row["slabs"] * (slab_size // row["slot_size"])


def test_stats_bytes_add_up(make_pool):
    pool = make_pool(4 * MiB, slab_size=256 * KiB)
    for i, size in enumerate([1000, 5000, 20000, 70000] * 10):
        pool.put(make_key(i), bytes(size))
    stats = pool.stats()
    rows = stats["classes"]
    assert len(rows) == 4
    assert sum(r["slabs"] for r in rows) + stats["free_slabs"] == stats["slabs"]
    assert sum(r["blocks"] for r in rows) == stats["blocks"]
    assert sum(r["payload_bytes"] for r in rows) == stats["bytes_used"]
    assert sum(r["wasted_bytes"] for r in rows) == stats["bytes_wasted"]
    assert stats["bytes_used"] == (1000 + 5000 + 20000 + 70000) * 10
    assert stats["bytes_used"] + stats["bytes_free"] + stats["bytes_wasted"] == (
        stats["capacity_bytes"]
    )


def test_metadata_per_block(make_pool):
    pool = make_pool(16 * MiB, slab_size=1 * MiB, max_blocks=4096)
    stats = pool.stats()
    assert stats["metadata_bytes_per_block"] <= 64
    assert stats["metadata_bytes"] <= 64 * 4096 + 64 * KiB


# ---- eviction ---------------------------------------------------------------------


def test_evict_fill_past_capacity(make_pool):
    pool = make_pool(4 * MiB, slab_size=256 * KiB)
    stored = fill(pool, 2 * (4 * MiB) // (16 * KiB), 16 * KiB)
    stats = pool.stats()
    assert stats["evictions"] > 0
    assert stats["blocks"] < len(stored)
    assert check_blocks(pool, stored) == stats["blocks"]
    assert stats["blocks"] > 0


def test_evict_keeps_recent(make_pool):
    pool = make_pool(4 * MiB, slab_size=256 * KiB)
    stored = fill(pool, 512, 16 * KiB)
    last = list(stored)[-1]
    assert pool.get(last) == stored[last]


def test_evict_protected_survive(make_pool):
    pool = make_pool(4 * MiB, slab_size=256 * KiB)
    protected = fill(pool, 32, 16 * KiB, tag="protected")
    assert pool.protect(list(protected)) == 32
    others = fill(pool, 3 * (4 * MiB) // (16 * KiB), 16 * KiB, tag="other")
    assert pool.stats()["evictions"] > 0
    for key, block in protected.items():
        assert pool.get(key) == block
    assert check_blocks(pool, others) > 0


def test_evict_protected_slab_move(make_pool):
    # 128 blocks of 16 KiB fill 8 of the 16 slabs, and the 4 protected ones share the first
    # two with unprotected blocks. The 48 KiB class must take slabs from the 16 KiB class
    # to grow past the 8 free ones, but not the protected blocks while others can go.
    pool = make_pool(4 * MiB, slab_size=256 * KiB)
    protected = {}
    for i in range(128):
        key = make_key(i, "mixed")
        block = make_block(key, 1, 16 * KiB)
        pool.put(key, block)
        if i % 8 == 0 and i < 32:
            protected[key] = block
    assert pool.protect(list(protected)) == 4
    fill(pool, 3 * (4 * MiB) // (48 * KiB), 48 * KiB, tag="large")
    assert pool.stats()["slab_moves"] > 0
    for key, block in protected.items():
        assert pool.get(key) == block


def test_evict_unprotected_again(make_pool):
    pool = make_pool(4 * MiB, slab_size=256 * KiB)
    first = fill(pool, 32, 16 * KiB, tag="first")
    pool.protect(list(first))
    assert pool.unprotect(list(first)) == 32
    fill(pool, 4 * (4 * MiB) // (16 * KiB), 16 * KiB, tag="other")
    assert check_blocks(pool, first) < 32


def test_evict_slab_moves(make_pool):
    pool = make_pool(4 * MiB, slab_size=256 * KiB)
    small = fill(pool, 2 * (4 * MiB) // (16 * KiB), 16 * KiB, tag="small")
    assert pool.stats()["slab_moves"] == 0
    large = fill(pool, 2 * (4 * MiB) // (48 * KiB), 48 * KiB, tag="large")
    stats = pool.stats()
    assert stats["slab_moves"] > 0
    sizes = {row["slot_size"]: row for row in stats["classes"]}
    large_rows = [row for slot, row in sizes.items() if slot >= 48 * KiB]
    assert len(large_rows) == 1
    assert large_rows[0]["slabs"] > 8
    assert check_blocks(pool, large) > 0
    check_blocks(pool, small)


def test_evict_mixed_sizes_correct(make_pool):
    pool = make_pool(2 * MiB, slab_size=128 * KiB)
    stored = {}
    sizes = [700, 3000, 12_000, 40_000, 100_000]
    for i in range(600):
        key = make_key(i, "mixed")
        block = make_block(key, 1, sizes[(i * 7) % len(sizes)])
        pool.put(key, block)
        stored[key] = block
    stats = pool.stats()
    assert stats["evictions"] > 0
    assert check_blocks(pool, stored) == stats["blocks"]
