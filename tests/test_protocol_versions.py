"""Protocol versions between builds. This build's newest version N and the previous
version N-1 interoperate, and ranges that do not meet are rejected with an error naming
both. DRAIN, which version 2 adds, is used only over connections that agreed on it.

The previous release is played by this build restricted to version 1 (proto_max=1, or
EMS_PROTO_MAX=1 in the environment). Version 0 stands for N-2, which no build speaks.
Servers and clients run in this process on 127.0.0.1; raw frames come from fuzz_frame.
"""
import errno
import struct
import threading
import time

import pytest

import ems._core as core
from conftest import make_block, make_key
from ems.client import ClusterClient
from ems.cluster.membership import NodeRecord, StaticMembership
from ems.errors import AuthenticationError, ProtocolVersionError
from fuzz_frame import (HELLO, OK, PING, RESPONSE, UNSUPPORTED_VERSION, connect, drain,
                        encode_frame, handshake, hello_payload, read_response)

N = core.PROTO_VERSION_MAX
BUILD_RANGE = struct.pack("<HH", core.PROTO_VERSION_MIN, core.PROTO_VERSION_MAX)


@pytest.fixture
def serve(make_pool):
    """Factory of servers on a fresh 16 MiB pool each; stopped when the test ends."""
    servers = []

    def factory(**options):
        server = core.Server(make_pool(16 << 20), host="127.0.0.1", port=0, **options)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def no_pin(monkeypatch):
    """Tests set EMS_PROTO_MIN and EMS_PROTO_MAX themselves."""
    monkeypatch.delenv("EMS_PROTO_MIN", raising=False)
    monkeypatch.delenv("EMS_PROTO_MAX", raising=False)


def open_conn(server, **options):
    return core.Connection("127.0.0.1", server.port, tenant="t", **options)


def drain_until_idle(node, timeout=2.0):
    """Send DRAIN until no other request is in flight; returns the last count. A request
    counts until its thread is done, which may be just after its response arrived."""
    deadline = time.monotonic() + timeout
    while True:
        in_flight = node.drain()
        if in_flight == 0 or time.monotonic() > deadline:
            return in_flight
        time.sleep(0.01)


# ---- the build's range and its settings -----------------------------------------------

def test_build_speaks_n_and_n_minus_1():
    # The compatibility policy: a release speaks its own version and the one before.
    assert core.PROTO_VERSION_MIN == core.PROTO_VERSION_MAX - 1
    assert core.PROTO_VERSION_MAX == 2


def test_protocol_range_from_arguments_and_env(monkeypatch):
    assert core.protocol_range() == (1, 2)
    monkeypatch.setenv("EMS_PROTO_MAX", "1")
    assert core.protocol_range() == (1, 1)
    assert core.protocol_range(proto_max=2) == (1, 2)   # an argument wins over the env
    monkeypatch.setenv("EMS_PROTO_MIN", "2")
    monkeypatch.setenv("EMS_PROTO_MAX", "2")
    assert core.protocol_range() == (2, 2)


