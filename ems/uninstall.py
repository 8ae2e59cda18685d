"""`ems uninstall`: remove what EMS made on this host and, with --zookeeper, in the cluster.

It stops the node daemons recorded in the run directory (ems.daemon_record), removes their
records, sockets and pool name records, deletes the cluster's znodes under
/ems/clusters/<cluster>, and removes the EMS segment files of spill directories. It never
deletes a file that is not an EMS file: a spill directory that contains anything else
keeps those files and is itself kept. EMS reserves no hugepages itself, so there is
nothing of that kind to release. The output states this and shows the host's reservation.

Everything is planned first and printed. --dry-run stops there. Otherwise the command
prompts for confirmation unless --yes is given. Exit codes: 0 done, 1 something could not be removed or
the cluster has live members (without --force), 2 bad usage.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import stat
import sys
import time
from dataclasses import dataclass, field

from ems import daemon_record
from ems.cluster.membership import ROOT, check_name
from ems.pool import run_dir, stale_name_records
from ems.tiering import segment

# Published and temporary segment names, as ems.tiering.segment makes them:
# <time ns, 20 digits>-<host>-<pid>-<12 hex digits>-<sequence, 8 digits>.seg[.tmp]
_SEGMENT_NAME = re.compile(r"^\d{20}-[^-/]+-\d+-[0-9a-f]{12}-\d{8}\.seg(\.tmp)?$")
_POOL_RECORD_SUFFIX = ".ems-pool"


@dataclass
class SpillDir:
    """A spill directory to clean: its EMS segment files and the entries that are not."""

    path: str
    origin: str                                          # "--spill-dir" or "daemon NODE"
    owners: list[str] = field(default_factory=list)      # node ids of daemons that use it
    segments: list[str] = field(default_factory=list)    # file names to delete
    others: list[str] = field(default_factory=list)      # names that stay
    missing: bool = False


@dataclass
class Plan:
    """The things uninstall removes or leaves, found by make_plan() without changing
    anything."""

    running: list[dict] = field(default_factory=list)     # daemon records: stop, remove
    stopped: list[dict] = field(default_factory=list)     # records of exited daemons
    left_running: list[dict] = field(default_factory=list)   # other clusters' daemons
    damaged: list[dict] = field(default_factory=list)     # unreadable records (kept)
    pool_records: list[str] = field(default_factory=list)     # of exited processes
    spill_dirs: list[SpillDir] = field(default_factory=list)
    znodes: list[str] = field(default_factory=list)       # deepest first
    members: list[str] = field(default_factory=list)      # live members not stopped here


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ems uninstall",
        description="Stop the EMS daemons of this host, delete the cluster's ZooKeeper "
                    "records and remove spill directories, printing each thing removed.")
    p.add_argument("--run-dir", default=None,
                   help="run directory of the daemons (default: EMS_RUN_DIR, else /dev/shm)")
    p.add_argument("--zookeeper", default=None,
                   help="ZooKeeper hosts of the cluster whose records to delete, e.g. "
                        "zk1:2181,zk2:2181 (needs --cluster)")
    p.add_argument("--cluster", default=None,
                   help="cluster name: delete /ems/clusters/NAME (with --zookeeper) and stop "
                        "only this cluster's daemons on this host (default: all of them)")
    p.add_argument("--spill-dir", action="append", default=[],
                   help="a spill directory to remove besides those the daemons recorded; "
                        "repeat for several. Only EMS segment files are deleted")
    p.add_argument("--force", action="store_true",
                   help="delete the cluster's records even while other nodes are members")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be removed and change nothing")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--timeout", type=float, default=20.0,
                   help="seconds to wait for each daemon to stop after SIGTERM before "
                        "SIGKILL (default 20)")
    return p


# ---- planning ------------------------------------------------------------------------------

def _scan_spill_dir(path: str, origin: str) -> SpillDir:
    found = SpillDir(path, origin)
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        found.missing = True
        return found
    for name in names:
        if _SEGMENT_NAME.match(name) and _is_segment_file(os.path.join(path, name)):
            found.segments.append(name)
        else:
            found.others.append(name)
    return found


def _is_segment_file(path: str) -> bool:
    """Return whether `path` is a regular file that an EMS spill store wrote: a published
    segment starts with a record header's magic, a temporary one may still be empty."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return False
        if path.endswith(segment.TEMP_SUFFIX) or info.st_size == 0:
            return True
        with open(path, "rb") as f:
            return f.read(len(segment.MAGIC)) == segment.MAGIC
    except OSError:
        return False


