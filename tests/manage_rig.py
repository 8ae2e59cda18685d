"""A real management service on loopback HTTPS for tests, and signed clients of it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import cluster_rig

from ems.manage.client import ManageClient
from ems.manage.server import ManageServer, init_directory


@dataclass
class Rig:
    directory: str
    server: ManageServer
    url: str
    ca_file: str
    admin: ManageClient

    def client(self, key_id: str, secret: str) -> ManageClient:
        return ManageClient(self.url, key_id, secret, self.ca_file)

    def new_account(self, name: str, price: str = "0.50") -> tuple[ManageClient, dict]:
        reply = self.admin.call("POST", "/v1/accounts",
                                {"name": name, "price_per_node_hour": price})
        return self.client(reply["access_key_id"], reply["secret_access_key"]), reply

    def stop(self) -> None:
        self.server.stop()


def start(directory: str, *, clock=None, sample: bool = False) -> Rig:
    """Initialise `directory`, serve it on a free port with metrics on another, and
    return the rig. The sampler runs only with sample=True."""
    config = init_directory(directory, ["127.0.0.1"])
    server = ManageServer(directory, port=0, metrics_port=0, clock=clock, sample=sample)
    server.start()
    url = f"https://127.0.0.1:{server.port}"
    admin = ManageClient(url, config["access_key_id"], config["secret_access_key"],
                         config["ca_file"])
    return Rig(directory, server, url, config["ca_file"], admin)


# ---- a service with a cluster and a daemon that obeys it ---------------------------------

@dataclass
class Plane:
    """The service, an account at 1.00 per node-hour with no balance, its cluster and a
    daemon of that cluster that enforces activation."""

    service: Rig
    client: ManageClient
    account: dict
    cluster: dict
    daemon: object            # cluster_rig.DaemonProcess
    zookeeper: object         # zookeeper_server.ZooKeeperServer
    directory: str

    def activate(self) -> str:
        """Issue a credential and activate the cluster with `ems activate`; returns the
        credential id."""
        reply = self.client.call("POST", "/v1/credentials", {"cluster": self.cluster["id"]})
        path = os.path.join(self.directory, f"{reply['id']}.credential")
        with open(path, "w") as f:
            f.write(reply["token"])
        result = subprocess.run(
            [sys.executable, "-m", "ems.cli", "activate", "--credential", path,
             "--zookeeper", self.zookeeper.hosts, "--cluster", self.cluster["name"],
             "--public-key", f"{self.service.directory}/signing.pub"],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return reply["id"]

    def stop(self) -> None:
        cluster_rig.stop(self.daemon)
        self.service.stop()


def start_plane(tmp_path, zookeeper, capacity: str = "16M") -> Plane:
    """Start a Plane. The cluster is named after the test directory, so tests do not
    share znodes."""
    service = start(str(tmp_path / "manage"))
    client, account = service.new_account("acme", "1.00")
    name = f"e2e-{tmp_path.name[-40:]}".replace("[", "-").replace("]", "")
    cluster = client.call("POST", "/v1/clusters", {"name": name, "zookeeper": zookeeper.hosts})
    (daemon,) = cluster_rig.plan(str(tmp_path), ["n1"])
    cluster_rig.start(daemon, str(tmp_path), zookeeper=zookeeper.hosts, capacity=capacity,
                      extra=("--cluster", name, "--manage-public-key",
                             f"{service.directory}/signing.pub"))
    return Plane(service, client, account, cluster, daemon, zookeeper, str(tmp_path))


def activation(daemon) -> dict:
    url = f"http://127.0.0.1:{daemon.metrics_port}/activation"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_state(daemon, state: str, timeout: float = 15.0) -> dict:
    """Wait until the daemon's /activation reports `state`; return that document."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = activation(daemon)
        if last["state"] == state:
            return last
        time.sleep(0.1)
    raise AssertionError(f"daemon {daemon.node_id} stayed {last} instead of {state}\n"
                         f"{daemon.log()[-3000:]}")
