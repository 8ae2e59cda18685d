"""The transfer server's local socket, GET pinning, connection churn and shutdown under load.

Each test runs a real ems._core.Server with a secret, listening on 127.0.0.1 and on a Unix
socket in the test's temporary directory. Raw frames (tests/fuzz_frame.py) drive the
LOCAL_* operations in orders a well-behaved client never sends. Pool statistics then show
whether a reservation leaked: `blocks` and `bytes_used` count reserved slots too.

A local client that writes outside its reserved slot in the shared mapping is trusted
(the socket is same-user only), so no test treats that as a fault.
"""
import errno
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import ems
import ems._core as core
from conftest import KiB, MiB, make_block, make_key
from fuzz_frame import (BAD_REQUEST, GET, HEADER_BYTES, LOCAL_ATTACH, LOCAL_COMMIT,
                        LOCAL_RESERVE, OK, PING, TOO_LARGE, UNAUTHENTICATED, batch, connect,
                        drain, encode_frame, encode_header, get_payload, handshake,
                        read_response)
from ems.errors import TransferError

SECRET = b"local socket secret"
TENANT = "t"
MAX_PAYLOAD = 16 * MiB


def start_server(pool, path, **options):
    settings = dict(host="127.0.0.1", port=0, unix_path=path, secret=SECRET, node_id=1,
                    max_payload=MAX_PAYLOAD, io_timeout_ms=1000)
    settings.update(options)
    return core.Server(pool, **settings)


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def unix_socket(path, stage=2, tenant=TENANT.encode(), timeout=5.0):
    """Return a raw connection to the Unix socket, past `stage` steps of the handshake."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    handshake(sock, stage, SECRET, tenant)
    return sock


def request(sock, opcode, payload=b"", request_id=7):
    sock.sendall(encode_frame(opcode, payload, request_id))
    return read_response(sock)


def local_reserve(sock, keys, lengths):
    """Send LOCAL_RESERVE and return (status, results, offsets)."""
    response = request(sock, LOCAL_RESERVE, get_payload(keys, lengths))
    assert response is not None, "server closed the connection on LOCAL_RESERVE"
    n = len(keys)
    if response.status != OK:
        return response.status, None, None
    assert response.payload_valid
    results = list(struct.unpack(f"<{n}q", response.payload[:8 * n]))
    offsets = list(struct.unpack(f"<{n}Q", response.payload[8 * n:]))
    return response.status, results, offsets


def local_commit(sock, n):
    """Send LOCAL_COMMIT for n reservations and return (status, results)."""
    response = request(sock, LOCAL_COMMIT, struct.pack("<II", n, 0))
    assert response is not None, "server closed the connection on LOCAL_COMMIT"
    if response.status != OK:
        return response.status, None
    return response.status, list(struct.unpack(f"<{n}q", response.payload))


def local_attach(sock):
    """Send LOCAL_ATTACH and return (mapping size, memfd)."""
    sock.sendall(encode_frame(LOCAL_ATTACH, request_id=9))
    data, fds, _, _ = socket.recv_fds(sock, HEADER_BYTES + 8, 1)
    assert len(fds) == 1, f"LOCAL_ATTACH sent {len(fds)} descriptors"
    assert len(data) == HEADER_BYTES + 8, data
    return struct.unpack("<Q", data[HEADER_BYTES:])[0], fds[0]


def assert_alive(sock):
    response = request(sock, PING, b"still here", request_id=11)
    assert response is not None, "server closed the connection"
    assert response.status == OK
    assert response.payload == b"still here"


def assert_closed(sock):
    data, closed = drain(sock, 3.0)
    assert closed, f"server kept the connection open (sent {len(data)} bytes)"


def assert_pool_usage(pool, blocks=0, bytes_used=0):
    """Wait for the pool to count `blocks` (committed and reserved), then check bytes_used."""
    assert wait_until(lambda: pool.stats()["blocks"] == blocks), pool.stats()["blocks"]
    assert pool.stats()["bytes_used"] == bytes_used


def fetch(connection, keys, lengths):
    buffers = [bytearray(n) for n in lengths]
    results = connection.get_many_into(keys, buffers, timeout_ms=5000)
    return results, [bytes(b) for b in buffers]


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "ems.sock")


@pytest.fixture
def daemon(make_pool, sock_path):
    pool = make_pool(16 * MiB, slab_size=1 * MiB, pages="small")
    server = start_server(pool, sock_path)
    client = core.Connection("127.0.0.1", server.port, secret=SECRET, tenant=TENANT,
                             timeout_ms=5000)
    yield pool, server, client
    client.close()
    server.stop()


# ---- LOCAL_RESERVE and LOCAL_COMMIT sent raw ----------------------------------------

def test_reserve_then_disconnect_aborts(daemon, sock_path):
    pool, server, client = daemon
    keys = [make_key(i, "disconnect") for i in range(3)]
    sizes = [4 * KiB, 100 * KiB, 1 * MiB]

    sock = unix_socket(sock_path)
    status, results, offsets = local_reserve(sock, keys, sizes)
    assert status == OK
    assert results == [0, 0, 0]
    assert pool.stats()["blocks"] == 3
    assert pool.stats()["bytes_used"] == sum(sizes)
    assert client.exists_many(keys) == [False] * 3   # reserved is not stored
    sock.close()

    assert_pool_usage(pool)
    assert wait_until(lambda: server.stats()["connections_open"] == 1)   # the client
    assert client.exists_many(keys) == [False] * 3
    blocks = [make_block(key, 1, size) for key, size in zip(keys, sizes)]
    assert client.put_many(keys, blocks, timeout_ms=5000) == [0, 0, 0]
    assert fetch(client, keys, sizes) == (sizes, blocks)


def test_reserve_cut_mid_frame_reserves_nothing(daemon, sock_path):
    pool, server, client = daemon
    keys = [make_key(i, "cut") for i in range(4)]
    frame = encode_frame(LOCAL_RESERVE, get_payload(keys, [8 * KiB] * 4))
    sock = unix_socket(sock_path)
    sock.sendall(frame[:-5])
    sock.close()
    assert wait_until(lambda: server.stats()["connections_open"] == 1)
    assert_pool_usage(pool)


def test_second_reserve_aborts_first(daemon, sock_path):
    pool, server, client = daemon
    first = [make_key(i, "first") for i in range(2)]
    second = [make_key(0, "second")]

    sock = unix_socket(sock_path)
    assert local_reserve(sock, first, [64 * KiB, 64 * KiB])[1] == [0, 0]
    assert pool.stats()["blocks"] == 2
    assert local_reserve(sock, second, [32 * KiB])[1] == [0]
    assert pool.stats()["blocks"] == 1
    assert pool.stats()["bytes_used"] == 32 * KiB

    # The count of the first batch no longer matches: nothing is committed.
    assert local_commit(sock, 2) == (BAD_REQUEST, None)
    assert_pool_usage(pool)
    assert_alive(sock)
    assert client.exists_many(first + second) == [False, False, False]

    assert local_reserve(sock, second, [32 * KiB])[1] == [0]
    assert local_commit(sock, 1) == (OK, [0])
    assert client.exists_many(first + second) == [False, False, True]
    sock.close()


def test_commit_without_reserve(daemon, sock_path):
    pool, server, client = daemon
    sock = unix_socket(sock_path)
    assert local_commit(sock, 0) == (OK, [])
    assert local_commit(sock, 3) == (BAD_REQUEST, None)
    assert_alive(sock)

    # A commit whose payload is not "u32 n, u32 0" matches no reservation either.
    key = make_key(1, "odd commit")
    assert local_reserve(sock, [key], [4 * KiB])[1] == [0]
    response = request(sock, LOCAL_COMMIT, struct.pack("<III", 1, 0, 0))
    assert response.status == BAD_REQUEST
    assert_pool_usage(pool)
    assert_alive(sock)

    # A commit after a successful one finds nothing pending.
    assert local_reserve(sock, [key], [4 * KiB])[1] == [0]
    assert local_commit(sock, 1) == (OK, [0])
    assert local_commit(sock, 1) == (BAD_REQUEST, None)
    assert pool.stats()["blocks"] == 1
    assert client.exists_many([key]) == [True]
    sock.close()


def test_reserve_invalid_lengths(daemon, sock_path):
    pool, server, client = daemon
    keys = [make_key(i, "lengths") for i in range(4)]
    sock = unix_socket(sock_path)
    status, results, offsets = local_reserve(sock, keys, [0, 1 * MiB + 1, 1 * MiB, 2 ** 63])
    assert status == OK
    assert results == [-errno.EINVAL, -errno.EMSGSIZE, 0, -errno.EMSGSIZE]
    assert offsets[0] == offsets[1] == offsets[3] == 0
    assert pool.stats()["blocks"] == 1
    status, results = local_commit(sock, 4)
    assert status == OK
    assert results[2] == 0   # the others: test_commit_repeats_failed_reservations
    assert client.exists_many(keys) == [False, False, True, False]
    assert pool.stats()["blocks"] == 1
    sock.close()


def test_commit_repeats_failed_reservations(daemon, sock_path):
    pool, server, client = daemon
    keys = [make_key(i, "failed") for i in range(3)]
    sock = unix_socket(sock_path)
    assert local_reserve(sock, keys, [0, 4096, 2 * MiB])[1] == [-errno.EINVAL, 0,
                                                                -errno.EMSGSIZE]
    assert local_commit(sock, 3) == (OK, [-errno.EINVAL, 0, -errno.EMSGSIZE])
    sock.close()


def test_reserve_duplicates_and_races(daemon, sock_path):
    pool, server, client = daemon
    size = 16 * KiB
    twice, stored, raced = (make_key(i, "dup") for i in range(3))
    assert client.put_many([stored], [make_block(stored, 1, size)], timeout_ms=5000) == [0]

    sock = unix_socket(sock_path)
    status, results, offsets = local_reserve(sock, [twice, twice, stored, raced], [size] * 4)
    assert results == [0, 0, 1, 0]
    assert offsets[0] != offsets[1]
    assert offsets[2] == 0
    assert pool.stats()["blocks"] == 4             # two slots for `twice`, one for `raced`
    assert fetch(client, [raced], [size])[0] == [-errno.ENOENT]   # reserved is not readable

    # A TCP client stores `raced` first: its reservation loses and is freed on commit.
    block = make_block(raced, 1, size)
    assert client.put_many([raced], [block], timeout_ms=5000) == [0]
    assert local_commit(sock, 4) == (OK, [0, 1, 1, 1])
    sock.close()
    assert_pool_usage(pool, blocks=3, bytes_used=3 * size)
    assert fetch(client, [raced], [size]) == ([size], [block])


@pytest.mark.parametrize("case", ["n above keys", "n below keys", "n huge", "short head"])
def test_reserve_count_mismatch_rejected(daemon, sock_path, case):
    pool, server, client = daemon
    keys = [make_key(i, "count") for i in range(3)]
    lengths = b"".join(struct.pack("<Q", 4096) for _ in keys)
    payload = {
        "n above keys": struct.pack("<II", 4, 0) + b"".join(keys) + lengths,
        "n below keys": struct.pack("<II", 2, 0) + b"".join(keys) + lengths,
        "n huge": struct.pack("<II", 0xffffffff, 0) + b"".join(keys) + lengths,
        "short head": b"\x03\x00\x00",
    }[case]
    sock = unix_socket(sock_path)
    response = request(sock, LOCAL_RESERVE, payload)
    assert response.status == BAD_REQUEST
    assert pool.stats()["blocks"] == 0
    assert_alive(sock)
    assert local_commit(sock, 3) == (BAD_REQUEST, None)
    sock.close()


def test_reserve_above_payload_limit_closes(daemon, sock_path):
    pool, server, client = daemon
    sock = unix_socket(sock_path)
    sock.sendall(encode_header(LOCAL_RESERVE, MAX_PAYLOAD + 1, 0))
    response = read_response(sock)
    assert response.status == TOO_LARGE
    assert_closed(sock)
    sock.close()
    assert pool.stats()["blocks"] == 0


def test_reserve_whole_pool_then_disconnect(daemon, sock_path):
    pool, server, client = daemon
    keys = [make_key(i, "fill") for i in range(20)]
    sock = unix_socket(sock_path)
    status, results, _ = local_reserve(sock, keys, [1 * MiB] * 20)
    assert status == OK
    assert results[:16] == [0] * 16   # 16 slabs of 1 MiB
    assert results[16:] == [-errno.ENOSPC] * 4

    # While the reservations stand, nothing else fits.
    other = make_key(0, "other")
    assert client.put_many([other], [bytes(1 * MiB)], timeout_ms=5000) == [-errno.ENOSPC]
    sock.close()
    assert_pool_usage(pool)
    assert client.put_many([other], [bytes(1 * MiB)], timeout_ms=5000) == [0]


@pytest.mark.parametrize("opcode", [LOCAL_ATTACH, LOCAL_RESERVE, LOCAL_COMMIT])
def test_local_ops_over_tcp_refused(daemon, opcode):
    pool, server, client = daemon
    payload = {LOCAL_ATTACH: b"", LOCAL_RESERVE: get_payload([make_key(1)], [4096]),
               LOCAL_COMMIT: batch([])}[opcode]
    sock = connect(server.port)
    handshake(sock, 2, SECRET, TENANT.encode())
    response = request(sock, opcode, payload)
    assert response.status == BAD_REQUEST
    assert_closed(sock)
    sock.close()
    assert pool.stats()["blocks"] == 0
    assert any("local operation on a TCP connection" in line for line in server.take_log())


@pytest.mark.parametrize("stage", [0, 1])
def test_local_ops_before_auth_refused(daemon, sock_path, stage):
    pool, server, client = daemon
    sock = unix_socket(sock_path, stage=stage)
    response = request(sock, LOCAL_RESERVE, get_payload([make_key(1)], [4096]))
    assert response.status == UNAUTHENTICATED
    assert_closed(sock)
    sock.close()
    assert pool.stats()["blocks"] == 0


def test_attach_write_commit_raw(daemon, sock_path):
    pool, server, client = daemon
    keys = [make_key(i, "raw attach") for i in range(2)]
    blocks = [make_block(keys[0], 1, 5000), make_block(keys[1], 1, 300 * KiB)]
    sock = unix_socket(sock_path)
    size, fd = local_attach(sock)
    try:
        assert size == os.fstat(fd).st_size
        mapping = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        status, results, offsets = local_reserve(sock, keys, [len(b) for b in blocks])
        assert results == [0, 0]
        for offset, block in zip(offsets, blocks):
            assert offset + len(block) <= size
            mapping[offset:offset + len(block)] = block
        assert local_commit(sock, 2) == (OK, [0, 0])
    finally:
        mapping.close()
    assert fetch(client, keys, [len(b) for b in blocks]) == ([len(b) for b in blocks], blocks)
    sock.close()


def test_commit_without_writing_affects_own_key(daemon, sock_path):
    pool, server, client = daemon
    size = 64 * KiB
    neighbors = [make_key(i, "neighbors") for i in range(4)]
    neighbor_blocks = [make_block(key, 1, size) for key in neighbors]
    assert client.put_many(neighbors, neighbor_blocks, timeout_ms=5000) == [0] * 4
    other_tenant = core.Connection("127.0.0.1", server.port, secret=SECRET, tenant="u",
                                   timeout_ms=5000)
    foreign = make_key(0, "foreign")
    foreign_block = make_block(foreign, 1, size)
    assert other_tenant.put_many([foreign], [foreign_block], timeout_ms=5000) == [0]

    # Free a slot so the reservation may reuse it, then commit without writing.
    deleted = make_key(9, "deleted")
    assert client.put_many([deleted], [make_block(deleted, 1, size)], timeout_ms=5000) == [0]
    assert client.delete_many([deleted]) == [0]
    unwritten = make_key(0, "unwritten")
    sock = unix_socket(sock_path)
    assert local_reserve(sock, [unwritten], [size])[1] == [0]
    assert local_commit(sock, 1) == (OK, [0])
    sock.close()

    # The unwritten key contains whatever the slot contained (the first 4 bytes of a freed
    # slot link the slab's free list), under its own key only.
    results, data = fetch(client, [unwritten], [size])
    assert results == [size]
    assert data[0][4:] in (bytes(size - 4), make_block(deleted, 1, size)[4:])
    assert fetch(client, neighbors, [size] * 4) == ([size] * 4, neighbor_blocks)
    assert fetch(other_tenant, [foreign], [size]) == ([size], [foreign_block])
    assert other_tenant.exists_many([unwritten]) == [False]
    assert client.exists_many([deleted]) == [False]
    other_tenant.close()


# ---- GET pinning ----------------------------------------------------------------------

def pinning_daemon(make_pool, path, **options):
    """Return a pool of 8 MiB in 1 MiB slabs (eight 1 MiB blocks fill it) and its server."""
    pool = make_pool(8 * MiB, slab_size=1 * MiB, pages="small")
    return pool, start_server(pool, path, **options)


def test_get_pins_survive_evicting_puts(make_pool, sock_path):
    pool, server = pinning_daemon(make_pool, sock_path)
    sizes = [1 * MiB, 300 * KiB, 64 * KiB]   # several classes, so slabs move between them
    keys = [make_key(i, "churned") for i in range(24)]
    blocks = {key: make_block(key, 1, sizes[i % 3]) for i, key in enumerate(keys)}
    hot = keys[:3]
    stop = threading.Event()
    errors, hits, put_results = [], [0], []

    def reader(seed, unix):
        rng = random.Random(seed)
        try:
            if unix:
                connection = core.Connection(unix_path=sock_path, secret=SECRET,
                                             tenant=TENANT, timeout_ms=5000)
            else:
                connection = core.Connection("127.0.0.1", server.port, secret=SECRET,
                                             tenant=TENANT, timeout_ms=5000)
            while not stop.is_set():
                requested = hot + rng.sample(keys, 3)
                lengths = [len(blocks[key]) for key in requested]
                results, data = fetch(connection, requested, lengths)
                for key, length, result, got in zip(requested, lengths, results, data):
                    if result == length:
                        hits[0] += 1
                        if got != blocks[key]:
                            errors.append(f"wrong bytes for a block of {length} bytes")
                    elif result != -errno.ENOENT:
                        errors.append(f"GET returned {result} for a block of {length} bytes")
            connection.close()
        except Exception as exc:   # reported below; a thread cannot fail the test itself
            errors.append(repr(exc))

    def writer():
        rng = random.Random(99)
        try:
            connection = core.Connection("127.0.0.1", server.port, secret=SECRET,
                                         tenant=TENANT, timeout_ms=5000)
            while not stop.is_set():
                chosen = rng.sample(keys, 2)
                put_results.extend(connection.put_many(chosen, [blocks[k] for k in chosen],
                                                       timeout_ms=5000))
            connection.close()
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(i, i == 2)) for i in range(3)]
    threads.append(threading.Thread(target=writer))
    for thread in threads:
        thread.start()
    time.sleep(3.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert hits[0] > 100
    assert set(put_results) <= {0, 1, -errno.ENOSPC}
    assert put_results.count(0) > 20
    assert pool.stats()["evictions"] > 0

    # No pin outlived its GET: eight new 1 MiB blocks evict everything.
    fresh = [make_key(i, "fresh") for i in range(8)]
    client = core.Connection("127.0.0.1", server.port, secret=SECRET, tenant=TENANT)
    assert client.put_many(fresh, [bytes(1 * MiB)] * 8, timeout_ms=5000) == [0] * 8
    client.close()
    server.stop()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_stalled_reader_pins_until_io_timeout(make_pool, sock_path, transport):
    pool, server = pinning_daemon(make_pool, sock_path, io_timeout_ms=1000)
    client = core.Connection("127.0.0.1", server.port, secret=SECRET, tenant=TENANT)
    keys = [make_key(i, "pinned") for i in range(8)]
    assert client.put_many(keys, [make_block(k, 1, 1 * MiB) for k in keys],
                           timeout_ms=5000) == [0] * 8

    # A reader asks for all eight blocks and reads nothing: its socket buffers fill, so
    # the server keeps every block pinned while it waits to send.
    family = socket.AF_UNIX if transport == "unix" else socket.AF_INET
    stalled = socket.socket(family, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    stalled.settimeout(5.0)
    stalled.connect(sock_path if transport == "unix" else ("127.0.0.1", server.port))
    handshake(stalled, 2, SECRET, TENANT.encode())
    server.take_log()
    started = time.monotonic()
    stalled.sendall(encode_frame(GET, get_payload(keys, [1 * MiB] * 8)))
    time.sleep(0.2)

    newcomer = make_key(0, "newcomer")
    assert client.put_many([newcomer], [bytes(1 * MiB)], timeout_ms=5000) == [-errno.ENOSPC]

    # After io_timeout_ms the server gives up on the reader and drops the pins.
    assert wait_until(lambda: server.stats()["connections_open"] == 1, timeout=5.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.5
    assert client.put_many([newcomer], [bytes(1 * MiB)], timeout_ms=5000) == [0]
    data, closed = drain(stalled, 3.0)
    assert closed
    assert len(data) < HEADER_BYTES + 64 + 8 * MiB
    stalled.close()
    log = server.take_log()
    assert any("GET" in line and "not sent" in line for line in log), log
    client.close()
    server.stop()


# ---- connection churn -----------------------------------------------------------------

def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def churn_once(kind, port, path):
    """Open one connection, bring it to the state `kind` selects and close it. Odd kinds use
    the Unix socket, even ones TCP. Kinds 0-1 send nothing, 2-3 part of a header, 4-5 part
    of a payload after the handshake, 6 a PING, 7 a LOCAL_RESERVE (left pending), and 8-9
    stop after HELLO, before AUTH."""
    if kind % 2:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5.0)
        sock.connect(path)
    else:
        sock = connect(port, timeout=5.0)
    try:
        if kind in (0, 1):
            return                                    # closed before a byte
        if kind in (2, 3):
            sock.sendall(encode_frame(PING, b"x" * 40)[:20])   # inside a header
            return
        if kind in (8, 9):
            handshake(sock, 1, SECRET, TENANT.encode())
            return
        handshake(sock, 2, SECRET, TENANT.encode())
        if kind in (4, 5):
            sock.sendall(encode_frame(PING, b"x" * 4000)[:1000])   # inside a payload
        elif kind == 6:
            assert request(sock, PING, b"ping").status == OK
        else:
            reserved = local_reserve(sock, [os.urandom(32) for _ in range(4)], [4096] * 4)
            assert reserved[1] == [0] * 4
    finally:
        sock.close()


def test_connection_churn_leaks_nothing(make_pool, sock_path):
    pool = make_pool(16 * MiB, slab_size=1 * MiB, pages="small")
    server = start_server(pool, sock_path, max_connections=64)
    for i in range(400):   # warm-up: thread stacks and malloc arenas reach their size
        churn_once(i % 10, server.port, sock_path)
    assert wait_until(lambda: server.stats()["connections_open"] == 0)
    server.take_log()
    before = rss_bytes()

    for i in range(1600):
        churn_once(i % 10, server.port, sock_path)
        if i % 400 == 0:
            server.take_log()   # the log is bounded; keep it from dropping lines
    assert wait_until(lambda: server.stats()["connections_open"] == 0)
    grown = rss_bytes() - before

    stats = server.stats()
    assert stats["connections"] == 2000
    assert stats["refused_busy"] == 0
    assert pool.stats()["blocks"] == 0            # every reservation was aborted
    assert pool.stats()["bytes_used"] == 0
    # 1 MiB is about 650 bytes a connection: a leaked buffer or thread stack shows.
    assert grown < 1 * MiB, f"RSS grew by {grown} bytes over 1600 connections"
    server.stop()


def test_max_connections_holds_under_churn(make_pool, sock_path):
    pool = make_pool(16 * MiB, slab_size=1 * MiB, pages="small")
    limit = 16
    server = start_server(pool, sock_path, max_connections=limit)
    open_connections = [core.Connection(unix_path=sock_path, secret=SECRET, tenant=TENANT)
            for _ in range(12)]
    stop = threading.Event()
    peak, outcomes, errors = [0], {"ok": 0, "busy": 0}, []

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], server.stats()["connections_open"])
            time.sleep(0.001)

    def churn(seed):
        rng = random.Random(seed)
        for _ in range(150):
            try:
                if rng.random() < 0.5:
                    connection = core.Connection(unix_path=sock_path, secret=SECRET,
                                                 tenant=TENANT, timeout_ms=5000)
                else:
                    connection = core.Connection("127.0.0.1", server.port, secret=SECRET,
                                                 tenant=TENANT, timeout_ms=5000)
            except TransferError as exc:
                if exc.errno != errno.EBUSY:
                    errors.append(repr(exc))
                outcomes["busy"] += 1
                continue
            connection.ping(timeout_ms=5000)
            outcomes["ok"] += 1
            connection.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=churn, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    stop.set()
    sampler.join()

    assert errors == []
    assert outcomes["ok"] + outcomes["busy"] == 900
    assert outcomes["busy"] > 0
    assert outcomes["ok"] > 0
    assert peak[0] <= limit
    assert server.stats()["refused_busy"] == outcomes["busy"]
    for connection in open_connections:
        connection.ping()
    assert wait_until(lambda: server.stats()["connections_open"] == 12)
    for connection in open_connections:
        connection.close()
    assert wait_until(lambda: server.stats()["connections_open"] == 0)
    server.stop()


def test_busy_reported_on_unix_socket(make_pool, sock_path):
    pool = make_pool(16 * MiB, slab_size=1 * MiB, pages="small")
    server = start_server(pool, sock_path, max_connections=1)
    first = core.Connection(unix_path=sock_path, secret=SECRET, tenant=TENANT)
    for _ in range(5):
        with pytest.raises(TransferError, match="connection limit") as raised:
            core.Connection(unix_path=sock_path, secret=SECRET, tenant=TENANT)
        assert raised.value.errno == errno.EBUSY
    first.ping()
    first.close()
    server.stop()


# ---- the socket file ------------------------------------------------------------------

def test_socket_path_of_live_server_kept(make_pool, sock_path):
    first = start_server(make_pool(8 * MiB, pages="small"), sock_path, node_id=1)
    with pytest.raises(TransferError) as raised:
        start_server(make_pool(8 * MiB, pages="small"), sock_path, node_id=2)
    assert raised.value.errno == errno.EADDRINUSE
    connection = core.Connection(unix_path=sock_path, secret=SECRET, tenant=TENANT)
    assert connection.stats()["node_id"] == 1
    connection.close()
    first.stop()
    assert not os.path.exists(sock_path)


def test_socket_file_of_dead_server_replaced(make_pool, sock_path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)   # bound and closed without listening: connecting is refused
    dead.close()
    server = start_server(make_pool(8 * MiB, pages="small"), sock_path, node_id=3)
    connection = core.Connection(unix_path=sock_path, secret=SECRET, tenant=TENANT)
    assert connection.stats()["node_id"] == 3
    connection.close()
    server.stop()


def memfd_mappings():
    with open("/proc/self/maps") as f:
        return sum("/memfd:" in line for line in f)


def test_attach_twice_keeps_one_mapping(daemon, sock_path):
    pool, server, client = daemon
    connection = core.Connection(unix_path=sock_path, secret=SECRET, tenant=TENANT)
    before = memfd_mappings()
    for _ in range(4):
        os.close(connection.local_attach())
    assert memfd_mappings() == before + 1
    key = make_key(1, "attached twice")
    assert connection.put_many([key], [b"x" * 5000]) == [0]
    assert fetch(client, [key], [5000]) == ([5000], [b"x" * 5000])
    connection.close()
    assert memfd_mappings() == before


# ---- stop under load ------------------------------------------------------------------

def test_stop_with_transfers_in_flight(make_pool, sock_path):
    pool = make_pool(16 * MiB, slab_size=1 * MiB, pages="small")
    # A long io_timeout: stop() must not wait for a stalled frame or reader to time out.
    server = start_server(pool, sock_path, io_timeout_ms=30000)
    keys = [make_key(i, "in flight") for i in range(8)]
    blocks = [make_block(key, 1, 256 * KiB) for key in keys]
    seeder = core.Connection("127.0.0.1", server.port, secret=SECRET, tenant=TENANT)
    assert seeder.put_many(keys, blocks, timeout_ms=5000) == [0] * 8
    seeder.close()

    # Two readers that ask for 2 MiB and read nothing, so the server blocks sending.
    stalled = []
    for address in (sock_path, ("127.0.0.1", server.port)):
        sock = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        sock.settimeout(5.0)
        sock.connect(address)
        handshake(sock, 2, SECRET, TENANT.encode())
        sock.sendall(encode_frame(GET, get_payload(keys, [256 * KiB] * 8)))
        stalled.append(sock)

    running = threading.Barrier(5)
    failures, wrong = [], []

    def worker(index):
        if index % 2:
            connection = core.Connection(unix_path=sock_path, secret=SECRET, tenant=TENANT,
                                         timeout_ms=5000)
            if index == 3:
                os.close(connection.local_attach())   # PUT through the shared mapping
        else:
            connection = core.Connection("127.0.0.1", server.port, secret=SECRET,
                                         tenant=TENANT, timeout_ms=5000)
        running.wait()
        mine = make_key(index, "worker")
        try:
            while True:
                connection.put_many([mine], [make_block(mine, 1, 256 * KiB)], timeout_ms=5000)
                results, data = fetch(connection, keys, [256 * KiB] * 8)
                wrong.extend(got for result, got, block in zip(results, data, blocks)
                             if result > 0 and got != block)
        except TransferError as exc:
            failures.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in workers:
        thread.start()
    running.wait()
    time.sleep(0.5)
    started = time.monotonic()
    server.stop()
    elapsed = time.monotonic() - started
    for thread in workers:
        thread.join(timeout=10)

    assert elapsed < 2.0
    assert not any(thread.is_alive() for thread in workers), "a client hung after stop"
    assert len(failures) == 4
    assert wrong == []
    for sock in stalled:
        assert drain(sock, 3.0)[1]
        sock.close()
    assert not os.path.exists(sock_path)
    pool.close()
    assert pool.closed


CONCURRENT_STOP = textwrap.dedent("""
    import os, sys, tempfile, threading
    import ems, ems._core as core

    path = os.path.join(tempfile.mkdtemp(), "s")
    stored_keys = os.urandom(32 * 200000)
    for round in range(6):
        pool = ems.Pool(8 << 20, pages="small")
        server = core.Server(pool, port=0, unix_path=path, secret=b"s")
        clients = [core.Connection(unix_path=path, secret=b"s", tenant="t") for _ in range(3)]
        gate = threading.Barrier(4)

        def stop_server():
            gate.wait()
            server.stop()

        def use_server():
            # dir_register runs without the GIL, across the moment stop() frees the server.
            gate.wait()
            try:
                while True:
                    server.dir_register(stored_keys, 3)
                    server.stats()
            except OSError:
                pass

        threads = [threading.Thread(target=stop_server), threading.Thread(target=use_server),
                   threading.Thread(target=use_server)]
        for thread in threads:
            thread.start()
        gate.wait()
        if round % 2:
            pool.close()        # stops the server too
        else:
            server.stop()
        assert not server.running
        for thread in threads:
            thread.join()
        for client in clients:
            client.close()
        pool.close()
    print("clean")
