"""SpillStore: blocks spilled to append-only segment files in one directory, under a quota.

Each store appends to its own temporary segment and publishes it by atomic rename when it
is sealed (full, or at close). Published files are never changed, only deleted whole. The
index (key -> segment, offset, length) lives in memory and is rebuilt from the published
segments' record headers on open and by refresh(). Every read is validated (see segment.py),
so a corrupt, torn or vanished record is a miss, never wrong bytes.

Several stores, in one or many processes or hosts, may share a directory: names never
collide, each indexes the others' segments after refresh(), and any of them may reclaim the
oldest segments to keep the directory under its quota. One lock serializes calls on a store.
"""
import errno
import logging
import mmap
import os
import threading
from dataclasses import dataclass, field

from ems import KEY_BYTES
from ems.errors import BufferNotWritableError, BufferSizeError, InvalidKeyError
from ems.pool import pid_alive
from ems.tiering import segment as fmt
from ems.tiering.io import open_backend

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 64 << 20

# Errors that mean the file system has no room. They stop spilling rather than fail one write.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Errors on a read that mean the segment file is gone (deleted, or stale on NFS).
_GONE = (errno.ENOENT, errno.ESTALE)


@dataclass
class _Segment:
    """A segment file in the store's index: this store's active one or a published one."""

    name: str  # published name, while the active segment is written under fmt.temp_name(name)
    path: str  # current path on disk
    size: int  # bytes on disk that count against the quota
    fd: int | None = None  # opened lazily for reads of published segments
    active: bool = False
    keys: list = field(default_factory=list)  # keys indexed in this segment


