"""Every ems.errors exception: its type, a message that names the value and the limit,
and a pool whose earlier blocks are still readable and unchanged afterwards."""

import os

import numpy as np
import pytest

import ems
from ems import errors
from conftest import ArrayInterfaceOnly, KiB, MiB, TensorLike, make_block, make_key


@pytest.fixture
def loaded(make_pool):
    """A pool holding 8 blocks, and the blocks it holds."""
    pool = make_pool(4 * MiB, slab_size=256 * KiB, pages="small")
    stored = {}
    for i in range(8):
        key = make_key(i, "loaded")
        stored[key] = make_block(key, 1, 1000 + 700 * i)
        pool.put(key, stored[key])
    return pool, stored


def assert_intact(pool, stored):
    for key, block in stored.items():
        assert pool.get(key) == block


def test_error_hierarchy():
    assert issubclass(errors.EMSError, Exception)
    for name in [
        "InvalidKeyError", "BufferSizeError", "BufferNotContiguousError",
        "BlockTooLargeError", "EmptyBlockError", "BufferNotWritableError",
        "CapacityError",
    ]:
        assert issubclass(getattr(errors, name), errors.EMSError)
        assert issubclass(getattr(errors, name), ValueError)
    assert issubclass(errors.ArenaError, OSError)
    assert issubclass(errors.AttachError, OSError)
    for name in ["PoolFullError", "ReadOnlyPoolError", "PoolClosedError"]:
        assert issubclass(getattr(errors, name), errors.EMSError)


# ---- keys -------------------------------------------------------------------------


@pytest.mark.parametrize("length", [31, 33, 0])
@pytest.mark.parametrize("call", ["put", "get", "get_into", "exists", "length", "delete",
                                  "reserve"])
def test_key_wrong_length(loaded, length, call):
    pool, stored = loaded
    key = bytes(length)
    args = {
        "put": (key, b"abc"),
        "get": (key,),
        "get_into": (key, bytearray(3)),
        "exists": (key,),
        "length": (key,),
        "delete": (key,),
        "reserve": (key, 3),
    }[call]
    with pytest.raises(errors.InvalidKeyError) as info:
        getattr(pool, call)(*args)
    assert str(length) in str(info.value)
    assert "32" in str(info.value)
    assert_intact(pool, stored)


@pytest.mark.parametrize("length", [31, 33])
@pytest.mark.parametrize("call", ["put_many", "get_many_into", "exists_many",
                                  "match_prefix", "protect", "unprotect"])
def test_key_wrong_length_batch(loaded, length, call):
    pool, stored = loaded
    keys = [make_key(100), bytes(length), make_key(101)]
    args = {
        "put_many": (keys, [b"a", b"b", b"c"]),
        "get_many_into": (keys, [bytearray(1)] * 3),
        "exists_many": (keys,),
        "match_prefix": (keys,),
        "protect": (keys,),
        "unprotect": (keys,),
    }[call]
    with pytest.raises(errors.InvalidKeyError) as info:
        getattr(pool, call)(*args)
    assert str(length) in str(info.value)
    assert "32" in str(info.value)
    assert pool.exists(make_key(100)) is False
    assert_intact(pool, stored)


@pytest.mark.parametrize("nbytes", [95, 97, 31])
def test_key_batch_bytes_not_multiple(loaded, nbytes):
    pool, stored = loaded
    with pytest.raises(errors.InvalidKeyError) as info:
        pool.exists_many(bytes(nbytes))
    assert str(nbytes) in str(info.value)
    assert "32" in str(info.value)
    assert_intact(pool, stored)


@pytest.mark.parametrize("rows,width", [(3, 31), (3, 33), (32, 31), (32, 33)])
def test_key_batch_numpy_width(loaded, rows, width):
    # 32 rows of 31 or 33 bytes add up to a multiple of 32 bytes, so only the shape
    # shows that the keys are the wrong size.
    pool, stored = loaded
    keys = np.zeros((rows, width), dtype=np.uint8)
    with pytest.raises(errors.InvalidKeyError) as info:
        pool.exists_many(keys)
    assert str(width) in str(info.value)
    assert "32" in str(info.value)
    assert_intact(pool, stored)


def test_key_str(loaded):
    pool, stored = loaded
    with pytest.raises(errors.InvalidKeyError) as info:
        pool.get("k" * 32)
    assert "str" in str(info.value)
    assert_intact(pool, stored)


def test_key_not_buffer(loaded):
    pool, stored = loaded
    with pytest.raises(TypeError):
        pool.get(12345)
    assert_intact(pool, stored)


