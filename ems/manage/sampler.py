"""Metering: counts each cluster's working nodes at every sample time and keeps standing
notices current.

A node works normally when it is registered in the cluster's ZooKeeper, responds on its
`/activation` endpoint within PROBE_TIMEOUT_S, and reports that it serves under a
credential of the cluster's account. A sample is recorded once per cluster and time (the store ignores a
second one), so a restarted service never counts a sample time twice. A sample time
the service missed (it was down for more than GRACE_S after it) is not recorded: the
service cannot know the past, and an unrecorded sample bills nothing.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from kazoo.exceptions import NoNodeError

from ems.cluster.membership import ROOT, NodeRecord
from ems.manage import billing, zkstate

log = logging.getLogger("ems.manage.sampler")

GRACE_S = 120          # a sample time is still taken this long after it passed
LOOP_S = 5.0           # how often the sampler wakes up
PROBE_TIMEOUT_S = 2.0  # per node
DELETED_RETRY_S = 86400   # deleted clusters' notices are retried this long
# Clusters probed, and notices written, at once. A cluster whose ZooKeeper does not respond
# occupies one worker for up to zkstate.CONNECT_TIMEOUT_S (PUBLISH_TIMEOUT_S for a notice).
# Taken one by one, a few dozen such clusters make a pass longer than GRACE_S, and then a
# sample time can pass with no pass starting in its grace period, unsampled for everyone.
CLUSTER_WORKERS = 32


class Sampler:
    def __init__(self, service, probe=None):
        self.service = service
        self.probe = probe or ZooKeeperProbe()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Counters for ems_manage_sampler_*: written by the thread that samples, read by
        # scrapes.
        self.passes = 0             # background passes finished, failed ones included
        self.pass_failures = 0      # background passes that raised
        self.samples_recorded = 0
        self.probe_failures = 0     # clusters whose nodes could not be counted

    # ---- one pass ----------------------------------------------------------------------

    def step(self) -> None:
        """Take the latest sample time if it is due, then write changed standing notices."""
        now = self.service.now()
        due = billing.last_sample_time(now)
        if now - due <= GRACE_S:
            self.sample_at(due)
        self.publish_changed(now)

    def sample_at(self, t: int) -> dict[str, int]:
        """Sample every live cluster that lacks sample time t. Returns cluster id -> nodes
        for the samples recorded."""
        store = self.service.store
        due = [cluster for cluster in store.clusters(live_only=True)
               if cluster["created"] <= t and not store.has_sample(cluster["id"], t)]

        def count(cluster: dict) -> int | None:
            try:
                return self._count(cluster)
            except Exception as exc:   # retried on the next pass within GRACE_S
                log.warning("sample of %s of cluster %s (%s) failed: %s", _utc(t),
                            cluster["id"], cluster["name"], exc)
                return None

        recorded = {}
        for cluster, nodes in zip(due, _run_all(count, due)):
            if nodes is None:
                continue
            if store.record_sample(cluster["id"], t, nodes):
                recorded[cluster["id"]] = nodes
                self.samples_recorded += 1
                if nodes and cluster["activated"] is None:
                    store.mark_activated(cluster["id"], t)
        if recorded:
            log.info("sample of %s: %s", _utc(t), ", ".join(f"cluster {cid} {n} nodes"
                                                          for cid, n in recorded.items()))
        return recorded

    def _count(self, cluster: dict) -> int:
        """Count the cluster's working nodes. A probe that raises is counted in
        probe_failures and re-raised."""
        try:
            return self.probe.count(cluster)
        except Exception:
            self.probe_failures += 1
            raise

    def publish_changed(self, now: int) -> None:
        clusters = [cluster for cluster in self.service.store.clusters()
                    if cluster["deleted"] is None or now - cluster["deleted"] <= DELETED_RETRY_S]
        _run_all(lambda cluster: self.service.publish_standing(cluster, force=False), clusters)

    # ---- background thread -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ems-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.probe.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:   # one bad pass must not end metering
                self.pass_failures += 1
                log.exception("sampler pass failed")
            self.passes += 1
            self._stop.wait(LOOP_S)


def _run_all(function, items: list) -> list:
    """Return [function(item) for item in items], computed by up to CLUSTER_WORKERS threads
    that end with the call."""
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(CLUSTER_WORKERS, len(items)),
                            thread_name_prefix="ems-sampler-worker") as workers:
        return list(workers.map(function, items))


class ZooKeeperProbe:
    """Node counter that reads a cluster's ZooKeeper and the nodes' HTTP endpoints, with
    one ZooKeeper client per ensemble."""

    def __init__(self):
        self._clients = {}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ems-probe")
        # The sampler's workers and the API's threads call it at once. _lock guards the two
        # dicts, and each ensemble's lock makes clusters that share it wait for one
        # connection.
        self._lock = threading.Lock()
        self._connecting: dict[str, threading.Lock] = {}

    def count(self, cluster: dict) -> int:
        answers = self.map(node_serves, self.records(cluster))
        return sum(1 for serves in answers if serves == cluster["account"])

    def map(self, function, records: list[NodeRecord]) -> list:
        """Call function on each record in parallel (it does network I/O)."""
        return list(self._pool.map(function, records))

    def records(self, cluster: dict) -> list[NodeRecord]:
        client = self._client(cluster["zookeeper"])
        path = f"{ROOT}/{cluster['name']}/nodes"
        try:
            names = client.get_children(path)
        except NoNodeError:
            return []
        except Exception:
            self._drop(cluster["zookeeper"])
            raise
        records = []
        for name in names:
            try:
                data, _ = client.get(f"{path}/{name}")
                records.append(NodeRecord.from_json(data))
            except NoNodeError:   # left between the listing and the read
                continue
            except ValueError as exc:
                log.warning("cluster %s: unreadable record of node %s: %s", cluster["name"],
                            name, exc)
        return records

    def _client(self, hosts: str):
        with self._lock:
            connecting = self._connecting.setdefault(hosts, threading.Lock())
        with connecting:
            with self._lock:
                client = self._clients.get(hosts)
            if client is None:
                client = zkstate.connect(hosts)
                with self._lock:
                    self._clients[hosts] = client
        return client

    def _drop(self, hosts: str) -> None:
        with self._lock:
            client = self._clients.pop(hosts, None)
        if client is not None:
            client.stop()
            client.close()

    def close(self) -> None:
        with self._lock:
            ensembles = list(self._clients)
        for hosts in ensembles:
            self._drop(hosts)
        self._pool.shutdown(wait=False)


def node_serves(record: NodeRecord) -> str | None:
    """Return the account a node serves under, from its /activation endpoint; None when
    it does not serve, does not respond, or has no metrics endpoint."""
    if not record.metrics_port:
        return None
    host = f"[{record.host}]" if ":" in record.host else record.host
    url = f"http://{host}:{record.metrics_port}/activation"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
            state = json.loads(response.read(65536))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("serving") is not True:
        return None
    return state.get("account") if isinstance(state.get("account"), str) else None


def _utc(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))