def _stale_pool_records(directory: str) -> list[str]:
    """Return the pool name records in `directory` whose owner process has exited."""
    return [path for path, _ in stale_name_records(directory)]


def _cluster_tree(zookeeper: str, cluster: str) -> tuple[list[str], list[str]]:
    """Return (znodes under /ems/clusters/CLUSTER, deepest first; ids of its members
    whose ephemeral znodes exist)."""
    from kazoo.exceptions import NoNodeError

    from ems.manage import zkstate

    client = zkstate.connect(zookeeper)
    try:
        root = f"{ROOT}/{cluster}"
        paths, pending = [], [root]
        while pending:
            path = pending.pop()
            try:
                children = client.get_children(path)
            except NoNodeError:
                continue
            paths.append(path)
            pending += [f"{path}/{child}" for child in children]
        members = []
        for path in paths:
            if path.startswith(f"{root}/nodes/"):
                found = client.exists(path)
                if found is not None and found.ephemeralOwner:
                    members.append(path.rsplit("/", 1)[1])
        return sorted(paths, key=lambda p: -p.count("/")), sorted(members)
    finally:
        client.stop()
        client.close()


def make_plan(args, directory: str) -> Plan:
    plan = Plan()
    for record in daemon_record.read_all(directory):
        if "error" in record:
            plan.damaged.append(record)
        elif args.cluster and record.get("cluster") != args.cluster:
            if daemon_record.is_running(record):
                plan.left_running.append(record)
        elif daemon_record.is_running(record):
            plan.running.append(record)
        else:
            plan.stopped.append(record)
    plan.pool_records = _stale_pool_records(directory)

    # Spill directories: those given, and those the daemons recorded. A shared directory
    # is also used by other hosts' daemons, so a recorded one is cleaned only when the
    # whole cluster is uninstalled (--zookeeper) or it is given explicitly.
    by_path: dict[str, SpillDir] = {}
    candidates = [(path, "--spill-dir") for path in args.spill_dir]
    for record in plan.running + plan.stopped:
        if record.get("spill_dir") and (args.zookeeper or not record.get("spill_shared")):
            candidates.append((record["spill_dir"], f"daemon {record.get('node_id')}"))
    for path, origin in candidates:
        path = os.path.abspath(path)
        if path not in by_path:
            by_path[path] = _scan_spill_dir(path, origin)
            plan.spill_dirs.append(by_path[path])
    for record in plan.running + plan.left_running:
        if record.get("spill_dir") and os.path.abspath(record["spill_dir"]) in by_path:
            by_path[os.path.abspath(record["spill_dir"])].owners.append(record.get("node_id"))

    if args.zookeeper:
        plan.znodes, members = _cluster_tree(args.zookeeper, args.cluster)
        local = {r.get("node_id") for r in plan.running}
        plan.members = [m for m in members if m not in local]
    return plan


# ---- output --------------------------------------------------------------------------------

def _describe(plan: Plan, args) -> list[str]:
    lines = []
    for record in plan.running:
        lines.append(f"stop daemon {record.get('node_id')} (pid {record['pid']}, cluster "
                     f"{record.get('cluster')}) and remove its socket "
                     f"{record.get('socket')} and record {record['path']}")
    for record in plan.stopped:
        lines.append(f"remove the record {record['path']} of stopped daemon "
                     f"{record.get('node_id')}")
    for path in plan.pool_records:
        lines.append(f"remove the pool name record {path} of an exited process")
    left = {r.get("node_id") for r in plan.left_running}
    for spill in plan.spill_dirs:
        if spill.missing:
            lines.append(f"spill directory {spill.path} ({spill.origin}) does not exist")
        elif left & set(spill.owners):
            lines.append(f"keep {spill.path}: daemon {', '.join(sorted(left & set(spill.owners)))}"
                         f" of another cluster uses it")
        elif not spill.segments and spill.others:
            lines.append(f"keep {spill.path} ({spill.origin}): it contains no EMS segment "
                         f"files, so it is not an EMS spill directory")
        else:
            keep = (f"; keep the directory and its {len(spill.others)} other entries"
                    if spill.others else " and the directory")
            lines.append(f"remove {len(spill.segments)} segment files from spill directory "
                         f"{spill.path} ({spill.origin}){keep}")
    if args.zookeeper:
        if plan.znodes:
            lines.append(f"delete {len(plan.znodes)} znodes of cluster {args.cluster} at "
                         f"ZooKeeper {args.zookeeper}: {plan.znodes[-1]} and below")
        else:
            lines.append(f"cluster {args.cluster} has no records at ZooKeeper "
                         f"{args.zookeeper}")
    return lines