# ---- buffers ----------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-1, 1])
def test_get_into_wrong_size(loaded, delta):
    pool, stored = loaded
    key = next(iter(stored))
    size = len(stored[key])
    with pytest.raises(errors.BufferSizeError) as info:
        pool.get_into(key, bytearray(size + delta))
    assert str(size + delta) in str(info.value)
    assert str(size) in str(info.value)
    assert_intact(pool, stored)


def test_get_into_wrong_size_numpy(loaded):
    pool, stored = loaded
    key = next(iter(stored))
    size = len(stored[key])
    with pytest.raises(errors.BufferSizeError) as info:
        pool.get_into(key, np.zeros(size + 8, dtype=np.uint8))
    assert str(size + 8) in str(info.value)
    assert str(size) in str(info.value)
    assert_intact(pool, stored)


def test_get_many_into_wrong_size(loaded):
    pool, stored = loaded
    keys = list(stored)[:2]
    sizes = [len(stored[k]) for k in keys]
    with pytest.raises(errors.BufferSizeError) as info:
        pool.get_many_into(keys, [bytearray(sizes[0]), bytearray(sizes[1] + 5)])
    assert str(sizes[1] + 5) in str(info.value)
    assert str(sizes[1]) in str(info.value)
    assert_intact(pool, stored)


def test_get_into_not_contiguous(loaded):
    pool, stored = loaded
    key = next(iter(stored))
    size = len(stored[key])
    dst = np.zeros(2 * size, dtype=np.uint8)[::2]
    with pytest.raises(errors.BufferNotContiguousError) as info:
        pool.get_into(key, dst)
    assert "contiguous" in str(info.value)
    assert not dst.any()
    assert_intact(pool, stored)


def test_put_not_contiguous(loaded):
    pool, stored = loaded
    data = np.arange(2000, dtype=np.uint8)[::2]
    with pytest.raises(errors.BufferNotContiguousError) as info:
        pool.put(make_key(100), data)
    assert "contiguous" in str(info.value)
    assert pool.exists(make_key(100)) is False
    assert_intact(pool, stored)


@pytest.mark.parametrize("kind", ["bytes", "memoryview_of_bytes", "numpy_readonly"])
def test_get_into_read_only(loaded, kind):
    pool, stored = loaded
    key = next(iter(stored))
    size = len(stored[key])
    if kind == "bytes":
        dst = bytes(size)
    elif kind == "memoryview_of_bytes":
        dst = memoryview(bytes(size))
    else:
        dst = np.zeros(size, dtype=np.uint8)
        dst.flags.writeable = False
    with pytest.raises(errors.BufferNotWritableError) as info:
        pool.get_into(key, dst)
    assert "read-only" in str(info.value)
    assert_intact(pool, stored)


def test_get_into_interface_not_contiguous(loaded):
    pool, stored = loaded
    key = next(iter(stored))
    size = len(stored[key])
    dst = np.zeros(2 * size, dtype=np.uint8)[::2]
    with pytest.raises(errors.BufferNotContiguousError) as info:
        pool.get_into(key, ArrayInterfaceOnly(dst))
    assert "contiguous" in str(info.value)
    assert_intact(pool, stored)


def test_get_into_interface_read_only(loaded):
    pool, stored = loaded
    key = next(iter(stored))
    dst = np.zeros(len(stored[key]), dtype=np.uint8)
    dst.flags.writeable = False
    with pytest.raises(errors.BufferNotWritableError) as info:
        pool.get_into(key, ArrayInterfaceOnly(dst))
    assert "read-only" in str(info.value)
    assert not dst.any()
    assert_intact(pool, stored)


def test_get_into_tensor_not_contiguous(loaded):
    pool, stored = loaded
    key = next(iter(stored))
    size = len(stored[key])
    dst = np.zeros((size, 2), dtype=np.uint8)[:, 0]
    with pytest.raises(errors.BufferNotContiguousError) as info:
        pool.get_into(key, TensorLike(dst))
    assert "contiguous" in str(info.value)
    assert not dst.any()
    assert_intact(pool, stored)


def test_get_into_tensor_on_gpu(loaded):
    pool, stored = loaded
    key = next(iter(stored))
    dst = TensorLike(np.zeros(len(stored[key]), dtype=np.uint8), device="cuda")
    with pytest.raises(TypeError) as info:
        pool.get_into(key, dst)
    assert "cuda" in str(info.value)
    assert_intact(pool, stored)