""")


def test_concurrent_stop_and_calls():
    # A subprocess: a double free or use after free would kill the test runner itself.
    done = subprocess.run([sys.executable, "-c", CONCURRENT_STOP], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "clean"


# ---- ems.connect("local") from several threads ----------------------------------------

def test_local_client_shared_by_threads(make_pool, sock_path):
    pool = make_pool(32 * MiB, slab_size=1 * MiB, pages="small")
    server = start_server(pool, sock_path)
    client = ems.connect("local", socket_path=sock_path, secret=SECRET, tenant=TENANT,
                         timeout_ms=5000)
    shared = [make_key(i, "shared") for i in range(4)]
    errors, stored_counts = [], []
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)   # switch threads often, to widen race windows in the client

    def worker(index):
        own = [make_key(i, f"own {index}") for i in range(30)]
        try:
            for step in range(0, 30, 3):
                keys = own[step:step + 3] + [shared[step % 4]]
                blocks = [make_block(key, 1, 8 * KiB + 100 * i) for i, key in enumerate(keys)]
                stored_counts.append(client.put_many(keys, blocks))
                buffers = [bytearray(len(b)) for b in blocks]
                hits = client.get_many_into(keys, buffers)
                if hits != [True] * 4 or [bytes(b) for b in buffers] != blocks:
                    errors.append(f"worker {index} read {hits} at step {step}")
                if client.exists_many(keys) != [True] * 4:
                    errors.append(f"worker {index}: a stored key is missing at step {step}")
                if client.match_prefix(own[:step + 3]) != step + 3:
                    errors.append(f"worker {index}: prefix shorter than {step + 3}")
        except Exception as exc:
            errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        sys.setswitchinterval(switch_interval)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []

    # Each shared key is stored once, and each thread stores its own 30 keys.
    assert sum(stored_counts) == 4 * 30 + 4
    stats = client.stats()
    assert stats["local_puts"] == sum(stored_counts)
    assert stats["local_hits"] == 4 * 10 * 4
    assert server.stats()["local_puts"] == 4 * 10 * 4
    client.close()
    server.stop()
