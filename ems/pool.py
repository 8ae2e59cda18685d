"""The embedded pool: ems.Pool, an owner handle that other processes can attach to.

ems._core does the work; this module adds names (a pool is published under a name so
another process can attach with Pool.attach(name)) and fork safety (a forked child keeps
the mapping but must not write, so its handles become read-only).

A name is a small registry file in EMS_RUN_DIR (default /dev/shm) that stores the owner's
pid and the memfd number; an attaching process opens /proc/PID/fd/FD. This needs the same
user as the owner (or the right to read the owner's /proc entries).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import weakref

from ems import _core
from ems.errors import AttachError, CapacityError

logger = logging.getLogger(__name__)

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_REGISTRY_SUFFIX = ".ems-pool"
_name_counter = itertools.count()
_owned_pools: weakref.WeakSet = weakref.WeakSet()


def run_dir() -> str:
    """Directory of the pool name registry: EMS_RUN_DIR, else /dev/shm, else /tmp."""
    configured = os.environ.get("EMS_RUN_DIR")
    if configured:
        return configured
    return "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


def _registry_path(name: str) -> str:
    return os.path.join(run_dir(), name + _REGISTRY_SUFFIX)


def pid_alive(pid: int) -> bool:
    """Return whether process `pid` exists (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(f"pool name {name!r} is invalid: use 1 to 100 characters from "
                         "letters, digits, '_', '.' and '-'")



def physical_memory_bytes() -> int:
    """Return the machine's physical memory in bytes (the most a pool can prefault)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

class Pool(_core._CorePool):
    """A block store in shared memory: 32-byte keys to immutable byte blocks.

    Pool(capacity_bytes) creates and owns a pool whose data region holds capacity_bytes
    (rounded down to whole slabs), plus about 61 bytes of index metadata per block of
    max_blocks. Blocks larger than slab_size are rejected. Page kinds are tried in the
    order hugetlb, thp, small unless `pages` names one. The owner is the only writer;
    Pool.attach(name) gives another process on the host a read-only handle.
    """

    def __init__(self, capacity_bytes: int, *, slab_size: int | None = None,
                 max_blocks: int | None = None, pages: str = "auto", name: str | None = None):
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise CapacityError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        memory = physical_memory_bytes()
        if capacity_bytes > memory:
            # The arena is prefaulted at creation: beyond RAM the kernel's OOM killer would
            # end the process instead of an error reaching the caller.
            raise CapacityError(f"capacity_bytes {capacity_bytes} exceeds this machine's "
                                f"memory ({memory} bytes)")
        if name is None:
            name = f"ems-{os.getpid()}-{next(_name_counter)}"
        _check_name(name)
        self._name = name
        self._registry = None

        _remove_stale_records()
        self._claim_name(name)
        self._create(capacity_bytes, slab_size, max_blocks, pages, name)
        self._publish_name(name)
        _owned_pools.add(self)
        self._finalizer = weakref.finalize(self, _remove_registry, self._registry, os.getpid())
        logger.debug("created pool %s: %d bytes, slab %d, %s pages", name, self.capacity,
                     self.slab_size, self.page_kind)

    @classmethod
    def attach(cls, name_or_fd: str | int) -> "Pool":
        """Attach read-only to a pool of another process by name, by a path to its memfd
        (such as /proc/PID/fd/FD) or by an inherited file descriptor."""
        pool = cls.__new__(cls)
        pool._registry = None
        pool._finalizer = None
        if isinstance(name_or_fd, int):
            pool._name = f"fd:{name_or_fd}"
            pool._attach_fd(name_or_fd, f"file descriptor {name_or_fd}")
            return pool

        if not isinstance(name_or_fd, str):
            raise TypeError(f"attach expects a pool name, a path or an fd, got "
                            f"{type(name_or_fd).__name__}")
        path = name_or_fd if name_or_fd.startswith("/") else _resolve_name(name_or_fd)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise AttachError(exc.errno, f"cannot open pool {name_or_fd!r} at {path}: "
                                         f"{exc.strerror}") from None
        try:
            pool._name = name_or_fd
            pool._attach_fd(fd, f"pool {name_or_fd!r}")
        finally:
            os.close(fd)
        return pool

    # -- names --

    def _claim_name(self, name: str) -> None:
        """Reject a name whose owner is alive; a stale or damaged record is overwritten."""
        try:
            with open(_registry_path(name)) as f:
                pid = int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if pid == os.getpid():
            if any(p._name == name and not p.closed for p in _owned_pools):
                raise ValueError(f"pool name {name!r} is already used in this process")
        elif pid_alive(pid):
            raise ValueError(f"pool name {name!r} is in use by process {pid}; "
                             "choose another name")

    def _publish_name(self, name: str) -> None:
        path = _registry_path(name)
        record = {"pid": os.getpid(), "fd": self.fd, "capacity": self.capacity}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
        self._registry = path

    # -- properties --

    @property
    def name(self) -> str:
        """Name other processes pass to Pool.attach."""
        return self._name

    @property
    def capacity(self) -> int:
        """Data bytes (whole slabs)."""
        return self.stats()["capacity_bytes"]

    @property
    def slab_size(self) -> int:
        return self.max_block_size

    @property
    def max_blocks(self) -> int:
        """Number of entries: more blocks than this evict even if bytes are free."""
        return self.stats()["max_blocks"]

    def close(self) -> None:
        """Unmap the pool and withdraw its name; attached readers then see only misses."""
        super().close()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<ems.Pool {self._name!r} closed>"
        role = "owner" if self.is_owner else "reader"
        return (f"<ems.Pool {self._name!r} {role} capacity={self.capacity} "
                f"slab_size={self.slab_size} pages={self.page_kind}>")


def _resolve_name(name: str) -> str:
    _check_name(name)
    path = _registry_path(name)
    try:
        with open(path) as f:
            record = json.load(f)
        pid, fd = int(record["pid"]), int(record["fd"])
    except FileNotFoundError:
        raise AttachError(2, f"no pool named {name!r} in {run_dir()}; is its owner running "
                             "with the same EMS_RUN_DIR?") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise AttachError(22, f"pool registry file {path} is damaged") from None
    if not pid_alive(pid):
        raise AttachError(3, f"pool {name!r} belongs to process {pid}, which is not running")
    return f"/proc/{pid}/fd/{fd}"


def stale_name_records(directory: str) -> list[tuple[str, int]]:
    """Return (path, owner pid) of the pool name records in `directory` whose owner process
    has exited, in name order."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(_REGISTRY_SUFFIX))
    except OSError:
        return []
    stale = []
    for file_name in names:
        path = os.path.join(directory, file_name)
        try:
            with open(path) as f:
                pid = int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not pid_alive(pid):
            stale.append((path, pid))
    return stale


def _remove_stale_records() -> None:
    """Delete name records whose owner process is gone (killed before it could)."""
    for path, pid in stale_name_records(run_dir()):
        logger.info("removing the name record %s of exited process %d", path, pid)
        _remove_registry(path, os.getpid())


def _remove_registry(path: str | None, pid: int) -> None:
    if path is None or os.getpid() != pid:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _disown_after_fork() -> None:
    for pool in list(_owned_pools):
        pool._disown()
        if pool._finalizer is not None:
            pool._finalizer.detach()


os.register_at_fork(after_in_child=_disown_after_fork)
