"""Activation end to end: real `ems serve --manage-public-key` daemons (tests/cluster_rig.py),
a real ZooKeeper, `ems activate` run as a subprocess, and an engine's local client.

The management service is played by the test: it makes its key with
tokens.new_private_key, signs credentials and standing notices, and publishes notices with
zkstate.publish. A second key stands for a forger. Each test uses its own cluster name.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

import cluster_rig as rig
from conftest import make_block, make_key

import ems
from ems.manage import tokens, zkstate

SECRET = rig.SECRET.encode()
ACCOUNT = "acct-7"
WAIT_S = 10.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate, timeout: float = WAIT_S, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(private key, path of its public PEM) of the test's management service."""
    key = tokens.new_private_key()
    path = tmp_path_factory.mktemp("manage") / "service.pub"
    path.write_bytes(tokens.public_pem(key))
    return key, str(path)


@pytest.fixture
def run_dir(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    return str(directory)


@pytest.fixture
def daemons():
    """Daemons started by a test, stopped at teardown."""
    started = []
    yield started
    for daemon in started:
        rig.stop(daemon)


def sign_credential(key, cluster, cred_id="cred-1", expires_at=None):
    now = int(time.time())
    return tokens.sign_credential(key, tokens.Credential(
        id=cred_id, account=ACCOUNT, cluster=cluster, issued=now,
        expires=expires_at if expires_at is not None else now + 3600))


def publish_standing(key, hosts, cluster, issued, **fields):
    notice = tokens.Standing(account=fields.pop("account", ACCOUNT), cluster=cluster,
                             issued=issued, **fields)
    zkstate.publish(hosts, zkstate.standing_path(cluster), tokens.sign_standing(key, notice))


def write_token(directory, name, token) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(token + "\n")
    return path


def start_daemon(daemons, run_dir, service, cluster, *, zookeeper=None, credential=None,
                 node="a"):
    extra = ["--manage-public-key", service[1], "--cluster", cluster]
    if credential:
        extra += ["--credential", credential]
    daemon = rig.plan(run_dir, [node])[0]
    daemons.append(daemon)
    return rig.start(daemon, run_dir, zookeeper=zookeeper, extra=tuple(extra))


def http_get(daemon, path: str) -> str:
    url = f"http://127.0.0.1:{daemon.metrics_port}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def activation(daemon) -> dict:
    return json.loads(http_get(daemon, "/activation"))


def state_is(daemon, state):
    return lambda: activation(daemon)["state"] == state


def run_activate(*args, env_key=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("EMS_MANAGE_PUBLIC_KEY", None)
    if env_key:
        env["EMS_MANAGE_PUBLIC_KEY"] = env_key
    return subprocess.run([sys.executable, "-m", "ems.cli", "activate", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def blocks(tag: str, count: int = 4):
    keys = [make_key(i, tag) for i in range(count)]
    return keys, [make_block(key, 1, 2048) for key in keys]


def read(client, keys):
    """(hits, contents) of the keys through the client."""
    buffers = [bytearray(2048) for _ in keys]
    hits = client.get_many_into(keys, buffers)
    return hits, [bytes(b) for b in buffers]


# ---- the full cycle -------------------------------------------------------------------


def test_activate_revoke_resume_arrears(zookeeper, service, run_dir, daemons, tmp_path):
    key, public = service
    cluster = "act-cycle"
    daemon = start_daemon(daemons, run_dir, service, cluster, zookeeper=zookeeper.hosts)

    # Before activation: nothing is stored or served, and the endpoints report why.
    doc = activation(daemon)
    assert doc["state"] == "not_activated"
    assert doc["serving"] is False
    assert doc["node_id"] == "a"
    assert doc["cluster"] == cluster
    assert doc["credential"] is None
    metrics = http_get(daemon, "/metrics")
    labels = f'cluster="{cluster}",node="a"'
    assert f'ems_activation_state{{{labels},state="not_activated"}} 1.0' in metrics
    assert f'ems_activation_state{{{labels},state="active"}} 0.0' in metrics
    assert f'ems_serving{{{labels}}} 0.0' in metrics
    assert "node a: not serving: no credential" in daemon.log()
    keys, data = blocks("before")
    with ems.connect("local", socket_path=daemon.socket_path, secret=SECRET) as client:
        assert client.put_many(keys, data) == 0
        assert client.put(keys[0], data[0]) is False
        assert read(client, keys)[0] == [False] * len(keys)
    assert f'ems_pool_suspended_drops_total{{{labels},tier="dram"}} 5.0' \
        in http_get(daemon, "/metrics")

    # `ems activate` with a good credential: the daemon serves.
    token = sign_credential(key, cluster)
    result = run_activate("--credential", write_token(tmp_path, "good.cred", token),
                          "--zookeeper", zookeeper.hosts, "--cluster", cluster,
                          "--public-key", public)
    assert result.returncode == 0, result.stderr
    assert "credential cred-1" in result.stdout
    assert f"account {ACCOUNT}" in result.stdout
    assert f"cluster {cluster}" in result.stdout
    assert wait_for(state_is(daemon, "active"))
    doc = activation(daemon)
    assert doc["serving"] is True
    assert doc["credential"] == "cred-1"
    assert doc["account"] == ACCOUNT
    assert f'ems_serving{{{labels}}} 1.0' in http_get(daemon, "/metrics")
    keys, data = blocks("stored")
    with ems.connect("local", socket_path=daemon.socket_path, secret=SECRET) as client:
        assert client.put_many(keys, data) == len(keys)
        assert read(client, keys) == ([True] * len(keys), data)

        # A notice revoking the credential: misses, and the log names the reason.
        publish_standing(key, zookeeper.hosts, cluster, 1000, revoked=frozenset({"cred-1"}))
        assert wait_for(state_is(daemon, "revoked"))
        assert activation(daemon)["serving"] is False
        assert read(client, keys)[0] == [False] * len(keys)
        assert client.exists_many(keys) == [False] * len(keys)
        assert "node a: not serving: credential cred-1 revoked" in daemon.log()
        assert 'state="revoked"} 1.0' in http_get(daemon, "/metrics")

        # A newer notice without the revocation: the blocks stored before are hits again.
        publish_standing(key, zookeeper.hosts, cluster, 2000)
        assert wait_for(state_is(daemon, "active"))
        assert read(client, keys) == ([True] * len(keys), data)

        # Arrears: misses again, and puts store nothing.
        publish_standing(key, zookeeper.hosts, cluster, 3000, arrears=True)
        assert wait_for(state_is(daemon, "arrears"))
        assert read(client, keys)[0] == [False] * len(keys)
        more, more_data = blocks("in-arrears")
        assert client.put_many(more, more_data) == 0
        assert f"node a: not serving: account {ACCOUNT} in arrears" in daemon.log()
    assert token not in daemon.log()


# ---- `ems activate` refusals ----------------------------------------------------------


@pytest.mark.parametrize("case,message", [
    ("forged", "signature does not verify"),
    ("expired", "expired at"),
    ("other_cluster", "is for cluster 'somewhere-else'"),
    ("garbage", "not an EMS token"),
])
def test_activate_refuses_bad_credentials(zookeeper, service, tmp_path, case, message):
    key, public = service
    cluster = f"act-refuse-{case}".replace("_", "-")
    token = {
        "forged": lambda: sign_credential(tokens.new_private_key(), cluster),
        "expired": lambda: sign_credential(key, cluster, expires_at=int(time.time()) - 60),
        "other_cluster": lambda: sign_credential(key, "somewhere-else"),
        "garbage": lambda: "not a credential at all",
    }[case]()
    result = run_activate("--credential", write_token(tmp_path, "bad.cred", token),
                          "--zookeeper", zookeeper.hosts, "--cluster", cluster,
                          env_key=public)
    assert result.returncode == 2
    assert message in result.stderr
    assert "nothing written" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    client = zkstate.connect(zookeeper.hosts)
    try:
        assert zkstate.read(client, zkstate.activation_path(cluster)) is None
    finally:
        client.stop()
        client.close()


def test_activate_refuses_revoked_credential(zookeeper, service, tmp_path):
    key, public = service
    cluster = "act-refuse-revoked"
    publish_standing(key, zookeeper.hosts, cluster, 10, revoked=frozenset({"cred-9"}))
    token = sign_credential(key, cluster, cred_id="cred-9")
    result = run_activate("--credential", write_token(tmp_path, "revoked.cred", token),
                          "--zookeeper", zookeeper.hosts, "--cluster", cluster,
                          "--public-key", public)
    assert result.returncode == 2
    assert "revoked" in result.stderr


@pytest.mark.parametrize("hosts", ["127.0.0.1:notaport", "127.0.0.1:99999", "[::1:2181"])
def test_activate_rejects_bad_zookeeper_hosts(service, tmp_path, hosts):
    key, public = service
    token = sign_credential(key, "act-bad-hosts")
    result = run_activate("--credential", write_token(tmp_path, "ok.cred", token),
                          "--zookeeper", hosts, "--cluster", "act-bad-hosts",
                          "--public-key", public)
    assert result.returncode == 2
    assert f"ZooKeeper hosts {hosts!r}" in result.stderr
    assert "Traceback" not in result.stderr


def test_activate_needs_a_public_key(zookeeper, tmp_path):
    result = run_activate("--credential", write_token(tmp_path, "x.cred", "x"),
                          "--zookeeper", zookeeper.hosts, "--cluster", "act-no-key")
    assert result.returncode == 2
    assert "--public-key is missing" in result.stderr


# ---- `ems serve --credential` ----------------------------------------------------------


def test_credential_expires_while_serving(service, run_dir, daemons, tmp_path):
    """Static membership, no ZooKeeper: only the clock ends the activation."""
    key, _ = service
    cluster = "act-expiry"
    expires_at = int(time.time()) + 4
    path = write_token(tmp_path, "short.cred",
                       sign_credential(key, cluster, expires_at=expires_at))
    daemon = start_daemon(daemons, run_dir, service, cluster, credential=path)
    keys, data = blocks("short")
    with ems.connect("local", socket_path=daemon.socket_path, secret=SECRET) as client:
        assert activation(daemon)["state"] == "active"
        assert client.put_many(keys, data) == len(keys)
        assert read(client, keys)[0] == [True] * len(keys)
        assert wait_for(state_is(daemon, "expired"), timeout=expires_at - time.time() + 5)
        assert time.time() >= expires_at
        assert read(client, keys)[0] == [False] * len(keys)
    assert "node a: not serving: credential cred-1 expired at" in daemon.log()


def test_serve_with_valid_credential_writes_znode(zookeeper, service, run_dir, daemons,
                                                  tmp_path):
    key, _ = service
    cluster = "act-serve-valid"
    token = sign_credential(key, cluster)
    daemon = start_daemon(daemons, run_dir, service, cluster, zookeeper=zookeeper.hosts,
                          credential=write_token(tmp_path, "good.cred", token))
    assert activation(daemon)["state"] == "active"
    keys, data = blocks("valid")
    with ems.connect("local", socket_path=daemon.socket_path, secret=SECRET) as client:
        assert client.put_many(keys, data) == len(keys)
        assert read(client, keys) == ([True] * len(keys), data)
    client = zkstate.connect(zookeeper.hosts)
    try:
        assert wait_for(lambda: zkstate.read(client, zkstate.activation_path(cluster)) == token)
    finally:
        client.stop()
        client.close()


def test_serve_with_invalid_credential_starts_without_serving(zookeeper, service, run_dir,
                                                              daemons, tmp_path):
    cluster = "act-serve-invalid"
    forged = sign_credential(tokens.new_private_key(), cluster)
    daemon = start_daemon(daemons, run_dir, service, cluster, zookeeper=zookeeper.hosts,
                          credential=write_token(tmp_path, "forged.cred", forged))
    doc = activation(daemon)
    assert doc["state"] == "invalid"
    assert doc["serving"] is False
    assert "node a: not serving: invalid credential" in daemon.log()
    assert "signature does not verify" in daemon.log()
    keys, data = blocks("invalid")
    with ems.connect("local", socket_path=daemon.socket_path, secret=SECRET) as client:
        assert client.put_many(keys, data) == 0
    client = zkstate.connect(zookeeper.hosts)
    try:
        assert zkstate.read(client, zkstate.activation_path(cluster)) is None
    finally:
        client.stop()
        client.close()


def test_serve_credential_needs_public_key(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, EMS_RUN_DIR=str(tmp_path))
    env.pop("EMS_MANAGE_PUBLIC_KEY", None)
    result = subprocess.run([sys.executable, "-m", "ems.cli", "serve", "--node-id", "x",
                             "--capacity", "16M", "--credential", str(tmp_path / "c.cred")],
                            env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "--credential needs --manage-public-key" in result.stderr
