"""ems.connect: one client API over an embedded pool, a local daemon, or a cluster.

Every mode offers the calls of ems.Pool that engines use (put, get_into, exists,
match_prefix, their batch forms, delete) plus futures-returning variants. In the daemon
modes the cache rules hold: a peer that is down, slow or refusing costs at most the
deadline and turns into misses (logged), never an exception into the engine.

Routing in cluster mode (see docs/cluster.md):
  read   local pool through shared memory -> directory shards of the missed keys (one
         batched call per shard) -> holders (one batched call per holder);
  write  the local daemon when it has room, else the owner of each key by capacity-weighted
         rendezvous hashing; holders announce new keys to the directory themselves. A
         draining node (about to restart) or an unreachable one gets no writes: its
         blocks go to the next owner.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ems import _core
from ems.cluster.membership import Membership, NodeRecord, open_membership
from ems.cluster.placement import Node, owners
from ems.errors import (AuthenticationError, BufferSizeError, PoolClosedError,
                        ProtocolVersionError, TransferError)
from ems.pool import Pool

logger = logging.getLogger(__name__)

MODES = ("embedded", "local", "cluster")
HOLDER_NONE = _core.HOLDER_NONE
BATCH_BYTES = 16 << 20        # data bytes per network call; below the 64 MiB frame limit
PEER_BACKOFF_S = 1.0          # a failed peer is skipped this long before a new attempt
# A node that returned ESHUTDOWN for a write is draining before a restart (`ems upgrade`).
# It gets no writes this long, which covers the restart of a node with static peers, whose
# record cannot show that it drains.
DRAINING_SKIP_S = 10.0


def connect(mode: str | None = None, *, capacity_bytes: int | None = None,
            socket_path: str | None = None, zookeeper: str | None = None,
            peers: str | None = None, cluster: str = "default", secret: bytes | None = None,
            tenant: str | None = None, timeout_ms: int = 1000, spill_dir: str | None = None,
            spill_bytes: int | None = None, spill_io: str = "auto", eviction: str = "clock",
            **pool_options):
    """Return a client. Settings left out come from the environment:

    mode            EMS_MODE: "embedded" (a pool in this process), "local" (the daemon on
                    this host, through EMS_SOCKET) or "cluster" (EMS_ZOOKEEPER or EMS_PEERS,
                    plus the local daemon when EMS_SOCKET is set). Default: "cluster" when
                    ZooKeeper or peers are given, "local" when a socket is, else "embedded".
    secret          EMS_SECRET, or the contents of the file EMS_SECRET_FILE.
    tenant          EMS_TENANT, default "default".
    spill_dir       embedded mode: EMS_SPILL_DIR, a directory for the spill tier (blocks
                    evicted from DRAM go there and come back on a hit); none by default.
    spill_bytes     EMS_SPILL_BYTES, the spill directory's quota (required with spill_dir).
    spill_io        "auto" (io_uring, else preadv/pwritev), "uring" or "posix".
    eviction        "clock" or "session" (see ems.tiering.SpillTier).
    A daemon's spill tier is set on `ems serve`, not here.
    """
    env = os.environ
    socket_path = socket_path or env.get("EMS_SOCKET") or None
    zookeeper = zookeeper or env.get("EMS_ZOOKEEPER") or None
    peers = peers or env.get("EMS_PEERS") or None
    tenant = tenant or env.get("EMS_TENANT") or "default"
    secret = secret if secret is not None else load_secret()
    if not mode:
        mode = env.get("EMS_MODE")
    if not mode and (zookeeper or peers):
        mode = "cluster"
    elif not mode and socket_path:
        mode = "local"
    elif not mode:
        mode = "embedded"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

    if mode == "embedded":
        if capacity_bytes is None:
            raise ValueError("embedded mode needs capacity_bytes (the pool size in bytes)")
        spill_dir = spill_dir or env.get("EMS_SPILL_DIR") or None
        if spill_bytes is None and env.get("EMS_SPILL_BYTES"):
            spill_bytes = int(env["EMS_SPILL_BYTES"])
        if spill_dir and not spill_bytes:
            raise ValueError("spill_dir needs spill_bytes (or EMS_SPILL_BYTES): the quota "
                             "of the spill directory in bytes")
        pool = Pool(capacity_bytes, **pool_options)
        if not spill_dir:
            return EmbeddedClient(pool)
        from ems.tiering.tier import open_tier
        try:
            tier = open_tier(pool, spill_dir, spill_bytes, io=spill_io, policy=eviction)
        except BaseException:
            pool.close()
            raise
        return EmbeddedClient(pool, tier)
    if mode == "local":
        if not socket_path:
            raise ValueError("local mode needs socket_path (or EMS_SOCKET): the daemon's "
                             "Unix socket")
        return ClusterClient(None, socket_path=socket_path, secret=secret, tenant=tenant,
                             timeout_ms=timeout_ms)
    if not zookeeper and not peers:
        raise ValueError("cluster mode needs zookeeper (EMS_ZOOKEEPER) or peers (EMS_PEERS)")
    membership = open_membership(zookeeper, peers, cluster)
    try:
        return ClusterClient(membership, socket_path=socket_path, secret=secret,
                             tenant=tenant, timeout_ms=timeout_ms)
    except BaseException:
        membership.close()   # else its ZooKeeper session and threads outlive the failure
        raise


def load_secret() -> bytes | None:
    """Return the cluster secret from EMS_SECRET or the file named by EMS_SECRET_FILE, or None."""
    if os.environ.get("EMS_SECRET"):
        return os.environ["EMS_SECRET"].encode()
    path = os.environ.get("EMS_SECRET_FILE")
    if path:
        with open(path, "rb") as f:
            return f.read().strip()
    return None


class _AsyncCalls:
    """Futures-returning variants of the batch calls, run on a small thread pool (the C
    calls release the GIL, so they overlap with the caller's work)."""

    _executor: ThreadPoolExecutor | None = None

    def _submit(self, fn, *args) -> Future:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ems-client")
        return self._executor.submit(fn, *args)

    def put_many_async(self, keys, datas) -> Future:
        return self._submit(self.put_many, keys, datas)

    def get_many_into_async(self, keys, buffers) -> Future:
        return self._submit(self.get_many_into, keys, buffers)

    def exists_many_async(self, keys) -> Future:
        return self._submit(self.exists_many, keys)

    def match_prefix_async(self, keys) -> Future:
        return self._submit(self.match_prefix, keys)

    def _close_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class EmbeddedClient(_AsyncCalls):
    """The client API over an ems.Pool owned by this process, with an optional spill tier
    (ems.tiering.SpillTier) under it: DRAM misses then read from disk and promote. While
    the pool is suspended (Pool.set_suspended) the tier is not read either."""

    mode = "embedded"

    def __init__(self, pool: Pool, tier=None):
        self.pool = pool
        self.tier = tier

    def _tier_readable(self) -> bool:
        return self.tier is not None and not self.pool.suspended

    def put(self, key, data) -> bool:
        if self.tier is None:
            return self.pool.put(key, data)
        with self.tier.write_lock:
            stored = self.pool.put(key, data)
        self.tier.kick()
        return stored

    def put_many(self, keys, datas) -> int:
        if self.tier is None:
            return self.pool.put_many(keys, datas)
        with self.tier.write_lock:   # see SpillTier.write_lock
            stored = self.pool.put_many(keys, datas)
        self.tier.kick()   # the ring may hold evicted blocks: spill them now
        return stored

    def get_into(self, key, buffer) -> bool:
        return self.get_many_into([key], [buffer])[0]

    def get_many_into(self, keys, buffers) -> list[bool]:
        found = self.pool.get_many_into(keys, buffers)
        if not self._tier_readable() or all(found):
            return found
        keys, buffers = _key_list(keys), _buffer_list(buffers, len(found))
        missed = [i for i, hit in enumerate(found) if not hit]
        below = self.tier.read_into([keys[i] for i in missed], [buffers[i] for i in missed])
        for i, hit in zip(missed, below):
            found[i] = hit
        return found

    def exists(self, key) -> bool:
        return self.exists_many([key])[0]

    def exists_many(self, keys) -> list[bool]:
        present = self.pool.exists_many(keys)
        if not self._tier_readable() or all(present):
            return present
        keys = _key_list(keys)
        missed = [i for i, hit in enumerate(present) if not hit]
        for i, hit in zip(missed, self.tier.probe([keys[i] for i in missed])):
            present[i] = hit
        return present

    def match_prefix(self, keys) -> int:
        matched = self.pool.match_prefix(keys)
        keys = _key_list(keys)
        if not self._tier_readable() or matched == len(keys):
            return matched
        # A chain may continue through blocks in DRAM and on disk, in any mix.
        rest = self.exists_many(keys[matched:])
        return matched + (rest.index(False) if False in rest else len(rest))

    def prefetch(self, keys, *, protect: bool = False) -> int:
        """Start moving the keys' blocks from the spill tier into DRAM and return at once
        (see SpillTier.prefetch). Returns how many reads were queued; 0 without a tier
        or while the pool is suspended."""
        if not self._tier_readable():
            return 0
        return self.tier.prefetch(_key_list(keys), protect=protect)

    def delete(self, key) -> bool:
        if self.tier is None:
            return self.pool.delete(key)
        return self.tier.delete([key])[0]

    def protect(self, keys) -> int:
        return self.pool.protect(keys)

    def unprotect(self, keys) -> int:
        if self.tier is not None:
            return self.tier.unprotect(_key_list(keys))
        return self.pool.unprotect(keys)

    def stats(self) -> dict:
        out = {"mode": self.mode, "pool": self.pool.stats()}
        if self.tier is not None:
            out["spill"] = self.tier.stats()
        return out

    def close(self) -> None:
        self._close_executor()
        try:
            if self.tier is not None:
                self.tier.close()
        finally:
            self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class _Peer:
    """Connections to one daemon, reused across calls; a failure closes the connection
    and makes the peer skipped for PEER_BACKOFF_S."""

    def __init__(self, record: NodeRecord, client: "ClusterClient"):
        self.record = record
        self.client = client
        self.idle: list = []
        self.lock = threading.Lock()
        self.down_until = 0.0

    def call(self, method: str, *args):
        """Run Connection.<method>(*args) on a pooled connection. Raises TransferError."""
        if time.monotonic() < self.down_until:
            raise TransferError(0, f"node {self.record.node_id} is backing off after a failure")
        with self.lock:
            conn = self.idle.pop() if self.idle else None
        try:
            if conn is None:
                conn = _core.Connection(self.record.host, self.record.port,
                                        secret=self.client.secret, tenant=self.client.tenant,
                                        timeout_ms=self.client.timeout_ms)
            result = getattr(conn, method)(*args, timeout_ms=self.client.timeout_ms)
        except TransferError:
            self.down_until = time.monotonic() + PEER_BACKOFF_S
            if conn is not None:
                conn.close()
            raise
        with self.lock:
            self.idle.append(conn)
        return result

    def close(self) -> None:
        with self.lock:
            for conn in self.idle:
                conn.close()
            self.idle.clear()


class ClusterClient(_AsyncCalls):
    """The client API over the daemons of a cluster (or only the local daemon).

    Counters in stats(): local_hits (served through shared memory), remote_hits,
    misses, local_puts, remote_puts, put_refused (blocks a daemon did not store), of them
    put_suspended (the daemon was suspended), put_redirected (blocks that a draining or
    unreachable node did not take and another node stored), peer_errors."""

    def __init__(self, membership: Membership | None, *, socket_path: str | None = None,
                 secret: bytes | None = None, tenant: str = "default",
                 timeout_ms: int = 1000):
        self.membership = membership
        self.secret = secret
        self.tenant = tenant
        self.timeout_ms = timeout_ms
        self.mode = "cluster" if membership is not None else "local"
        self.counters = dict(local_hits=0, local_tier_hits=0, remote_hits=0, misses=0,
                             local_puts=0,
                             remote_puts=0, put_refused=0, put_suspended=0,
                             put_redirected=0, peer_errors=0)
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        self._local_lock = threading.Lock()
        self._local = None
        self._local_tier = False    # the local daemon has a spill tier
        self._reader = None
        self._socket_path = None
        self._local_retry_at = 0.0      # monotonic time of the next attach attempt
        self._local_node_id = None
        self._last_error_log = 0.0
        # node id (None: the local daemon) -> monotonic time until which it gets no writes
        self._draining_until: dict[str | None, float] = {}

        socket_path = socket_path or self._find_local_socket()
        if socket_path:
            self._attach_local(socket_path)
        elif self.membership is not None:
            self._check_credentials()

    # -- set-up --

    def _check_credentials(self) -> None:
        """Open one connection to a member, so that a wrong secret or tenant fails here with
        a clear error instead of turning every later call into a miss. An unreachable
        cluster is only logged: it may come up later."""
        for record in sorted(self._nodes().values(), key=lambda r: r.node_id):
            try:
                conn = _core.Connection(record.host, record.port, secret=self.secret,
                                        tenant=self.tenant, timeout_ms=self.timeout_ms)
            except (AuthenticationError, ProtocolVersionError):
                raise
            except TransferError:
                continue
            conn.close()
            return
        logger.warning("no node of the cluster responded yet; calls return misses until one "
                       "does")

    def _find_local_socket(self) -> str | None:
        if self.membership is None:
            return None
        host = socket.gethostname()
        for record in self.membership.nodes().values():
            if record.hostname == host and record.local_socket and \
                    os.path.exists(record.local_socket):
                return record.local_socket
        return None

    def _attach_local(self, socket_path: str) -> None:
        """Connect to the daemon's Unix socket, map its pool (read-write, to fill
        reservations) and attach a reader for shared-memory gets."""
        local = _core.Connection(unix_path=socket_path, secret=self.secret,
                                 tenant=self.tenant, timeout_ms=self.timeout_ms)
        reader = None
        try:
            fd = local.local_attach()
            try:
                reader = Pool.attach(fd)
            finally:
                os.close(fd)
            stats = local.stats()
        except BaseException:
            if reader is not None:
                reader.close()
            local.close()
            raise
        self._local, self._reader, self._socket_path = local, reader, socket_path
        # Misses of shared memory are asked of the daemon only when it has a tier below DRAM.
        self._local_tier = bool(stats.get("miss_handler"))
        self._local_holder = int(stats["node_id"])
        if self.membership is not None:
            for record in self.membership.nodes().values():
                if record.holder_id() == self._local_holder:
                    self._local_node_id = record.node_id
        logger.info("attached to the local daemon at %s (%s pages)", socket_path,
                    self._reader.page_kind)

    def _reattach_local(self) -> None:
        """Attach again after the connection to the local daemon broke, at most once per
        PEER_BACKOFF_S. A restarted daemon serves a new pool, so the old connection and
        mapping are closed. Only put_many calls it, because reads do not use the
        connection: a client that only reads keeps the old mapping, and its misses go to
        the holders."""
        with self._local_lock:
            now = time.monotonic()
            if self._local.alive or now < self._local_retry_at:
                return
            self._local_retry_at = now + PEER_BACKOFF_S
            old_local, old_reader = self._local, self._reader
            try:
                self._attach_local(self._socket_path)
            except OSError as exc:   # TransferError, AttachError: the daemon is still down
                self._note_error(f"attaching again to the local daemon at "
                                 f"{self._socket_path}", exc)
                return
            old_local.close()
            old_reader.close()

    def _read_local(self, method: str, *args):
        """Call a method of the shared-memory reader. Returns None when there is no reader
        or when _reattach_local closed it in another thread meanwhile."""
        reader = self._reader
        if reader is None:
            return None
        try:
            return getattr(reader, method)(*args)
        except PoolClosedError:
            return None

    def _local_call(self, method: str, *args):
        """Call the local daemon over its Unix socket; None (logged) when that fails."""
        try:
            with self._local_lock:
                return getattr(self._local, method)(*args, timeout_ms=self.timeout_ms)
        except TransferError as exc:
            self._note_error(f"{method} at the local daemon", exc)
            return None

    def _nodes(self) -> dict[str, NodeRecord]:
        return self.membership.nodes() if self.membership is not None else {}

    def _peer(self, record: NodeRecord) -> _Peer:
        with self._lock:
            peer = self._peers.get(record.node_id)
            if peer is None or peer.record.host != record.host or peer.record.port != record.port:
                peer = _Peer(record, self)
                self._peers[record.node_id] = peer
            return peer

    def _remote_nodes(self) -> list[NodeRecord]:
        return [r for r in self._nodes().values() if r.node_id != self._local_node_id]

    def _note_error(self, what: str, exc: Exception) -> None:
        self.counters["peer_errors"] += 1
        now = time.monotonic()
        if now - self._last_error_log > 5.0:    # rate-limited: a dead node fails every call
            self._last_error_log = now
            logger.warning("%s failed, served as misses: %s", what, exc)

    def _note_put_failures(self, where: str, results: list[int]) -> None:
        """Count and log (rate-limited) the blocks a daemon could not store. -EACCES comes
        from a suspended daemon (its cluster is not activated). Its blocks are not stored,
        which a cache reports as a count, not as an error."""
        failed = [r for r in results if r < 0 and r != -errno.ESHUTDOWN]   # see _redirect
        if failed:
            self.counters["put_refused"] += len(failed)
            suspended = sum(1 for r in failed if r == -errno.EACCES)
            self.counters["put_suspended"] += suspended
            now = time.monotonic()
            if now - self._last_error_log > 5.0:
                self._last_error_log = now
                reason = ("the node is not serving (suspended until its cluster is activated)"
                          if suspended == len(failed) else os.strerror(-failed[0]))
                logger.warning("%s could not store %d blocks: %s", where, len(failed), reason)

    # -- reads --

    def get_into(self, key, buffer) -> bool:
        return self.get_many_into([key], [buffer])[0]

    def get_many_into(self, keys, buffers) -> list[bool]:
        """Copy each block into its buffer (a list, one per key). Returns hits."""
        keys = _key_list(keys)
        if len(buffers) != len(keys):
            raise ValueError(f"get_many_into got {len(keys)} keys but {len(buffers)} buffers")
        hits = [False] * len(keys)
        if self._reader is not None and keys:
            stored = _core.tenant_keys(self.tenant, keys)
            hits = self._read_local("get_many_into", stored, list(buffers)) or hits
            self.counters["local_hits"] += sum(hits)
        missing = [i for i, hit in enumerate(hits) if not hit]
        if missing and self._local_tier:
            # The daemon's spill tier: its GET reads what DRAM lacks from disk.
            results = self._local_call("get_many_into", [keys[i] for i in missing],
                                       [buffers[i] for i in missing]) or []
            _check_sizes(keys, buffers, missing, results)
            for i, r in zip(missing, results):
                hits[i] = r > 0
            self.counters["local_tier_hits"] += sum(1 for r in results if r > 0)
            missing = [i for i, hit in enumerate(hits) if not hit]
        if missing and self.membership is not None:
            for i in self._fetch_remote([keys[i] for i in missing],
                                        [buffers[i] for i in missing]):
                hits[missing[i]] = True
        self.counters["misses"] += hits.count(False)
        return hits

    def _fetch_remote(self, keys: list[bytes], buffers: list) -> list[int]:
        """Indices of `keys` fetched from holders: directory lookup per shard, then one
        GET per holder."""
        holders = self._lookup(keys)
        by_id = {r.holder_id(): r for r in self._nodes().values()}
        fetched = []
        for holder in np.unique(holders):
            record = by_id.get(int(holder))
            if record is None or int(holder) == HOLDER_NONE:
                continue
            idx = np.flatnonzero(holders == holder).tolist()
            for chunk in _chunks(idx, [memoryview(buffers[i]).nbytes for i in idx]):
                try:
                    results = self._peer(record).call(
                        "get_many_into", [keys[i] for i in chunk], [buffers[i] for i in chunk])
                except TransferError as exc:
                    self._note_error(f"GET from node {record.node_id}", exc)
                    break
                _check_sizes(keys, buffers, chunk, results)
                fetched.extend(i for i, r in zip(chunk, results) if r > 0)
        self.counters["remote_hits"] += len(fetched)
        return fetched

    def _lookup(self, keys: list[bytes]) -> np.ndarray:
        """Holder id of each key from its directory shard (HOLDER_NONE where unknown)."""
        holders = np.full(len(keys), HOLDER_NONE, dtype=np.uint64)
        nodes = sorted(self._nodes().values(), key=lambda r: r.node_id)
        if not nodes or not keys:
            return holders
        stored = _core.tenant_keys(self.tenant, keys)
        shard = directory_shards(stored, nodes)
        for s in np.unique(shard):
            idx = np.flatnonzero(shard == s)
            record = nodes[int(s)]
            try:
                found = self._peer(record).call("dir_lookup", [keys[i] for i in idx])
            except TransferError as exc:
                self._note_error(f"directory lookup at node {record.node_id}", exc)
                continue
            holders[idx] = found
        return holders

    def exists(self, key) -> bool:
        return self.exists_many([key])[0]

    def exists_many(self, keys) -> list[bool]:
        """Return whether each key is stored somewhere (local pool or the directory). A
        directory entry is a hint: a later get may still miss."""
        keys = _key_list(keys)
        present = [False] * len(keys)
        if self._reader is not None and keys:
            stored = _core.tenant_keys(self.tenant, keys)
            present = self._read_local("exists_many", stored) or present
        missing = [i for i, p in enumerate(present) if not p]
        if missing and self._local_tier:
            below = self._local_call("exists_many", [keys[i] for i in missing]) or []
            for i, p in zip(missing, below):
                present[i] = bool(p)
            missing = [i for i, p in enumerate(present) if not p]
        if missing and self.membership is not None:
            holders = self._lookup([keys[i] for i in missing])
            for i, holder in zip(missing, holders):
                present[i] = int(holder) != HOLDER_NONE
        return list(present)

    def match_prefix(self, keys) -> int:
        """Return the number of leading keys stored somewhere in the cluster."""
        keys = _key_list(keys)
        if not keys:
            return 0
        local = 0
        if self._reader is not None:
            local = self._read_local("match_prefix", _core.tenant_keys(self.tenant, keys)) or 0
        if local < len(keys) and self._local_tier:
            local += self._local_call("match_prefix", keys[local:]) or 0
        if local == len(keys) or self.membership is None:
            return local
        rest = [int(h) != HOLDER_NONE for h in self._lookup(keys[local:])]
        if False in rest:
            return local + rest.index(False)
        return local + len(rest)

    def prefetch(self, keys) -> int:
        """Ask the local daemon to start reading the keys' blocks from its spill tier into
        DRAM, and return at once. Returns how many keys are in DRAM or on their way.
        NOTE: only the local daemon prefetches; without one this returns 0."""
        if self._local is None:
            return 0
        return self._local_call("prefetch", _key_list(keys)) or 0

    # -- writes --

    def put(self, key, data) -> bool:
        return self.put_many([key], [data]) == 1

    def put_many(self, keys, datas) -> int:
        """Store datas[i] under keys[i]; returns how many were stored now. Blocks that could
        not be stored (node down, pool full) are skipped: this is a cache."""
        keys = _key_list(keys)
        if len(datas) != len(keys):
            raise ValueError(f"put_many got {len(keys)} keys but {len(datas)} data buffers")
        sizes = [memoryview(d).nbytes for d in datas]
        if self._local is not None and not self._local.alive:
            self._reattach_local()
        remote = self._writable(self._remote_nodes())
        if self._local is not None:
            # While the local daemon restarts or drains, the other nodes take the writes.
            usable = self._local.alive and self._local_writable()
            if not remote or (usable and self._local_has_room(sum(sizes))):
                stored, draining = self._put_local(keys, datas, sizes)
                if not draining:
                    return stored
                # The local daemon drains before a restart: its blocks go to the owners.
                keys, datas, sizes = ([items[i] for i in draining]
                                      for items in (keys, datas, sizes))
                return stored + self._redirect(keys, datas, sizes, remote,
                                               "the local daemon")
        if not remote:
            return 0
        return self._put_placed(keys, datas, sizes, remote)

    def _local_writable(self) -> bool:
        return time.monotonic() >= self._draining_until.get(None, 0.0)

    def _writable(self, nodes: list[NodeRecord]) -> list[NodeRecord]:
        """Return the nodes that take writes: not draining by their record, not returning
        ESHUTDOWN for writes lately, and not backing off after a failed call."""
        now = time.monotonic()
        with self._lock:
            backing_off = {node_id for node_id, peer in self._peers.items()
                           if now < peer.down_until}
        return [r for r in nodes
                if not r.draining and now >= self._draining_until.get(r.node_id, 0.0)
                and r.node_id not in backing_off]

    def _note_draining(self, node_id: str | None, where: str, count: int) -> None:
        """Skip a node that returned ESHUTDOWN (it is draining) for writes a while."""
        if time.monotonic() >= self._draining_until.get(node_id, 0.0):
            logger.info("%s is draining before a restart; writing %d blocks and the next "
                        "%.0f s of writes to other nodes", where, count, DRAINING_SKIP_S)
        self._draining_until[node_id] = time.monotonic() + DRAINING_SKIP_S

    def _redirect(self, keys, datas, sizes, nodes: list[NodeRecord], where: str) -> int:
        """Place blocks that a draining or failed node did not take on the writable
        `nodes`, once. Returns how many were stored; the others count as refused."""
        nodes = self._writable(nodes)
        if not nodes:
            self.counters["put_refused"] += len(keys)
            now = time.monotonic()
            if now - self._last_error_log > 5.0:
                self._last_error_log = now
                logger.warning("%s could not store %d blocks, and no other node takes "
                               "writes", where, len(keys))
            return 0
        stored = self._put_placed(keys, datas, sizes, nodes, redirect=False)
        self.counters["put_redirected"] += stored
        return stored

    def _local_has_room(self, nbytes: int) -> bool:
        if self.membership is None or not self._remote_nodes():
            return True
        stats = self._read_local("stats")
        return stats is not None and stats["bytes_free"] >= nbytes

    def _put_local(self, keys, datas, sizes) -> tuple[int, list[int]]:
        """Store through the local daemon. Returns the count stored and the indices of
        the keys it rejected because it drains."""
        stored, draining = 0, []
        for chunk in _chunks(list(range(len(keys))), sizes):
            try:
                with self._local_lock:
                    results = self._local.put_many([keys[i] for i in chunk],
                                                   [datas[i] for i in chunk],
                                                   timeout_ms=self.timeout_ms)
            except TransferError as exc:
                self._note_error("PUT to the local daemon", exc)
                break
            stored += results.count(0)
            draining += [i for i, r in zip(chunk, results) if r == -errno.ESHUTDOWN]
            self._note_put_failures("the local daemon", results)
        self.counters["local_puts"] += stored
        if draining:
            self._note_draining(None, "the local daemon", len(draining))
        return stored, draining

    def _put_placed(self, keys, datas, sizes, nodes: list[NodeRecord], *,
                    redirect: bool = True) -> int:
        weights = [Node(r.node_id, float(max(r.free_bytes, r.capacity_bytes // 100, 1)))
                   for r in nodes]
        target = owners(_split_keys(_core.tenant_keys(self.tenant, keys)), weights, 1)[:, 0]
        stored = 0
        rejected = []    # indices that a draining or failed node did not take
        for t in np.unique(target):
            record = nodes[int(t)]
            idx = np.flatnonzero(target == t).tolist()
            for chunk in _chunks(idx, [sizes[i] for i in idx]):
                try:
                    results = self._peer(record).call(
                        "put_many", [keys[i] for i in chunk], [datas[i] for i in chunk])
                except TransferError as exc:
                    self._note_error(f"PUT to node {record.node_id}", exc)
                    rejected += idx[idx.index(chunk[0]):]   # this chunk and the node's rest
                    break
                stored += results.count(0)
                draining = [i for i, r in zip(chunk, results) if r == -errno.ESHUTDOWN]
                if draining:
                    self._note_draining(record.node_id, f"node {record.node_id}",
                                        len(draining))
                    rejected += draining
                self._note_put_failures(f"node {record.node_id}", results)
        self.counters["remote_puts"] += stored
        if rejected and redirect:
            stored += self._redirect(*([items[i] for i in rejected]
                                       for items in (keys, datas, sizes)),
                                     nodes, "a draining or unreachable node")
        elif rejected:
            self.counters["put_refused"] += len(rejected)
        return stored

    def delete(self, key) -> bool:
        """Delete on the local daemon and on the key's holder."""
        deleted = False
        if self._local is not None:
            try:
                with self._local_lock:
                    deleted = self._local.delete_many([key],
                                                      timeout_ms=self.timeout_ms)[0] == 0
            except TransferError as exc:
                self._note_error("DELETE at the local daemon", exc)
        holder = int(self._lookup([key])[0]) if self.membership is not None else HOLDER_NONE
        record = {r.holder_id(): r for r in self._nodes().values()}.get(holder)
        if record is not None and record.node_id != self._local_node_id:
            try:
                deleted |= self._peer(record).call("delete_many", [key])[0] == 0
            except TransferError as exc:
                self._note_error(f"DELETE at node {record.node_id}", exc)
        return deleted

    def protect(self, keys) -> int:
        """Mark blocks to be evicted last (for requests waiting in the scheduler), on the
        local daemon and on the holders of the other keys. Returns how many were found."""
        return self._protect(_key_list(keys), True)

    def unprotect(self, keys) -> int:
        return self._protect(_key_list(keys), False)

    def _protect(self, keys: list[bytes], flag: bool) -> int:
        found = 0
        local = [False] * len(keys)
        if self._local is not None and keys:
            try:
                with self._local_lock:
                    found = self._local.protect(keys, flag, timeout_ms=self.timeout_ms)
                local = self._read_local("exists_many",
                                         _core.tenant_keys(self.tenant, keys)) or local
            except TransferError as exc:
                self._note_error("PROTECT at the local daemon", exc)
        rest = [k for k, here in zip(keys, local) if not here]
        if not rest or self.membership is None:
            return found
        holders = self._lookup(rest)
        by_id = {r.holder_id(): r for r in self._nodes().values()}
        for holder in np.unique(holders):
            record = by_id.get(int(holder))
            if record is None or record.node_id == self._local_node_id:
                continue
            subset = [rest[i] for i in np.flatnonzero(holders == holder)]
            try:
                found += self._peer(record).call("protect", subset, flag)
            except TransferError as exc:
                self._note_error(f"PROTECT at node {record.node_id}", exc)
        return found

    # -- inspection --

    def stats(self) -> dict:
        out = {"mode": self.mode, "tenant": self.tenant, **self.counters}
        reader = self._read_local("stats")
        if reader is not None:
            out["shared_memory_hits"] = reader["reader_hits"]
            out["shared_memory_misses"] = reader["reader_misses"]
        return out

    def close(self) -> None:
        self._close_executor()
        with self._lock:
            for peer in self._peers.values():
                peer.close()
            self._peers.clear()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._local is not None:
            self._local.close()
            self._local = None
        if self.membership is not None:
            self.membership.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def directory_shards(stored_keys: bytes, nodes: list[NodeRecord]) -> np.ndarray:
    """Index into `nodes` of the directory shard of each stored key: its rendezvous owner
    with equal weights, so that every client and daemon agrees whatever free space it saw.
    `nodes` must be sorted by node_id."""
    return owners(_split_keys(stored_keys), [Node(r.node_id, 1.0) for r in nodes], 1)[:, 0]


def _split_keys(joined: bytes) -> np.ndarray:
    return np.frombuffer(joined, dtype=np.uint8).reshape(-1, 32)


def _key_list(keys) -> list[bytes]:
    if isinstance(keys, (bytes, bytearray, memoryview)):
        data = bytes(keys)
        if len(data) % 32:
            raise ValueError(f"batch of keys is {len(data)} bytes, not a multiple of 32")
        return [data[i:i + 32] for i in range(0, len(data), 32)]
    return list(keys)


def _check_sizes(keys, buffers, indices, results) -> None:
    """Raise BufferSizeError for the first GET result of EMSGSIZE (a buffer of another size)."""
    for i, r in zip(indices, results):
        if r == -errno.EMSGSIZE:
            raise BufferSizeError(
                f"destination buffer of {memoryview(buffers[i]).nbytes} bytes does "
                f"not match the block stored under key {keys[i].hex()}")


def _buffer_list(buffers, n: int) -> list:
    """Return one buffer per key: a list as given, or one buffer split evenly (as Pool does)."""
    if isinstance(buffers, (list, tuple)):
        return list(buffers)
    view = memoryview(buffers).cast("B")
    per = len(view) // n
    return [view[i * per:(i + 1) * per] for i in range(n)]


def _chunks(indices: list[int], sizes: list[int]):
    """Split indices into runs whose data stays under BATCH_BYTES (one call each)."""
    chunk, total = [], 0
    for i, size in zip(indices, sizes):
        if chunk and total + size > BATCH_BYTES:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += size
    if chunk:
        yield chunk