def _notes(plan: Plan) -> list[str]:
    lines = []
    for record in plan.left_running:
        lines.append(f"leave daemon {record.get('node_id')} (pid {record['pid']}) running: "
                     f"it serves cluster {record.get('cluster')}")
    for record in plan.damaged:
        lines.append(f"leave {record['path']}: unreadable daemon record ({record['error']})")
    for record in plan.running:
        manager = _manager_of(record["pid"])
        if manager:
            lines.append(f"daemon {record.get('node_id')} runs under {manager}")
    lines.append(_hugepage_note())
    return lines


def _manager_of(pid: int) -> str | None:
    """Return what started the process, read from its cgroup: a systemd unit or a
    Kubernetes pod, with what keeps it from starting again; None otherwise."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            groups = f.read()
    except OSError:
        return None
    if "kubepods" in groups:
        return ("a Kubernetes pod: delete its DaemonSet first (kubectl delete -k), or it "
                "starts again")
    # The last component of a cgroup path is the unit the process runs in.
    unit = re.search(r"/([^/\n]+\.service)\s*$", groups, re.MULTILINE)
    if unit is None:
        return None
    systemctl = "systemctl --user" if "/user@" in groups else "systemctl"
    return (f"systemd unit {unit.group(1)}: run `{systemctl} disable {unit.group(1)}` so "
            f"that it does not start again at boot")


def _hugepage_note() -> str:
    total = free = size_kib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == "HugePages_Total":
                    total = int(value.split()[0])
                elif name == "HugePages_Free":
                    free = int(value.split()[0])
                elif name == "Hugepagesize":
                    size_kib = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    text = ("hugepages: EMS reserves none itself, so uninstall releases none; pools use "
            "what vm.nr_hugepages reserves")
    if total is not None:
        text += (f" (now {total} pages of {size_kib} KiB, {free} free). If they were "
                 f"reserved for EMS, release them with `sysctl -w vm.nr_hugepages=0` and "
                 f"remove the setting from /etc/sysctl.d")
    return text


# ---- actions -------------------------------------------------------------------------------

def _stop_daemon(record: dict, timeout: float, out) -> bool:
    """SIGTERM the daemon, wait up to `timeout` s, then SIGKILL. Returns whether it exited."""
    pid, node = record["pid"], record.get("node_id")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    except PermissionError:
        print(f"failed to stop daemon {node} (pid {pid}): permission denied; run as root or "
              f"as the daemon's user", file=out)
        return False
    deadline = time.monotonic() + timeout
    while daemon_record.is_running(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    if daemon_record.is_running(record):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while daemon_record.is_running(record) and time.monotonic() < deadline:
            time.sleep(0.05)
        if daemon_record.is_running(record):
            print(f"failed to stop daemon {node} (pid {pid}): it still runs 5 s after "
                  f"SIGKILL", file=out)
            return False
        print(f"killed daemon {node} (pid {pid}) with SIGKILL: it did not stop within "
              f"{timeout:g} s of SIGTERM", file=out)
        return True
    print(f"stopped daemon {node} (pid {pid})", file=out)
    return True


def _remove_file(path: str, what: str, out, *, socket_only: bool = False) -> bool:
    try:
        if socket_only and not stat.S_ISSOCK(os.lstat(path).st_mode):
            print(f"kept {path}: not a socket", file=out)
            return True
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        print(f"failed to remove {what} {path}: {exc.strerror}", file=out)
        return False
    print(f"removed {what} {path}", file=out)
    return True


def _remove_daemon_files(record: dict, directory: str, out) -> bool:
    ok = True
    if record.get("socket"):
        ok &= _remove_file(record["socket"], "socket", out, socket_only=True)
    pool_record = os.path.join(directory, f"ems-{record.get('node_id')}{_POOL_RECORD_SUFFIX}")
    if os.path.exists(pool_record) and pool_record in _stale_pool_records(directory):
        ok &= _remove_file(pool_record, "pool name record", out)
    return _remove_file(record["path"], "daemon record", out) and ok


def _clean_spill_dir(planned: SpillDir, still_running: set, out) -> bool:
    if planned.missing or (not planned.segments and planned.others):
        return True
    users = sorted(still_running & set(planned.owners))
    if users:
        print(f"kept spill directory {planned.path}: daemon {', '.join(users)} still uses it",
              file=out)
        return True   # a daemon that failed to stop has already failed the run
    # Scanned again: a daemon publishes its open segment when it stops.
    spill = _scan_spill_dir(planned.path, planned.origin)
    ok = True
    for name in spill.segments:
        try:
            os.unlink(os.path.join(spill.path, name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"failed to remove spill segment {spill.path}/{name}: {exc.strerror}",
                  file=out)
            ok = False
    if spill.others:
        print(f"removed {len(spill.segments)} segment files from {spill.path}; kept the "
              f"directory for its other entries: {', '.join(spill.others[:5])}"
              + (" ..." if len(spill.others) > 5 else ""), file=out)
        return ok
    try:
        os.rmdir(spill.path)
    except OSError as exc:
        print(f"failed to remove spill directory {spill.path}: {exc.strerror}", file=out)
        return False
    print(f"removed spill directory {spill.path} ({len(spill.segments)} segment files)",
          file=out)
    return ok


def _delete_cluster(args, out) -> bool:
    """Delete /ems/clusters/CLUSTER, then /ems/clusters and /ems when no other cluster
    uses them. Returns False when members are live and --force is not given."""
    from kazoo.exceptions import KazooException, NoNodeError, NotEmptyError

    from ems.manage import zkstate

    # Members of daemons stopped a moment ago leave with their session: wait for that.
    deadline = time.monotonic() + 5.0
    znodes, members = _cluster_tree(args.zookeeper, args.cluster)
    while members and not args.force and time.monotonic() < deadline:
        time.sleep(0.2)
        znodes, members = _cluster_tree(args.zookeeper, args.cluster)
    if members and not args.force:
        print(f"not deleting cluster {args.cluster} at ZooKeeper {args.zookeeper}: nodes "
              f"{', '.join(members)} are live members; stop them (ems uninstall on their "
              f"hosts) or pass --force", file=out)
        return False
    if not znodes:
        return True
    client = zkstate.connect(args.zookeeper)
    try:
        try:
            client.delete(f"{ROOT}/{args.cluster}", recursive=True)
        except KazooException as exc:   # a member that joined meanwhile: NotEmptyError
            print(f"failed to delete {ROOT}/{args.cluster} at ZooKeeper {args.zookeeper}: "
                  f"{exc!r}; run ems uninstall again", file=out)
            return False
        print(f"deleted {len(znodes)} znodes of cluster {args.cluster} at ZooKeeper "
              f"{args.zookeeper} ({ROOT}/{args.cluster} and below)", file=out)
        for parent in (ROOT, ROOT.rsplit("/", 1)[0]):
            try:
                client.delete(parent)
                print(f"deleted {parent}, which no other cluster uses", file=out)
            except (NoNodeError, NotEmptyError):
                break
    finally:
        client.stop()
        client.close()
    return True


def _confirm(out) -> bool:
    try:
        answer = input("remove all of this? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing removed", file=out)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.zookeeper and not args.cluster:
        parser.error("--zookeeper needs --cluster, the cluster whose records to delete")
    if args.cluster:
        try:
            check_name("cluster name", args.cluster)
        except ValueError as exc:
            parser.error(str(exc))
    out = sys.stdout
    directory = args.run_dir or run_dir()
    try:
        plan = make_plan(args, directory)
    except Exception as exc:   # ZooKeeper unreachable, or a failed read: nothing changed yet
        print(f"ems uninstall: {exc}; nothing was removed", file=sys.stderr)
        return 1

    actions = _describe(plan, args)
    print("ems uninstall would:" if args.dry_run else "ems uninstall will:", file=out)
    for line in actions or ["find nothing of EMS's to remove"]:
        print(f"  {line}", file=out)
    for line in _notes(plan):
        print(f"note: {line}", file=out)
    if plan.members and not args.force:
        print(f"cluster {args.cluster} has live members on other hosts: "
              f"{', '.join(plan.members)}; stop them first or pass --force to delete its "
              f"records anyway. Nothing was removed", file=sys.stderr)
        return 1
    if args.dry_run or not actions:
        return 0
    if not args.yes and not _confirm(out):
        return 1

    ok = True
    still_running = {r.get("node_id") for r in plan.left_running}
    for record in plan.running:
        if _stop_daemon(record, args.timeout, out):
            ok &= _remove_daemon_files(record, directory, out)
        else:
            still_running.add(record.get("node_id"))
            ok = False
    for record in plan.stopped:
        ok &= _remove_daemon_files(record, directory, out)
    for path in plan.pool_records:
        if os.path.exists(path):
            ok &= _remove_file(path, "pool name record", out)
    if args.zookeeper:
        ok &= _delete_cluster(args, out)
    for spill in plan.spill_dirs:
        ok &= _clean_spill_dir(spill, still_running, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
