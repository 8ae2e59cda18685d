"""The management plane end to end: a real service on HTTPS, a real ZooKeeper and a real
`ems serve` daemon that obeys it.

The account activates its cluster with a credential issued by the service. The sampler
counts the daemon through ZooKeeper and its /activation endpoint, and the bill grows until
the account is in arrears and the daemon stops serving. A top-up brings it back with the
blocks it held. Revoking the credential and deleting the cluster stop it too.
"""
import json
import subprocess
import sys
import time
import urllib.request

import pytest

import cluster_rig as rig
import manage_rig
import ems
from ems.manage import billing
from ems.manage.sampler import Sampler, ZooKeeperProbe

BLOCK = 4096


def activation(daemon) -> dict:
    url = f"http://127.0.0.1:{daemon.metrics_port}/activation"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_state(daemon, state: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = activation(daemon)
        if last["state"] == state:
            return last
        time.sleep(0.1)
    raise AssertionError(f"daemon {daemon.node_id} stayed {last} instead of {state}\n"
                         f"{daemon.log()[-3000:]}")


def local_client(daemon):
    return ems.connect("local", socket_path=daemon.socket_path, secret=rig.SECRET.encode())


def key(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def reads(daemon, count: int) -> int:
    with local_client(daemon) as client:
        buffers = [bytearray(BLOCK) for _ in range(count)]
        found = client.get_many_into([key(i) for i in range(count)], buffers)
    return sum(1 for ok, b in zip(found, buffers) if ok and b == bytes([7]) * BLOCK)


def writes(daemon, count: int) -> int:
    with local_client(daemon) as client:
        return client.put_many([key(i) for i in range(count)], [bytes([7]) * BLOCK] * count)


@pytest.fixture
def plane(tmp_path, zookeeper):
    """The service, an account 'acme' at 1.00 per node-hour with no balance, its cluster
    (named after the test directory, so tests do not share znodes) and a daemon of it
    that enforces activation."""
    service = manage_rig.start(str(tmp_path / "manage"))
    client, account = service.new_account("acme", "1.00")
    name = f"e2e-{tmp_path.name[-40:]}".replace("[", "-").replace("]", "")
    cluster = client.call("POST", "/v1/clusters", {"name": name, "zookeeper": zookeeper.hosts})
    (daemon,) = rig.plan(str(tmp_path), ["n1"])
    rig.start(daemon, str(tmp_path), zookeeper=zookeeper.hosts, capacity="16M",
              extra=("--cluster", name, "--manage-public-key",
                     f"{service.directory}/signing.pub"))
    yield service, client, account, cluster, daemon
    rig.stop(daemon)
    service.stop()


def activate(service, client, cluster, tmp_path, zookeeper) -> str:
    reply = client.call("POST", "/v1/credentials", {"cluster": cluster["id"]})
    path = tmp_path / "credential"
    path.write_text(reply["token"])
    result = subprocess.run(
        [sys.executable, "-m", "ems.cli", "activate", "--credential", str(path),
         "--zookeeper", zookeeper.hosts, "--cluster", cluster["name"],
         "--public-key", f"{service.directory}/signing.pub"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return reply["id"]


def sampler_of(service) -> Sampler:
    return Sampler(service.server.service, ZooKeeperProbe())


def test_activation_metering_arrears_and_top_up(plane, tmp_path, zookeeper):
    service, client, account, cluster, daemon = plane
    assert activation(daemon)["serving"] is False
    assert writes(daemon, 8) == 0, "a daemon that is not activated stored blocks"

    sampler = sampler_of(service)
    try:
        hour = billing.last_sample_time(time.time()) // billing.HOUR_S * billing.HOUR_S
        hour += billing.HOUR_S
        assert sampler.sample_at(hour) == {cluster["id"]: 0}, "an inactive node was counted"

        credential = activate(service, client, cluster, tmp_path, zookeeper)
        state = wait_state(daemon, "active")
        assert state["account"] == account["id"]
        assert state["credential"] == credential
        assert writes(daemon, 8) == 8
        assert reads(daemon, 8) == 8

        # Twelve samples of one node: one node-hour at 1.00, against a balance of 0.
        for step in range(1, 12):
            assert sampler.sample_at(hour + step * billing.SAMPLE_INTERVAL_S) == \
                {cluster["id"]: 1}
        assert client.call("GET", "/v1/account")["in_arrears"] is False
        sampler.sample_at(hour + 12 * billing.SAMPLE_INTERVAL_S)
        view = client.call("GET", "/v1/account")
        assert view["bill_due"] == "1.00"
        assert view["in_arrears"] is True
        sampler.publish_changed(int(time.time()))
        wait_state(daemon, "arrears")
        assert reads(daemon, 8) == 0, "a daemon in arrears served reads"
        assert writes(daemon, 4) == 0

        bill = client.call("GET", "/v1/bill", query={
            "month": time.strftime("%Y-%m", time.gmtime(hour + 1))})
        assert [(i["node_sum"], i["node_hours"], i["amount"]) for i in bill["items"]] == \
            [(12, 1, "1.00")]
        assert sampler.sample_at(hour + 13 * billing.SAMPLE_INTERVAL_S) == \
            {cluster["id"]: 0}, "a node in arrears was counted"

        service.admin.call("POST", f"/v1/accounts/{account['id']}/topups", {"amount": "5"})
        wait_state(daemon, "active")
        assert reads(daemon, 8) == 8, "blocks stored before the arrears were lost"
    finally:
        sampler.stop()


def test_revocation_and_deletion_stop_serving(plane, tmp_path, zookeeper):
    service, client, account, cluster, daemon = plane
    credential = activate(service, client, cluster, tmp_path, zookeeper)
    wait_state(daemon, "active")
    assert writes(daemon, 4) == 4

    reply = client.call("DELETE", f"/v1/credentials/{credential}")
    assert reply["notice"] == "published"
    wait_state(daemon, "revoked")
    assert reads(daemon, 4) == 0
    assert "revoked" in daemon.log()

    activate(service, client, cluster, tmp_path, zookeeper)
    wait_state(daemon, "active")
    assert reads(daemon, 4) == 4

    client.call("DELETE", f"/v1/clusters/{cluster['id']}")
    wait_state(daemon, "deleted")
    assert reads(daemon, 4) == 0
