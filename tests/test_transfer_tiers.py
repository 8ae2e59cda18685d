"""The transfer server's miss handler: a lower tier serving what the pool misses.

Each test runs a real ems._core.Server over a real pool, on 127.0.0.1 and on a Unix socket,
with a Python handler backed by a dict, a stand-in for a spill tier on disk (LowerTier).
Its LOAD puts the block into the pool with pool.put. Every call is recorded, so a test can
check that a request made exactly one call with exactly the keys the pool lacked.
"""
import errno
import faulthandler
import logging
import threading
import time

import pytest

import ems._core as core
from conftest import KiB, MiB, make_block, make_key
from ems.errors import TransferError

SECRET = b"tier secret"
TENANT = "t"
BLOCK = 4 * KiB
DEADLOCK_S = 60   # seconds after which deadlock_watchdog ends a hung test run


class LowerTier:
    """A dict of stored key -> block as a stand-in for a spill tier, usable as a miss
    handler. LOAD puts found blocks into the pool, PROBE only reports them, and PREFETCH
    loads them on a background thread once `release_prefetch` is set."""

    def __init__(self, pool):
        self.pool = pool
        self.blocks = {}
        self.calls = []                 # (mode, [stored keys]) in call order
        self.lock = threading.Lock()
        self.release_prefetch = threading.Event()
        self.release_prefetch.set()
        self.loaders = []

    def add(self, key, block, tenant=TENANT):
        """Store `block` under the tenant's stored key of `key`, and return that key."""
        stored = core.tenant_keys(tenant, [key])
        self.blocks[stored] = block
        return stored

    def __call__(self, mode, keys):
        assert isinstance(keys, bytes) and len(keys) % 32 == 0
        batch = [keys[i:i + 32] for i in range(0, len(keys), 32)]
        with self.lock:
            self.calls.append((mode, batch))
        found = bytearray(len(batch))
        for i, key in enumerate(batch):
            block = self.blocks.get(key)
            if block is None:
                continue
            if mode == core.MISS_LOAD:
                self.pool.put(key, block)
            elif mode == core.MISS_PREFETCH:
                loader = threading.Thread(target=self._load_later, args=(key, block))
                loader.start()
                self.loaders.append(loader)
            found[i] = 1
        return bytes(found)

    def _load_later(self, key, block):
        self.release_prefetch.wait(10)
        self.pool.put(key, block)

    def take_calls(self):
        with self.lock:
            calls, self.calls = self.calls, []
        return calls


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture(autouse=True)
def deadlock_watchdog():
    """End the process with status 1 if a test hangs, since a deadlock that holds the GIL
    keeps pytest from failing the test itself. Run with -s to see every thread's stack."""
    faulthandler.dump_traceback_later(DEADLOCK_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def pool(make_pool):
    return make_pool(64 * MiB, pages="small")


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "ems.sock")


@pytest.fixture
def server(pool, sock_path):
    server = core.Server(pool, host="127.0.0.1", port=0, unix_path=sock_path, secret=SECRET,
                         node_id=1, max_payload=4 * MiB, io_timeout_ms=5000)
    yield server
    server.stop()


@pytest.fixture
def tier(pool, server):
    tier = LowerTier(pool)
    server.set_miss_handler(tier)
    yield tier
    tier.release_prefetch.set()
    for loader in tier.loaders:
        loader.join(10)


def connect(server, path=None, tenant=TENANT):
    """Open a client connection over TCP, or over the Unix socket at `path`."""
    if path is None:
        return core.Connection("127.0.0.1", server.port, secret=SECRET, tenant=tenant,
                               timeout_ms=5000)
    return core.Connection(unix_path=path, secret=SECRET, tenant=tenant, timeout_ms=5000)


@pytest.fixture(params=["tcp", "unix"])
def conn(request, server, sock_path):
    connection = connect(server, sock_path if request.param == "unix" else None)
    yield connection
    connection.close()


def get_blocks(connection, keys, lengths):
    buffers = [bytearray(n) for n in lengths]
    results = connection.get_many_into(keys, buffers, timeout_ms=5000)
    return results, [bytes(b) for b in buffers]


def stored(keys, tenant=TENANT):
    return [core.tenant_keys(tenant, [key]) for key in keys]


# ---- GET, EXISTS, MATCH_PREFIX and PREFETCH ---------------------------------------------

