"""Cluster membership: which EMS node daemons exist and how to reach them.

A member is a NodeRecord. StaticMembership serves a fixed list (from --peers or a JSON file).
ZooKeeperMembership registers a daemon as an EPHEMERAL znode
/ems/clusters/<cluster>/nodes/<node_id> and watches the other members. The data path never
waits on ZooKeeper: nodes() returns the last known set, which stays unchanged while the
connection is down. This module does not check that a member answers, and it does not place
keys (placement.py does).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from dataclasses import dataclass

import blake3
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import ConnectionLoss, KazooException, NodeExistsError, NoNodeError
from kazoo.protocol.states import EventType

from ems.errors import MembershipError, NodeIdInUseError

log = logging.getLogger(__name__)

ROOT = "/ems/clusters"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,100}")
# EMS_HOLDER_NONE in csrc/transfer.h: a directory lookup returns it for "no holder".
HOLDER_NONE = 0xFFFFFFFF
UNIX_PATH_MAX = 107  # bytes; sockaddr_un.sun_path is 108 bytes with the terminating NUL
UPDATE_TIMEOUT = 1.0  # seconds update() waits for ZooKeeper to confirm a write

# Allowed ranges of the integer fields of NodeRecord (None: no upper bound).
_INT_RANGES = {
    "port": (1, 65535),
    "metrics_port": (0, 65535),
    "capacity_bytes": (0, None),
    "free_bytes": (0, None),
    "proto_min": (1, None),
    "proto_max": (1, None),
}


def check_name(kind: str, value) -> None:
    """Raise ValueError unless `value` can be a node id or cluster name (a znode name)."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"invalid {kind} {value!r}: expected 1 to 100 characters from "
                         f"A-Z a-z 0-9 _ . - (and not '.' or '..')")


def _address(record: NodeRecord) -> str:
    """Return "host:port", with an IPv6 host in brackets."""
    host = f"[{record.host}]" if ":" in record.host else record.host
    return f"{host}:{record.port}"