@pytest.mark.parametrize("env, arguments, message", [
    ({"EMS_PROTO_MAX": "3"}, {}, "EMS_PROTO_MAX 3 is outside this build's protocol versions 1-2"),
    ({"EMS_PROTO_MAX": "x"}, {}, "EMS_PROTO_MAX 'x' is not a protocol version"),
    ({}, {"proto_min": 0}, "proto_min 0 is outside this build's protocol versions 1-2"),
    ({}, {"proto_min": 2, "proto_max": 1}, "protocol range 2-1 is reversed"),
])
def test_protocol_range_invalid(monkeypatch, serve, env, arguments, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        core.protocol_range(**arguments)
    with pytest.raises(ValueError, match=message):
        serve(**arguments)


def test_env_pins_server_and_connection(monkeypatch, serve):
    monkeypatch.setenv("EMS_PROTO_MAX", "1")
    server = serve()
    assert (server.proto_min, server.proto_max) == (1, 1)
    monkeypatch.delenv("EMS_PROTO_MAX")
    assert open_conn(server).version == 1           # a new client meets an old server

    server = serve()
    assert (server.proto_min, server.proto_max) == (1, 2)
    monkeypatch.setenv("EMS_PROTO_MAX", "1")
    assert open_conn(server).version == 1           # an old client meets a new server


# ---- negotiation ------------------------------------------------------------------------

@pytest.mark.parametrize("server_range, client_range, agreed", [
    ((1, 2), (1, 2), 2),     # N and N
    ((1, 2), (1, 1), 1),     # N server, N-1 client
    ((1, 1), (1, 2), 1),     # N-1 server, N client
    ((1, 1), (1, 1), 1),     # N-1 and N-1
    ((2, 2), (1, 2), 2),     # a server that dropped N-1 still meets an N client
])
def test_negotiates_newest_common_version(serve, server_range, client_range, agreed):
    server = serve(proto_min=server_range[0], proto_max=server_range[1])
    conn = open_conn(server, proto_min=client_range[0], proto_max=client_range[1])
    assert conn.version == agreed
    key = make_key(0, "negotiated")
    block = make_block(key, 1, 4096)
    assert conn.put_many([key], [block]) == [0]
    buffer = bytearray(4096)
    assert conn.get_many_into([key], [buffer]) == [4096]
    assert buffer == block
    conn.ping()


@pytest.mark.parametrize("server_range, client_range", [
    ((1, 1), (2, 2)),        # N-1 only against N only: N+1 and N-1 share nothing
    ((2, 2), (1, 1)),
])
def test_disjoint_ranges_rejected_naming_both(serve, server_range, client_range):
    server = serve(proto_min=server_range[0], proto_max=server_range[1])
    with pytest.raises(ProtocolVersionError) as raised:
        open_conn(server, proto_min=client_range[0], proto_max=client_range[1])
    assert raised.value.errno == errno.EPROTONOSUPPORT
    text = str(raised.value)
    assert f"this client speaks versions {client_range[0]}-{client_range[1]}" in text
    assert f"the server {server_range[0]}-{server_range[1]}" in text
    assert "client speaks versions" in " ".join(server.take_log())


def test_version_0_hello_rejected_with_range(serve):
    """A peer of N-2 (version 0 here) gets UNSUPPORTED_VERSION with the server's range,
    and the log names both ranges."""
    server = serve()
    sock = connect(server.port)
    try:
        sock.sendall(encode_frame(HELLO, hello_payload(min_version=0, max_version=0),
                                  request_id=5, version=0))
        response = read_response(sock)
        assert response is not None
        assert response.status == UNSUPPORTED_VERSION
        assert response.request_id == 5
        assert response.payload == BUILD_RANGE
        assert response.payload_valid
        _, closed = drain(sock, 3.0)
        assert closed
    finally:
        sock.close()
    assert any("client speaks versions 0-0, this server 1-2" in line
               for line in server.take_log())


def test_hello_of_newer_version_negotiates(serve):
    """A client of N+1 sends HELLO in a frame of its oldest version, which may be newer
    than this server speaks: the server reads any HELLO and agrees on N."""
    server = serve()
    sock = connect(server.port)
    try:
        sock.sendall(encode_frame(HELLO, hello_payload(min_version=N, max_version=N + 1),
                                  request_id=1, version=N + 1))
        response = read_response(sock)
        assert response.status == OK
        assert response.version == N
        assert struct.unpack_from("<H", response.payload)[0] == N
        sock.sendall(encode_frame(PING, b"ping", request_id=2, version=N))
        response = read_response(sock)
        assert (response.status, response.payload) == (OK, b"ping")
    finally:
        sock.close()


def test_frame_of_other_version_after_handshake_rejected(serve):
    server = serve()
    sock = connect(server.port)
    try:
        handshake(sock, 1, None)                 # agrees on version 1
        sock.sendall(encode_frame(PING, b"x", request_id=3, version=2))
        response = read_response(sock)
        assert response.status == UNSUPPORTED_VERSION
        assert response.version == 1             # the agreed version, which the client reads
        assert response.flags == RESPONSE
        assert response.payload == BUILD_RANGE
        _, closed = drain(sock, 3.0)
        assert closed
    finally:
        sock.close()
    assert any("unsupported protocol version 2 (this connection accepts 1-1)" in line
               for line in server.take_log())


def test_stats_count_handshakes_by_version_and_role(serve):
    server = serve()
    open_conn(server, proto_max=1).close()
    open_conn(server, role="node").close()
    stats = open_conn(server).stats()
    assert (stats["proto_min"], stats["proto_max"]) == (1, 2)
    assert stats["hellos"] == {"1": {"client": 1, "node": 0}, "2": {"client": 1, "node": 1}}


# ---- DRAIN (version 2) ------------------------------------------------------------------

def test_drain_needs_version_2(serve):
    server = serve()
    conn = open_conn(server, role="node", proto_max=1)
    with pytest.raises(ProtocolVersionError, match="DRAIN .* needs protocol version 2"):
        conn.drain()
    assert conn.alive
    conn.ping()
    assert not server.draining


def test_drain_refuses_writes_and_serves_reads(serve):
    server = serve()
    client = open_conn(server)
    node = open_conn(server, role="node")
    stored, offered = make_key(1, "drain"), make_key(2, "drain")
    block = make_block(stored, 1, 4096)
    assert client.put_many([stored], [block]) == [0]

    assert drain_until_idle(node) == 0
    assert server.draining
    assert client.stats()["draining"] == 1
    assert client.put_many([offered], [make_block(offered, 1, 4096)]) == [-errno.ESHUTDOWN]
    buffers = [bytearray(4096), bytearray(4096)]
    assert client.get_many_into([stored, offered], buffers) == [4096, -errno.ENOENT]
    assert buffers[0] == block
    # An old client meets the same refusal as a negative errno per key.
    old = open_conn(server, proto_max=1)
    assert old.put_many([offered], [block]) == [-errno.ESHUTDOWN]

    assert node.drain(False) >= 0
    assert not server.draining
    assert client.put_many([offered], [make_block(offered, 1, 4096)]) == [0]


def test_drain_counts_requests_in_flight(serve):
    """A GET held in the miss handler is in flight until the handler returns."""
    server = serve()
    entered, release = threading.Event(), threading.Event()

    def handler(mode, keys):
        entered.set()
        release.wait(10)
        return bytes(len(keys) // 32)

    server.set_miss_handler(handler)
    reader = open_conn(server)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        get=reader.get_many_into([make_key(3, "slow")], [bytearray(64)], timeout_ms=10000)))
    thread.start()
    try:
        assert entered.wait(10)
        node = open_conn(server, role="node")
        time.sleep(0.1)                 # the handshake's own request has ended
        assert node.drain() == 1        # the GET
    finally:
        release.set()
        thread.join()
    assert result["get"] == [-errno.ENOENT]
    assert drain_until_idle(node) == 0


