"""Suspending a pool (Pool.set_suspended): reads miss, writes store nothing without raising,
and a resume serves every block stored before.

The pool tests run on an owner pool and on a handle attached to it. The client tests run a
real transfer server (ems._core.Server) in this process and reach it through ems.connect
in local mode, as an engine on the daemon's host would, and an embedded client with a
spill tier.
"""
import errno
import logging

import pytest

import ems
import ems._core as core
from conftest import KiB, MiB, make_block, make_key
from ems.errors import PoolClosedError, PoolSuspendedError, ReadOnlyPoolError

SECRET = b"suspend test secret"
COUNT = 12
SIZE = 3000


def fill(pool, tag="s"):
    """Put COUNT blocks and return {key: block}."""
    stored = {}
    for i in range(COUNT):
        key = make_key(i, tag)
        stored[key] = make_block(key, 1, SIZE)
        assert pool.put(key, stored[key]) is True
    return stored


def reads_found(pool, stored) -> dict:
    """How many of the stored keys each read call finds."""
    keys = list(stored)
    buffers = [bytearray(SIZE) for _ in keys]
    hits = pool.get_many_into(keys, buffers)
    for key, buffer, hit in zip(keys, buffers, hits):
        if hit:
            assert bytes(buffer) == stored[key]
    found = {
        "get": sum(pool.get(key) is not None for key in keys),
        "get_into": sum(pool.get_into(key, bytearray(SIZE)) for key in keys),
        "get_many_into": sum(hits),
        "exists": sum(pool.exists(key) for key in keys),
        "exists_many": sum(pool.exists_many(keys)),
        "match_prefix": pool.match_prefix(keys),
    }
    for key in keys:
        block = pool.get(key)
        assert block is None or block == stored[key]
    return found


def all_calls(count: int) -> dict:
    return dict.fromkeys(["get", "get_into", "get_many_into", "exists", "exists_many",
                          "match_prefix"], count)


# ---- the pool ------------------------------------------------------------------------


def test_pool_starts_serving(pool):
    assert pool.suspended is False
    stats = pool.stats()
    assert stats["suspended"] is False
    assert stats["suspended_drops"] == 0


def test_reads_miss_while_suspended(pool):
    stored = fill(pool)
    pool.set_suspended(True)
    assert pool.suspended is True
    assert pool.stats()["suspended"] is True
    before = pool.stats()
    assert reads_found(pool, stored) == all_calls(0)
    after = pool.stats()
    assert after["hits"] == before["hits"]
    assert after["misses"] > before["misses"]
    assert after["blocks"] == COUNT


def test_resume_serves_every_stored_block(pool):
    stored = fill(pool)
    pool.set_suspended(True)
    pool.set_suspended(False)
    assert pool.suspended is False
    assert reads_found(pool, stored) == all_calls(COUNT)


def test_puts_store_nothing_while_suspended(pool):
    stored = fill(pool)
    pool.set_suspended(True)
    new = [make_key(i, "new") for i in range(4)]

    # A new key and a stored key both return False: nothing raises into the engine.
    assert pool.put(new[0], b"x" * 100) is False
    assert pool.put(next(iter(stored)), b"y" * 100) is False
    assert pool.put_many(new, [b"z" * 200] * 4) == 0
    stats = pool.stats()
    assert stats["suspended_drops"] == 6
    assert stats["blocks"] == COUNT
    assert stats["puts"] == COUNT

    pool.set_suspended(False)
    assert all(pool.get(key) is None for key in new)
    assert pool.put_many(new, [b"z" * 200] * 4) == 4
    assert reads_found(pool, stored) == all_calls(COUNT)
    assert pool.stats()["suspended_drops"] == 6


def test_put_argument_errors_still_raise(pool):
    pool.set_suspended(True)
    with pytest.raises(ems.errors.EmptyBlockError):
        pool.put(make_key(0), b"")
    with pytest.raises(ems.errors.BlockTooLargeError):
        pool.put_many([make_key(1)], [bytes(pool.max_block_size + 1)])


def test_reserve_raises_while_suspended(pool):
    pool.set_suspended(True)
    with pytest.raises(PoolSuspendedError, match="suspended"):
        pool.reserve(make_key(0), 100)
    assert pool.stats()["blocks"] == 0


def test_commit_after_suspend_drops_block(pool):
    key = make_key(0, "late")
    reservation = pool.reserve(key, 256)
    reservation.buffer[:] = b"r" * 256
    pool.set_suspended(True)
    assert reservation.commit() is False
    stats = pool.stats()
    assert stats["blocks"] == 0
    assert stats["bytes_used"] == 0
    assert stats["suspended_drops"] == 1
    pool.set_suspended(False)
    assert pool.get(key) is None