@dataclass(frozen=True)
class NodeRecord:
    """One node daemon's entry in the cluster: its id, where to reach it, and its capacity.

    The constructor checks every field and raises ValueError naming the field.
    """

    node_id: str  # 1 to 100 characters from A-Z a-z 0-9 _ . -
    host: str  # TCP address (name or IP) of the daemon's data port
    port: int
    metrics_port: int = 0  # 0: no metrics endpoint
    local_socket: str = ""  # Unix socket path for clients on the same host; "": none
    hostname: str = ""  # socket.gethostname() of the daemon, so clients can tell "same host"
    capacity_bytes: int = 0
    free_bytes: int = 0
    proto_min: int = 1  # range of transfer protocol versions the daemon speaks
    proto_max: int = 1
    version: str = ""  # ems package version of the daemon
    draining: bool = False  # stores no new blocks (before a restart); clients write elsewhere

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"int": int, "bool": bool}.get(field.type, str)
            # bool is a subclass of int, but True is no port number.
            if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
                raise ValueError(f"node record field {field.name!r} must be "
                                 f"{expected.__name__}, got {type(value).__name__} {value!r}")
        check_name("node_id", self.node_id)

        where = f"node {self.node_id!r}: field"
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"{where} 'host' must be a non-empty address without spaces, "
                             f"got {self.host!r}")
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                bounds = f"{low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"{where} {name!r} must be {bounds}, got {value}")
        if self.proto_min > self.proto_max:
            raise ValueError(f"{where} 'proto_min' ({self.proto_min}) is greater than "
                             f"'proto_max' ({self.proto_max})")
        if len(self.local_socket.encode()) > UNIX_PATH_MAX:
            raise ValueError(f"{where} 'local_socket' is longer than {UNIX_PATH_MAX} bytes: "
                             f"{self.local_socket!r}")

    def holder_id(self) -> int:
        """Return the node's 32-bit id in the key directory: the first 4 bytes of
        BLAKE3(node_id), little-endian, with HOLDER_NONE mapped to HOLDER_NONE - 1.

        NOTE: two node ids can share a holder id, with a probability of about n*n / 2**33
        for n nodes. Members log an error when such a node joins.
        """
        value = int.from_bytes(blake3.blake3(self.node_id.encode()).digest()[:4], "little")
        return HOLDER_NONE - 1 if value == HOLDER_NONE else value

    def to_json(self) -> bytes:
        """Encode the record as compact JSON with sorted keys (UTF-8)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True,
                          separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, obj) -> NodeRecord:
        """Build a record from a decoded JSON object.

        Unknown fields are ignored, so a newer daemon can add fields; missing optional fields
        take their defaults. Raise ValueError naming a missing or invalid field.
        """
        if not isinstance(obj, dict):
            raise ValueError(f"node record must be a JSON object, got {type(obj).__name__}")
        fields = dataclasses.fields(cls)
        for field in fields:
            if field.default is dataclasses.MISSING and field.name not in obj:
                raise ValueError(f"node record is missing field {field.name!r}")
        names = {field.name for field in fields}
        return cls(**{name: value for name, value in obj.items() if name in names})

    @classmethod
    def from_json(cls, data: bytes | str) -> NodeRecord:
        """Decode a record written by to_json(); raise ValueError if it is malformed."""
        try:
            obj = json.loads(data)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"node record is not valid JSON: {exc}") from None
        except RecursionError:   # nested deeper than Python's recursion limit (1000 by default)
            raise ValueError("node record is not valid JSON: nested too deeply") from None
        return cls.from_dict(obj)


def parse_peers(text: str) -> list[NodeRecord]:
    """Parse a static peer list "id=host:port,id2=host:port" into records.

    An IPv6 host goes in brackets ("a=[::1]:7000"). Raise ValueError naming the bad entry.
    """
    records: list[NodeRecord] = []
    seen = set()
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"invalid peer list {text!r}: empty entry; expected "
                             f"id=host:port,id2=host:port")
        node_id, sep, address = entry.partition("=")
        if not sep:
            raise ValueError(f"invalid peer {entry!r}: expected id=host:port")
        try:
            host, port = _split_address(address.strip())
            record = NodeRecord(node_id.strip(), host, port)
        except ValueError as exc:
            raise ValueError(f"invalid peer {entry!r}: {exc}") from None
        if record.node_id in seen:
            raise ValueError(f"invalid peer list {text!r}: node id {record.node_id!r} "
                             f"appears twice")
        seen.add(record.node_id)
        records.append(record)
    return records


def _split_address(address: str) -> tuple[str, int]:
    """Split "host:port" or "[ipv6]:port"; raise ValueError if either part is missing."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [ipv6-address]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError("missing ':port'")
        if ":" in host:
            raise ValueError("an IPv6 address must be in brackets: [address]:port")
    if not host:
        raise ValueError("missing host")
    if not port_text.isdigit():
        raise ValueError(f"port must be a number, got {port_text!r}")
    return host, int(port_text)


