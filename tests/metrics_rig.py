"""A daemon that exposes every metric family, and helpers to read Prometheus text.

The daemon runs with a spill tier and under an activation credential, so it also exposes
the families that only such daemons have (ems_tier_*,
ems_activation_expiry_timestamp_seconds). It stores a few blocks over TCP, so that the per
size class families have rows.
"""
from __future__ import annotations

import os
import re
import time
import urllib.request

import cluster_rig as rig

import ems._core as core
from ems.manage import tokens

CLUSTER = "metrics-test"
ACCOUNT = "acct-metrics"
BLOCK_BYTES = 3000


def start_full_node(run_dir: str) -> rig.DaemonProcess:
    """Start daemon "m1" in cluster CLUSTER with a spill tier and a valid credential, and
    store 8 blocks in it over TCP."""
    key = tokens.new_private_key()
    public = os.path.join(run_dir, "manage.pub")
    with open(public, "wb") as f:
        f.write(tokens.public_pem(key))
    now = int(time.time())
    token = tokens.sign_credential(key, tokens.Credential(
        id="cred-metrics", account=ACCOUNT, cluster=CLUSTER, issued=now,
        expires=now + 86400))
    credential = os.path.join(run_dir, "metrics.credential")
    with open(credential, "w") as f:
        f.write(token + "\n")

    (daemon,) = rig.plan(run_dir, ["m1"])
    rig.start(daemon, run_dir, peers=daemon.peer, capacity="16M",
              extra=("--cluster", CLUSTER, "--manage-public-key", public,
                     "--credential", credential, "--spill-dir",
                     os.path.join(run_dir, "spill"), "--spill-size", "64M",
                     "--slab-size", "1M"))
    try:
        wait_for(lambda: 'ems_serving{cluster="%s",node="m1"} 1.0' % CLUSTER
                 in scrape(daemon.metrics_port), "the daemon to serve")
        conn = connect(daemon)
        try:
            keys = [os.urandom(32) for _ in range(8)]
            assert conn.put_many(keys, [b"m" * BLOCK_BYTES] * len(keys)) == [0] * len(keys)
        finally:
            conn.close()
    except BaseException:
        rig.stop(daemon)
        raise
    return daemon


def connect(daemon: rig.DaemonProcess, secret: str = rig.SECRET) -> core.Connection:
    return core.Connection("127.0.0.1", daemon.port, secret=secret.encode())


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def families(text: str) -> dict[str, str]:
    """{name: type} of every family in the text, named as Prometheus stores it (a
    counter with its _total, an info family with its _info, a histogram without the
    _bucket, _sum and _count suffixes)."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def series_names(text: str) -> set[str]:
    """Names a query can select: every family, and the _bucket, _sum and _count series
    of each histogram."""
    names = set()
    for name, kind in families(text).items():
        names.add(name)
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def sample(text: str, name: str, **labels: str) -> float:
    """Value of the one sample of `name` whose labels include `labels`."""
    found = []
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{key}="{value_}"' in head for key, value_ in labels.items()):
            found.append(float(value))
    assert len(found) == 1, f"{len(found)} samples of {name} with {labels}"
    return found[0]


def ems_names(text: str) -> set[str]:
    """The ems_* metric names a query or document mentions. A prefix that ends in an
    underscore ("ems_manage_") is not a name."""
    return set(re.findall(r"\bems_[a-z0-9_]*[a-z0-9](?![a-z0-9_])", text))
