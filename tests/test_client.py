"""ems.connect: mode selection, the embedded client, and the local-daemon client against an
in-process transfer server (the cluster paths run real daemons in test_cluster*.py)."""
import os

import pytest

import ems
import ems._core as core
from conftest import make_block, make_key
from ems.client import ClusterClient, EmbeddedClient, _chunks

SECRET = b"client-test-secret"


@pytest.fixture
def local_daemon(tmp_path):
    pool = ems.Pool(64 << 20, pages="small")
    path = str(tmp_path / "d.sock")
    server = core.Server(pool, port=0, unix_path=path, secret=SECRET, node_id=5)
    yield pool, server, path
    server.stop()
    pool.close()


def test_connect_defaults_to_embedded(monkeypatch):
    for name in ("EMS_MODE", "EMS_SOCKET", "EMS_ZOOKEEPER", "EMS_PEERS"):
        monkeypatch.delenv(name, raising=False)
    with ems.connect(capacity_bytes=16 << 20) as client:
        assert isinstance(client, EmbeddedClient)
        key = make_key(1)
        assert client.put(key, make_block(key, 1, 4096))
        out = bytearray(4096)
        assert client.get_into(key, out)
        assert bytes(out) == make_block(key, 1, 4096)
        assert client.match_prefix([key, make_key(2)]) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "embedded"}, "capacity_bytes"),
    ({"mode": "local"}, "socket_path"),
    ({"mode": "cluster"}, "zookeeper"),
    ({"mode": "remote"}, "mode must be one of"),
])
def test_connect_errors_name_the_setting(monkeypatch, kwargs, message):
    for name in ("EMS_MODE", "EMS_SOCKET", "EMS_ZOOKEEPER", "EMS_PEERS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=message):
        ems.connect(**kwargs)


def test_connect_reads_the_secret_file(monkeypatch, tmp_path, local_daemon):
    _, _, path = local_daemon
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    monkeypatch.delenv("EMS_SECRET", raising=False)
    monkeypatch.setenv("EMS_SECRET_FILE", str(secret_file))
    with ems.connect(socket_path=path) as client:
        assert client.mode == "local"


def test_local_client_without_secret_is_refused(monkeypatch, local_daemon):
    _, server, path = local_daemon
    monkeypatch.delenv("EMS_SECRET", raising=False)
    monkeypatch.delenv("EMS_SECRET_FILE", raising=False)
    with pytest.raises(ems.errors.AuthenticationError, match="requires the cluster secret"):
        ems.connect("local", socket_path=path)
    assert server.stats()["auth_failures"] == 0   # refused before sending a proof


def test_local_client_round_trip_through_shared_memory(local_daemon):
    pool, server, path = local_daemon
    keys = [make_key(i, "local") for i in range(8)]
    blocks = [make_block(k, 3, 10000 + i) for i, k in enumerate(keys)]
    with ems.connect("local", socket_path=path, secret=SECRET, tenant="t1") as client:
        assert client.put_many(keys, blocks) == 8
        assert client.put_many(keys, blocks) == 0     # already stored
        outs = [bytearray(len(b)) for b in blocks]
        assert client.get_many_into(keys, outs) == [True] * 8
        assert [bytes(o) for o in outs] == blocks
        stats = client.stats()
        assert stats["local_puts"] == 8
        assert stats["local_hits"] == 8
        assert stats["shared_memory_hits"] == 8
        assert client.match_prefix(keys + [make_key(99)]) == 8
        assert client.exists_many([keys[0], make_key(99)]) == [True, False]
        assert client.delete(keys[0])
        assert not client.exists(keys[0])
    # The daemon holds the blocks under the tenant's stored keys only.
    assert pool.exists(core.tenant_keys("t1", keys[1]))
    assert not pool.exists(keys[1])
    assert server.stats()["local_puts"] == 16


def test_local_tenants_do_not_see_each_other(local_daemon):
    _, _, path = local_daemon
    key = make_key(1, "iso")
    with ems.connect("local", socket_path=path, secret=SECRET, tenant="a") as a, \
            ems.connect("local", socket_path=path, secret=SECRET, tenant="b") as b:
        a.put(key, make_block(key, 1, 2048))
        assert not b.exists(key)
        assert not b.get_into(key, bytearray(2048))
        assert b.match_prefix([key]) == 0


def test_async_variants_return_futures(local_daemon):
    _, _, path = local_daemon
    keys = [make_key(i, "async") for i in range(4)]
    blocks = [make_block(k, 1, 4096) for k in keys]
    with ems.connect("local", socket_path=path, secret=SECRET) as client:
        assert client.put_many_async(keys, blocks).result(timeout=5) == 4
        outs = [bytearray(4096) for _ in keys]
        assert client.get_many_into_async(keys, outs).result(timeout=5) == [True] * 4
        assert [bytes(o) for o in outs] == blocks
        assert client.match_prefix_async(keys).result(timeout=5) == 4


def test_daemon_pool_lists_its_keys():
    with ems.Pool(16 << 20, pages="small") as pool:
        keys = [make_key(i, "list") for i in range(100)]
        pool.put_many(keys, [b"x" * 100] * 100)
        listed = b"".join(pool.keys(chunk=7))
        assert sorted(listed[i:i + 32] for i in range(0, len(listed), 32)) == sorted(keys)


def test_chunks_stay_under_the_batch_limit():
    sizes = [6 << 20] * 7
    chunks = list(_chunks(list(range(7)), sizes))
    assert [len(c) for c in chunks] == [2, 2, 2, 1]
    assert sum(len(c) for c in chunks) == 7


def test_cluster_client_without_membership_is_local_mode(local_daemon):
    _, _, path = local_daemon
    client = ClusterClient(None, socket_path=path, secret=SECRET)
    try:
        assert client.mode == "local"
        assert client.put(os.urandom(32), b"y" * 100)
    finally:
        client.close()


def test_local_protect_keeps_blocks_through_eviction(tmp_path):
    """Protected blocks outlive a flood of puts that evicts everything else."""
    pool = ems.Pool(8 << 20, slab_size=1 << 20, pages="small")
    path = str(tmp_path / "p.sock")
    server = core.Server(pool, port=0, unix_path=path, secret=SECRET, node_id=6)
    try:
        with ems.connect("local", socket_path=path, secret=SECRET) as client:
            kept = [make_key(i, "kept") for i in range(2)]
            client.put_many(kept, [make_block(k, 1, 256 << 10) for k in kept])
            assert client.protect(kept + [make_key(9, "absent")]) == 2
            for start in range(0, 96, 8):
                flood = [make_key(i, "flood") for i in range(start, start + 8)]
                client.put_many(flood, [make_block(k, 1, 256 << 10) for k in flood])
            assert pool.stats()["evictions"] > 0
            outs = [bytearray(256 << 10) for _ in kept]
            assert client.get_many_into(kept, outs) == [True, True]
            assert [bytes(o) for o in outs] == [make_block(k, 1, 256 << 10) for k in kept]
            assert client.unprotect(kept) == 2
    finally:
        server.stop()
        pool.close()
