"""ZooKeeper paths of a cluster's activation, next to its membership.

    /ems/clusters/<cluster>/activation   the credential token that activated the cluster
    /ems/clusters/<cluster>/standing     the service's latest signed standing notice

Both are persistent znodes of ASCII token text. Anyone may write them, because the
ensemble's ACL is open, as for membership. Daemons trust only what verifies with the
service's public key, so a forged token is ignored, and an attacker can at most replace a
token with an older genuine one.
"""
from __future__ import annotations

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError, NodeExistsError
from kazoo.hosts import collect_hosts

from ems.cluster.membership import ROOT, check_name
from ems.errors import MembershipError

CONNECT_TIMEOUT_S = 10.0


def activation_path(cluster: str) -> str:
    check_name("cluster name", cluster)
    return f"{ROOT}/{cluster}/activation"


def standing_path(cluster: str) -> str:
    check_name("cluster name", cluster)
    return f"{ROOT}/{cluster}/standing"


def connect(hosts: str, timeout: float = CONNECT_TIMEOUT_S) -> KazooClient:
    """Start a kazoo client or raise MembershipError naming the hosts."""
    client = KazooClient(hosts=hosts, timeout=timeout)
    try:
        client.start(timeout=timeout)
    except client.handler.timeout_exception:
        client.close()
        raise MembershipError(f"ZooKeeper at {hosts} did not respond within {timeout:g} s; "
                              f"check that it is running and reachable") from None
    return client


def write(client: KazooClient, path: str, token: str) -> None:
    """Create or replace the znode at `path` with `token`."""
    data = token.encode("ascii")
    try:
        client.create(path, data, makepath=True)
    except NodeExistsError:
        client.set(path, data)


def read(client: KazooClient, path: str) -> str | None:
    try:
        data, _ = client.get(path)
    except NoNodeError:
        return None
    return data.decode("ascii", "replace") if data else None


def publish(hosts: str, path: str, token: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Write one token through a short-lived connection (the CLI and the service use it)."""
    client = connect(hosts, timeout)
    try:
        write(client, path, token)
    finally:
        client.stop()
        client.close()


def check_hosts(hosts: str) -> None:
    """Raise ValueError unless `hosts` reads as ZooKeeper's host:port[,host:port...]."""
    if not isinstance(hosts, str) or not 1 <= len(hosts) <= 1000:
        raise ValueError(f"ZooKeeper hosts {hosts!r} must be 1 to 1000 characters")
    for part in hosts.split("/", 1)[0].split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"ZooKeeper hosts {hosts!r}: {part!r} is not host:port")
    # kazoo's own parser, which KazooClient runs, rejects more (an unclosed '[' of IPv6).
    try:
        collect_hosts(hosts)
    except ValueError as exc:
        raise ValueError(f"ZooKeeper hosts {hosts!r} are invalid: {exc}") from None