def test_attached_handle_misses_and_cannot_resume(pool):
    stored = fill(pool)
    reader = ems.Pool.attach(pool.name)
    try:
        assert reads_found(reader, stored) == all_calls(COUNT)
        pool.set_suspended(True)
        assert reader.suspended is True
        assert reader.stats()["suspended"] is True
        assert reads_found(reader, stored) == all_calls(0)
        with pytest.raises(ReadOnlyPoolError):
            reader.set_suspended(False)
        assert pool.suspended is True
        pool.set_suspended(False)
        assert reads_found(reader, stored) == all_calls(COUNT)
    finally:
        reader.close()


def test_closed_pool_rejects_suspension(make_pool):
    pool = make_pool(4 * MiB, slab_size=256 * KiB, pages="small")
    pool.close()
    with pytest.raises(PoolClosedError):
        pool.set_suspended(True)
    with pytest.raises(PoolClosedError):
        pool.suspended


# ---- clients -------------------------------------------------------------------------


@pytest.fixture
def served(make_pool, tmp_path):
    """(pool, server) of a real transfer server on a 16 MiB pool, with a Unix socket."""
    pool = make_pool(16 * MiB, slab_size=1 * MiB, pages="small")
    server = core.Server(pool, host="127.0.0.1", port=0, unix_path=str(tmp_path / "ems.sock"),
                         secret=SECRET, node_id=1, io_timeout_ms=1000)
    yield pool, server
    server.stop()


def test_local_client_put_not_stored_while_suspended(served, tmp_path, caplog):
    pool, _ = served
    keys = [make_key(i, "client") for i in range(6)]
    blocks = [make_block(key, 1, SIZE) for key in keys]
    with ems.connect("local", socket_path=str(tmp_path / "ems.sock"), secret=SECRET,
                     tenant="t") as client:
        assert client.put_many(keys[:3], blocks[:3]) == 3
        pool.set_suspended(True)

        with caplog.at_level(logging.WARNING, logger="ems.client"):
            assert client.put(keys[3], blocks[3]) is False
            assert client.put_many(keys[3:], blocks[3:]) == 0
        assert "not serving" in caplog.text
        assert client.stats()["put_suspended"] == 4
        buffers = [bytearray(SIZE) for _ in keys]
        assert client.get_many_into(keys, buffers) == [False] * 6
        assert client.exists_many(keys) == [False] * 6
        assert client.match_prefix(keys) == 0
        assert pool.stats()["blocks"] == 3

        pool.set_suspended(False)
        hits = client.get_many_into(keys, buffers)
        assert hits == [True] * 3 + [False] * 3
        assert [bytes(b) for b in buffers[:3]] == blocks[:3]
        assert client.put_many(keys[3:], blocks[3:]) == 3


def test_connection_put_returns_eacces_per_key(served):
    pool, server = served
    pool.set_suspended(True)
    conn = core.Connection("127.0.0.1", server.port, secret=SECRET, tenant="t")
    try:
        results = conn.put_many([make_key(0), make_key(1)], [b"a" * 10, b"b" * 10])
        assert results == [-errno.EACCES, -errno.EACCES]
        stats = conn.stats()
        assert stats["suspended"] == 1
        assert stats["suspended_drops"] == 2
    finally:
        conn.close()


def test_embedded_tier_not_read_while_suspended(tmp_path):
    from ems.tiering import tier as tiering
    pool = ems.Pool(4 * MiB, slab_size=1 * MiB, pages="small")
    tier = tiering.open_tier(pool, str(tmp_path), 64 * MiB, io="posix")
    with ems.client.EmbeddedClient(pool, tier) as client:
        size = 256 * KiB
        keys = [make_key(i, "tier") for i in range(48)]
        blocks = [make_block(key, 1, size) for key in keys]
        assert client.put_many(keys, blocks) == len(keys)
        evicted = pool.stats()["evictions"]
        assert evicted > 0
        tier._drain()
        on_disk = [key for key, present in zip(keys, pool.exists_many(keys)) if not present]
        assert on_disk and all(tier.probe(on_disk))

        pool.set_suspended(True)
        assert client.exists_many(on_disk) == [False] * len(on_disk)
        assert client.get_many_into(on_disk, [bytearray(size) for _ in on_disk]) == \
            [False] * len(on_disk)
        assert client.match_prefix(keys) == 0
        assert client.prefetch(on_disk) == 0

        pool.set_suspended(False)
        buffers = [bytearray(size) for _ in on_disk]
        assert client.get_many_into(on_disk, buffers) == [True] * len(on_disk)
        assert [bytes(b) for b in buffers] == [blocks[keys.index(k)] for k in on_disk]