def test_get_into_tensor_wrong_size(loaded):
    pool, stored = loaded
    key = next(iter(stored))
    size = len(stored[key])
    with pytest.raises(errors.BufferSizeError) as info:
        pool.get_into(key, TensorLike(np.zeros(size + 4, dtype=np.uint8)))
    assert str(size + 4) in str(info.value)
    assert str(size) in str(info.value)
    assert_intact(pool, stored)


def test_get_into_no_buffer(loaded):
    pool, stored = loaded
    key = next(iter(stored))
    with pytest.raises(TypeError):
        pool.get_into(key, object())
    assert_intact(pool, stored)


# ---- block sizes ------------------------------------------------------------------


def test_put_too_large(loaded):
    pool, stored = loaded
    size = pool.max_block_size + 1
    with pytest.raises(errors.BlockTooLargeError) as info:
        pool.put(make_key(100), bytes(size))
    assert str(size) in str(info.value)
    assert str(pool.max_block_size) in str(info.value)
    assert pool.exists(make_key(100)) is False
    assert_intact(pool, stored)


def test_reserve_too_large(loaded):
    pool, stored = loaded
    size = pool.max_block_size + 1
    with pytest.raises(errors.BlockTooLargeError) as info:
        pool.reserve(make_key(100), size)
    assert str(size) in str(info.value)
    assert str(pool.max_block_size) in str(info.value)
    assert_intact(pool, stored)


def test_put_many_too_large(loaded):
    pool, stored = loaded
    size = pool.max_block_size + 1
    with pytest.raises(errors.BlockTooLargeError) as info:
        pool.put_many([make_key(100)], [bytes(size)])
    assert str(size) in str(info.value)
    assert str(pool.max_block_size) in str(info.value)
    assert_intact(pool, stored)


def test_put_empty(loaded):
    pool, stored = loaded
    with pytest.raises(errors.EmptyBlockError) as info:
        pool.put(make_key(100), b"")
    assert "0" in str(info.value)
    assert pool.exists(make_key(100)) is False
    assert_intact(pool, stored)


def test_reserve_empty(loaded):
    pool, stored = loaded
    with pytest.raises(errors.EmptyBlockError) as info:
        pool.reserve(make_key(100), 0)
    assert "0" in str(info.value)
    assert_intact(pool, stored)


# ---- construction -----------------------------------------------------------------


def test_capacity_too_small():
    with pytest.raises(errors.CapacityError) as info:
        ems.Pool(32 * KiB, slab_size=64 * KiB)
    assert str(32 * KiB) in str(info.value)
    assert str(64 * KiB) in str(info.value)


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_not_positive(capacity):
    with pytest.raises(errors.CapacityError) as info:
        ems.Pool(capacity, slab_size=64 * KiB)
    assert f"got {capacity}" in str(info.value)


def test_capacity_above_memory():
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(errors.CapacityError) as info:
        ems.Pool(memory + 1 * MiB)
    assert str(memory + 1 * MiB) in str(info.value)
    assert str(memory) in str(info.value)


def test_capacity_too_small_default_slab():
    with pytest.raises(errors.CapacityError) as info:
        ems.Pool(512 * KiB)
    assert str(512 * KiB) in str(info.value)
    assert str(1 * MiB) in str(info.value)


@pytest.mark.parametrize("slab_size", [100_000, 32 * KiB, 2 << 30, 0, 3 * MiB])
def test_bad_slab_size(slab_size):
    with pytest.raises(ValueError) as info:
        ems.Pool(64 * MiB, slab_size=slab_size)
    assert str(slab_size) in str(info.value)
    message = str(info.value)
    assert "65536" in message or "64 KiB" in message
    assert "1073741824" in message or "1 GiB" in message


@pytest.mark.parametrize("pages", ["huge", "", "SMALL"])
def test_bad_pages(pages):
    with pytest.raises(ValueError) as info:
        ems.Pool(1 * MiB, slab_size=64 * KiB, pages=pages)
    assert repr(pages) in str(info.value) or f'"{pages}"' in str(info.value)


# ---- attached pools ---------------------------------------------------------------


@pytest.fixture
def attached(loaded):
    pool, stored = loaded
    reader = ems.Pool.attach(pool.name)
    yield pool, reader, stored
    reader.close()


@pytest.mark.parametrize("call", ["put", "delete", "reserve", "put_many", "protect",
                                  "unprotect"])
