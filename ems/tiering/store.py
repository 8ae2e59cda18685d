"""SpillStore: blocks spilled to append-only segment files in one directory, under a quota.

Each store appends to its own temporary segment and publishes it by atomic rename when it
is sealed (full, or at close). Published files are never changed, only deleted whole. The
index (key -> segment, offset, length) lives in memory and is rebuilt from the published
segments' record headers on open and by refresh(). Every read is validated (see segment.py),
so a corrupt, torn or vanished record is a miss, never wrong bytes.

Several stores, in one or many processes or hosts, may share a directory: names never
collide, each indexes the others' segments after refresh(), and any of them may reclaim the
oldest segments to keep the directory under its quota. One lock serializes calls on a store.

Records are written and read with up to `depth` requests in flight, one request per record,
through a staging area of aligned buffers that is reused between calls. A record is dead when
the index no longer points to it (its key was deleted, indexed again in a newer segment, or
dropped after failing validation). Compaction rewrites the live records of this store's
mostly dead segments into a new segment, publishes it, and only then deletes the old file.
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
from ems.tiering.io import DEFAULT_DEPTH, MAX_DEPTH, READ, WRITE, open_backend

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 64 << 20
# A segment of this store is compacted once this fraction of its bytes is dead.
DEFAULT_COMPACT_DEAD_FRACTION = 0.5
# Bytes of staging buffers for requests in flight. Blocks so large that depth + 1 of them
# exceed it get fewer requests in flight, and always at least one.
# NOTE: the staging area only grows and lives as long as the store (with io_uring, as long
# as the process), so one block above this size keeps a staging area of its size.
MAX_STAGING_BYTES = 64 << 20

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
    own: bool = False  # written by this store, so this store may compact it
    keys: list = field(default_factory=list)  # keys indexed in this segment, dead ones too
    live: int = 0  # record bytes of the records the index points to
    reserved: int = 0  # file size set by ftruncate ahead of writes (active segment only)


class SpillStore:
    """A block store on local or shared disk for blocks evicted from memory.

    directory: where segment files live (created if missing).
    quota_bytes: maximum bytes of segment files in the directory; the oldest whole segments
    are deleted to stay under it.
    io: "auto" (io_uring, else os.preadv/os.pwritev), "uring" or "posix".
    segment_bytes: size at which a segment is sealed and published.
    depth: maximum reads or writes in flight at once with io_uring (1 to 4096). The posix
    backend does one at a time.
    compact_dead_fraction: fraction of a segment's bytes that must be dead before
    delete_many(), refresh() or compact() rewrites it (0 < fraction <= 1).
    read_only: the store only reads (put_many raises PermissionError); for a process that
    looks up what another one spills, such as the vLLM scheduler.

    Capacity: before a write would take the directory past quota_bytes, the oldest published
    segments (by creation time in their names, any writer's) are deleted whole. A published
    segment of this store whose dead bytes reach compact_dead_fraction of its size is
    compacted: its live records are copied into the active segment, that segment is
    published, and the old file is deleted, which frees the dead bytes. Copied records count
    as new for the oldest-first order. Compaction is skipped while the copy would not fit the
    quota without reclaiming, and it never touches other writers' segments or this
    directory's segments from before this store was opened, which only reclaim removes.

    NOTE: keep segment_bytes well below quota_bytes. Reclaim deletes whole segments, so with
    a quota of only a segment or two, blocks reported stored can be reclaimed by the same call.
    """

    def __init__(self, directory, quota_bytes: int, io: str = "auto",
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, writer_id: str | None = None,
                 *, depth: int = DEFAULT_DEPTH,
                 compact_dead_fraction: float = DEFAULT_COMPACT_DEAD_FRACTION,
                 read_only: bool = False):
        if quota_bytes <= 0:
            raise ValueError(f"invalid quota_bytes {quota_bytes}; it must be positive")
        if segment_bytes < fmt.ALIGN:
            raise ValueError(f"invalid segment_bytes {segment_bytes}; the minimum is {fmt.ALIGN}")
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"invalid depth {depth}; expected 1 to {MAX_DEPTH}")
        if not 0 < compact_dead_fraction <= 1:
            raise ValueError(f"invalid compact_dead_fraction {compact_dead_fraction}; "
                             "expected more than 0 and at most 1")
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.quota_bytes = quota_bytes
        self.segment_bytes = segment_bytes
        self.compact_dead_fraction = compact_dead_fraction
        self.writer_id = writer_id or fmt.new_writer_id()
        self.read_only = read_only
        self._backend, self._io_fallback = open_backend(io, depth)
        self._lock = threading.Lock()
        self._segments: dict[str, _Segment] = {}
        self._index: dict[bytes, tuple[str, int, int]] = {}
        self._active: _Segment | None = None
        self._sequence = 0
        self._direct = True
        self._spilling = True
        self._staging: mmap.mmap | None = None
        self._scan_page = memoryview(mmap.mmap(-1, fmt.ALIGN))  # header reads of _scan
        self._logged_segments: set[str] = set()
        self._counters = dict(hits=0, misses=0, checksum_failures=0, io_errors=0, spills=0,
                              spill_failures=0, enospc=0, reclaimed_segments=0,
                              evicted_blocks=0, deleted_blocks=0, compacted_segments=0,
                              compacted_blocks=0)
        self._closed = False
        with self._lock:
            self._remove_dead_temps()
            self._refresh()
        log.info("spill store opened: directory=%s writer=%s io=%s depth=%d blocks=%d",
                 self.directory, self.writer_id, self._backend.mode, self._backend.depth,
                 len(self._index))

    # ---- public API ---------------------------------------------------------------------

    def put_many(self, keys, datas) -> list[bool]:
        """Spill each data under its key; return, per block, whether it was stored.

        A key already indexed is not written again and returns True, because keys name
        their content. A block is not stored when it alone exceeds the quota, or after the
        disk filled up (ENOSPC or EDQUOT), which stops spilling for the life of this store.
        """
        if len(keys) != len(datas):
            raise ValueError(f"put_many got {len(keys)} keys but {len(datas)} buffers")
        if self.read_only:
            raise PermissionError(f"spill store {self.directory} was opened read-only")
        keys = [_check_key(key) for key in keys]
        views = [memoryview(data).cast("B") for data in datas]
        with self._lock:
            self._check_open()
            results = self._put_many(keys, views)
            self._counters["spill_failures"] += results.count(False)
            return results

    def lengths(self, keys) -> list[int | None]:
        """Return, per key, the length of its indexed block, or None where it has none."""
        with self._lock:
            entries = [self._index.get(bytes(key)) for key in keys]
        return [None if entry is None else entry[2] for entry in entries]

    def publish(self) -> bool:
        """Publish the open segment now, so other stores on the directory index its blocks
        at their next refresh; later puts start a new segment. Returns whether one was."""
        with self._lock:
            self._check_open()
            return self._seal()

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
            results = self._get_many_into(keys, views)
            hits = sum(results)
            self._counters["hits"] += hits
            self._counters["misses"] += len(keys) - hits
            return results

    def exists_many(self, keys) -> list[bool]:
        """Return, per key, whether the index has it (the record is validated only on read)."""
        with self._lock:
            return [bytes(key) in self._index for key in keys]

    def delete_many(self, keys) -> list[bool]:
        """Remove each key from the index; return, per key, whether it was indexed.

        Files are not changed, so the space comes back when compaction rewrites a mostly
        dead segment (run at the end of this call) or when quota reclaim deletes it.
        NOTE: a delete is not written to disk. After a restart, or in another store on the
        same directory, the block is found again until its segment is compacted or reclaimed.
        Keys name their content, so such a block is stale, never wrong.
        """
        keys = [_check_key(key) for key in keys]
        with self._lock:
            self._check_open()
            results = [self._unindex(key) for key in keys]
            self._counters["deleted_blocks"] += sum(results)
            self._compact()
            return results

    def compact(self) -> int:
        """Compact every segment of this store whose dead bytes reach compact_dead_fraction;
        return how many segments were rewritten and deleted."""
        with self._lock:
            self._check_open()
            return self._compact()

    def refresh(self) -> None:
        """Index segments other writers published since the last scan, forget deleted ones,
        and compact this store's segments that newer copies of their keys left mostly dead.

        NOTE: the quota counts published segments and this store's active one, so each
        other writer's active segment may take the directory past the quota until sealed.
        """
        with self._lock:
            self._check_open()
            self._refresh()
            self._compact()

    def stats(self) -> dict:
        with self._lock:
            dead = sum(seg.size - seg.live for seg in self._segments.values())
            return dict(self._counters, bytes=self._used_bytes(), dead_bytes=dead,
                        blocks=len(self._index), segments=len(self._segments),
                        io_mode=self._backend.mode, io_fallback=self._io_fallback,
                        depth=self._backend.depth, direct_io=self._direct,
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

    def _put_many(self, keys, views, counter="spills"):
        """Store the blocks not yet indexed; count the records written under counter."""
        results = [False] * len(keys)
        pending = []  # (result index, key, view) bound for the active segment
        pending_bytes = 0
        pending_keys = {}  # key -> result index of its first occurrence in this call
        repeats = []  # (result index, result index of the first occurrence)

        # NOTE: the plan below is a Python loop per block. The bytes move in C (memoryview
        # copies, crc32c) and in the kernel, with up to `depth` writes in flight.
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
                self._flush(pending, results, counter)
                pending, pending_bytes = [], 0
                self._seal()
                if not self._spilling:
                    break

            if not self._make_room(pending_bytes + size):
                # Only the active segment is left to reclaim: publish it and retry.
                self._flush(pending, results, counter)
                pending, pending_bytes = [], 0
                self._seal()
                if not self._spilling or not self._make_room(size):
                    continue
            if self._active is None and not self._open_active():
                break
            pending.append((i, key, view))
            pending_bytes += size
            pending_keys[key] = i
        self._flush(pending, results, counter)
        for i, first in repeats:
            results[i] = results[first]
        return results

    def _make_room(self, incoming: int) -> bool:
        """Reclaim the oldest published segments until incoming more bytes fit the quota."""
        while self._used_bytes() + incoming > self.quota_bytes:
            victims = [name for name, seg in self._segments.items() if not seg.active]
            if not victims:
                return False
            self._reclaim(self._segments[min(victims)])
        return True

    def _flush(self, pending, results, counter):
        """Append the pending records to the active segment and index those written."""
        if not pending or not self._spilling:
            return
        seg = self._active
        written, error = self._write_records(seg, [(key, view) for _, key, view in pending])

        offset = seg.size
        for i, key, view in pending[:written]:
            self._index_put(key, seg, offset, view.nbytes)
            seg.keys.append(key)
            results[i] = True
            offset += fmt.record_bytes(view.nbytes)
        seg.size = offset
        self._counters[counter] += written
        if error is not None:
            self._write_failed(error, seg)

    def _write_records(self, seg: _Segment, records) -> tuple[int, OSError | None]:
        """Write (key, payload) records one after another from seg.size, one write request
        per record and up to depth in flight.

        Return (written, error): the records before the first failed one are on the file,
        and error is that failure or None. Records after it may be on the file too, but
        seg.size excludes them, so the next write or the seal's ftruncate removes them.
        """
        sizes = [fmt.record_bytes(view.nbytes) for _, view in records]
        offsets = []
        end = seg.size
        for size in sizes:
            offsets.append(end)
            end += size

        # Set the file size before writing. ext4 waits inside the submission for an O_DIRECT
        # write that extends the file (IOMAP_DIO_FORCE_WAIT in fs/ext4/file.c), so appends
        # would run one at a time whatever the depth. On ext4 with kernel 6.18 this raised
        # 256 KiB writes by about a quarter at depth 1 and at depth 32.
        if end > seg.reserved:
            try:
                os.ftruncate(seg.fd, end)
            except OSError as error:
                return 0, error
            seg.reserved = end

        backend = self._backend
        slots = self._staging_slots(max(sizes), len(records))
        free = list(range(len(slots)))
        slot_of = [0] * len(records)
        failures = {}  # record index -> OSError
        packed = 0  # records packed into a slot; the last one may wait for a free request
        submitted = 0

        def pack_next():
            nonlocal packed
            slot_of[packed] = slot = free.pop()
            key, payload = records[packed]
            fmt.pack_record(slots[slot][:sizes[packed]], key, payload)
            packed += 1

        try:
            # Queueing stops at the first failure, since no record after it will be indexed.
            while (submitted < len(records) and not failures) or backend.in_flight:
                while (submitted < len(records) and not failures
                       and backend.in_flight < backend.depth and (packed > submitted or free)):
                    if packed == submitted:
                        pack_next()
                    view = slots[slot_of[submitted]][:sizes[submitted]]
                    backend.submit(WRITE, seg.fd, offsets[submitted], view, submitted)
                    submitted += 1
                # Pack the next record while the device works on those in flight.
                if packed == submitted < len(records) and free and not failures:
                    pack_next()
                for index, outcome in backend.complete():
                    free.append(slot_of[index])
                    if isinstance(outcome, OSError):
                        failures[index] = outcome
        finally:
            backend.drain()

        if not failures:
            return len(records), None
        first = min(failures)
        return first, failures[first]

    def _write_failed(self, error: OSError, seg: _Segment | None):
        if error.errno in _NO_SPACE:
            self._counters["enospc"] += 1
            if self._spilling:
                log.warning("spill directory %s is full (%s); spilling stopped, reads go on",
                            self.directory, error,
                            extra={"spill_dir": self.directory, "errno": error.errno})
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
        self._active = _Segment(name, path, 0, fd, active=True, own=True)
        self._segments[name] = self._active
        return True

    def _seal(self) -> bool:
        """Publish the active segment by atomic rename, or delete it if it contains no record.

        Return whether a segment was published.
        """
        seg, self._active = self._active, None
        if seg is None:
            return False
        seg.active = False
        if seg.size == 0:
            self._drop(seg)
            return False
        published = os.path.join(self.directory, seg.name)
        try:
            os.ftruncate(seg.fd, seg.size)  # cut a failed write's tail and unused reserved bytes
            os.fsync(seg.fd)
            os.rename(seg.path, published)
        except OSError as error:
            log.warning("failed to publish segment %s: %s; its blocks are dropped", seg.path, error)
            self._drop(seg)
            return False
        seg.path = published
        seg.reserved = 0
        return True

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
        if not plan:
            return results

        # Each record is read whole, header to padding, into a staging slot, checked, and its
        # payload copied out, while up to depth other reads are in flight.
        backend = self._backend
        sizes = [fmt.record_bytes(length) for *_, length in plan]
        slots = self._staging_slots(max(sizes), len(plan))
        free = list(range(len(slots)))
        slot_of = [0] * len(plan)
        # Names of segments whose file is gone, forgotten once no read in flight uses their fd.
        vanished = set()
        submitted = 0

        def submit_more():
            nonlocal submitted
            while submitted < len(plan) and free and backend.in_flight < backend.depth:
                seg, offset = plan[submitted][2], plan[submitted][3]
                if seg.name not in vanished:
                    slot_of[submitted] = slot = free.pop()
                    backend.submit(READ, seg.fd, offset, slots[slot][:sizes[submitted]], submitted)
                submitted += 1

        try:
            while submitted < len(plan) or backend.in_flight:
                submit_more()
                # Each time a slot is free again, queue another read before checking and
                # copying out the next finished record, so the device is not idle meanwhile.
                for index, outcome in backend.complete():
                    submit_more()
                    i, key, seg, _, length = plan[index]
                    record = slots[slot_of[index]]
                    results[i] = self._accept(key, seg, length, record, outcome, views[i], vanished)
                    free.append(slot_of[index])
        finally:
            backend.drain()
        for seg in {p[2] for p in plan if p[2].name in vanished}:
            self._forget(seg)
        return results

    def _accept(self, key, seg, length, record, outcome, out, vanished) -> bool:
        """Copy a read record's payload into out if it is valid; count and log it if not.

        The name of a segment whose file is gone is added to vanished for the caller to forget.
        """
        if isinstance(outcome, OSError):
            self._counters["io_errors"] += 1
            self._log_once(seg, "spill read failed: segment=%s error=%s", seg.path, outcome)
            if outcome.errno in _GONE:
                vanished.add(seg.name)
            return False
        payload = fmt.check_record(record[:outcome], key, length)
        if payload is None:
            self._counters["checksum_failures"] += 1
            self._log_once(seg, "spill record failed validation: segment=%s key=%s",
                           seg.path, key.hex())
            if self._index.get(key, (None,))[0] == seg.name:
                self._unindex(key)
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

    def _staging_slots(self, slot_bytes: int, count: int) -> list[memoryview]:
        """Return up to depth + 1 aligned buffers of slot_bytes each, reusing the staging mmap.

        The slot beyond depth lets the CPU prepare or check one record while depth requests
        are in flight. An mmap is page-aligned, and slot_bytes is a multiple of ALIGN, so every
        slot suits O_DIRECT. The caller must not hold the slots past the end of its call.
        """
        slots = max(1, min(self._backend.depth + 1, count, MAX_STAGING_BYTES // slot_bytes))
        need = slots * slot_bytes
        if self._staging is None or len(self._staging) < need:
            # Grow at least twofold up to the cap, because a replaced area that io_uring used
            # is never unmapped (see UringBackend) and so must be replaced rarely.
            grown = 2 * len(self._staging) if self._staging is not None else 0
            self._staging = mmap.mmap(-1, max(need, min(grown, MAX_STAGING_BYTES)))
        whole = memoryview(self._staging)
        return [whole[i * slot_bytes:(i + 1) * slot_bytes] for i in range(slots)]

    # ---- compaction ---------------------------------------------------------------------

    def _compact(self) -> int:
        """Compact this store's published segments whose dead bytes reach the threshold,
        oldest first; return how many were deleted."""
        candidates = sorted(
            name for name, seg in self._segments.items()
            if seg.own and not seg.active and seg.size
            and seg.size - seg.live >= self.compact_dead_fraction * seg.size)
        compacted = 0
        for name in candidates:
            seg = self._segments.get(name)  # an earlier round may have reclaimed it
            if seg is not None and self._compact_segment(seg):
                compacted += 1
        return compacted

    def _compact_segment(self, seg: _Segment) -> bool:
        """Move seg's live records to a new published segment, then delete seg.

        Return whether seg was deleted. Step order keeps every published record readable
        after a crash at any point: the old file is deleted only after the new one is
        renamed into place, fsynced, and the directory fsynced. A crash before that leaves a
        temporary segment, which the next open deletes, and the old file intact.
        """
        # Step 1: collect the live records, and check that a copy of them fits the quota
        # without reclaiming anything.
        live = {}
        for key in seg.keys:
            location = self._index.get(key)
            if location is not None and location[0] == seg.name:
                live[key] = location
        live_bytes = sum(fmt.record_bytes(length) for _, _, length in live.values())
        if live and not self._spilling:
            return False
        if self._used_bytes() + live_bytes > self.quota_bytes:
            log.info("spill segment %s not compacted: %d live bytes do not fit the quota",
                     seg.path, live_bytes)
            return False

        # Step 2: read and validate the live records. One that fails validation is dropped.
        keys = list(live)
        buffers = [bytearray(live[key][2]) for key in keys]
        views = [memoryview(buffer) for buffer in buffers]
        found = self._get_many_into(keys, views) if keys else []
        moved = [(key, view) for key, view, ok in zip(keys, views, found) if ok]
        if self._segments.get(seg.name) is not seg:
            return False  # the file vanished under the read

        # Step 3: write them to the active segment and publish it. The keys leave the index
        # first, so the write path does not skip them as already stored.
        if moved:
            for key, _ in moved:
                self._unindex(key)
            stored = self._put_many([key for key, _ in moved], [view for _, view in moved],
                                    counter="compacted_blocks")
            published = self._seal() and self._fsync_directory()
            lost = [key for (key, _), ok in zip(moved, stored) if not ok or key not in self._index]
            if lost or not published:
                # Point the keys not safely copied back at the old file, which is kept.
                for key in lost:
                    self._index_put(key, seg, live[key][1], live[key][2])
                log.warning("compaction of spill segment %s stopped: %d of %d live records "
                            "not copied or not published; the segment is kept",
                            seg.path, len(lost), len(moved))
                return False

        # Step 4: delete the old file.
        self._delete_file(seg)
        self._counters["compacted_segments"] += 1
        self._forget(seg)
        return True

    def _fsync_directory(self) -> bool:
        """Make renames in the directory durable; return False (logged) if that failed."""
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            log.warning("cannot fsync spill directory %s: %s", self.directory, error)
            return False
        return True

    # ---- index and files ----------------------------------------------------------------

    def _index_put(self, key: bytes, seg: _Segment, offset: int, length: int):
        """Point key at a record of seg, making any record it pointed to before dead."""
        self._unindex(key)
        self._index[key] = (seg.name, offset, length)
        seg.live += fmt.record_bytes(length)

    def _unindex(self, key: bytes) -> bool:
        """Remove key from the index; return whether it was there."""
        location = self._index.pop(key, None)
        if location is None:
            return False
        seg = self._segments.get(location[0])
        if seg is not None:
            seg.live -= fmt.record_bytes(location[2])
        return True

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
        self._segments[name] = seg
        try:
            file_bytes = os.fstat(fd).st_size
            view = self._scan_page
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
                self._index_put(header.key, seg, offset, header.length)
                seg.keys.append(header.key)
                offset = end
        finally:
            os.close(fd)
        if offset < file_bytes:
            log.warning("spill segment %s has %d bytes past its last valid record; ignored",
                        seg.path, file_bytes - offset)
        seg.size = file_bytes

    def _reclaim(self, seg: _Segment):
        self._delete_file(seg)
        self._counters["reclaimed_segments"] += 1
        self._counters["evicted_blocks"] += self._forget(seg)

    def _delete_file(self, seg: _Segment):
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass  # another writer reclaimed it first
        except OSError as error:
            log.warning("cannot delete spill segment %s: %s", seg.path, error)

    def _drop(self, seg: _Segment):
        """Delete a segment of this writer that never got published."""
        try:
            os.unlink(seg.path)
        except OSError as error:
            log.warning("cannot delete unpublished spill segment %s: %s", seg.path, error)
        self._forget(seg)

    def _forget(self, seg: _Segment) -> int:
        """Remove a segment and the index entries that point into it, and return how many
        entries were removed."""
        _close_fd(seg)
        self._segments.pop(seg.name, None)
        removed = 0
        for key in seg.keys:
            if self._index.get(key, (None,))[0] == seg.name:
                del self._index[key]
                removed += 1
        seg.keys = []
        seg.live = 0
        return removed

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
