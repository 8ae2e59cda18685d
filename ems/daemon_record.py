"""The record a node daemon leaves in its run directory, so that `ems uninstall` finds it.

$EMS_RUN_DIR/ems-NODE.daemon is a JSON object with the pid, the process start time, node
id, cluster, ZooKeeper hosts, Unix socket, spill directory and whether that directory is
shared. The start time (clock ticks after boot, field 22 of /proc/PID/stat) keeps a reused
pid from being taken for the daemon. The daemon writes the record once it serves and adds "stopped" (Unix time) when it stops
cleanly. The record stays after the stop, because the spill directory it names outlives
the process. The run directory is a tmpfs on most hosts (/dev/shm, /run/ems), so records
are gone after a reboot.

The pid is the one in the daemon's PID namespace. Read from another namespace (a cleanup
pod), it names some other process or none, and the start time check then almost always
makes the daemon count as exited.
"""
from __future__ import annotations

import json
import os

from ems.pool import pid_alive

SUFFIX = ".daemon"


def record_path(directory: str, node_id: str) -> str:
    return os.path.join(directory, f"ems-{node_id}{SUFFIX}")


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of process `pid` in clock ticks after boot, or None when the
    process does not exist or has exited and waits to be reaped (a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces, so fields are
    # counted from its closing parenthesis, after which field 3 (the state) starts.
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def write(path: str, record: dict) -> None:
    """Write `record` to `path` atomically (a reader sees the old or the new content)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.write("\n")
    os.replace(tmp, path)


def read_all(directory: str) -> list[dict]:
    """Return the records in `directory`, each with its "path". Unreadable or damaged
    files are returned as {"path": ..., "error": ...}."""
    try:
        names = sorted(n for n in os.listdir(directory)
                       if n.startswith("ems-") and n.endswith(SUFFIX))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                record = json.load(f)
            if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
                raise ValueError("not a daemon record")
        except (OSError, ValueError) as exc:
            records.append({"path": path, "error": str(exc)})
            continue
        record["path"] = path
        records.append(record)
    return records


def is_running(record: dict) -> bool:
    """Return whether the daemon of `record` is still the process with its pid."""
    pid = record.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    ticks = process_start_ticks(pid)
    return ticks is not None and ticks == record.get("start_ticks")