class SpillStore:
    """A block store on local or shared disk for blocks evicted from memory.

    directory: where segment files live (created if missing).
    quota_bytes: maximum bytes of segment files in the directory; the oldest whole segments
    are deleted to stay under it.
    io: "auto" (io_uring, else os.preadv/os.pwritev), "uring" or "posix".
    segment_bytes: size at which a segment is sealed and published.

    NOTE: keep segment_bytes well below quota_bytes. Reclaim deletes whole segments, so with
    a quota of only a segment or two, blocks reported stored can be reclaimed by the same call.
    """

    def __init__(self, directory, quota_bytes: int, io: str = "auto",
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, writer_id: str | None = None):
        if quota_bytes <= 0:
            raise ValueError(f"invalid quota_bytes {quota_bytes}; it must be positive")
        if segment_bytes < fmt.ALIGN:
            raise ValueError(f"invalid segment_bytes {segment_bytes}; the minimum is {fmt.ALIGN}")
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.quota_bytes = quota_bytes
        self.segment_bytes = segment_bytes
        self.writer_id = writer_id or fmt.new_writer_id()
        self._backend, self._io_fallback = open_backend(io)
        self._lock = threading.Lock()
        self._segments: dict[str, _Segment] = {}
        self._index: dict[bytes, tuple[str, int, int]] = {}
        self._active: _Segment | None = None
        self._sequence = 0
        self._direct = True
        self._spilling = True
        self._logged_segments: set[str] = set()
        self._counters = dict(hits=0, misses=0, checksum_failures=0, io_errors=0, spills=0,
                              spill_failures=0, enospc=0, reclaimed_segments=0)
        self._closed = False
        with self._lock:
            self._remove_dead_temps()
            self._refresh()
        log.info("spill store opened: directory=%s writer=%s io=%s blocks=%d",
                 self.directory, self.writer_id, self._backend.mode, len(self._index))

    # ---- public API ---------------------------------------------------------------------

    def put_many(self, keys, datas) -> list[bool]:
        """Spill each data under its key; return, per block, whether it was stored.

        A key already indexed is not written again and returns True, because keys name
        their content. A block is not stored when it alone exceeds the quota, or after the
        disk filled up (ENOSPC or EDQUOT), which stops spilling for the life of this store.
        """
        if len(keys) != len(datas):
            raise ValueError(f"put_many got {len(keys)} keys but {len(datas)} buffers")
        keys = [_check_key(key) for key in keys]
        views = [memoryview(data).cast("B") for data in datas]
        with self._lock:
            self._check_open()
            return self._put_many(keys, views)

    def get_many_into(self, keys, buffers) -> list[bool]:
        """Read each key's block into the start of its buffer; return, per block, whether it
        was found and valid. A buffer smaller than its block raises BufferSizeError."""
        if len(keys) != len(buffers):
            raise ValueError(f"get_many_into got {len(keys)} keys but {len(buffers)} buffers")
        keys = [_check_key(key) for key in keys]
        views = []
        for buffer in buffers:
            view = memoryview(buffer)
            if view.readonly:
                raise BufferNotWritableError("invalid read-only buffer: get_many_into requires writable buffers")
            views.append(view.cast("B"))
        with self._lock:
            self._check_open()
            return self._get_many_into(keys, views)

    def exists_many(self, keys) -> list[bool]:
        """Return, per key, whether the index has it (the record is validated only on read)."""
        with self._lock:
            return [bytes(key) in self._index for key in keys]

    def refresh(self) -> None:
        """Index segments other writers published since the last scan and forget deleted ones.

        NOTE: the quota counts published segments and this store's active one, so each
        other writer's active segment may take the directory past the quota until sealed.
        """
        with self._lock:
            self._check_open()
            self._refresh()

    def stats(self) -> dict:
        with self._lock:
            return dict(self._counters, bytes=self._used_bytes(), blocks=len(self._index),
                        segments=len(self._segments), io_mode=self._backend.mode,
                        io_fallback=self._io_fallback, direct_io=self._direct,
                        spilling=self._spilling, quota_bytes=self.quota_bytes)

    def close(self) -> None:
        """Publish the active segment and release files and the io_uring ring."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._seal()
            for seg in self._segments.values():
                _close_fd(seg)
            self._backend.close()
        log.info("spill store closed: directory=%s writer=%s", self.directory, self.writer_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- writing ------------------------------------------------------------------------

    def _put_many(self, keys, views):
        results = [False] * len(keys)
        pending = []  # (result index, key, view) bound for the active segment
        pending_bytes = 0
        pending_keys = {}  # key -> result index of its first occurrence in this call
        repeats = []  # (result index, result index of the first occurrence)

        # NOTE: the plan below is a Python loop per block. The bytes move in C (memoryview
        # copies, crc32c) and in one write per batch and segment.
        for i, (key, view) in enumerate(zip(keys, views)):
            if not self._spilling:
                break
            if key in self._index:
                results[i] = True
                continue
            if key in pending_keys:
                repeats.append((i, pending_keys[key]))
                continue
            size = fmt.record_bytes(view.nbytes)
            if size > self.quota_bytes:
                continue

            # Seal a full segment. A record larger than a segment gets a segment of its own.
            active_bytes = (self._active.size if self._active else 0) + pending_bytes
            if active_bytes and active_bytes + size > self.segment_bytes:
                self._flush(pending, results)
                pending, pending_bytes = [], 0
                self._seal()
                if not self._spilling:
                    break

            if not self._make_room(pending_bytes + size):
                # Only the active segment is left to reclaim: publish it and retry.
                self._flush(pending, results)
                pending, pending_bytes = [], 0
                self._seal()
                if not self._spilling or not self._make_room(size):
                    continue
            if self._active is None and not self._open_active():
                break
            pending.append((i, key, view))
            pending_bytes += size
            pending_keys[key] = i
        self._flush(pending, results)
        for i, first in repeats:
            results[i] = results[first]
        self._counters["spill_failures"] += results.count(False)
        return results

    def _make_room(self, incoming: int) -> bool:
        """Reclaim the oldest published segments until incoming more bytes fit the quota."""
        while self._used_bytes() + incoming > self.quota_bytes:
            victims = [name for name, seg in self._segments.items() if not seg.active]
            if not victims:
                return False
            self._reclaim(self._segments[min(victims)])
        return True

    def _flush(self, pending, results):
        """Write the pending records at the end of the active segment in one write."""
        if not pending or not self._spilling:
            return
        seg = self._active
        sizes = [fmt.record_bytes(view.nbytes) for _, _, view in pending]
        batch = mmap.mmap(-1, sum(sizes))  # page-aligned and zero-filled, as O_DIRECT needs
        whole = memoryview(batch)
        offset = 0
        for (_, key, view), size in zip(pending, sizes):
            fmt.pack_record(whole[offset:offset + size], key, view)
            offset += size

        try:
            self._backend.write(seg.fd, seg.size, whole)
        except OSError as error:
            self._write_failed(error, seg)
            return

        offset = seg.size
        for (i, key, view), size in zip(pending, sizes):
            self._index[key] = (seg.name, offset, view.nbytes)
            seg.keys.append(key)
            results[i] = True
            offset += size
        seg.size = offset
        self._counters["spills"] += len(pending)

    def _write_failed(self, error: OSError, seg: _Segment | None):
        if error.errno in _NO_SPACE:
            self._counters["enospc"] += 1
            if self._spilling:
                log.warning("spill directory %s is full (%s); spilling stopped, reads go on",
                            self.directory, error)
            self._spilling = False
            self._seal()
        else:
            self._counters["io_errors"] += 1
            log.warning("spill write failed: segment=%s error=%s",
                        seg.path if seg else self.directory, error)

    def _open_active(self) -> bool:
        name = fmt.segment_name(self.writer_id, self._sequence)
        self._sequence += 1
        path = os.path.join(self.directory, fmt.temp_name(name))
        try:
            fd = self._open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except OSError as error:
            self._write_failed(error, None)
            return False
        self._active = _Segment(name, path, 0, fd, active=True)
        self._segments[name] = self._active
        return True

    def _seal(self):
        """Publish the active segment by atomic rename, or delete it if it contains no record."""
        seg, self._active = self._active, None
        if seg is None:
            return
        seg.active = False
        if seg.size == 0:
            self._drop(seg)
            return
        published = os.path.join(self.directory, seg.name)
        try:
            os.ftruncate(seg.fd, seg.size)  # cut a failed write's tail
            os.fsync(seg.fd)
            os.rename(seg.path, published)
        except OSError as error:
            log.warning("failed to publish segment %s: %s; its blocks are dropped", seg.path, error)
            self._drop(seg)
            return
        seg.path = published

    # ---- reading ------------------------------------------------------------------------

    def _get_many_into(self, keys, views):
        results = [False] * len(keys)
        plan = []  # (result index, key, segment, offset, length)
        for i, (key, view) in enumerate(zip(keys, views)):
            location = self._index.get(key)
            if location is None:
                continue
            name, offset, length = location
            if view.nbytes < length:
                raise BufferSizeError(f"buffer {i} has {view.nbytes} bytes but the block has {length}")
            seg = self._segments.get(name)
            if seg is None or not self._open_for_read(seg):
                continue
            plan.append((i, key, seg, offset, length))

        # One aligned buffer for the batch; each record is read whole, header to padding.
        sizes = [fmt.record_bytes(length) for *_, length in plan]
        if plan:
            batch = mmap.mmap(-1, sum(sizes))
            whole = memoryview(batch)
            requests, start = [], 0
            for (_, _, seg, offset, _), size in zip(plan, sizes):
                requests.append((seg.fd, offset, whole[start:start + size]))
                start += size
            outcomes = self._backend.read_many(requests)
            for (i, key, seg, _, length), (_, _, record), outcome in zip(plan, requests, outcomes):
                results[i] = self._accept(key, seg, length, record, outcome, views[i])

        hits = sum(results)
        self._counters["hits"] += hits
        self._counters["misses"] += len(keys) - hits
        return results

    def _accept(self, key, seg, length, record, outcome, out) -> bool:
        """Copy a read record's payload into out if it is valid; count and log it if not."""
        if isinstance(outcome, OSError):
            self._counters["io_errors"] += 1
            self._log_once(seg, "spill read failed: segment=%s error=%s", seg.path, outcome)
            if outcome.errno in _GONE:
                self._forget(seg)
            return False
        payload = fmt.check_record(record[:outcome], key, length)
        if payload is None:
            self._counters["checksum_failures"] += 1
            self._log_once(seg, "spill record failed validation: segment=%s key=%s",
                           seg.path, key.hex())
            if self._index.get(key, (None,))[0] == seg.name:
                del self._index[key]
            return False
        out[:length] = payload
        return True

    def _open_for_read(self, seg: _Segment) -> bool:
        if seg.fd is not None:
            return True
        try:
            seg.fd = self._open(seg.path, os.O_RDONLY)
        except OSError as error:
            self._counters["io_errors"] += 1
            self._log_once(seg, "spill segment cannot be opened: %s (%s)", seg.path, error)
            self._forget(seg)
            return False
        return True

    # ---- index and files ----------------------------------------------------------------

    def _refresh(self):
        try:
            names = sorted(n for n in os.listdir(self.directory) if fmt.is_published(n))
        except OSError as error:
            log.warning("cannot list spill directory %s: %s", self.directory, error)
            return
        present = set(names)
        for seg in [s for s in self._segments.values() if not s.active and s.name not in present]:
            self._forget(seg)
        for name in names:
            if name not in self._segments:
                self._scan(name)

    def _scan(self, name: str):
        """Index the records of a published segment, stopping at the first invalid header or
        at a record the file is too short to hold (a torn tail)."""
        seg = _Segment(name, os.path.join(self.directory, name), 0)
        try:
            fd = self._open(seg.path, os.O_RDONLY)
        except FileNotFoundError:
            return  # deleted by another writer between listdir and open
        except OSError as error:
            log.warning("cannot open spill segment %s: %s; skipped", seg.path, error)
            return
        try:
            file_bytes = os.fstat(fd).st_size
            page = mmap.mmap(-1, fmt.ALIGN)
            view = memoryview(page)
            offset = 0
            # NOTE: one read per record; segments of many small records rescan slowly.
            while offset + fmt.HEADER_BYTES <= file_bytes:
                outcome = self._backend.read_many([(fd, offset, view)])[0]
                if isinstance(outcome, OSError):
                    log.warning("spill segment scan failed: %s at offset %d: %s",
                                seg.path, offset, outcome)
                    break
                header = fmt.parse_header(view[:outcome])
                if header is None:
                    break
                end = offset + fmt.record_bytes(header.length)
                if end > file_bytes:
                    break
                self._index[header.key] = (name, offset, header.length)
                seg.keys.append(header.key)
                offset = end
        finally:
            os.close(fd)
        if offset < file_bytes:
            log.warning("spill segment %s has %d bytes past its last valid record; ignored",
                        seg.path, file_bytes - offset)
        seg.size = file_bytes
        self._segments[name] = seg

    def _reclaim(self, seg: _Segment):
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass  # another writer reclaimed it first
        except OSError as error:
            log.warning("cannot delete spill segment %s: %s", seg.path, error)
        self._counters["reclaimed_segments"] += 1
        self._forget(seg)

    def _drop(self, seg: _Segment):
        """Delete a segment of this writer that never got published."""
        try:
            os.unlink(seg.path)
        except OSError as error:
            log.warning("cannot delete unpublished spill segment %s: %s", seg.path, error)
        self._forget(seg)

    def _forget(self, seg: _Segment):
        """Remove a segment and the index entries that point into it."""
        _close_fd(seg)
        self._segments.pop(seg.name, None)
        for key in seg.keys:
            if self._index.get(key, (None,))[0] == seg.name:
                del self._index[key]
        seg.keys = []

    def _remove_dead_temps(self):
        """Delete temporary segments left by crashed writers on this host.

        NOTE: their records are lost rather than recovered. Only a pid that no longer exists
        marks a writer dead, so a reused pid keeps its temporary file until the next open.
        """
        host = fmt.host_tag()
        for name in os.listdir(self.directory):
            owner = fmt.temp_owner(name)
            if owner is None or owner[0] != host or pid_alive(owner[1]):
                continue
            try:
                os.unlink(os.path.join(self.directory, name))
                log.info("deleted temporary spill segment %s of a writer that exited", name)
            except OSError as error:
                log.warning("cannot delete temporary spill segment %s: %s", name, error)

    def _open(self, path: str, flags: int) -> int:
        """Open with O_DIRECT, or without it where the file system rejects it (logged once)."""
        if self._direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self._direct = False
                log.warning("O_DIRECT is not supported in %s; spill I/O goes through the page cache",
                            self.directory)
        return os.open(path, flags, 0o644)

    def _used_bytes(self) -> int:
        return sum(seg.size for seg in self._segments.values())

    def _log_once(self, seg: _Segment, message: str, *args):
        if seg.name not in self._logged_segments:
            self._logged_segments.add(seg.name)
            log.warning(message, *args)

    def _check_open(self):
        if self._closed:
            raise ValueError(f"spill store {self.directory} is closed")


def _check_key(key) -> bytes:
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise InvalidKeyError(f"invalid key of {len(key)} bytes; keys are {KEY_BYTES} bytes")
    return key


def _close_fd(seg: _Segment):
    if seg.fd is not None:
        try:
            os.close(seg.fd)
        except OSError:
            pass
        seg.fd = None
