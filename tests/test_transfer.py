"""Functional tests of the transfer engine: ems._core.Server and Connection on 127.0.0.1.

Covers block round trips, tenants, authentication, the directory, the local socket,
deadlines against peers that stop responding, the connection limit and shutdown.
Malformed input is in test_transfer_bad_input.py.
"""
import errno
import os
import socket
import threading
import time

import pytest

import ems
import ems._core as core
from conftest import KiB, MiB, make_block, make_key
from ems.errors import AuthenticationError, TransferError
from fuzz_frame import (BUSY, HELLO, OK, RESPONSE, STATS, UNAUTHENTICATED, connect, drain,
                        encode_frame, hello_payload, read_response)

SECRET = b"cluster secret"


def start_server(pool, **options):
    settings = dict(host="127.0.0.1", port=0, secret=SECRET, node_id=1,
                    max_payload=4 * MiB, io_timeout_ms=500)
    settings.update(options)
    return core.Server(pool, **settings)


def open_connection(server, tenant="t", **options):
    settings = dict(secret=SECRET, tenant=tenant)
    settings.update(options)
    return core.Connection("127.0.0.1", server.port, **settings)


def wait_until(condition, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def server(make_pool):
    pool = make_pool(64 * MiB)
    server = start_server(pool)
    yield server
    server.stop()


@pytest.fixture
def conn(server):
    connection = open_connection(server)
    yield connection
    connection.close()


def get_blocks(connection, keys, lengths):
    """Return (results, buffers) of one GET of `keys` into buffers of `lengths` bytes."""
    buffers = [bytearray(n) for n in lengths]
    return connection.get_many_into(keys, buffers), buffers


# ---- blocks -----------------------------------------------------------------------------

def test_round_trip_block_sizes(server, conn):
    sizes = [1, 4 * KiB, 1 * MiB]
    keys = [make_key(size, "round trip") for size in sizes]
    blocks = [make_block(key, 1, size) for key, size in zip(keys, sizes)]

    assert conn.put_many(keys, blocks) == [0, 0, 0]
    results, buffers = get_blocks(conn, keys, sizes)
    assert results == sizes
    for buffer, block in zip(buffers, blocks):
        assert bytes(buffer) == block

    # One key per call as well, so each size also travels alone.
    for key, block in zip(keys, blocks):
        results, buffers = get_blocks(conn, [key], [len(block)])
        assert results == [len(block)]
        assert bytes(buffers[0]) == block

    stats = server.stats()
    assert stats["put_stored"] == 3
    assert stats["get_hits"] == 6
    assert stats["get_misses"] == 0


def test_put_twice_returns_already_stored(conn):
    key = make_key(1, "twice")
    first, second = make_block(key, 1, 100), make_block(key, 2, 100)

    assert conn.put_many([key], [first]) == [0]
    assert conn.put_many([key], [second]) == [1]

    # The first block stays: a second PUT of a key never replaces it.
    results, buffers = get_blocks(conn, [key], [100])
    assert results == [100]
    assert bytes(buffers[0]) == first


def test_exists_match_prefix_delete(conn):
    chain = [make_key(i, "chain") for i in range(5)]
    blocks = [make_block(key, 1, 64) for key in chain[:3]]
    assert conn.put_many(chain[:3], blocks) == [0, 0, 0]

    assert conn.exists_many(chain) == [True, True, True, False, False]
    assert conn.match_prefix(chain) == 3
    assert conn.match_prefix(chain[3:] + chain[:3]) == 0
    assert conn.match_prefix([]) == 0

    assert conn.delete_many([chain[1], chain[4]]) == [0, -errno.ENOENT]
    assert conn.exists_many(chain[:3]) == [True, False, True]
    assert conn.match_prefix(chain) == 1
    results, _ = get_blocks(conn, [chain[1]], [64])
    assert results == [-errno.ENOENT]
    assert conn.delete_many([chain[1]]) == [-errno.ENOENT]


def test_get_wrong_length_is_emsgsize(server, conn):
    key, other = make_key(1, "length"), make_key(2, "length")
    block, other_block = make_block(key, 1, 4 * KiB), make_block(other, 1, 300)
    assert conn.put_many([key, other], [block, other_block]) == [0, 0]

    results, buffers = get_blocks(conn, [key, other], [4 * KiB - 1, 300])
    assert results == [-errno.EMSGSIZE, 300]
    assert buffers[0] == bytes(4 * KiB - 1)      # left untouched
    assert bytes(buffers[1]) == other_block

    # Nothing else broke: the same connection reads the block with the right length.
    assert conn.alive
    conn.ping()
    results, buffers = get_blocks(conn, [key], [4 * KiB])
    assert results == [4 * KiB]
    assert bytes(buffers[0]) == block
    assert server.take_log() == []


# ---- tenants ----------------------------------------------------------------------------

def test_tenant_isolation(server):
    tenant_a = open_connection(server, tenant="tenant-a")
    tenant_b = open_connection(server, tenant="tenant-b")
    keys = [make_key(i, "shared name") for i in range(3)]
    blocks_a = [make_block(key, 1, 512) for key in keys]
    assert tenant_a.put_many(keys, blocks_a) == [0, 0, 0]

    # Tenant B can neither read nor probe nor delete tenant A's blocks.
    results, _ = get_blocks(tenant_b, keys, [512] * 3)
    assert results == [-errno.ENOENT] * 3
    assert tenant_b.exists_many(keys) == [False] * 3
    assert tenant_b.match_prefix(keys) == 0
    assert tenant_b.delete_many(keys) == [-errno.ENOENT] * 3

    # The same key names under tenant B are new blocks, not tenant A's.
    blocks_b = [make_block(key, 2, 512) for key in keys]
    assert tenant_b.put_many(keys, blocks_b) == [0, 0, 0]
    results, buffers = get_blocks(tenant_b, keys, [512] * 3)
    assert results == [512] * 3
    assert [bytes(b) for b in buffers] == blocks_b

    results, buffers = get_blocks(tenant_a, keys, [512] * 3)
    assert results == [512] * 3
    assert [bytes(b) for b in buffers] == blocks_a
    assert tenant_a.match_prefix(keys) == 3
    tenant_a.close()
    tenant_b.close()


def test_invalid_tenant_rejected_by_client(server):
    for tenant in ["", "a b", "x" * 65]:
        with pytest.raises(ValueError, match="tenant"):
            open_connection(server, tenant=tenant)


def test_non_ascii_tenant_rejected_by_client(server):
    with pytest.raises(ValueError, match="tenant"):
        open_connection(server, tenant="caf\u00e9")


# ---- authentication ---------------------------------------------------------------------

def test_wrong_secret_rejected(server):
    failures = server.stats()["auth_failures"]
    with pytest.raises(AuthenticationError, match="wrong cluster secret") as raised:
        open_connection(server, secret=b"not the secret")
    assert raised.value.errno == errno.EACCES
    assert server.stats()["auth_failures"] == failures + 1
    log = server.take_log()
    assert any("authentication failed: wrong cluster secret" in line for line in log), log

    # A node role proof is bound to its role and tenant as well.
    with pytest.raises(AuthenticationError):
        open_connection(server, secret=SECRET[:-1], role="node")
    assert server.stats()["auth_failures"] == failures + 2


def test_missing_secret_rejected(server):
    """The client raises before it sends AUTH, so the server counts and logs nothing."""
    with pytest.raises(AuthenticationError, match="requires the cluster secret") as raised:
        open_connection(server, secret=None)
    assert raised.value.errno == errno.EACCES

    # The server's side of a missing secret: a request without AUTH is rejected and logged.
    errors = server.stats()["errors"]
    sock = connect(server.port)
    try:
        sock.sendall(encode_frame(HELLO, hello_payload(b"t"), 1))
        assert read_response(sock).status == OK
        sock.sendall(encode_frame(STATS, request_id=2))
        assert read_response(sock).status == UNAUTHENTICATED
    finally:
        sock.close()
    assert server.stats()["errors"] == errors + 1
    assert wait_until(lambda: any("request before authentication" in line
                                  for line in server.take_log()))


def test_server_without_secret_accepts_client_without_one(make_pool):
    pool = make_pool(16 * MiB)
    server = start_server(pool, secret=None)
    key = make_key(1, "open server")
    block = make_block(key, 1, 2000)

    client = open_connection(server, secret=None)
    assert client.put_many([key], [block]) == [0]
    results, buffers = get_blocks(client, [key], [2000])
    assert results == [2000]
    assert bytes(buffers[0]) == block

    # A client that has a secret skips AUTH when the server requires none.
    with_secret = open_connection(server)
    assert with_secret.exists_many([key]) == [True]
    assert server.stats()["auth_failures"] == 0
    client.close()
    with_secret.close()
    server.stop()


# ---- directory --------------------------------------------------------------------------

def test_directory_register_and_lookup(server):
    keys = [make_key(i, "directory") for i in range(3)]
    node = open_connection(server, role="node")
    client = open_connection(server)

    node.dir_register(core.tenant_keys("t", keys[:2]), 7)
    assert client.dir_lookup(keys) == [7, 7, core.HOLDER_NONE]
    assert server.dir_lookup(core.tenant_keys("t", keys)) == [7, 7, core.HOLDER_NONE]

    # The entries are keyed by stored keys, so another tenant finds none of them.
    other_tenant = open_connection(server, tenant="other")
    assert other_tenant.dir_lookup(keys) == [core.HOLDER_NONE] * 3

    # A client connection may not register, and is closed for trying.
    with pytest.raises(AuthenticationError):
        client.dir_register(core.tenant_keys("t", keys[2:]), 9)
    assert not client.alive
    assert any("directory registration needs the node role" in line
               for line in server.take_log())
    assert server.dir_lookup(core.tenant_keys("t", keys)) == [7, 7, core.HOLDER_NONE]

    # Nor may a node connection touch blocks.
    with pytest.raises(TransferError):
        node.put_many([keys[0]], [b"block"])
    assert server.stats()["put_stored"] == 0
    other_tenant.close()
    client.close()
    node.close()


# ---- local socket -----------------------------------------------------------------------

def test_local_socket_put_into_shared_mapping(make_pool, tmp_path):
    pool = make_pool(16 * MiB)
    path = str(tmp_path / "ems.sock")
    server = start_server(pool, unix_path=path)
    assert os.path.exists(path)
    keys = [make_key(i, "local") for i in range(2)]
    blocks = [make_block(keys[0], 1, 3000), make_block(keys[1], 1, 70000)]

    local = core.Connection(unix_path=path, secret=SECRET, tenant="t")
    fd = local.local_attach()
    try:
        assert local.put_many(keys, blocks) == [0, 0]
        assert local.put_many(keys, blocks) == [1, 1]
        stats = server.stats()
        assert stats["local_puts"] == 4
        assert stats["puts"] == 0          # no block crossed the socket

        # Another handle on the same memfd reads the blocks under their stored keys.
        reader = ems.Pool.attach(fd)
        stored = core.tenant_keys("t", keys)
        assert reader.get(stored[:32]) == blocks[0]
        assert reader.get(stored[32:]) == blocks[1]
        assert reader.get(keys[0]) is None   # raw keys are not stored keys
        reader.close()
    finally:
        os.close(fd)

    # A TCP client of the same tenant reads them too.
    remote = open_connection(server)
    results, buffers = get_blocks(remote, keys, [3000, 70000])
    assert results == [3000, 70000]
    assert [bytes(b) for b in buffers] == blocks
    remote.close()
    local.close()
    server.stop()
    assert not os.path.exists(path)


# ---- deadlines --------------------------------------------------------------------------

class SilentPeer:
    """A TCP server on 127.0.0.1 that accepts connections and, unless `answer_hello`, never
    sends a byte. With `answer_hello` it completes an unauthenticated HELLO and then goes
    silent. Sockets stay open until close()."""

    def __init__(self, answer_hello=False):
        self.answer_hello = answer_hello
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.listener.settimeout(0.1)
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.accepted.append(sock)
            if self.answer_hello:
                hello = read_response(sock)   # the same frame layout as a response
                challenge = bytes(32)
                payload = b"\x01\x00\x00\x00" + challenge   # version 1, no auth
                sock.sendall(encode_frame(HELLO, payload, hello.request_id, flags=RESPONSE))

    def close(self):
        self.stopping = True
        self.thread.join()
        for sock in self.accepted:
            sock.close()
        self.listener.close()


def test_silent_peer_costs_connect_deadline():
    peer = SilentPeer()
    try:
        started = time.monotonic()
        with pytest.raises(TransferError) as raised:
            core.Connection("127.0.0.1", peer.port, secret=SECRET, tenant="t", timeout_ms=300)
        elapsed = time.monotonic() - started
    finally:
        peer.close()
    assert raised.value.errno == errno.ETIMEDOUT
    assert 0.25 <= elapsed < 1.0


def test_stalled_peer_costs_call_deadline():
    peer = SilentPeer(answer_hello=True)
    try:
        connection = core.Connection("127.0.0.1", peer.port, tenant="t", timeout_ms=2000)
        assert connection.alive
        buffer = bytearray(100)
        started = time.monotonic()
        with pytest.raises(TransferError) as raised:
            connection.get_many_into([make_key(1)], [buffer], timeout_ms=300)
        elapsed = time.monotonic() - started
        assert raised.value.errno == errno.ETIMEDOUT
        assert 0.25 <= elapsed < 1.0
        assert not connection.alive

        # Every later call fails at once instead of waiting again.
        started = time.monotonic()
        with pytest.raises(TransferError):
            connection.ping(timeout_ms=300)
        assert time.monotonic() - started < 0.1
    finally:
        peer.close()


# ---- limits and shutdown ----------------------------------------------------------------

def test_max_connections_refuses_busy(make_pool):
    pool = make_pool(16 * MiB)
    server = start_server(pool, max_connections=2)
    first, second = open_connection(server), open_connection(server)
    key = make_key(1, "busy")
    assert first.put_many([key], [b"kept"]) == [0]

    # A raw connection beyond the limit gets a BUSY frame and is closed.
    sock = connect(server.port)
    try:
        response = read_response(sock)
        assert response.status == BUSY
        assert response.flags == RESPONSE
        assert drain(sock, 2.0) == (b"", True)
    finally:
        sock.close()

    # A client beyond the limit raises; the open connections keep working.
    with pytest.raises(TransferError, match="connection limit") as raised:
        open_connection(server)
    assert raised.value.errno == errno.EBUSY
    assert server.stats()["refused_busy"] == 2
    log = server.take_log()
    assert sum("connections open (the limit)" in line for line in log) == 2, log
    assert second.exists_many([key]) == [True]
    first.ping()

    # Closing one makes room for a new one.
    first.close()
    assert wait_until(lambda: server.stats()["connections_open"] == 1)
    third = open_connection(server)
    assert third.exists_many([key]) == [True]
    third.close()
    second.close()
    server.stop()


def test_stop_with_open_connections_is_prompt(make_pool):
    pool = make_pool(16 * MiB)
    # A long io_timeout: stop() must not wait for a stalled frame to time out.
    server = start_server(pool, io_timeout_ms=30000)
    connections = [open_connection(server) for _ in range(3)]
    stalled = connect(server.port)
    stalled.sendall(encode_frame(HELLO, hello_payload(b"t"), 1)[:-1])   # one byte short
    assert wait_until(lambda: server.stats()["connections_open"] == 4)

    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.0
    assert not server.running
    for connection in connections:
        with pytest.raises(TransferError):
            connection.ping(timeout_ms=1000)
    assert drain(stalled, 2.0) == (b"", True)   # closed (FIN or reset)
    stalled.close()
    server.stop()   # a second stop does nothing


def test_pool_close_stops_server(make_pool):
    pool = make_pool(16 * MiB)
    server = start_server(pool)
    port = server.port
    connection = open_connection(server)
    connection.ping()

    pool.close()
    assert not server.running
    with pytest.raises(TransferError):
        connection.ping(timeout_ms=1000)
    with pytest.raises(TransferError) as raised:
        core.Connection("127.0.0.1", port, secret=SECRET, tenant="t", timeout_ms=500)
    assert raised.value.errno == errno.ECONNREFUSED
