"""Cluster membership: node records, static peer lists, and ZooKeeper registration and
watching against a real ZooKeeper server (tests/zookeeper_server.py)."""

import itertools
import json
import logging
import time

import blake3
import pytest
from kazoo.client import KazooClient

from ems.cluster import membership
from ems.cluster.membership import (
    NodeRecord, StaticMembership, ZooKeeperMembership, open_membership, parse_peers)
from ems.errors import MembershipError, NodeIdInUseError
from zookeeper_server import ZooKeeperMissing, ZooKeeperServer, free_port

LOGGER = "ems.cluster.membership"
SESSION_TIMEOUT = 2.0  # seconds; the test server allows 1 to 10 (tickTime 500 ms)
_cluster_numbers = itertools.count()


def wait_for(predicate, timeout=10.0, description="condition"):
    """Poll `predicate` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {description}")


def record(node_id, port, **fields):
    return NodeRecord(node_id, "127.0.0.1", port, **fields)


@pytest.fixture
def cluster():
    """A cluster name no other test uses, so tests sharing one server do not meet."""
    return f"test-{next(_cluster_numbers)}-{time.monotonic_ns()}"


@pytest.fixture
def open_zk(zookeeper, cluster):
    """Factory for ZooKeeperMembership objects on the shared server, closed at teardown."""
    opened = []

    def factory(node=None, **kwargs):
        kwargs.setdefault("timeout", SESSION_TIMEOUT)
        member = ZooKeeperMembership(zookeeper.hosts, cluster, node, **kwargs)
        opened.append(member)
        return member

    yield factory
    for member in opened:
        member.close()


# ---- NodeRecord ---------------------------------------------------------------------


def test_record_json_round_trip():
    full = NodeRecord("node-a", "10.0.0.7", 7000, metrics_port=9100,
                      local_socket="/run/ems/node-a.sock", hostname="host-7",
                      capacity_bytes=64 << 30, free_bytes=12 << 30, proto_min=1,
                      proto_max=3, version="0.1.0")
    assert NodeRecord.from_json(full.to_json()) == full
    assert NodeRecord.from_json(full.to_json().decode()) == full
    minimal = record("b", 1)
    assert NodeRecord.from_json(minimal.to_json()) == minimal
    assert json.loads(full.to_json())["free_bytes"] == 12 << 30


def test_record_json_ignores_unknown_fields():
    data = json.loads(record("a", 7000).to_json())
    data["added_by_a_newer_daemon"] = [1, 2]
    assert NodeRecord.from_json(json.dumps(data)) == record("a", 7000)


def test_record_json_defaults_optional_fields():
    parsed = NodeRecord.from_json(b'{"node_id": "a", "host": "h", "port": 1}')
    assert parsed == NodeRecord("a", "h", 1)


@pytest.mark.parametrize("data, message", [
    (b"", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"a"', "must be a JSON object"),
    (b'{"host": "h", "port": 1}', "missing field 'node_id'"),
    (b'{"node_id": "a", "port": 1}', "missing field 'host'"),
    (b'{"node_id": "a", "host": "h"}', "missing field 'port'"),
    (b'{"node_id": "a", "host": "h", "port": "1"}', "field 'port' must be int"),
    (b'{"node_id": "a", "host": "h", "port": 1.0}', "field 'port' must be int"),
    (b'{"node_id": "a", "host": "h", "port": true}', "field 'port' must be int"),
    (b'{"node_id": "a", "host": "h", "port": null}', "field 'port' must be int"),
    (b'{"node_id": 5, "host": "h", "port": 1}', "field 'node_id' must be str"),
    (b'{"node_id": "a", "host": ["h"], "port": 1}', "field 'host' must be str"),
    (b'{"node_id": "a", "host": "h", "port": 1, "version": 1}', "field 'version' must be str"),
    (b'{"node_id": "a", "host": "h", "port": 1, "free_bytes": NaN}',
     "field 'free_bytes' must be int"),
    (b'{"node_id": "a", "host": "h", "port": 0}', "field 'port' must be 1..65535"),
    (b'{"node_id": "a", "host": "h", "port": 65536}', "field 'port' must be 1..65535"),
    (b'{"node_id": "a", "host": "h", "port": 1, "metrics_port": -1}',
     "field 'metrics_port' must be 0..65535"),
    (b'{"node_id": "a", "host": "h", "port": 1, "free_bytes": -5}',
     "field 'free_bytes' must be >= 0"),
    (b'{"node_id": "a", "host": "h", "port": 1, "proto_min": 0}',
     "field 'proto_min' must be >= 1"),
    (b'{"node_id": "a", "host": "h", "port": 1, "proto_min": 3, "proto_max": 2}',
     "'proto_min' (3) is greater than 'proto_max' (2)"),
    (b'{"node_id": "a", "host": "", "port": 1}', "field 'host'"),
    (b'{"node_id": "a", "host": "h h", "port": 1}', "field 'host'"),
    (b'{"node_id": "", "host": "h", "port": 1}', "invalid node_id ''"),
    (b'{"node_id": "a/b", "host": "h", "port": 1}', "invalid node_id 'a/b'"),
    (b'{"node_id": "..", "host": "h", "port": 1}', "invalid node_id '..'"),
    (b'{"node_id": "' + b"x" * 101 + b'", "host": "h", "port": 1}', "invalid node_id"),
    (b'{"node_id": "a", "host": "h", "port": 1, "local_socket": "/' + b"s" * 107 + b'"}',
     "field 'local_socket' is longer than 107 bytes"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_record_json_rejects(data, message):
    with pytest.raises(ValueError) as info:
        NodeRecord.from_json(data)
    assert message in str(info.value)


def test_record_constructor_checks_fields():
    with pytest.raises(ValueError, match="field 'port' must be 1..65535"):
        NodeRecord("a", "h", 70000)
    with pytest.raises(ValueError, match="invalid node_id 'a b'"):
        NodeRecord("a b", "h", 1)
    assert NodeRecord("A-z_0.9", "::1", 65535).node_id == "A-z_0.9"
    assert NodeRecord("x" * 100, "h", 1).node_id == "x" * 100


def test_holder_id_stable():
    # First 4 bytes of BLAKE3(b"node-a") are 09 fb 92 9a.
    assert record("node-a", 1).holder_id() == 0x9A92FB09
    for node_id in ["node-a", "ems-0", "x" * 100]:
        digest = blake3.blake3(node_id.encode()).digest()
        expected = int.from_bytes(digest[:4], "little")
        assert record(node_id, 1).holder_id() == expected
    assert record("node-a", 1).holder_id() == record("node-a", 2).holder_id()


def test_holder_id_avoids_holder_none(monkeypatch):
    class FakeHash:
        def __init__(self, data):
            pass

        def digest(self):
            return b"\xff\xff\xff\xff" + bytes(28)

    monkeypatch.setattr(membership.blake3, "blake3", FakeHash)
    assert record("any", 1).holder_id() == 0xFFFFFFFE


# ---- static membership ----------------------------------------------------------------


def test_parse_peers_valid():
    peers = parse_peers(" a=10.0.0.1:7000, b.2=host-b:7001 ,c_3=[fd00::1]:7002")
    assert peers == [NodeRecord("a", "10.0.0.1", 7000), NodeRecord("b.2", "host-b", 7001),
                     NodeRecord("c_3", "fd00::1", 7002)]
    assert parse_peers("solo=127.0.0.1:1") == [NodeRecord("solo", "127.0.0.1", 1)]


@pytest.mark.parametrize("text, message", [
    ("", "empty entry"),
    ("a=h:1,", "empty entry"),
    ("a=h:1,,b=h:2", "empty entry"),
    ("a", "invalid peer 'a': expected id=host:port"),
    ("a=h", "invalid peer 'a=h': missing ':port'"),
    ("a=h:", "port must be a number, got ''"),
    ("a=h:seven", "port must be a number, got 'seven'"),
    ("a=h:-1", "port must be a number, got '-1'"),
    ("a=h:0", "field 'port' must be 1..65535, got 0"),
    ("a=h:65536", "field 'port' must be 1..65535, got 65536"),
    ("a=:7000", "missing host"),
    ("a=fd00::1:7000", "IPv6 address must be in brackets"),
    ("a=[fd00::1]7000", "expected [ipv6-address]:port"),
    ("a=[fd00::1:7000", "expected [ipv6-address]:port"),
    ("=h:1", "invalid node_id ''"),
    ("a b=h:1", "invalid node_id 'a b'"),
    ("a=h:1,a=g:2", "node id 'a' appears twice"),
])
def test_parse_peers_invalid(text, message):
    with pytest.raises(ValueError) as info:
        parse_peers(text)
    assert message in str(info.value)


def test_static_membership_sets_nodes():
    members = StaticMembership.from_peers("a=h:1,b=h:2")
    assert set(members.nodes()) == {"a", "b"}
    assert members.connected
    with pytest.raises(ValueError, match="node id 'a' appears twice"):
        StaticMembership([record("a", 1), record("a", 2)])


def test_static_membership_from_file(tmp_path):
    records = [record("a", 1, free_bytes=5), record("b", 2)]
    path = tmp_path / "peers.json"
    path.write_text(json.dumps([json.loads(r.to_json()) for r in records]))
    assert StaticMembership.from_file(path).nodes() == {"a": records[0], "b": records[1]}


@pytest.mark.parametrize("content, message", [
    ("{broken", "not valid JSON"),
    ('{"node_id": "a"}', "expected a JSON list of node records, got dict"),
    ('[{"node_id": "a", "host": "h", "port": 1}, {"node_id": "b", "host": "h"}]',
     "record 1: node record is missing field 'port'"),
    ('[{"node_id": "a", "host": "h", "port": 1}, {"node_id": "a", "host": "h", "port": 2}]',
     "node id 'a' appears twice"),
])
def test_static_membership_from_bad_file(tmp_path, content, message):
    path = tmp_path / "peers.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        StaticMembership.from_file(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_static_listeners(caplog):
    members = StaticMembership([record("a", 1)])
    seen = []
    members.add_listener(seen.append)
    assert seen == [{"a": record("a", 1)}]

    def broken(nodes):
        raise RuntimeError("listener bug")

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        members.add_listener(broken)
        members.update(record("a", 1, free_bytes=9))
    assert "listener bug" in caplog.text
    assert seen[-1] == {"a": record("a", 1, free_bytes=9)}
    assert len(seen) == 2

    members.update(record("a", 1, free_bytes=9))  # unchanged: no call
    assert len(seen) == 2
    members.remove_listener(seen.append)
    members.update(record("a", 1, free_bytes=10))
    assert len(seen) == 2


def test_open_membership_without_zookeeper():
    own = record("b", 7001, free_bytes=3)
    members = open_membership(None, "a=127.0.0.1:7000,b=127.0.0.1:7001", "c", own)
    assert members.nodes() == {"a": record("a", 7000), "b": own}

    with pytest.raises(ValueError, match="lists node 'b' at 127.0.0.1:9999"):
        open_membership(None, "b=127.0.0.1:9999", "c", own)
    with pytest.raises(ValueError, match="node id 'b' is not in --peers"):
        open_membership(None, "a=127.0.0.1:7000", "c", own)

    assert open_membership(None, None, "c", own).nodes() == {"b": own}
    assert open_membership(None, "", "c", None).nodes() == {}


def test_holder_id_collision_logged(caplog, monkeypatch):
    monkeypatch.setattr(NodeRecord, "holder_id", lambda self: 42)
    members = StaticMembership([record("a", 1)])
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        members.update(record("b", 2))
    assert "nodes b and a have the same holder id 0x0000002a" in caplog.text


# ---- ZooKeeper ----------------------------------------------------------------------


def test_zookeeper_listens_on_loopback_only(zookeeper):
    assert zookeeper.listening_addresses() == [("tcp", "127.0.0.1", zookeeper.port)]


def test_zk_registrations_seen_by_watcher(open_zk, cluster, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    watcher = open_zk()
    a = open_zk(record("a", 7001, free_bytes=1))
    b = open_zk(record("b", 7002, free_bytes=2))
    expected = {"a": record("a", 7001, free_bytes=1), "b": record("b", 7002, free_bytes=2)}

    wait_for(lambda: watcher.nodes() == expected, description="both registrations")
    wait_for(lambda: a.nodes() == expected and b.nodes() == expected,
             description="registrants to see each other")
    assert watcher.connected
    assert "node a joined (127.0.0.1:7001)" in caplog.text
    assert "node b joined (127.0.0.1:7002)" in caplog.text

    client = KazooClient(hosts=watcher.hosts)
    client.start(timeout=5)
    try:
        data, stat = client.get(f"/ems/clusters/{cluster}/nodes/a")
        assert NodeRecord.from_json(data) == expected["a"]
        assert stat.ephemeralOwner != 0
    finally:
        client.stop()
        client.close()


def test_zk_listener_sees_join_and_update(open_zk):
    watcher = open_zk()
    calls = []
    watcher.add_listener(calls.append)
    assert calls == [{}]

    a = open_zk(record("a", 7001))
    wait_for(lambda: calls[-1] == {"a": record("a", 7001)},
             description="listener call on join")
    a.update(record("a", 7001, free_bytes=77))
    wait_for(lambda: calls[-1] == {"a": record("a", 7001, free_bytes=77)},
             description="listener call on update")


def test_zk_update_seen(open_zk):
    watcher = open_zk()
    a = open_zk(record("a", 7001, free_bytes=100))
    wait_for(lambda: "a" in watcher.nodes(), description="registration")

    for free in [90, 80, 70]:
        a.update(record("a", 7001, free_bytes=free, capacity_bytes=100))
    wait_for(lambda: watcher.nodes()["a"].free_bytes == 70, description="the last update")
    assert watcher.nodes()["a"].capacity_bytes == 100

    with pytest.raises(ValueError, match="record for node 'b'"):
        a.update(record("b", 7002))
    with pytest.raises(ValueError, match="registered no node"):
        watcher.update(record("a", 7001))


def test_zk_close_leaves(open_zk, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    watcher = open_zk()
    a = open_zk(record("a", 7001))
    b = open_zk(record("b", 7002))
    wait_for(lambda: set(watcher.nodes()) == {"a", "b"}, description="both registrations")

    a.close()
    # Closing the session deletes the ephemeral znode at once, well before a timeout.
    wait_for(lambda: set(watcher.nodes()) == {"b"}, timeout=SESSION_TIMEOUT / 2,
             description="node a to leave")
    wait_for(lambda: set(b.nodes()) == {"b"}, description="node b to see a leave")
    assert "node a left" in caplog.text
    assert not a.connected
    a.close()  # closing twice is harmless


def test_zk_duplicate_node_id_rejected(open_zk, zookeeper, cluster):
    first = open_zk(record("a", 7001))
    with pytest.raises(NodeIdInUseError) as info:
        ZooKeeperMembership(zookeeper.hosts, cluster, record("a", 7999),
                            timeout=SESSION_TIMEOUT)
    assert "node id 'a' is already registered" in str(info.value)
    assert cluster in str(info.value)
    # The refused daemon did not overwrite the first one's record.
    watcher = open_zk()
    assert watcher.nodes() == {"a": record("a", 7001)}
    assert first.connected

    # Another cluster on the same server may use the same node id.
    other = ZooKeeperMembership(zookeeper.hosts, cluster + "-other", record("a", 7999),
                                timeout=SESSION_TIMEOUT)
    other.close()


def test_zk_replaces_stale_own_record(open_zk, zookeeper, cluster, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    watcher = open_zk()
    a = open_zk(record("a", 7001, free_bytes=1))
    path = f"/ems/clusters/{cluster}/nodes/a"
    old_session = KazooClient(hosts=zookeeper.hosts)
    old_session.start(timeout=5)
    try:
        # Stage what a session expiry can leave behind: the znode of a's previous session,
        # still present when a re-registers from its new session.
        with a._zk_lock:
            old_session.delete(path)
            old_session.create(path, record("a", 7001).to_json(), ephemeral=True)
            a._owner_session = old_session.client_id[0]
        a._resync()
        assert "node a re-registered in cluster" in caplog.text
        _, stat = old_session.get(path)
        assert stat.ephemeralOwner == a._client.client_id[0]
        wait_for(lambda: watcher.nodes() == {"a": record("a", 7001, free_bytes=1)},
                 description="the replaced record")
    finally:
        old_session.stop()
        old_session.close()


def test_zk_invalid_record_ignored(open_zk, zookeeper, cluster, caplog):
    watcher = open_zk()
    client = KazooClient(hosts=zookeeper.hosts)
    client.start(timeout=5)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            client.create(f"/ems/clusters/{cluster}/nodes/junk", b"{not json", ephemeral=True)
            client.create(f"/ems/clusters/{cluster}/nodes/liar",
                          record("other", 1).to_json(), ephemeral=True)
            a = open_zk(record("a", 7001))
            wait_for(lambda: "a" in watcher.nodes(), description="a valid registration")
        assert set(watcher.nodes()) == {"a"}
        assert set(a.nodes()) == {"a"}
        assert "ignoring node junk" in caplog.text
        assert "ignoring node liar" in caplog.text
        assert "names node 'other'" in caplog.text
    finally:
        client.stop()
        client.close()


def test_zk_connect_failure_names_hosts():
    hosts = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(MembershipError) as info:
        ZooKeeperMembership(hosts, "c", record("a", 7001), timeout=1.0)
    assert hosts in str(info.value)
    assert isinstance(info.value, ConnectionError)
    assert time.monotonic() - started < 5


def test_zk_invalid_cluster_name():
    with pytest.raises(ValueError, match="invalid cluster 'a/b'"):
        ZooKeeperMembership("127.0.0.1:1", "a/b")


def test_open_membership_with_zookeeper(zookeeper, cluster):
    members = open_membership(zookeeper.hosts, "ignored=h:1", cluster, record("a", 7001),
                              timeout=SESSION_TIMEOUT)
    try:
        assert isinstance(members, ZooKeeperMembership)
        wait_for(lambda: members.nodes() == {"a": record("a", 7001)},
                 description="registration")
    finally:
        members.close()


def expire_session(hosts, member):
    """Expire the ZooKeeper session of `member`: another client opens the same session and
    closes it, the method of ZooKeeper's FAQ. If `member` reconnects first and takes the
    session back, the close misses, so repeat until the member has a new session."""
    session = member._client.client_id
    for _ in range(20):
        thief = KazooClient(hosts=hosts, client_id=session, timeout=SESSION_TIMEOUT)
        thief.start(timeout=5)
        thief.stop()
        thief.close()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if member._client.client_id not in (None, session):
                return
            time.sleep(0.02)
    pytest.fail("could not expire the session")


def test_zk_outage_keeps_nodes_and_recovers(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        server = ZooKeeperServer(tmp_path)
    except ZooKeeperMissing as exc:
        pytest.skip(f"no ZooKeeper server to test with: {exc}")
    server.start()
    watcher = a = b = None
    try:
        watcher = ZooKeeperMembership(server.hosts, "outage", timeout=SESSION_TIMEOUT)
        a = ZooKeeperMembership(server.hosts, "outage", record("a", 7001, free_bytes=1),
                                timeout=SESSION_TIMEOUT)
        b = ZooKeeperMembership(server.hosts, "outage", record("b", 7002),
                                timeout=SESSION_TIMEOUT)
        wait_for(lambda: set(watcher.nodes()) == {"a", "b"}, description="registrations")
        before = watcher.nodes()

        # ZooKeeper down: the last set stays, and one WARNING reports it.
        server.stop()
        wait_for(lambda: not watcher.connected and not a.connected,
                 description="disconnection")
        assert watcher.nodes() == before
        assert a.nodes() == before
        assert ("ZooKeeper connection lost; serving with the last membership of 2 nodes"
                in caplog.text)
        b.close()  # b stops during the outage, so its session cannot close
        assert "record stays in cluster outage until the session times out" in caplog.text

        # update() while down neither raises nor waits; the record is written later.
        started = time.monotonic()
        a.update(record("a", 7001, free_bytes=2))
        a.update(record("a", 7001, free_bytes=3))
        assert time.monotonic() - started < 0.5
        assert "record of node a is written after the next reconnect" in caplog.text
        time.sleep(SESSION_TIMEOUT)  # down for longer than a session timeout
        assert watcher.nodes() == before

        # Back up: both reconnect, and the pending record reaches the watcher.
        server.start()
        wait_for(lambda: watcher.connected and a.connected, description="reconnection")
        assert "ZooKeeper connection to 127.0.0.1" in caplog.text
        wait_for(lambda: watcher.nodes()["a"] == record("a", 7001, free_bytes=3),
                 description="the record written during the outage")
        # The server restored b's session and expires it one session timeout later.
        wait_for(lambda: set(watcher.nodes()) == {"a"}, timeout=3 * SESSION_TIMEOUT,
                 description="b's session to expire")
        assert "node b left" in caplog.text

        # A registrant whose session expired re-creates its ephemeral znode.
        caplog.clear()
        expire_session(server.hosts, a)
        wait_for(lambda: "node a re-registered in cluster outage" in caplog.text,
                 description="re-registration")
        wait_for(lambda: watcher.nodes() == {"a": record("a", 7001, free_bytes=3)},
                 description="the re-created record")
        assert "ZooKeeper session expired" in caplog.text
        a.update(record("a", 7001, free_bytes=4))
        wait_for(lambda: watcher.nodes()["a"].free_bytes == 4,
                 description="an update after re-registration")
    finally:
        for member in (watcher, a, b):
            if member is not None:
                member.close()
        server.stop()