def test_get_loads_block_from_lower_tier(pool, tier, conn):
    key = make_key(1, "tier only")
    block = make_block(key, 1, BLOCK)
    stored_key = tier.add(key, block)
    assert not pool.exists(stored_key)

    results, buffers = get_blocks(conn, [key], [BLOCK])
    assert results == [BLOCK]
    assert buffers[0] == block
    assert pool.exists(stored_key)
    assert tier.take_calls() == [(core.MISS_LOAD, [stored_key])]

    # Now in the pool, the next GET never reaches the handler.
    results, buffers = get_blocks(conn, [key], [BLOCK])
    assert results == [BLOCK]
    assert buffers[0] == block
    assert tier.take_calls() == []


def test_get_batch_single_load_call(pool, server, tier, conn):
    keys = [make_key(i, "get batch") for i in range(8)]
    blocks = [make_block(key, 1, BLOCK + i) for i, key in enumerate(keys)]
    in_pool, in_tier = {0, 3, 6}, {1, 4, 7}
    for i in in_pool:
        assert conn.put_many([keys[i]], [blocks[i]]) == [0]
    for i in in_tier:
        tier.add(keys[i], blocks[i])
    before = server.stats()

    results, buffers = get_blocks(conn, keys, [len(b) for b in blocks])
    for i in range(8):
        if i in in_pool | in_tier:
            assert results[i] == len(blocks[i]), i
            assert buffers[i] == blocks[i], i
        else:
            assert results[i] == -errno.ENOENT, i
    missed = [i for i in range(8) if i not in in_pool]
    assert tier.take_calls() == [(core.MISS_LOAD, stored([keys[i] for i in missed]))]

    after = server.stats()
    assert after["miss_calls"] - before["miss_calls"] == 1
    assert after["miss_keys"] - before["miss_keys"] == len(missed)
    assert after["miss_found"] - before["miss_found"] == len(in_tier)
    assert after["get_hits"] - before["get_hits"] == len(in_pool | in_tier)


