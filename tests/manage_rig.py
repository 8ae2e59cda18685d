"""A real management service on loopback HTTPS for tests, and signed clients of it."""
from __future__ import annotations

from dataclasses import dataclass

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
