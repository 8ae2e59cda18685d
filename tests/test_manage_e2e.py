"""The management plane end to end: a real service on HTTPS, a real ZooKeeper and a real
`ems serve` daemon that obeys it.

The account activates its cluster with a credential issued by the service. The sampler
counts the daemon through ZooKeeper and its /activation endpoint, and the bill grows until
the account is in arrears and the daemon stops serving. A top-up brings it back with the
blocks it held. Revoking the credential and deleting the cluster stop it too.
"""
import time

import pytest

import cluster_rig as rig
import manage_rig
import ems
from ems.manage import billing
from ems.manage.sampler import Sampler, ZooKeeperProbe

BLOCK = 4096


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
    rig_plane = manage_rig.start_plane(tmp_path, zookeeper)
    yield rig_plane
    rig_plane.stop()


def sampler_of(service) -> Sampler:
    return Sampler(service.server.service, ZooKeeperProbe())




def test_activation_metering_arrears_and_top_up(plane):
    service, client, account, cluster, daemon = (plane.service, plane.client, plane.account,
                                                  plane.cluster, plane.daemon)
    assert manage_rig.activation(daemon)["serving"] is False
    assert writes(daemon, 8) == 0, "a daemon that is not activated stored blocks"

    sampler = sampler_of(service)
    try:
        hour = billing.last_sample_time(time.time()) // billing.HOUR_S * billing.HOUR_S
        hour += billing.HOUR_S
        assert sampler.sample_at(hour) == {cluster["id"]: 0}, "an inactive node was counted"

        credential = plane.activate()
        state = manage_rig.wait_state(daemon, "active")
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
        manage_rig.wait_state(daemon, "arrears")
        assert reads(daemon, 8) == 0, "a daemon in arrears served reads"
        assert writes(daemon, 4) == 0

        bill = client.call("GET", "/v1/bill", query={
            "month": time.strftime("%Y-%m", time.gmtime(hour + 1))})
        assert [(i["node_sum"], i["node_hours"], i["amount"]) for i in bill["items"]] == \
            [(12, 1, "1.00")]
        assert sampler.sample_at(hour + 13 * billing.SAMPLE_INTERVAL_S) == \
            {cluster["id"]: 0}, "a node in arrears was counted"

        service.admin.call("POST", f"/v1/accounts/{account['id']}/topups", {"amount": "5"})
        manage_rig.wait_state(daemon, "active")
        assert reads(daemon, 8) == 8, "blocks stored before the arrears were lost"
    finally:
        sampler.stop()


def test_revocation_and_deletion_stop_serving(plane):
    client, cluster, daemon = plane.client, plane.cluster, plane.daemon
    credential = plane.activate()
    manage_rig.wait_state(daemon, "active")
    assert writes(daemon, 4) == 4

    reply = client.call("DELETE", f"/v1/credentials/{credential}")
    assert reply["notice"] == "published"
    manage_rig.wait_state(daemon, "revoked")
    assert reads(daemon, 4) == 0
    assert "revoked" in daemon.log()

    plane.activate()
    manage_rig.wait_state(daemon, "active")
    assert reads(daemon, 4) == 4

    client.call("DELETE", f"/v1/clusters/{cluster['id']}")
    manage_rig.wait_state(daemon, "deleted")
    assert reads(daemon, 4) == 0