class Membership:
    """The set of known node daemons, and the listeners called on each change.

    Concurrency: _lock guards _records, _listeners and _closed. Listeners run outside _lock,
    one notification at a time (_notify_lock), and each gets the set current when it runs,
    so the last call a listener receives carries the latest set.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._notify_lock = threading.RLock()  # reentrant: a listener may add a listener
        self._records: dict[str, NodeRecord] = {}
        self._listeners: list = []
        self._closed = False

    @property
    def connected(self) -> bool:
        """Whether the set is being kept up to date (a static set always is)."""
        return True

    def nodes(self) -> dict[str, NodeRecord]:
        """Return a copy of the last known set, by node id. Never blocks on ZooKeeper."""
        with self._lock:
            return dict(self._records)

    def add_listener(self, callback) -> None:
        """Call callback(nodes) now with the current set and again after every change.

        Exceptions raised by a callback are logged, not raised. Callbacks may run on kazoo's
        thread, so they should return quickly.
        """
        with self._lock:
            self._listeners.append(callback)
        with self._notify_lock:
            self._call_listener(callback, self.nodes())

    def remove_listener(self, callback) -> None:
        """Stop calling a callback added with add_listener()."""
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def update(self, record: NodeRecord) -> None:
        """Replace the record with the same node id (a daemon's free bytes change)."""
        self._apply({record.node_id: record})

    def close(self) -> None:
        """Stop updating the set; calling it again does nothing."""
        with self._lock:
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _apply(self, changes: dict[str, NodeRecord | None]) -> None:
        """Set members (None removes one), log joins and leaves, and notify listeners."""
        changed = False
        joined, left, moved, collisions = [], [], [], []
        with self._lock:
            for node_id, record in changes.items():
                old = self._records.get(node_id)
                if record == old:
                    continue
                changed = True
                if record is None:
                    del self._records[node_id]
                    left.append(node_id)
                    continue
                self._records[node_id] = record
                if old is None:
                    joined.append(record)
                    collisions += [(record, other) for other in self._records.values()
                                   if other.node_id != node_id
                                   and other.holder_id() == record.holder_id()]
                elif _address(old) != _address(record):
                    moved.append(record)

        # `peer` and `cluster` become fields of JSON log lines (ems.logs).
        cluster = getattr(self, "cluster", None)
        for record in joined:
            log.info("node %s joined (%s)", record.node_id, _address(record),
                     extra={"cluster": cluster, "peer": record.node_id})
        for record in moved:
            log.info("node %s moved to %s", record.node_id, _address(record),
                     extra={"cluster": cluster, "peer": record.node_id})
        for node_id in left:
            log.info("node %s left", node_id, extra={"cluster": cluster, "peer": node_id})
        for record, other in collisions:
            log.error("nodes %s and %s have the same holder id 0x%08x, so the key directory "
                      "cannot tell them apart; rename one", record.node_id, other.node_id,
                      record.holder_id())
        if changed:
            self._notify()

    def _notify(self) -> None:
        with self._notify_lock:
            with self._lock:
                listeners = list(self._listeners)
            nodes = self.nodes()
            for callback in listeners:
                self._call_listener(callback, nodes)

    @staticmethod
    def _call_listener(callback, nodes) -> None:
        try:
            callback(dict(nodes))
        except Exception:
            log.exception("membership listener %r failed", callback)


class StaticMembership(Membership):
    """A fixed member list, from a --peers string or a JSON file; nothing joins or leaves."""

    def __init__(self, records=()):
        super().__init__()
        for record in records:
            if record.node_id in self._records:
                raise ValueError(f"node id {record.node_id!r} appears twice in the static "
                                 f"membership")
            self._records[record.node_id] = record

    @classmethod
    def from_peers(cls, text: str) -> StaticMembership:
        """Build the set from "id=host:port,id2=host:port" (see parse_peers)."""
        return cls(parse_peers(text))

    @classmethod
    def from_file(cls, path) -> StaticMembership:
        """Build the set from a JSON file holding a list of record objects.

        Raise ValueError naming the file and the index of a bad record.
        """
        try:
            with open(path, "rb") as file:
                data = json.load(file)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of node records, got "
                             f"{type(data).__name__}")
        records = []
        for index, obj in enumerate(data):
            try:
                records.append(NodeRecord.from_dict(obj))
            except ValueError as exc:
                raise ValueError(f"{path}: record {index}: {exc}") from None
        try:
            return cls(records)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