def test_attached_write(attached, call):
    pool, reader, stored = attached
    key = next(iter(stored))
    args = {
        "put": (make_key(100), b"abc"),
        "delete": (key,),
        "reserve": (make_key(100), 3),
        "put_many": ([make_key(100)], [b"abc"]),
        "protect": ([key],),
        "unprotect": ([key],),
    }[call]
    with pytest.raises(errors.ReadOnlyPoolError):
        getattr(reader, call)(*args)
    assert_intact(reader, stored)
    assert_intact(pool, stored)
    assert pool.exists(make_key(100)) is False


def test_attach_unknown_name():
    name = "ems-no-such-pool-7f3a"
    with pytest.raises(errors.AttachError) as info:
        ems.Pool.attach(name)
    assert name in str(info.value)


def test_attach_dead_pid():
    # A /proc path whose process does not exist.
    path = "/proc/999999999/fd/3"
    with pytest.raises(errors.AttachError) as info:
        ems.Pool.attach(path)
    assert path in str(info.value)


def test_attach_not_a_pool(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"not a pool" * 100_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(errors.AttachError):
            ems.Pool.attach(fd)
    finally:
        os.close(fd)


def test_attach_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(errors.AttachError):
            ems.Pool.attach(fd)
    finally:
        os.close(fd)


# ---- closed pools -----------------------------------------------------------------


@pytest.mark.parametrize(
    "call,args",
    [
        ("put", (make_key(0), b"abc")),
        ("get", (make_key(0),)),
        ("get_into", (make_key(0), bytearray(3))),
        ("exists", (make_key(0),)),
        ("length", (make_key(0),)),
        ("delete", (make_key(0),)),
        ("put_many", ([make_key(0)], [b"abc"])),
        ("get_many_into", ([make_key(0)], [bytearray(3)])),
        ("exists_many", ([make_key(0)],)),
        ("match_prefix", ([make_key(0)],)),
        ("protect", ([make_key(0)],)),
        ("unprotect", ([make_key(0)],)),
        ("reserve", (make_key(0), 3)),
        ("stats", ()),
    ],
)
def test_closed_pool(make_pool, call, args):
    pool = make_pool(1 * MiB, slab_size=64 * KiB)
    pool.put(make_key(0), b"abc")
    pool.close()
    with pytest.raises(errors.PoolClosedError):
        getattr(pool, call)(*args)


def test_closed_attached(loaded):
    pool, stored = loaded
    reader = ems.Pool.attach(pool.name)
    reader.close()
    with pytest.raises(errors.PoolClosedError):
        reader.get(next(iter(stored)))
    assert_intact(pool, stored)


def test_closed_reservation_commit(make_pool):
    pool = make_pool(1 * MiB, slab_size=64 * KiB)
    res = pool.reserve(make_key(0), 100)
    pool.close()
    with pytest.raises(errors.PoolClosedError):
        res.commit()


# ---- a pool whose blocks are all reserved -----------------------------------------


def test_pool_full(make_pool):
    pool = make_pool(1 * MiB, slab_size=64 * KiB, max_blocks=1024)
    committed = {}
    for i in range(8):
        key = make_key(i, "committed")
        committed[key] = make_block(key, 1, 4096)
        pool.put(key, committed[key])
    reservations = []
    with pytest.raises(errors.PoolFullError):
        for i in range(2000):
            res = pool.reserve(make_key(i, "held"), 4096)
            res.buffer[:] = make_block(make_key(i, "held"), 1, 4096)
            reservations.append(res)
    assert len(reservations) > 0
    assert len(reservations) <= 256
    with pytest.raises(errors.PoolFullError):
        pool.put(make_key(0, "late"), bytes(4096))
    assert pool.exists(make_key(0, "late")) is False
    assert pool.stats()["pool_full"] >= 2
    for key, block in committed.items():
        got = pool.get(key)
        assert got is None or got == block
    for res in reservations:
        res.abort()
    assert pool.stats()["blocks"] <= len(committed)
    for key, block in committed.items():
        got = pool.get(key)
        assert got is None or got == block
    assert pool.put(make_key(0, "late"), bytes(4096)) is True
    assert pool.get(make_key(0, "late")) == bytes(4096)


def test_pool_full_then_commit(make_pool):
    pool = make_pool(1 * MiB, slab_size=64 * KiB, max_blocks=1024)
    reservations = []
    with pytest.raises(errors.PoolFullError):
        for i in range(2000):
            key = make_key(i, "held")
            res = pool.reserve(key, 4096)
            res.buffer[:] = make_block(key, 1, 4096)
            reservations.append((key, res))
    for key, res in reservations:
        res.commit()
    assert pool.stats()["blocks"] == len(reservations)
    for key, res in reservations:
        assert pool.get(key) == make_block(key, 1, 4096)