def test_drain_needs_node_role(serve):
    server = serve()
    client = open_conn(server)
    with pytest.raises(AuthenticationError):
        client.drain()
    assert not server.draining


# ---- the cluster client fails over from a draining node ----------------------------------

def cluster_of(servers, draining=()):
    records = [NodeRecord(f"n{i}", "127.0.0.1", server.port, capacity_bytes=16 << 20,
                          free_bytes=16 << 20, draining=f"n{i}" in draining)
               for i, server in enumerate(servers)]
    return ClusterClient(StaticMembership(records), tenant="t")


def where(servers, keys):
    """Per server, how many of the keys it stores."""
    counts = []
    for server in servers:
        conn = open_conn(server)
        counts.append(sum(conn.exists_many(keys)))
        conn.close()
    return counts


def test_client_redirects_writes_of_draining_node(serve):
    servers = [serve(), serve()]
    servers[0].set_draining(True)
    client = cluster_of(servers)
    try:
        keys = [make_key(i, "redirect") for i in range(64)]
        blocks = [make_block(key, 1, 2048) for key in keys]
        assert client.put_many(keys, blocks) == len(keys)
        stats = client.stats()
        assert stats["put_redirected"] > 0          # rendezvous gave some keys to n0
        assert stats["put_refused"] == 0
        assert where(servers, keys) == [0, len(keys)]

        # The node that returned ESHUTDOWN gets no writes for a while.
        puts_before = servers[0].stats()["puts"]
        more = [make_key(i, "redirect-2") for i in range(64)]
        assert client.put_many(more, [make_block(k, 1, 2048) for k in more]) == len(more)
        assert servers[0].stats()["puts"] == puts_before
        assert where(servers, more) == [0, len(more)]
    finally:
        client.close()


def test_client_skips_node_whose_record_drains(serve):
    servers = [serve(), serve()]
    client = cluster_of(servers, draining=("n0",))
    try:
        keys = [make_key(i, "record-drains") for i in range(64)]
        assert client.put_many(keys, [make_block(k, 1, 2048) for k in keys]) == len(keys)
        assert servers[0].stats()["puts"] == 0
        assert client.stats()["put_redirected"] == 0
        assert where(servers, keys) == [0, len(keys)]
    finally:
        client.close()


def test_client_counts_refused_when_only_draining_nodes(serve):
    servers = [serve()]
    servers[0].set_draining(True)
    client = cluster_of(servers)
    try:
        keys = [make_key(i, "nowhere") for i in range(8)]
        assert client.put_many(keys, [make_block(k, 1, 2048) for k in keys]) == 0
        stats = client.stats()
        assert stats["put_refused"] == len(keys)
        assert stats["put_redirected"] == 0
    finally:
        client.close()
