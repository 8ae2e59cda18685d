"""SpillTier: the DRAM pool backed by a SpillStore, as one cache with two levels.

Blocks move down and up like this:
  down  the pool copies each block it evicts into its spill ring (C, under the pool
        mutex). The tier's background thread drains the ring in batches and appends the
        blocks to the store. Blocks already on disk are flagged in the pool, so evicting
        them again copies nothing. The "session" policy also moves whole sessions down
        before the pool fills (see _evict_sessions).
  up    a DRAM miss that the store has is read from disk straight into the caller's
        buffer, then put back into the pool (promotion). prefetch(keys) queues the same
        for the background thread and returns at once.

Python runs once per batch here, never per byte: the ring drain, the store and the pool
all take lists of keys and buffers.

Thread safety: every public method may be called from any thread. The store serializes
its own calls; the tier's lock guards only the session table and the prefetch queue.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

from ems import KEY_BYTES
from ems.errors import BufferSizeError
from ems.tiering.store import DEFAULT_SEGMENT_BYTES, SpillStore

log = logging.getLogger(__name__)

POLICIES = ("clock", "session")
# Modes of the transfer server's miss handler (ems._core.MISS_*).
MISS_LOAD, MISS_PROBE, MISS_PREFETCH, MISS_DELETE = 0, 1, 2, 3
# Counters of SpillTier.stats(), in blocks unless the name says bytes.
COUNTERS = ("hits", "misses", "promotions", "spills", "spill_failures", "spilled_bytes",
            "prefetch_requested", "prefetched", "prefetch_misses", "sessions_evicted",
            "background_errors")
DEFAULT_RING_BYTES = 64 << 20
DRAIN_BYTES = 16 << 20          # bytes moved per drain batch: bounds how long a read waits
TICK_S = 0.02                   # background loop period while idle
IDLE_PUBLISH_S = 0.5            # an unpublished segment idle this long is published
REFRESH_INTERVAL_S = 0.5        # shared directories: rescan for other writers at most this often
HIGH_WATERMARK = 0.90           # session policy: start moving sessions down above this use
LOW_WATERMARK = 0.80            # ... and stop below this


def open_tier(pool, directory, quota_bytes: int, *, io: str = "auto", policy: str = "clock",
              shared: bool = False, ring_bytes: int | None = None,
              writer_id: str | None = None) -> "SpillTier":
    """Open (or reopen, indexing what is already there) a spill directory under `pool`."""
    if ring_bytes is None:
        ring_bytes = max(DEFAULT_RING_BYTES, 2 * pool.max_block_size)
    # Quota reclaim deletes whole segments, so a segment is at most an eighth of the quota.
    segment = max(1 << 20, min(DEFAULT_SEGMENT_BYTES, quota_bytes // 8))
    store = SpillStore(directory, quota_bytes, io=io, writer_id=writer_id, segment_bytes=segment)
    try:
        return SpillTier(pool, store, ring_bytes=ring_bytes, policy=policy, shared=shared)
    except BaseException:
        store.close()
        raise


class SpillTier:
    """Attach a spill store under an owner pool.

    pool          an owner ems.Pool; the tier sets its spill ring and reads its stats.
    store         an open SpillStore; the tier closes it on close().
    ring_bytes    the pool's eviction ring. An eviction that finds the ring full is lost
                  (counted as spill_dropped in the pool stats), so size it for the bytes
                  evicted in one TICK_S while the disk is busy.
    policy        "clock": the pool's CLOCK decides what leaves DRAM. "session": blocks
                  tagged with a session through touch() leave DRAM a whole session at a
                  time, longest-unused first, once the pool is HIGH_WATERMARK full; CLOCK
                  still handles untagged blocks and anything the tier has not moved yet.
    shared        True when other processes or hosts also write the directory: misses
                  rescan it (at most every REFRESH_INTERVAL_S) before they count.
    """

    def __init__(self, pool, store: SpillStore, *, ring_bytes: int = DEFAULT_RING_BYTES,
                 policy: str = "clock", shared: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {POLICIES}, got {policy!r}")
        max_block = pool.max_block_size
        if ring_bytes < 2 * max_block:
            raise ValueError(f"ring_bytes {ring_bytes} is too small: it must hold at least "
                             f"two of the pool's largest blocks ({2 * max_block} bytes)")
        self.pool = pool
        self.store = store
        self.policy = policy
        self.shared = shared
        pool.set_spill_ring(ring_bytes)
        # The ring drain's buffer (under _drain_lock) and the background thread's own.
        self._ring_buffer = bytearray(max(DRAIN_BYTES, max_block))
        self._work_buffer = bytearray(max(DRAIN_BYTES, max_block))
        self._drain_lock = threading.Lock()
        # Serializes what writes DRAM under a key the tier also holds: promotion (a put and
        # its SPILLED mark), deletes, and the puts of an EmbeddedClient over this tier.
        self.write_lock = threading.Lock()

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._prefetch: collections.deque[list[bytes]] = collections.deque()
        self._protect_after: set[bytes] = set()
        self._protected: set[bytes] = set()     # keys protected through this tier
        # session id -> (last use, monotonic seconds; keys of the session seen so far)
        self._sessions: dict[bytes, tuple[float, set[bytes]]] = {}
        self._last_refresh = 0.0
        self._last_spill = 0.0
        self._unpublished = False
        self._counters = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ems-spill", daemon=True)
        self._thread.start()

    # ---- reads ------------------------------------------------------------------------

    def read_into(self, keys: list[bytes], buffers: list) -> list[bool]:
        """Read DRAM misses from disk into their buffers and promote the hits into the pool.
        Returns a hit flag per key. A buffer of the wrong size raises BufferSizeError."""
        if not keys:
            return []
        for key, length, buffer in zip(keys, self.store.lengths(keys), buffers):
            size = memoryview(buffer).nbytes
            if length is not None and length != size:
                raise BufferSizeError(f"buffer of {size} bytes does not match the {length}-byte "
                                      f"block stored under key {bytes(key).hex()}")
        found = self._read_store(keys, buffers)
        hits = [key for key, ok in zip(keys, found) if ok]
        if hits:
            self._promote(hits, [buf for buf, ok in zip(buffers, found) if ok])
            self._counters["hits"] += len(hits)
        self._counters["misses"] += len(keys) - len(hits)
        return found

    def probe(self, keys: list[bytes]) -> list[bool]:
        """Say, per key, whether the store indexes it (records are validated on read)."""
        if not keys:
            return []
        present = self.store.exists_many(keys)
        if not all(present):
            self._drain()
            present = self.store.exists_many(keys)
        if self.shared and not all(present) and self._refresh_due():
            present = self.store.exists_many(keys)
        return present

    def prefetch(self, keys: list[bytes], *, protect: bool = False) -> int:
        """Queue spill-to-DRAM reads of the keys not in DRAM and return at once.

        With protect, each key is marked protected once it is in DRAM, so the pool evicts
        it last; unprotect when the blocks are used. Returns how many keys were queued."""
        keys = [bytes(key) for key in keys]
        if protect:
            with self._lock:
                self.pool.protect(keys)
                self._protected.update(keys)
        in_dram = self.pool.exists_many(keys)
        wanted = [key for key, present in zip(keys, in_dram) if not present]
        if not wanted:
            return 0
        with self._lock:
            self._prefetch.append(wanted)
            if protect:
                self._protect_after.update(wanted)
        self._counters["prefetch_requested"] += len(wanted)
        self._wake.set()
        return len(wanted)

    def unprotect(self, keys: list[bytes]) -> int:
        """Clear the protected mark of keys (prefetched with protect, now used or given up).
        Returns how many were in DRAM."""
        keys = [bytes(key) for key in keys]
        with self._lock:   # with _prefetch_batch's protect: an unprotect is never lost
            self._protected.difference_update(keys)
            self._protect_after.difference_update(keys)
            return self.pool.unprotect(keys)

    def miss_handler(self, mode: int, joined_keys: bytes) -> bytes:
        """The transfer server's miss handler (Server.set_miss_handler): keys the pool did
        not have, 32 bytes each. MISS_LOAD promotes them now, MISS_PROBE only looks them
        up, MISS_PREFETCH queues them. Returns one byte per key, 1 where found."""
        view = memoryview(joined_keys)
        keys = [bytes(view[i:i + KEY_BYTES]) for i in range(0, len(view), KEY_BYTES)]
        if mode == MISS_PROBE:
            found = self.probe(keys)
        elif mode == MISS_PREFETCH:
            found = self.probe(keys)
            self.prefetch([key for key, ok in zip(keys, found) if ok])
        elif mode == MISS_DELETE:
            found = self.delete(keys, in_dram=False)
        else:
            found = self.load(keys)
        return bytes(found)

    def load(self, keys: list[bytes]) -> list[bool]:
        """Promote the keys' blocks from disk into DRAM now. Returns a hit flag per key."""
        lengths = self.store.lengths(keys)
        if None in lengths:
            self._drain()
            lengths = self.store.lengths(keys)
        if self.shared and None in lengths and self._refresh_due():
            lengths = self.store.lengths(keys)
        wanted = [i for i, n in enumerate(lengths) if n is not None]
        found = [False] * len(keys)
        if not wanted:
            self._counters["misses"] += len(keys)
            return found
        staging = bytearray(sum(lengths[i] for i in wanted))
        views = _views(staging, [lengths[i] for i in wanted])
        for i, hit in zip(wanted, self.read_into([keys[i] for i in wanted], views)):
            found[i] = hit
        self._counters["misses"] += len(keys) - len(wanted)
        return found

    def delete(self, keys: list[bytes], *, in_dram: bool = True) -> list[bool]:
        """Delete the keys from DRAM (unless in_dram is False: the caller did) and from disk,
        including blocks evicted a moment ago and still in the pool's ring. Returns, per
        key, whether either level held it."""
        keys = [bytes(key) for key in keys]
        with self.write_lock:
            in_pool = self.pool.delete_many(keys) if in_dram else [False] * len(keys)
            self._drain()
            on_disk = self.store.delete_many(keys)
        return [a or b for a, b in zip(in_pool, on_disk)]

    def kick(self) -> None:
        """Wake the background thread now (after puts that may have evicted blocks), rather
        than at its next TICK_S."""
        self._wake.set()

    # ---- sessions ---------------------------------------------------------------------

    def touch(self, session: bytes, keys: list[bytes]) -> None:
        """Record that `keys` belong to `session` and that it was used now (session policy).

        A key touched by two sessions leaves DRAM with whichever is evicted first. In KV
        chains that is rare, because blocks with a common root share a session id."""
        if self.policy != "session":
            return
        now = time.monotonic()
        with self._lock:
            entry = self._sessions.get(session)
            if entry is None:
                self._sessions[session] = (now, set(keys))
            else:
                entry[1].update(keys)
                self._sessions[session] = (now, entry[1])

    # ---- stats and life cycle ---------------------------------------------------------

    def stats(self) -> dict:
        pool = self.pool.stats()
        with self._lock:
            sessions = len(self._sessions)
            queued = sum(len(batch) for batch in self._prefetch)
        return dict(self._counters, policy=self.policy, sessions=sessions,
                    prefetch_queued=queued, spill_captured=pool.get("spill_captured", 0),
                    spill_dropped=pool.get("spill_dropped", 0), store=self.store.stats())

    def close(self) -> None:
        """Drain the ring, stop the thread and close the store (publishing its segment).
        The pool stays open: its owner closes it."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join()
        try:
            self._drain()
        finally:
            self.store.close()

    # ---- background work --------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(TICK_S)
            self._wake.clear()
            try:
                moved = self._drain()
                moved += self._run_prefetches()
                if self.policy == "session":
                    moved += self._evict_sessions()
                self._publish_if_idle(moved)
            except Exception:   # the tier must outlive one bad batch; the pool keeps serving
                self._counters["background_errors"] += 1
                log.exception("spill tier background step failed")

    def _drain(self) -> int:
        """Append every block waiting in the pool's ring to the store. Returns blocks moved.

        Readers that miss call it too. A block taken out of the ring is on disk once the
        lock is released, so no block is in neither DRAM, the ring nor the store. Readers
        look again whatever this returns, because a reader that waited for the background
        thread's drain gets 0 although its block has just reached the store."""
        moved = 0
        with self._drain_lock:
            while True:
                keys, lengths = self.pool.take_evicted(self._ring_buffer, 1 << 16)
                if not keys:
                    return moved
                self._spill(keys, _views(self._ring_buffer, lengths))
                moved += len(keys)

    def _spill(self, keys: list[bytes], views: list) -> None:
        new = [i for i, present in enumerate(self.store.exists_many(keys)) if not present]
        if len(new) < len(keys):   # on disk already (a promoted block evicted before marked)
            keys, views = [keys[i] for i in new], [views[i] for i in new]
        if not keys:
            return
        stored = self.store.put_many(keys, views)
        count = sum(stored)
        self._counters["spills"] += count
        self._counters["spill_failures"] += len(keys) - count
        self._counters["spilled_bytes"] += sum(len(v) for v, ok in zip(views, stored) if ok)
        self._last_spill = time.monotonic()
        self._unpublished = True

    def _run_prefetches(self) -> int:
        moved = 0
        while True:
            with self._lock:
                if not self._prefetch:
                    return moved
                keys = self._prefetch.popleft()
            # Blocks that reached DRAM since the request (a load or an earlier prefetch)
            # need no disk read.
            keys = [key for key, present in zip(keys, self.pool.exists_many(keys))
                    if not present]
            if keys:
                moved += self._prefetch_batch(keys)

    def _prefetch_batch(self, keys: list[bytes]) -> int:
        lengths = self.store.lengths(keys)
        wanted = [(key, n) for key, n in zip(keys, lengths) if n is not None]
        missing = len(keys) - len(wanted)
        done = start = 0
        while start < len(wanted):
            # As many blocks as fit the work buffer (always at least one).
            end, total = start + 1, wanted[start][1]
            while end < len(wanted) and total + wanted[end][1] <= len(self._work_buffer):
                total += wanted[end][1]
                end += 1
            batch, start = wanted[start:end], end
            views = _views(self._work_buffer, [length for _, length in batch])
            batch_keys = [key for key, _ in batch]
            found = self._read_store(batch_keys, views)
            hits = [key for key, ok in zip(batch_keys, found) if ok]
            self._promote(hits, [v for v, ok in zip(views, found) if ok])
            missing += len(batch_keys) - len(hits)
            done += len(hits)
        with self._lock:
            protect = [key for key in keys if key in self._protect_after]
            self._protect_after.difference_update(keys)
            if protect:
                self.pool.protect(protect)
        self._counters["prefetched"] += done
        self._counters["prefetch_misses"] += missing
        return done

    def _evict_sessions(self) -> int:
        """Evict whole sessions, longest-unused first, while the pool is above
        HIGH_WATERMARK, until it is below LOW_WATERMARK. They leave DRAM as CLOCK victims
        do (through the ring, to disk); protected blocks stay. Nothing is evicted while the
        store does not take blocks (after ENOSPC): CLOCK alone decides then. Returns the
        sessions evicted."""
        stats = self.pool.stats()
        capacity, used = stats["capacity_bytes"], stats["bytes_used"]
        if used <= HIGH_WATERMARK * capacity or not self.store.stats()["spilling"]:
            return 0
        with self._lock:
            order = sorted(self._sessions.items(), key=lambda item: item[1][0])
        evicted = 0
        for session, (_, keys) in order:
            if used <= LOW_WATERMARK * capacity:
                break
            used -= self.pool.evict_many(list(keys))
            evicted += 1
            with self._lock:
                self._sessions.pop(session, None)
        self._counters["sessions_evicted"] += evicted
        return evicted

    def _publish_if_idle(self, moved: int) -> None:
        """Publish the store's open segment after IDLE_PUBLISH_S without spills, so other
        processes sharing the directory (the vLLM scheduler, other daemons) see it."""
        if moved or not self._unpublished:
            return
        if time.monotonic() - self._last_spill >= IDLE_PUBLISH_S:
            self.store.publish()
            self._unpublished = False

    # ---- helpers ----------------------------------------------------------------------

    def _read_store(self, keys: list[bytes], buffers: list) -> list[bool]:
        found = self.store.get_many_into(keys, buffers)
        if not all(found):
            self._drain()
            found = self._read_again(keys, buffers, found)   # evicted a moment ago
        if self.shared and not all(found) and self._refresh_due():
            found = self._read_again(keys, buffers, found)
        return found

    def _read_again(self, keys: list[bytes], buffers: list, found: list[bool]) -> list[bool]:
        missed = [i for i, ok in enumerate(found) if not ok]
        again = self.store.get_many_into([keys[i] for i in missed], [buffers[i] for i in missed])
        for i, ok in zip(missed, again):
            found[i] = ok
        return found

    def _promote(self, keys: list[bytes], buffers: list) -> None:
        """Put blocks read from disk back into DRAM, marked as on disk already. A key
        deleted since the read is skipped, so a delete is never undone."""
        if not keys:
            return
        with self.write_lock:
            still = self.store.exists_many(keys)
            if not all(still):
                keys = [key for key, ok in zip(keys, still) if ok]
                buffers = [buffer for buffer, ok in zip(buffers, still) if ok]
            self.pool.put_many(keys, buffers)
            self.pool.mark_spilled(keys)
        self._counters["promotions"] += len(keys)

    def _refresh_due(self) -> bool:
        """Rescan a shared directory when the last scan is older than REFRESH_INTERVAL_S.
        Returns whether it rescanned."""
        now = time.monotonic()
        if now - self._last_refresh < REFRESH_INTERVAL_S:
            return False
        self._last_refresh = now
        self.store.refresh()
        return True


def _views(buffer, lengths: list[int]) -> list[memoryview]:
    """Split the start of buffer into consecutive views of the given lengths."""
    view, views, offset = memoryview(buffer), [], 0
    for length in lengths:
        views.append(view[offset:offset + length])
        offset += length
    return views