class ZooKeeperMembership(Membership):
    """Members registered in ZooKeeper, optionally with this daemon among them.

    `timeout` (seconds) bounds the first connect and is the requested session timeout, so a
    daemon that dies or loses its network leaves the set about `timeout` seconds later. The
    server clamps it to 2..20 ticks (4 to 40 s with ZooKeeper's default tickTime of 2 s).

    Threads: kazoo calls _on_state on its connection thread and _on_event on its callback
    thread, and each reconnect runs _resync on a new thread. _zk_lock lets one sequence of
    ZooKeeper reads and writes run at a time, so the last read is the one applied.
    update() takes only _lock, because it must not wait behind a read.
    """

    def __init__(self, hosts: str, cluster: str = "default", record: NodeRecord | None = None,
                 timeout: float = 10.0):
        super().__init__()
        check_name("cluster", cluster)
        self.hosts = hosts
        self.cluster = cluster
        self.timeout = timeout
        self._dir = f"{ROOT}/{cluster}/nodes"
        self._record = record  # this daemon's latest record; written on every reconnect
        self._owner_session = None  # session id that created this daemon's znode
        self._connected = False
        self._update_warned = False  # update() warned once during the current outage
        self._invalid_seen: dict[str, int] = {}  # node id -> mzxid of an invalid record logged
        self._zk_lock = threading.Lock()
        # Reconnect at least three times per session timeout, so a short outage does not
        # expire the session (kazoo 2.11's default retry waits up to 3600 s between tries).
        self._client = KazooClient(
            hosts=hosts, timeout=timeout,
            connection_retry={"max_tries": -1, "delay": 0.1, "backoff": 2,
                              "max_delay": max(timeout / 3, 0.1)},
            command_retry={"max_tries": 3, "delay": 0.1, "backoff": 2, "max_delay": 1.0})

        try:
            self._client.start(timeout=timeout)
        except self._client.handler.timeout_exception:
            raise MembershipError(f"could not connect to ZooKeeper at {hosts} within "
                                  f"{timeout:g} s; check that it is running and "
                                  f"reachable") from None
        self._client.add_listener(self._on_state)
        # A drop before add_listener() would go unseen; the next CONNECTED then resyncs.
        self._connected = self._client.connected
        try:
            with self._zk_lock:
                self._client.retry(self._client.ensure_path, self._dir)
                if record is not None:
                    self._publish()
                self._sync()
        except BaseException as exc:
            with self._lock:
                self._closed = True
            self._client.stop()
            self._client.close()
            if isinstance(exc, KazooException):
                raise MembershipError(f"ZooKeeper at {hosts} failed while joining cluster "
                                      f"{cluster!r}: {exc!r}") from exc
            raise
        if record is not None:
            log.info("node %s registered in cluster %s at ZooKeeper %s (%s)",
                     record.node_id, cluster, hosts, _address(record),
                     extra={"cluster": cluster})

    @property
    def connected(self) -> bool:
        """Whether the ZooKeeper session is connected now."""
        with self._lock:
            return self._connected and not self._closed

    @property
    def client(self) -> KazooClient:
        """The started kazoo client, for other watches of the same daemon (activation).
        close() stops it, which ends those watches too."""
        return self._client

    def update(self, record: NodeRecord) -> None:
        """Rewrite this daemon's record in ZooKeeper.

        Waits at most UPDATE_TIMEOUT seconds and does not raise on ZooKeeper errors: it
        logs a WARNING, and the record is written again after the next reconnect. nodes()
        changes when the watch on the record fires, not here.
        """
        if self._record is None:
            raise ValueError("this membership registered no node; pass record= to register")
        if record.node_id != self._record.node_id:
            raise ValueError(f"update() got a record for node {record.node_id!r}, but this "
                             f"membership registered node {self._record.node_id!r}")

        # Queue the write under _lock: _publish reads _record under it too, so the last
        # write ZooKeeper applies carries the latest record.
        with self._lock:
            self._record = record
            pending = None
            if self._connected and not self._closed:
                pending = self._client.set_async(self._path(record.node_id), record.to_json())
            warn = pending is None and not self._update_warned
            self._update_warned = self._update_warned or pending is None
        if pending is None:
            level = logging.WARNING if warn else logging.DEBUG
            log.log(level, "ZooKeeper is not connected; the record of node %s is written "
                    "after the next reconnect", record.node_id)
            return

        try:
            pending.get(timeout=UPDATE_TIMEOUT)
        except self._client.handler.timeout_exception:
            log.warning("writing the record of node %s to ZooKeeper timed out after %g s; it "
                        "is written again after the next reconnect", record.node_id,
                        UPDATE_TIMEOUT)
        except KazooException as exc:
            log.warning("writing the record of node %s to ZooKeeper failed: %r; it is "
                        "written again after the next reconnect", record.node_id, exc)

    def close(self) -> None:
        """Leave the cluster: closing the session deletes this daemon's ephemeral znode."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connected = self._connected
        self._client.stop()
        self._client.close()
        if self._record is None:
            return
        if connected:
            log.info("node %s left cluster %s", self._record.node_id, self.cluster,
                     extra={"cluster": self.cluster})
        else:
            log.warning("node %s closed its membership while ZooKeeper was unreachable; its "
                        "record stays in cluster %s until the session times out",
                        self._record.node_id, self.cluster, extra={"cluster": self.cluster})

    def _path(self, node_id: str) -> str:
        return f"{self._dir}/{node_id}"

    def _publish(self) -> bool:
        """Create this daemon's ephemeral znode, or rewrite it if this session owns it.

        Return True if it was created. Raise NodeIdInUseError if another live session owns
        the node id, and KazooException on ZooKeeper errors. The caller holds _zk_lock.
        """
        created = False
        while True:
            with self._lock:
                record = self._record
            path = self._path(record.node_id)
            client_id = self._client.client_id
            if client_id is None:
                raise ConnectionLoss("no ZooKeeper session")  # dropped again meanwhile
            session_id = client_id[0]
            try:
                self._client.create(path, record.to_json(), ephemeral=True, makepath=True)
                created = True
            except NodeExistsError:
                try:
                    created = self._take_over(path, record, session_id) or created
                except NoNodeError:
                    continue  # it went away between two calls: create it again
            self._owner_session = session_id
            # Write again if update() changed the record meanwhile.
            with self._lock:
                if self._record is record:
                    return created

    def _take_over(self, path: str, record: NodeRecord, session_id: int) -> bool:
        """Rewrite an existing znode of this node id if this daemon owns it (return False),
        or delete it and return True after re-creating it if an expired session of this
        daemon left it behind. Raise NodeIdInUseError for anyone else's znode."""
        data, stat = self._client.get(path)
        owner = stat.ephemeralOwner
        if owner == session_id:
            self._client.set(path, record.to_json())
            return False
        if owner != 0 and owner == self._owner_session:
            self._client.delete(path, version=stat.version)
            self._client.create(path, record.to_json(), ephemeral=True, makepath=True)
            return True
        holder = f"session 0x{owner:x}" if owner else "a persistent znode (delete it)"
        raise NodeIdInUseError(
            f"node id {record.node_id!r} is already registered in cluster {self.cluster!r} at "
            f"ZooKeeper {self.hosts} by {holder}, record {data.decode(errors='replace')}; "
            f"stop that daemon or choose another node id. A daemon that died leaves its "
            f"record until its session times out.")

    def _sync(self) -> None:
        """Re-read the node list and every record, leaving watches on all of them, and
        replace the set. The caller holds _zk_lock."""
        children = self._client.get_children(self._dir, watch=self._on_event)
        records = {}
        for node_id in children:
            record = self._read(node_id)
            if record is not None:
                records[node_id] = record
        with self._lock:
            changes: dict[str, NodeRecord | None] = dict.fromkeys(self._records)
        changes.update(records)
        self._apply(changes)

    def _sync_children(self) -> None:
        """Re-read the node list and the records of new members. The caller holds _zk_lock."""
        children = set(self._client.get_children(self._dir, watch=self._on_event))
        with self._lock:
            known = set(self._records)
        changes: dict[str, NodeRecord | None] = dict.fromkeys(known - children)
        for node_id in sorted(children - known):
            changes[node_id] = self._read(node_id)
        self._apply(changes)

    def _read(self, node_id: str) -> NodeRecord | None:
        """Read one member's record and leave a watch on it; None if it is gone or invalid."""
        try:
            data, stat = self._client.get(self._path(node_id), watch=self._on_event)
        except NoNodeError:
            return None
        try:
            record = NodeRecord.from_json(data)
            if record.node_id != node_id:
                raise ValueError(f"the record names node {record.node_id!r}")
        except ValueError as exc:
            # Log each version of an invalid record once, not at every re-read.
            if self._invalid_seen.get(node_id) != stat.mzxid:
                self._invalid_seen[node_id] = stat.mzxid
                log.warning("ignoring node %s in cluster %s: invalid record: %s", node_id,
                            self.cluster, exc)
            return None
        self._invalid_seen.pop(node_id, None)
        return record

    def _on_event(self, event) -> None:
        """Apply a watch event: a change of the node list or of one record."""
        # NONE events report connection changes, which _on_state handles.
        if event.type == EventType.NONE or self._closed:
            return
        try:
            with self._zk_lock:
                if event.path == self._dir:
                    self._sync_children()
                else:
                    node_id = event.path.rsplit("/", 1)[1]
                    self._apply({node_id: self._read(node_id)})
        except KazooException as exc:
            # A lost connection is followed by a reconnect, and _resync re-reads everything.
            if self._closed:
                return
            log.warning("reading cluster %s after a %s event on %s failed: %r", self.cluster,
                        event.type, event.path, exc)

    def _on_state(self, state) -> None:
        """Track the connection; runs on kazoo's connection thread, so it must not block."""
        if state == KazooState.CONNECTED:
            with self._lock:
                if self._closed or self._connected:
                    return
                self._connected = True
                self._update_warned = False
            log.info("ZooKeeper connection to %s restored", self.hosts)
            self._client.handler.spawn(self._resync)
            return

        with self._lock:
            if self._closed:
                return
            was_connected = self._connected
            self._connected = False
            count = len(self._records)
        if was_connected:
            log.warning("ZooKeeper connection lost; serving with the last membership of %d "
                        "nodes", count)
        if state == KazooState.LOST and self._record is not None:
            log.warning("ZooKeeper session expired; node %s is re-registered after the "
                        "reconnect", self._record.node_id)
        elif state == KazooState.LOST:
            log.warning("ZooKeeper session expired")

    def _resync(self) -> None:
        """Restore this daemon's record and re-read the set after a reconnect."""
        with self._zk_lock:
            if self._closed:
                return
            if self._record is not None:
                try:
                    if self._publish():
                        log.info("node %s re-registered in cluster %s", self._record.node_id,
                                 self.cluster)
                except NodeIdInUseError as exc:
                    log.error("%s", exc)
                except KazooException as exc:
                    if not self._closed:
                        log.warning("re-registering node %s failed: %r; trying again after "
                                    "the next reconnect", self._record.node_id, exc)
            try:
                self._sync()
            except KazooException as exc:
                if self._closed:
                    return
                log.warning("re-reading cluster %s failed: %r; trying again after the next "
                            "reconnect", self.cluster, exc)


