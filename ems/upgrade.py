"""`ems upgrade`: restart the node daemons of a cluster one at a time (a rolling upgrade).

Each node, in node id order or the order of --nodes, goes through these steps, and the
next node starts only after them:

1. drain it, when it speaks protocol version 2 or later, so that it stores no new block
   and writers turn to other nodes, and wait until its other requests end;
2. run the operator's restart command, and wait until the old process has closed its
   connections;
3. wait until the new process responds to PING at the expected protocol version, its
   /healthz returns ok and, with ZooKeeper, it has registered with that version.

The first node that does not come back healthy within --timeout stops the upgrade, and the
report names the nodes not upgraded. The tool does not install software: the restart
command does (for example a package upgrade and `systemctl restart ems@{node}`). Blocks in
the restarted node's DRAM are lost, as with any restart, and reads of them miss.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from ems import __version__, _core
from ems.client import load_secret
from ems.cluster.membership import NodeRecord, open_membership
from ems.errors import MembershipError, TransferError

TENANT = "ems-upgrade"          # tenant name of the tool's node-role connections
POLL_S = 0.05                   # how often drain, stop and health checks poll
RESTART_FIELDS = ("node", "host", "port")   # placeholders of --restart-cmd
OUTPUT_TAIL = 2000              # characters of a failed restart command's output shown


class UpgradeFailed(Exception):
    """A node could not be drained, restarted or did not come back healthy."""


@dataclass
class Settings:
    """The options of one run; `ems upgrade --help` documents each."""

    restart_cmd: str
    secret: bytes | None
    expect_protocol: int
    expect_version: str | None
    timeout_s: float
    drain_timeout_s: float
    pause_s: float
    metrics_port: int | None
    call_timeout_ms: int
    zookeeper: bool


def restart_command(template: str, record: NodeRecord) -> str:
    """Fill the template's {node}, {host} and {port}, each quoted for the shell, because
    a record's host comes from the membership, which anyone on ZooKeeper can write."""
    values = {"node": record.node_id, "host": record.host, "port": str(record.port)}
    return template.format(**{name: shlex.quote(value) for name, value in values.items()})


def _connect(record: NodeRecord, settings: Settings) -> _core.Connection:
    return _core.Connection(record.host, record.port, secret=settings.secret, tenant=TENANT,
                            role="node", timeout_ms=settings.call_timeout_ms)


def _healthz(host: str, port: int, timeout_s: float) -> str | None:
    """Return None when http://host:port/healthz returns 200, else the problem."""
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status == 200:
                return None
            return f"{url} returned {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} failed: {exc}"


