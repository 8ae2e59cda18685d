"""`ems serve`: the node daemon.

It owns a pool and serves it over TCP and a Unix socket with the C transfer server. It keeps
one shard of the key directory, registers in the cluster membership, announces the keys it
stores to their directory shards, and publishes Prometheus metrics over HTTP.

With a management public key it serves only while its cluster is activated: the pool
starts suspended and an ems.manage.activation.ActivationGate resumes it.

Threads: the C server's own threads run the data path and call no Python, so the data path
never waits on ZooKeeper or on this module. One Python "pump" thread forwards the server's
log lines, announces new keys in batches, pings the other nodes to notice a restart and
refreshes the membership record. The metrics HTTP server and the activation gate have
their own threads.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace

import numpy as np

import ems
from ems import _core, daemon_record
from ems.client import directory_shards
from ems.cluster.membership import (NodeRecord, check_own_entry, open_membership,
                                    parse_peers)
from ems.errors import TransferError
from ems.manage.activation import NOT_ENFORCED, ActivationGate, ActivationStatus
from ems.metrics import start_metrics
from ems.pool import Pool, run_dir
from ems.tiering.tier import open_tier

logger = logging.getLogger("ems.daemon")

PUMP_INTERVAL_S = 0.05        # how often new keys are announced and log lines forwarded
RECORD_INTERVAL_S = 5.0       # how often the membership record's free bytes are refreshed
PEER_CHECK_INTERVAL_S = 1.0   # how often other nodes are pinged to notice a restart
ANNOUNCE_BATCH = 65536        # keys per directory registration call
NODE_TENANT = "node"          # tenant name of daemon-to-daemon connections


@dataclass
class DaemonConfig:
    """Settings of one daemon; `ems serve --help` documents each."""

    node_id: str
    capacity_bytes: int
    host: str = "127.0.0.1"
    port: int = 7700
    advertise_host: str | None = None
    socket_path: str | None = None        # default: <run dir>/ems-<node_id>.sock
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 0          # 0: any free port; None: no metrics
    pages: str = "auto"
    slab_size: int | None = None
    zookeeper: str | None = None
    peers: str | None = None
    cluster: str = "default"
    secret: bytes | None = None
    max_connections: int = 256
    io_timeout_ms: int = 30000
    peer_timeout_ms: int = 1000
    spill_dir: str | None = None          # spill tier directory; None: DRAM only
    spill_bytes: int | None = None        # its quota
    spill_io: str = "auto"
    spill_shared: bool = False            # other nodes write the same directory
    manage_public_key: object | None = None   # Ed25519 public key; None: no activation gate
    credential: str | None = None         # credential token from --credential
    credential_source: str = "--credential"   # where it came from, for log lines


class Daemon:
    """One node daemon. start() brings it up, stop() takes it down; run() does both
    around a wait for SIGTERM or SIGINT."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.pool = None
        self.tier = None
        self.server = None
        self.membership = None
        self.gate = None
        self.metrics = None
        self.record = None
        self.nodes: dict[str, NodeRecord] = {}
        self._stop = threading.Event()
        self._reannounce = threading.Event()
        self._pump_thread = None
        self._node_conns: dict[str, _core.Connection] = {}   # used by the pump thread only
        self._unreachable: set[str] = set()   # node ids whose last ping or announce failed
        self._last_warning: dict[str, float] = {}
        self.announced = 0
        self.record_path: str | None = None   # set once the daemon record is written
        self._started: float | None = None    # Unix time start() began

    # -- lifecycle --

    def start(self) -> None:
        cfg = self.config
        self._started = time.time()
        socket_path = cfg.socket_path or os.path.join(run_dir(), f"ems-{cfg.node_id}.sock")
        if cfg.secret is None:
            logger.warning("no cluster secret configured: the daemon accepts any client "
                           "(set EMS_SECRET or --secret-file)")
        if cfg.peers and not cfg.zookeeper:
            # Checked again with the bound port when the membership opens; this check fails
            # before anything is started.
            check_own_entry(parse_peers(cfg.peers), cfg.node_id, cfg.advertise_host or cfg.host,
                            cfg.port or None)
        try:
            self.pool = Pool(cfg.capacity_bytes, slab_size=cfg.slab_size, pages=cfg.pages,
                             name=f"ems-{cfg.node_id}")
        except ValueError as exc:
            if "in use by process" not in str(exc):
                raise
            raise ValueError(f"node id {cfg.node_id!r} is already served on this host "
                             f"({exc}); give each daemon its own --node-id") from None
        if cfg.manage_public_key is not None:
            # Suspended before the server starts, so nothing is served before the gate
            # has judged the credentials.
            self.pool.set_suspended(True)
            self.gate = ActivationGate(self.pool, node_id=cfg.node_id, cluster=cfg.cluster,
                                       public_key=cfg.manage_public_key,
                                       credential_token=cfg.credential,
                                       credential_source=cfg.credential_source)
        else:
            logger.warning("node %s: activation is not enforced (no --manage-public-key): "
                           "the daemon serves without a credential", cfg.node_id)
        holder = NodeRecord(node_id=cfg.node_id, host=cfg.advertise_host or cfg.host,
                            port=1).holder_id()
        try:
            if cfg.spill_dir:
                self.tier = open_tier(self.pool, cfg.spill_dir, cfg.spill_bytes,
                                      io=cfg.spill_io, shared=cfg.spill_shared)
            self.server = _core.Server(self.pool, host=cfg.host, port=cfg.port,
                                       unix_path=socket_path, secret=cfg.secret,
                                       node_id=holder, max_connections=cfg.max_connections,
                                       io_timeout_ms=cfg.io_timeout_ms)
            if self.tier is not None:
                self.server.set_miss_handler(self.tier.miss_handler)
        except Exception:
            self._close_storage()
            raise
        self.socket_path = socket_path
        stats = self.pool.stats()
        self.record = NodeRecord(
            node_id=cfg.node_id, host=cfg.advertise_host or cfg.host, port=self.server.port,
            local_socket=socket_path, hostname=socket.gethostname(),
            capacity_bytes=stats["capacity_bytes"], free_bytes=stats["bytes_free"],
            proto_min=self.server.proto_min, proto_max=self.server.proto_max,
            version=ems.__version__)

        if cfg.metrics_port is not None:
            try:
                self.metrics = start_metrics(self, cfg.metrics_host, cfg.metrics_port)
            except OSError as exc:
                self.server.stop()
                self._close_storage()
                raise OSError(exc.errno, f"cannot serve metrics on {cfg.metrics_host}:"
                                         f"{cfg.metrics_port}: {exc.strerror}") from None
            self.record = replace(self.record, metrics_port=self.metrics.port)
        self.membership = open_membership(cfg.zookeeper, cfg.peers, cfg.cluster, self.record)
        if self.gate is not None:
            self.gate.start(getattr(self.membership, "client", None))
        self.membership.add_listener(self._on_members)
        self._pump_thread = threading.Thread(target=self._pump, name="ems-pump", daemon=True)
        self._pump_thread.start()
        self._write_record()
        logger.info("node %s serving %d bytes (%s pages) on %s:%d and %s; protocol "
                    "versions %d-%d; spill tier: %s; metrics on %s; membership: %s; "
                    "activation: %s", cfg.node_id, stats["capacity_bytes"],
                    self.pool.page_kind, cfg.host, self.server.port, socket_path,
                    self.server.proto_min, self.server.proto_max,
                    f"{cfg.spill_dir} ({cfg.spill_bytes} bytes, "
                    f"{self.tier.store.stats()['io_mode']})" if self.tier else "none",
                    f"{cfg.metrics_host}:{self.metrics.port}" if self.metrics else "nowhere",
                    f"ZooKeeper {cfg.zookeeper}" if cfg.zookeeper else
                    f"static peers ({len(self.membership.nodes())} nodes)",
                    self._activation_summary(), extra={"cluster": cfg.cluster})

    def stop(self) -> None:
        logger.info("node %s stopping", self.config.node_id)
        self._stop.set()
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=5)
        if self.gate is not None:   # before the membership closes its ZooKeeper client
            self.gate.stop()
        if self.membership is not None:
            self.membership.close()
        for conn in self._node_conns.values():
            conn.close()
        if self.server is not None:
            self._forward_log()
            self.server.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self._close_storage()
        if self.record_path is not None:
            self._write_record(stopped=time.time())
        logger.info("node %s stopped", self.config.node_id)

    def _write_record(self, **fields) -> None:
        """Write (or rewrite) the daemon record that `ems uninstall` reads (see
        ems.daemon_record). A failure is logged: the daemon serves without a record."""
        cfg = self.config
        path = daemon_record.record_path(run_dir(), cfg.node_id)
        record = {"pid": os.getpid(), "start_ticks": daemon_record.process_start_ticks(
                      os.getpid()),
                  "node_id": cfg.node_id, "cluster": cfg.cluster, "zookeeper": cfg.zookeeper,
                  "socket": self.socket_path,
                  "spill_dir": os.path.abspath(cfg.spill_dir) if cfg.spill_dir else None,
                  "spill_shared": cfg.spill_shared, "started": self._started, **fields}
        try:
            daemon_record.write(path, record)
            self.record_path = path
        except OSError as exc:
            logger.warning("node %s: cannot write the daemon record %s: %s; `ems uninstall` "
                           "will not find this daemon", cfg.node_id, path, exc)

    def _close_storage(self) -> None:
        """Close the spill tier (publishing its open segment), then the pool. The server
        must be stopped first: its miss handler reads the tier."""
        try:
            if self.tier is not None:
                self.tier.close()
        finally:
            if self.pool is not None:
                self.pool.close()

    def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    def _activation_summary(self) -> str:
        status = self.activation()
        if status.serving:
            return status.state
        return f"{status.state}, so the pool is suspended and serves no block"

    def activation(self) -> ActivationStatus:
        """Return the gate's current decision, or NOT_ENFORCED without a gate."""
        if self.gate is None:
            return ActivationStatus(NOT_ENFORCED, "activation is not enforced "
                                    "(no --manage-public-key)")
        return self.gate.status()

    # -- membership --

    def _on_members(self, nodes: dict[str, NodeRecord]) -> None:
        """Forget a lost node's directory entries and re-announce this node's keys when
        the set of shards changed. (The membership itself logs joins and leaves.)"""
        old, new = set(self.nodes), set(nodes)
        for node_id in sorted(old - new):
            if node_id == self.config.node_id:
                continue
            forgotten = self.server.dir_forget(self.nodes[node_id].holder_id())
            logger.info("dropped %d directory entries that pointed to lost node %s",
                        forgotten, node_id, extra={"peer": node_id})
        # The pump closes the connections of lost nodes (_check_peers): a Connection is
        # not thread-safe, and this runs on the membership's thread.
        self.nodes = dict(nodes)
        if old != new:
            self._reannounce.set()

    # -- the pump thread --

    def _pump(self) -> None:
        last_record = last_check = time.monotonic()
        while not self._stop.wait(PUMP_INTERVAL_S):
            try:
                self._forward_log()
                if self._reannounce.is_set():
                    self._reannounce.clear()
                    self._announce_all("after a membership change")
                keys, dropped = self.server.take_new_keys(ANNOUNCE_BATCH)
                if dropped:
                    logger.warning("%d new keys were not announced (queue overflow); they "
                                   "stay readable locally", dropped)
                if keys:
                    self._announce(keys)
                if time.monotonic() - last_check > PEER_CHECK_INTERVAL_S:
                    last_check = time.monotonic()
                    self._check_peers()
                if self.server.draining != self.record.draining:
                    self._publish_draining()
                if time.monotonic() - last_record > RECORD_INTERVAL_S:
                    last_record = time.monotonic()
                    self._refresh_record()
            except Exception:   # the pump must survive anything; the data path does not need it
                logger.exception("daemon pump step failed; continuing")

    def _forward_log(self) -> None:
        for line in self.server.take_log():
            logger.warning("transfer server: %s", line)

    def _check_peers(self) -> None:
        """Ping every other node, and re-announce this node's keys when one responds again
        after a failure, because a restarted node starts with an empty directory shard. With
        static peers no membership change reports the restart.

        NOTE: the pings run one after another on this thread, so each peer that does not
        respond delays announcements by up to peer_timeout_ms per check.
        """
        nodes = dict(self.nodes)
        for node_id in [n for n in self._node_conns if n not in nodes]:
            self._drop_node_conn(node_id)
        self._unreachable &= set(nodes)
        recovered = []
        for node_id, record in sorted(nodes.items()):
            if node_id == self.config.node_id:
                continue
            try:
                self._node_conn(record).ping(timeout_ms=self.config.peer_timeout_ms)
            except TransferError as exc:
                self._drop_node_conn(node_id)
                if node_id not in self._unreachable:
                    self._unreachable.add(node_id)
                    logger.warning("ping to node %s failed: %s", node_id, exc,
                                   extra={"peer": node_id})
                continue
            if node_id in self._unreachable:
                self._unreachable.discard(node_id)
                recovered.append(node_id)
        if recovered:
            self._announce_all(f"after node {', '.join(recovered)} responded again")

    def _drop_node_conn(self, node_id: str) -> None:
        conn = self._node_conns.pop(node_id, None)
        if conn is not None:
            conn.close()

    def _publish_draining(self) -> None:
        """Write the server's draining state (set by a DRAIN request, see `ems upgrade`)
        into the membership record, so that clients place new blocks on other nodes."""
        draining = self.server.draining
        self.record = replace(self.record, draining=draining)
        self.membership.update(self.record)
        if draining:
            logger.info("node %s draining: it stores no new blocks, and clients write to "
                        "the other nodes until it restarts", self.config.node_id)
        else:
            logger.info("node %s stopped draining: storing new blocks again",
                        self.config.node_id)

    def _refresh_record(self) -> None:
        free = self.pool.stats()["bytes_free"]
        if free != self.record.free_bytes:
            self.record = replace(self.record, free_bytes=free)
            self.membership.update(self.record)

    def _announce_all(self, reason: str) -> None:
        total = 0
        for chunk in self.pool.keys(ANNOUNCE_BATCH):
            self._announce(chunk)
            total += len(chunk) // 32
        logger.info("re-announced %d keys to the directory %s", total, reason)

    def _announce(self, stored: bytes) -> None:
        """Register stored keys with their directory shards, one call per shard."""
        nodes = sorted(self.nodes.values(), key=lambda r: r.node_id)
        if not nodes:
            return
        holder = self.server.node_id
        shard = directory_shards(stored, nodes)
        keys = np.frombuffer(stored, dtype=np.uint8).reshape(-1, 32)
        for s in np.unique(shard):
            record = nodes[int(s)]
            batch = keys[shard == s].tobytes()
            if record.node_id == self.config.node_id:
                self.server.dir_register(batch, holder)
                self.announced += len(batch) // 32
                continue
            try:
                self._node_conn(record).dir_register(batch, holder,
                                                     timeout_ms=self.config.peer_timeout_ms)
                self.announced += len(batch) // 32
            except TransferError as exc:
                self._drop_node_conn(record.node_id)
                self._unreachable.add(record.node_id)   # re-announced when a ping succeeds
                self._warn_once(record.node_id, "announcing %d keys to node %s failed: %s; "
                                "they stay readable through this node", len(batch) // 32,
                                record.node_id, exc)

    def _node_conn(self, record: NodeRecord) -> _core.Connection:
        conn = self._node_conns.get(record.node_id)
        if conn is None or not conn.alive:
            conn = _core.Connection(record.host, record.port, secret=self.config.secret,
                                    tenant=NODE_TENANT, role="node",
                                    timeout_ms=self.config.peer_timeout_ms,
                                    proto_min=self.server.proto_min,
                                    proto_max=self.server.proto_max)
            self._node_conns[record.node_id] = conn
            logger.info("connected to node %s at protocol version %d", record.node_id,
                        conn.version)
        return conn

    def _warn_once(self, key: str, fmt: str, *args) -> None:
        """Log a warning at most every 10 s per key (a dead peer fails every batch)."""
        now = time.monotonic()
        if now - self._last_warning.get(key, 0.0) > 10.0:
            self._last_warning[key] = now
            logger.warning(fmt, *args)