def check_own_entry(records: list[NodeRecord], node_id: str, host: str,
                    port: int | None) -> None:
    """Raise ValueError unless the static peer list names `node_id` at host:port (any port
    when `port` is None). A node missing from the list, or listed at another address, would
    split the cluster: the other nodes would route its keys elsewhere."""
    own = next((r for r in records if r.node_id == node_id), None)
    if own is None:
        raise ValueError(f"node id {node_id!r} is not in --peers "
                         f"({', '.join(r.node_id for r in records)}); list every node, this "
                         "one included, with its address")
    if own.host != host or (port is not None and own.port != port):
        raise ValueError(f"--peers lists node {node_id!r} at {_address(own)}, but this "
                         f"daemon serves {host}:{port}; fix --peers or --port (another daemon "
                         "may already use this node id)")


def open_membership(zookeeper: str | None, peers: str | None, cluster: str = "default",
                    record: NodeRecord | None = None, timeout: float = 10.0) -> Membership:
    """Open the configured membership.

    ZooKeeper when `zookeeper` names hosts ("host:port,..."), else the static `peers` list
    plus `record`, else `record` alone (or no node at all). Own `record` replaces its peer
    entry, which must exist at the same address (see check_own_entry).
    """
    if zookeeper:
        return ZooKeeperMembership(zookeeper, cluster, record, timeout)
    records = parse_peers(peers) if peers else []
    if record is not None:
        if records:
            check_own_entry(records, record.node_id, record.host, record.port)
        records = [peer for peer in records if peer.node_id != record.node_id] + [record]
    return StaticMembership(records)