def _wait(check, timeout_s: float):
    """Call check() every POLL_S until it returns None or timeout_s passes. Returns None,
    or the last problem check() returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        problem = check()
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(POLL_S)


class Upgrade:
    """One rolling upgrade: the membership, the settings, and a line of output per step."""

    def __init__(self, membership, settings: Settings, out=sys.stdout):
        self.membership = membership
        self.settings = settings
        self.out = out

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def record(self, node_id: str) -> NodeRecord | None:
        return self.membership.nodes().get(node_id)

    def _range(self, record: NodeRecord) -> str:
        if not self.settings.zookeeper:
            return "range not published (static peers)"
        return f"protocol {record.proto_min}-{record.proto_max}, version {record.version}"

    # -- checks --

    def check_before(self, node_ids: list[str]) -> None:
        """Check that every node to restart is a member and responds to PING, so that no
        node is taken down while another is already down. Raises UpgradeFailed."""
        for node_id in node_ids:
            record = self.record(node_id)
            if record is None:
                raise UpgradeFailed(f"node {node_id} is not a member of the cluster")
            try:
                conn = _connect(record, self.settings)
                try:
                    conn.ping(timeout_ms=self.settings.call_timeout_ms)
                    agreed = conn.version
                finally:
                    conn.close()
            except TransferError as exc:
                raise UpgradeFailed(f"node {node_id} does not respond before the upgrade: "
                                    f"{exc}; fix it, or leave it out with --nodes") from None
            drain = "drain" if agreed >= 2 else "no DRAIN in protocol version 1"
            self.say(f"  {node_id} at {record.host}:{record.port}: answers at protocol "
                     f"{agreed} ({drain}); {self._range(record)}")

    def healthy(self, node_id: str) -> str | None:
        """Return None when the node's new process is up at the expected version, else the
        first problem found."""
        settings = self.settings
        record = self.record(node_id)
        if record is None:
            return "not registered in the membership"
        if settings.zookeeper:
            if record.proto_max < settings.expect_protocol:
                return (f"registered with protocol {record.proto_min}-{record.proto_max}, "
                        f"expected {settings.expect_protocol} or later")
            if settings.expect_version and record.version != settings.expect_version:
                return f"registered with version {record.version!r}, expected " \
                       f"{settings.expect_version!r}"
            if record.draining:
                return "registered as draining"
        try:
            conn = _connect(record, settings)
            try:
                conn.ping(timeout_ms=settings.call_timeout_ms)
                agreed = conn.version
            finally:
                conn.close()
        except TransferError as exc:
            return f"PING failed: {exc}"
        if agreed < settings.expect_protocol:
            return f"answers at protocol {agreed}, expected {settings.expect_protocol}"
        port = record.metrics_port or settings.metrics_port
        if port:
            return _healthz(record.host, port, settings.call_timeout_ms / 1000)
        return None

    # -- one node --

    def drain(self, node_id: str, conn: _core.Connection) -> None:
        """Drain the node and wait until its other requests end (at most
        --drain-timeout); a node of protocol version 1 cannot drain."""
        if conn.version < 2:
            self.say("  drain: skipped, protocol version 1 has no DRAIN; requests in flight "
                     "at the restart fail and their clients count misses")
            return
        started = time.monotonic()
        state = {}

        def idle():
            state["in_flight"] = conn.drain(True, timeout_ms=self.settings.call_timeout_ms)
            return None if state["in_flight"] == 0 else "busy"

        try:
            busy = _wait(idle, self.settings.drain_timeout_s)
        except TransferError as exc:
            raise UpgradeFailed(f"DRAIN of node {node_id} failed: {exc}") from None
        elapsed = time.monotonic() - started
        if busy:
            self.say(f"  drain: {state['in_flight']} requests still in flight after "
                     f"{elapsed:.1f} s (--drain-timeout); restarting anyway")
        else:
            self.say(f"  drain: no new blocks stored, no request in flight after "
                     f"{elapsed:.1f} s")

    def restart(self, node_id: str, record: NodeRecord, conn: _core.Connection) -> None:
        command = restart_command(self.settings.restart_cmd, record)
        started = time.monotonic()
        try:
            done = subprocess.run(command, shell=True, capture_output=True, text=True,
                                  timeout=self.settings.timeout_s)
        except subprocess.TimeoutExpired:
            self._undrain(conn)
            raise UpgradeFailed(f"restart command of node {node_id} did not finish in "
                                f"{self.settings.timeout_s:.0f} s: {command}") from None
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()[-OUTPUT_TAIL:]
            self._undrain(conn)
            raise UpgradeFailed(f"restart command of node {node_id} exited with "
                                f"{done.returncode}: {command}\n{output}")
        self.say(f"  restart: {command} (exit 0 after {elapsed:.1f} s)")

    def _undrain(self, conn: _core.Connection) -> None:
        """End draining when the old process still runs after a failed restart, so that
        the node stores blocks again."""
        if conn.version < 2:
            return
        try:
            conn.drain(False, timeout_ms=self.settings.call_timeout_ms)
            self.say("  the old process still runs: draining ended")
        except TransferError:
            pass   # the old process is gone; a new one starts without draining

    def wait_stopped(self, node_id: str, conn: _core.Connection) -> None:
        """Wait until the old process closed the connection opened before the restart."""
        started = time.monotonic()

        def stopped():
            try:
                conn.ping(timeout_ms=self.settings.call_timeout_ms)
            except TransferError:
                return None
            return "the old process still answers PING"

        problem = _wait(stopped, self.settings.timeout_s)
        if problem:
            raise UpgradeFailed(f"node {node_id}: {problem} {self.settings.timeout_s:.0f} s "
                                f"after the restart command")
        self.say(f"  stopped: the old process closed its connections after "
                 f"{time.monotonic() - started:.1f} s")

    def upgrade_node(self, node_id: str) -> None:
        """Drain, restart and check one node. Raises UpgradeFailed."""
        record = self.record(node_id)
        if record is None:
            raise UpgradeFailed(f"node {node_id} left the membership during the upgrade")
        try:
            conn = _connect(record, self.settings)
        except TransferError as exc:
            raise UpgradeFailed(f"node {node_id} does not respond: {exc}") from None
        try:
            self.drain(node_id, conn)
            self.restart(node_id, record, conn)
            self.wait_stopped(node_id, conn)
        finally:
            conn.close()

        started = time.monotonic()
        problem = _wait(lambda: self.healthy(node_id), self.settings.timeout_s)
        if problem:
            raise UpgradeFailed(f"node {node_id} did not come back healthy within "
                                f"{self.settings.timeout_s:.0f} s: {problem}")
        record = self.record(node_id)
        health = "/healthz ok" if record.metrics_port or self.settings.metrics_port else \
            "/healthz not checked (no metrics port known)"
        self.say(f"  healthy after {time.monotonic() - started:.1f} s: PING ok at protocol "
                 f"{self.settings.expect_protocol} or later, {health}; {self._range(record)}")

    def run(self, node_ids: list[str], dry_run: bool) -> int:
        settings = self.settings
        self.say(f"ems upgrade: {len(node_ids)} nodes, one at a time: {', '.join(node_ids)}")
        self.check_before(node_ids)
        if dry_run:
            for i, node_id in enumerate(node_ids, 1):
                command = restart_command(settings.restart_cmd, self.record(node_id))
                self.say(f"[{i}/{len(node_ids)}] would drain node {node_id}, run: {command}, "
                         f"and wait up to {settings.timeout_s:.0f} s for it to answer at "
                         f"protocol {settings.expect_protocol} or later")
            self.say("dry run: nothing was drained or restarted")
            return 0

        started = time.monotonic()
        for i, node_id in enumerate(node_ids, 1):
            self.say(f"[{i}/{len(node_ids)}] node {node_id}")
            try:
                self.upgrade_node(node_id)
            except UpgradeFailed as exc:
                print(f"ems upgrade: FAILED: {exc}", file=sys.stderr, flush=True)
                self.say(f"stopped at node {node_id}: upgraded {i - 1} of {len(node_ids)} "
                         f"nodes; not upgraded: {', '.join(node_ids[i - 1:])}")
                return 1
            if i < len(node_ids) and settings.pause_s > 0:
                # The other nodes re-announce their keys to the new process's directory
                # shard within about a second of seeing it again.
                time.sleep(settings.pause_s)
        self.say(f"upgraded {len(node_ids)} of {len(node_ids)} nodes in "
                 f"{time.monotonic() - started:.1f} s")
        return 0


# ---- command line ------------------------------------------------------------------

def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="ems upgrade",
        description="Restart the node daemons of a cluster one at a time: drain a node, run "
                    "the restart command, wait until the new process responds to PING at "
                    "the expected protocol version and its /healthz is ok, then go on with "
                    "the next. Stops at the first node that does not come back healthy.",
        epilog="exit status: 0 when every node was upgraded (or the dry run found every node "
               "up), 1 when a node failed and the upgrade stopped, 2 on invalid options")
    p.add_argument("--restart-cmd", required=True,
                   help="shell command that restarts one node with the new software, e.g. "
                        "'systemctl restart ems@{node}'; {node}, {host} and {port} are "
                        "replaced, quoted for the shell")

    p.add_argument("--zookeeper", default=env.get("EMS_ZOOKEEPER"),
                   help="ZooKeeper hosts, e.g. 127.0.0.1:2181 (default: EMS_ZOOKEEPER)")
    p.add_argument("--peers", default=env.get("EMS_PEERS"),
                   help="static peers without ZooKeeper: id=host:port,... (default: EMS_PEERS)")
    p.add_argument("--cluster", default=env.get("EMS_CLUSTER", "default"),
                   help="cluster name in ZooKeeper (default: EMS_CLUSTER or 'default')")
    p.add_argument("--nodes", default=None,
                   help="node ids to restart, in this order, separated by commas (default: "
                        "every member, in node id order)")

    p.add_argument("--secret-file", default=None,
                   help="file holding the cluster secret (default: EMS_SECRET or "
                        "EMS_SECRET_FILE; none means no authentication)")

    p.add_argument("--expect-protocol", type=int, default=_core.PROTO_VERSION_MAX,
                   help="protocol version a restarted node must speak (default "
                        f"{_core.PROTO_VERSION_MAX}, the newest of this ems {__version__})")
    p.add_argument("--expect-version", default=None,
                   help="ems version a restarted node must register with (ZooKeeper only; "
                        "default: not checked)")

    p.add_argument("--timeout", type=_positive_float, default=120.0,
                   help="seconds each node may take to restart and come back healthy, and "
                        "the restart command to finish (default 120)")
    p.add_argument("--drain-timeout", type=_positive_float, default=30.0,
                   help="seconds to wait for a draining node's requests in flight to end "
                        "(default 30); the restart goes ahead after it")
    p.add_argument("--pause", type=float, default=2.0,
                   help="seconds to wait after a node is healthy before the next one, so "
                        "that the other nodes re-announce their keys to it (default 2)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="metrics port of every node, for /healthz with static peers, whose "
                        "records carry none (default: the port in each record)")
    p.add_argument("--timeout-ms", type=int, default=1000,
                   help="deadline of each connection and call in milliseconds (default 1000)")

    p.add_argument("--dry-run", action="store_true",
                   help="check the nodes and print the plan without draining or restarting")
    return p


def _read_secret(parser: argparse.ArgumentParser, path: str | None) -> bytes | None:
    try:
        if not path:
            return load_secret()
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as exc:
        parser.error(f"cannot read the cluster secret: {exc}")
    if not secret:
        parser.error(f"secret file {path} is empty")
    return secret


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.zookeeper and not args.peers:
        parser.error("no cluster: pass --zookeeper or --peers (or set EMS_ZOOKEEPER or "
                     "EMS_PEERS)")
    if not _core.PROTO_VERSION_MIN <= args.expect_protocol <= _core.PROTO_VERSION_MAX:
        parser.error(f"--expect-protocol {args.expect_protocol} is outside the versions this "
                     f"ems speaks ({_core.PROTO_VERSION_MIN}-{_core.PROTO_VERSION_MAX})")
    if args.pause < 0 or args.timeout_ms <= 0:
        parser.error("--pause must be 0 or more and --timeout-ms positive")
    try:
        restart_command(args.restart_cmd, NodeRecord("node", "host", 1))
    except (KeyError, IndexError, ValueError) as exc:
        parser.error(f"--restart-cmd {args.restart_cmd!r} is invalid ({exc!r}): use only "
                     f"{', '.join('{' + name + '}' for name in RESTART_FIELDS)}, and {{{{ "
                     f"for a literal brace")
    settings = Settings(
        restart_cmd=args.restart_cmd, secret=_read_secret(parser, args.secret_file),
        expect_protocol=args.expect_protocol, expect_version=args.expect_version,
        timeout_s=args.timeout, drain_timeout_s=args.drain_timeout, pause_s=args.pause,
        metrics_port=args.metrics_port, call_timeout_ms=args.timeout_ms,
        zookeeper=bool(args.zookeeper))

    try:
        membership = open_membership(args.zookeeper, args.peers, args.cluster)
    except ValueError as exc:
        parser.error(str(exc))
    except MembershipError as exc:
        print(f"ems upgrade: {exc}", file=sys.stderr)
        return 1
    try:
        members = sorted(membership.nodes())
        node_ids = [n.strip() for n in args.nodes.split(",")] if args.nodes else members
        if len(set(node_ids)) != len(node_ids):
            parser.error(f"--nodes {args.nodes!r} names a node twice")
        if not node_ids:
            print(f"ems upgrade: cluster {args.cluster!r} has no members", file=sys.stderr)
            return 1
        try:
            return Upgrade(membership, settings).run(node_ids, args.dry_run)
        except UpgradeFailed as exc:
            print(f"ems upgrade: {exc}; nothing was restarted", file=sys.stderr)
            return 1
    finally:
        membership.close()


if __name__ == "__main__":
    sys.exit(main())