def test_get_unloaded_found_key_misses(pool, server, conn):
    """A LOAD that reports a key found without putting it, or puts a block of another
    length, leaves the key a miss or a length mismatch."""
    key_lied, key_short = make_key(1, "lying tier"), make_key(2, "lying tier")
    stored_short = core.tenant_keys(TENANT, [key_short])

    def handler(mode, keys):
        pool.put(stored_short, b"x" * (BLOCK - 1))
        return b"\x01" * (len(keys) // 32)

    server.set_miss_handler(handler)
    results, _ = get_blocks(conn, [key_lied, key_short], [BLOCK, BLOCK])
    assert results == [-errno.ENOENT, -errno.EMSGSIZE]


def test_exists_probes_lower_tier(pool, tier, conn):
    keys = [make_key(i, "exists") for i in range(4)]
    assert conn.put_many([keys[0]], [make_block(keys[0], 1, BLOCK)]) == [0]
    stored_tier = tier.add(keys[2], make_block(keys[2], 1, BLOCK))

    assert conn.exists_many(keys) == [True, False, True, False]
    assert tier.take_calls() == [(core.MISS_PROBE, stored([keys[1], keys[2], keys[3]]))]
    assert not pool.exists(stored_tier)   # PROBE loads nothing


def test_match_prefix_extends_over_lower_tier(pool, tier, conn):
    """Keys 0 and 1 in the pool, 2 in the tier, 3 in the pool, 4 in neither, 5 in the
    tier: the prefix is 4 and stops at key 4."""
    keys = [make_key(i, "prefix") for i in range(6)]
    for i in (0, 1, 3):
        assert conn.put_many([keys[i]], [make_block(keys[i], 1, BLOCK)]) == [0]
    for i in (2, 5):
        tier.add(keys[i], make_block(keys[i], 1, BLOCK))

    assert conn.match_prefix(keys) == 4
    # Only the keys after the pool's own prefix that the pool lacks are probed.
    assert tier.take_calls() == [(core.MISS_PROBE, stored([keys[2], keys[4], keys[5]]))]

    # A chain the pool contains whole makes no call.
    assert conn.match_prefix(keys[:2]) == 2
    assert conn.match_prefix(keys[2:4]) == 2
    assert tier.take_calls() == [(core.MISS_PROBE, stored([keys[2]]))]
    assert conn.match_prefix(keys[4:]) == 0
    assert tier.take_calls() == [(core.MISS_PROBE, stored([keys[4], keys[5]]))]


def test_prefetch_returns_before_load(pool, tier, conn):
    keys = [make_key(i, "prefetch") for i in range(3)]
    block = make_block(keys[1], 1, BLOCK)
    assert conn.put_many([keys[0]], [make_block(keys[0], 1, BLOCK)]) == [0]
    stored_tier = tier.add(keys[1], block)

    # The background load waits for release_prefetch, so PREFETCH must return first.
    tier.release_prefetch.clear()
    assert conn.prefetch(keys) == 2
    assert tier.take_calls() == [(core.MISS_PREFETCH, stored(keys[1:]))]
    assert not pool.exists(stored_tier)

    tier.release_prefetch.set()
    assert wait_until(lambda: pool.exists(stored_tier))
    results, buffers = get_blocks(conn, [keys[1]], [BLOCK])
    assert results == [BLOCK]
    assert buffers[0] == block
    assert tier.take_calls() == []


def test_prefetch_without_handler_counts_pool(server, conn):
    keys = [make_key(i, "prefetch alone") for i in range(3)]
    assert conn.put_many(keys[:2], [make_block(k, 1, 100) for k in keys[:2]]) == [0, 0]
    assert conn.prefetch(keys) == 2
    assert conn.prefetch([]) == 0
    assert server.stats()["miss_calls"] == 0


# ---- failures and lifecycle -------------------------------------------------------------

@pytest.mark.parametrize("kind, handler", [
    ("raises", lambda mode, keys: 1 / 0),
    ("too long", lambda mode, keys: b"\x01" * (len(keys) // 32 + 1)),
    ("too short", lambda mode, keys: b""),
    ("not bytes-like", lambda mode, keys: [1] * (len(keys) // 32)),
])
def test_failing_handler_gives_misses(pool, server, conn, caplog, kind, handler):
    key, cached = make_key(1, kind), make_key(2, kind)
    block = make_block(cached, 1, BLOCK)
    assert conn.put_many([cached], [block]) == [0]
    server.set_miss_handler(handler)

    with caplog.at_level(logging.ERROR, logger="ems.server"):
        for _ in range(3):
            results, buffers = get_blocks(conn, [cached, key], [BLOCK, BLOCK])
            assert results == [BLOCK, -errno.ENOENT]
            assert buffers[0] == block
            assert conn.exists_many([key]) == [False]
            assert conn.match_prefix([key]) == 0
    records = [r for r in caplog.records if r.name == "ems.server"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "treating the keys as not found" in records[0].getMessage()
    assert server.stats()["miss_handler_failures"] == 9

    # The connection and the server still serve.
    conn.ping()
    assert conn.alive
    assert conn.exists_many([cached]) == [True]


def test_handler_gets_tenant_stored_keys(pool, server, tier, sock_path):
    key = make_key(1, "two tenants")
    block_a = make_block(key, 1, BLOCK)
    tier.add(key, block_a, tenant="alpha")
    alpha = connect(server, tenant="alpha")
    beta = connect(server, sock_path, tenant="beta")

    results, buffers = get_blocks(alpha, [key], [BLOCK])
    assert results == [BLOCK]
    assert buffers[0] == block_a
    results, _ = get_blocks(beta, [key], [BLOCK])
    assert results == [-errno.ENOENT]   # the tier contains alpha's block only

    calls = tier.take_calls()
    assert len(calls) == 2
    alpha_key, beta_key = calls[0][1][0], calls[1][1][0]
    assert alpha_key == core.tenant_keys("alpha", [key])
    assert beta_key == core.tenant_keys("beta", [key])
    assert alpha_key != beta_key
    assert key not in (alpha_key, beta_key)
    alpha.close()
    beta.close()


def test_concurrent_clients_load_from_tier(pool, server, tier, sock_path):
    keys = [make_key(i, "concurrent") for i in range(64)]
    blocks = [make_block(key, 1, 1 * KiB + i) for i, key in enumerate(keys)]
    for key, block in zip(keys, blocks):
        tier.add(key, block)
    failures, read = [], set()

    def reader(path, offset):
        connection = connect(server, path)
        try:
            for round_ in range(20):
                picked = [(offset + round_ * 7 + j * 5) % len(keys) for j in range(4)]
                read.update(picked)
                results, buffers = get_blocks(connection, [keys[i] for i in picked],
                                              [len(blocks[i]) for i in picked])
                for i, result, buffer in zip(picked, results, buffers):
                    if result != len(blocks[i]) or buffer != blocks[i]:
                        failures.append((i, result))
        finally:
            connection.close()

    threads = [threading.Thread(target=reader, args=(sock_path if n % 2 else None, n * 13))
               for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    # Every key read reached the tier at least once, and only keys read did.
    calls = tier.take_calls()
    assert {mode for mode, batch in calls} == {core.MISS_LOAD}
    loaded = {key for mode, batch in calls for key in batch}
    assert loaded == set(stored([keys[i] for i in read]))


def test_stop_with_handler_blocked(pool, server, sock_path):
    started, stopped = threading.Event(), threading.Event()
    late_calls = []

    def slow_handler(mode, keys):
        if stopped.is_set():
            late_calls.append(mode)
        started.set()
        time.sleep(0.5)
        return bytes(len(keys) // 32)

    server.set_miss_handler(slow_handler)
    outcomes = []

    def reader(connection):
        try:
            for i in range(50):
                outcomes.append(get_blocks(connection, [make_key(i, "stop")], [BLOCK])[0])
        except TransferError as exc:
            outcomes.append(exc.errno)

    connections = [connect(server), connect(server, sock_path)]
    readers = [threading.Thread(target=reader, args=(c,)) for c in connections]
    for thread in readers:
        thread.start()
    assert started.wait(10)

    begin = time.monotonic()
    server.stop()
    took = time.monotonic() - begin
    stopped.set()
    assert took < 5, f"stop took {took:.1f} s"
    assert not server.running
    for thread in readers:
        thread.join(10)
    assert not any(thread.is_alive() for thread in readers)
    time.sleep(0.2)
    assert late_calls == []
    assert outcomes   # each reader got a result or a transport error
    for connection in connections:
        connection.close()


def test_pool_close_with_handler_blocked(make_pool):
    pool = make_pool(16 * MiB, pages="small")
    server = core.Server(pool, host="127.0.0.1", port=0, secret=SECRET, io_timeout_ms=5000)
    started = threading.Event()

    def slow_handler(mode, keys):
        started.set()
        time.sleep(0.5)
        return bytes(len(keys) // 32)

    server.set_miss_handler(slow_handler)
    connection = connect(server)
    outcomes = []

    def reader_main():
        # The server closes the connection while the handler runs, so the request fails.
        try:
            outcomes.append(connection.exists_many([make_key(1, "close")]))
        except TransferError as exc:
            outcomes.append(exc.errno)

    reader = threading.Thread(target=reader_main)
    reader.start()
    assert started.wait(10)

    pool.close()
    assert not server.running
    reader.join(10)
    assert not reader.is_alive()
    assert len(outcomes) == 1
    connection.close()


def test_clear_handler_waits_for_running_call(server, conn):
    started = threading.Event()
    finished = []

    def slow_handler(mode, keys):
        started.set()
        time.sleep(0.3)
        finished.append(mode)
        return bytes(len(keys) // 32)

    server.set_miss_handler(slow_handler)
    reader = threading.Thread(target=lambda: conn.exists_many([make_key(1, "clear")]))
    reader.start()
    assert started.wait(10)
    server.set_miss_handler(None)
    assert finished == [core.MISS_PROBE]   # set_miss_handler returned after the call
    reader.join(10)


def test_no_handler_keeps_old_behaviour(pool, server, conn):
    calls = []
    key = make_key(1, "no handler")
    server.set_miss_handler(lambda mode, keys: calls.append(mode) or b"\x01")
    server.set_miss_handler(None)

    results, _ = get_blocks(conn, [key], [BLOCK])
    assert results == [-errno.ENOENT]
    assert conn.exists_many([key]) == [False]
    assert conn.match_prefix([key]) == 0
    assert conn.prefetch([key]) == 0
    assert calls == []
    assert server.stats()["miss_calls"] == 0


def test_set_miss_handler_checks(server):
    with pytest.raises(TypeError, match="callable or None"):
        server.set_miss_handler(42)
    server.stop()
    with pytest.raises(TransferError, match="stopped"):
        server.set_miss_handler(lambda mode, keys: b"")
