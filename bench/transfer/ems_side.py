"""Measure EMS PUT and GET bandwidth between two processes on one host, for run.py.

The pool and its transfer server run in a holder process (ems_holder.py) that listens on
127.0.0.1 and on a Unix socket. This process is the client: `threads` Python threads,
each with its own connection, move distinct 32-byte keys in batches of up to
BATCH_BYTES from pre-allocated buffers. The C calls release the GIL, so the threads
transfer in parallel. The module also measures two references on the same machine: a
read through the pool's shared memory (`local_shm_get_bandwidth`) and numpy copies
(`memcpy_bandwidth`). Every figure is in bytes per second (GB/s = 1e9 bytes/s).

The holder is kept between calls with the same block size and stopped at exit.
Run it alone for a table: `python bench/transfer/ems_side.py`.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import ems
import ems._core as core

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
KiB = 1 << 10
MiB = 1 << 20
TENANT = "bench"
HOLDER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ems_holder.py")

DEFAULT_SECONDS = 2.5
# Bytes of blocks per put_many or get_many_into call. The server rejects a request whose
# payload exceeds 64 MiB (its default max_payload).
BATCH_BYTES = 16 * MiB
MAX_BLOCK = 32 * MiB
# Sources are slices of one ring of random bytes as large as the data set, up to
# SOURCE_RING_MAX, so every key of a data set up to that size reads memory of its own, as
# real KV blocks do. The ring is built from RANDOM_CHUNK random bytes, each copy XORed
# with its own 64-bit pattern, because generating 1 GiB of random bytes takes seconds.
RANDOM_CHUNK = 8 * MiB
SOURCE_RING_MAX = 1 << 30
# GET destinations: a ring per thread, reused pass after pass like a staging buffer.
DEST_RING_BYTES = 32 * MiB
# numpy.copyto reference: bytes of the source and of the target it copies between.
MEMCPY_BYTES = 256 * MiB
# Alignment of each key's source offset in the ring.
SOURCE_ALIGN = 64
CALL_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_MS = 2_000
HOLDER_START_TIMEOUT_S = 60.0
HOLDER_STOP_TIMEOUT_S = 10.0
MIN_SLAB_SIZE = 8 * MiB
# Slack slabs on top of the data set: the warm-up blocks need room too.
SLACK_SLABS = 4
# Index entries per key of the data set: the pool's default of one entry per 16 KiB of
# capacity is too few for small blocks.
ENTRIES_PER_KEY = 2
MIN_ENTRIES = 1024


# ---- holder process ----------------------------------------------------------------------

def listening_addresses(pid: int) -> list[str]:
    """Return 'address:port' of every TCP socket that process `pid` listens on."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:  # the descriptor was closed after listdir
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])

    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in rows.readlines()[1:]:
                fields = row.split()
                # fields[1] is the local address, fields[3] the state (0A = LISTEN) and
                # fields[9] the inode of the socket.
                if fields[3] != "0A" or fields[9] not in inodes:
                    continue
                address, port = fields[1].split(":")
                if len(address) == 8:
                    octets = bytes.fromhex(address)[::-1]
                    address = ".".join(str(octet) for octet in octets)
                addresses.append(f"{address}:{int(port, 16)}")
    return addresses


class Holder:
    """A running ems_holder.py process: one pool served on 127.0.0.1 and a Unix socket."""

    def __init__(self, capacity: int, slab_size: int, max_blocks: int):
        self.capacity = capacity
        self.slab_size = slab_size
        self.max_blocks = max_blocks
        self.secret = os.urandom(32)
        self.directory = tempfile.mkdtemp(prefix="ems-bench-")
        self.unix_path = os.path.join(self.directory, "ems.sock")
        self.log_path = os.path.join(self.directory, "holder.log")
        # The data set whose keys the pool stores now, or None.
        self.dataset: Dataset | None = None
        self.process: subprocess.Popen | None = None
        try:
            self.port = self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> int:
        command = [sys.executable, HOLDER_SCRIPT, "--capacity", str(self.capacity),
                   "--slab-size", str(self.slab_size), "--max-blocks", str(self.max_blocks),
                   "--unix-path", self.unix_path]
        with open(self.log_path, "w") as holder_log:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=holder_log,
                                            text=True)
        self.process.stdin.write(self.secret.hex() + "\n")
        self.process.stdin.flush()

        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            ready = selector.select(HOLDER_START_TIMEOUT_S)
        line = self.process.stdout.readline().split() if ready else []
        if len(line) != 2 or line[0] != "port":
            raise RuntimeError(f"ems_holder.py did not report its port within "
                               f"{HOLDER_START_TIMEOUT_S:.0f} s (output {line!r}):\n"
                               f"{self.log_tail()}")
        port = int(line[1])

        outside = [address for address in listening_addresses(self.process.pid)
                   if not address.startswith(LOOPBACK + ":")]
        if outside:
            raise RuntimeError(f"ems_holder.py listens on {outside}, expected only "
                               f"{LOOPBACK}")
        log.info("started holder pid %d: %d bytes, slab %d, %d entries, port %d",
                 self.process.pid, self.capacity, self.slab_size, self.max_blocks, port)
        return port

    def log_tail(self, limit: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as holder_log:
                return holder_log.read()[-limit:]
        except OSError as error:
            return f"(no holder log: {error})"

    def connect(self) -> core.Connection:
        """Open a TCP connection to the holder."""
        return core.Connection(LOOPBACK, self.port, secret=self.secret, tenant=TENANT,
                               timeout_ms=CONNECT_TIMEOUT_MS)

    def connect_local(self) -> core.Connection:
        """Open a connection over the holder's Unix socket."""
        return core.Connection(unix_path=self.unix_path, secret=self.secret, tenant=TENANT,
                               timeout_ms=CONNECT_TIMEOUT_MS)

    def stop(self) -> None:
        """Close the holder's standard input, wait for it to exit (SIGTERM, then SIGKILL if
        it does not), and remove its directory. Stopping twice does nothing."""
        process, self.process = self.process, None
        if process is not None:
            try:
                process.stdin.close()
            except OSError:  # a holder that already died leaves a broken pipe
                pass
            try:
                process.wait(HOLDER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("holder pid %d ignored end of input; sending SIGTERM",
                            process.pid)
                process.terminate()
                try:
                    process.wait(HOLDER_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("holder pid %d ignored SIGTERM; killing it", process.pid)
                    process.kill()
                    process.wait()
            process.stdout.close()
            log.info("stopped holder pid %d (exit status %s)", process.pid,
                     process.returncode)
        shutil.rmtree(self.directory, ignore_errors=True)


_holder: Holder | None = None
_holder_block = 0


def slab_size_for(block: int) -> int:
    """Return the smallest power of two of at least MIN_SLAB_SIZE and twice the block."""
    slab = MIN_SLAB_SIZE
    while slab < 2 * block:
        slab *= 2
    return slab


def holder_for(block: int, count: int) -> Holder:
    """Return the cached holder if it serves `block` and has room for `count` blocks; else
    stop it and start one that does."""
    global _holder, _holder_block
    slab = slab_size_for(block)
    # A slot is the block rounded up to its size class, at most 1/64 larger (slab.h), so
    # block * 33 / 32 + 64 bytes over-estimates it.
    slots_per_slab = max(1, slab // (block + block // 32 + 64))
    capacity = (-(-count // slots_per_slab) + SLACK_SLABS) * slab
    max_blocks = max(MIN_ENTRIES, ENTRIES_PER_KEY * count)
    if (_holder is not None and _holder_block == block and _holder.capacity >= capacity
            and _holder.max_blocks >= max_blocks):
        return _holder
    stop_holder()
    _holder = Holder(capacity, slab, max_blocks)
    _holder_block = block
    return _holder


def stop_holder() -> None:
    """Stop the cached holder, if any."""
    global _holder
    holder, _holder = _holder, None
    if holder is not None:
        holder.stop()


def discard_holder(operation: str) -> None:
    """Log the holder's output after `operation` failed, and stop the holder, because its
    pool may be left in an unknown state. The next call starts a new one."""
    if _holder is not None:
        log.error("%s failed; holder log:\n%s", operation, _holder.log_tail())
    stop_holder()


atexit.register(stop_holder)


# ---- data set ----------------------------------------------------------------------------

_source_ring: np.ndarray | None = None


def source_ring(length: int) -> np.ndarray:
    """Return at least `length` bytes of pseudo-random data, rounded up to RANDOM_CHUNK.
    The ring is cached and grown on demand. Callers must not write to it."""
    global _source_ring
    length = -(-length // RANDOM_CHUNK) * RANDOM_CHUNK
    if _source_ring is not None and len(_source_ring) >= length:
        return _source_ring

    rng = np.random.default_rng(20240611)
    chunk = np.frombuffer(rng.bytes(RANDOM_CHUNK), dtype=np.uint64)
    ring = np.empty(length // 8, dtype=np.uint64)
    words = RANDOM_CHUNK // 8
    for index in range(length // RANDOM_CHUNK):
        pattern = np.uint64(index * 0x9E3779B97F4A7C15 % (1 << 64))
        np.bitwise_xor(chunk, pattern, out=ring[index * words:(index + 1) * words])
    _source_ring = ring.view(np.uint8)
    return _source_ring


@dataclass
class Batch:
    """Consecutive keys of a data set and their source blocks, for one call."""
    first: int                   # index of the first key in the data set
    keys: bytes                  # n x 32 bytes
    sources: list[np.ndarray]


@dataclass
class Dataset:
    """`count` distinct keys of `block` bytes each. Key i's contents are a slice of the
    source ring at an offset derived from i, so a GET can be checked against it."""
    block: int
    count: int
    keys: bytes = field(repr=False)
    ring: np.ndarray = field(repr=False)
    span: int                    # key offsets in the ring are below this

    @classmethod
    def create(cls, block: int, count: int) -> "Dataset":
        # A random tag per data set, so no key collides with one of an earlier data set.
        tag = os.urandom(16)
        keys = b"".join(hashlib.blake2b(index.to_bytes(8, "little"), digest_size=32,
                                        key=tag).digest() for index in range(count))
        span = min(count * (block + SOURCE_ALIGN), SOURCE_RING_MAX)
        return cls(block, count, keys, source_ring(span + block), span)

    def source(self, index: int) -> np.ndarray:
        # Consecutive keys read neighbouring, distinct slices of the ring, aligned to
        # SOURCE_ALIGN when the block size is a multiple of it.
        offset = index * (self.block + SOURCE_ALIGN) % self.span
        return self.ring[offset:offset + self.block]

    def batches(self, start: int, stop: int, per_batch: int) -> list[Batch]:
        """Split keys [start, stop) into batches of up to `per_batch` keys."""
        batches = []
        for first in range(start, stop, per_batch):
            last = min(first + per_batch, stop)
            batches.append(Batch(first, self.keys[first * 32:last * 32],
                                 [self.source(index) for index in range(first, last)]))
        return batches

    def shares(self, threads: int, per_batch: int) -> list[list[Batch]]:
        """Split all keys into `threads` contiguous shares, each a list of batches."""
        bounds = [self.count * t // threads for t in range(threads + 1)]
        return [self.batches(bounds[t], bounds[t + 1], per_batch) for t in range(threads)]


def keys_per_batch(block: int) -> int:
    return max(1, BATCH_BYTES // block)


def check_arguments(block: int, threads: int, total_bytes: int) -> None:
    if not 0 < block <= MAX_BLOCK:
        raise ValueError(f"block {block} is out of range 1..{MAX_BLOCK} bytes")
    if threads <= 0:
        raise ValueError(f"threads must be positive, got {threads}")
    if total_bytes <= 0:
        raise ValueError(f"total_bytes must be positive, got {total_bytes}")


def key_count(block: int, threads: int, total_bytes: int) -> int:
    """Return the number of distinct keys of a data set: total_bytes of blocks, at least
    one per thread."""
    return max(threads, total_bytes // block)


# ---- timed phases ------------------------------------------------------------------------

def run_timed(workers: list[Callable[[float], int]], seconds: float) -> float:
    """Run each worker in its own thread from a common start and return bytes per second.

    A worker gets its deadline (a time.perf_counter value) and returns the bytes it moved.
    The time runs from the common start to the end of the last worker.
    """
    moved = [0] * len(workers)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(workers) + 1)

    def work(index: int) -> None:
        try:
            barrier.wait()
            moved[index] = workers[index](time.perf_counter() + seconds)
        except BaseException as error:  # re-raised by the main thread below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,), daemon=True)
               for i in range(len(workers))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(moved) / elapsed


def check_put(results: list[int], batch: Batch, allow_stored: bool = False) -> None:
    """Raise unless every key of the batch was stored (or, with allow_stored, was present)."""
    accepted = (0, 1) if allow_stored else (0,)
    for offset, result in enumerate(results):
        if result not in accepted:
            raise RuntimeError(f"PUT of key {batch.first + offset} returned {result}, "
                               f"expected one of {accepted}")


def check_get(results: list[int], batch: Batch, block: int) -> None:
    for offset, result in enumerate(results):
        if result != block:
            raise RuntimeError(f"GET of key {batch.first + offset} returned {result}, "
                               f"expected its length {block}")


def delete_dataset(conn: core.Connection, dataset: Dataset) -> None:
    """Delete every key of `dataset`, in calls of up to 64 Ki keys."""
    step = 1 << 16
    for first in range(0, dataset.count, step):
        keys = dataset.keys[first * 32:min(first + step, dataset.count) * 32]
        for offset, result in enumerate(conn.delete_many(keys, CALL_TIMEOUT_MS)):
            if result not in (0, -2):
                raise RuntimeError(f"DELETE of key {first + offset} returned {result}")


def warm_up(conn: core.Connection, block: int) -> None:
    """Put, get and delete one block under a key of its own, outside any timing."""
    key = os.urandom(32)
    data = source_ring(block)[:block]
    check_put(conn.put_many([key], [data], CALL_TIMEOUT_MS), Batch(0, key, [data]))
    target = np.empty(block, dtype=np.uint8)
    check_get(conn.get_many_into([key], [target], CALL_TIMEOUT_MS), Batch(0, key, [data]),
              block)
    conn.delete_many([key], CALL_TIMEOUT_MS)


class DestinationRing:
    """One thread's GET destinations: slots of one batch each in a prefaulted array.
    Remembers the batch last read into each slot, so the bytes can be checked after."""

    def __init__(self, block: int, per_batch: int):
        slot_bytes = block * per_batch
        self.slots = max(2, DEST_RING_BYTES // slot_bytes)
        self.memory = np.empty(self.slots * slot_bytes, dtype=np.uint8)
        self.memory.fill(0)  # np.empty maps pages lazily: touch them before timing
        self.views = [[self.memory[slot * slot_bytes + k * block:
                                   slot * slot_bytes + (k + 1) * block]
                       for k in range(per_batch)] for slot in range(self.slots)]
        self.last: list[Batch | None] = [None] * self.slots

    def verify(self, block: int) -> int:
        """Compare every block still in the ring with its source and return how many
        blocks were compared. Raise RuntimeError on the first wrong byte."""
        checked = 0
        for slot, batch in enumerate(self.last):
            if batch is None:
                continue
            for offset, source in enumerate(batch.sources):
                target = self.views[slot][offset]
                if not np.array_equal(target, source):
                    first_wrong = int(np.flatnonzero(target != source)[0])
                    raise RuntimeError(
                        f"GET of key {batch.first + offset} returned wrong bytes: byte "
                        f"{first_wrong} of {block} is {target[first_wrong]}, expected "
                        f"{source[first_wrong]}")
                checked += 1
        return checked


def put_worker(conn: core.Connection, batches: list[Batch],
               dataset: Dataset) -> Callable[[float], int]:
    """Return a worker that puts its batches until the deadline. After each full pass
    it deletes its keys, inside the timing, so that the next pass copies them again
    (a key already stored is not copied)."""
    def work(deadline: float) -> int:
        moved = 0
        while True:
            for batch in batches:
                check_put(conn.put_many(batch.keys, batch.sources, CALL_TIMEOUT_MS), batch)
                moved += len(batch.sources) * dataset.block
                if time.perf_counter() >= deadline:
                    return moved
            for batch in batches:
                conn.delete_many(batch.keys, CALL_TIMEOUT_MS)
    return work


def get_worker(conn: core.Connection, batches: list[Batch], ring: DestinationRing,
               block: int) -> Callable[[float], int]:
    """Return a worker that reads its batches in turn, repeating them, until the deadline."""
    def work(deadline: float) -> int:
        moved = 0
        calls = 0
        while True:
            for batch in batches:
                slot = calls % ring.slots
                views = ring.views[slot][:len(batch.sources)]
                check_get(conn.get_many_into(batch.keys, views, CALL_TIMEOUT_MS), batch, block)
                ring.last[slot] = batch
                calls += 1
                moved += len(batch.sources) * block
                if time.perf_counter() >= deadline:
                    return moved
    return work


def local_get_worker(reader: ems.Pool, batches: list[Batch], stored_keys: list[bytes],
                     ring: DestinationRing, block: int) -> Callable[[float], int]:
    """Return a worker that reads its batches from the attached pool until the deadline."""
    def work(deadline: float) -> int:
        moved = 0
        calls = 0
        while True:
            for batch, keys in zip(batches, stored_keys):
                slot = calls % ring.slots
                hits = reader.get_many_into(keys, ring.views[slot][:len(batch.sources)])
                if not all(hits):
                    missed = batch.first + hits.index(False)
                    raise RuntimeError(f"shared-memory GET of key {missed} missed")
                ring.last[slot] = batch
                calls += 1
                moved += len(batch.sources) * block
                if time.perf_counter() >= deadline:
                    return moved
    return work


def server_evictions(conn: core.Connection) -> int:
    return int(conn.stats(CALL_TIMEOUT_MS)["evictions"])


def fill(conn: core.Connection, dataset: Dataset, per_batch: int) -> None:
    """Put every key of the data set that is not stored yet, outside any timing."""
    for batch in dataset.batches(0, dataset.count, per_batch):
        check_put(conn.put_many(batch.keys, batch.sources, CALL_TIMEOUT_MS), batch,
                  allow_stored=True)


def replace_dataset(holder: Holder, conn: core.Connection, dataset: Dataset) -> None:
    """Delete the holder's previous data set, so the pool has room for the new one."""
    if holder.dataset is not None:
        delete_dataset(conn, holder.dataset)
    holder.dataset = dataset


# ---- public measurements -----------------------------------------------------------------

def measure_put(holder: Holder, block: int, threads: int, count: int,
                seconds: float) -> float:
    """Measure PUT into a new data set of `count` keys, and leave every key stored."""
    per_batch = keys_per_batch(block)
    conns = [holder.connect() for _ in range(threads)]
    try:
        for conn in conns:
            warm_up(conn, block)
        dataset = Dataset.create(block, count)
        replace_dataset(holder, conns[0], dataset)
        evictions = server_evictions(conns[0])

        workers = [put_worker(conn, share, dataset)
                   for conn, share in zip(conns, dataset.shares(threads, per_batch))]
        rate = run_timed(workers, seconds)

        # A thread stopped by the deadline in a later pass left the rest of its keys
        # deleted: store them again so that a GET finds the whole data set.
        fill(conns[0], dataset, per_batch)
        evicted = server_evictions(conns[0]) - evictions
        if evicted:
            raise RuntimeError(f"the pool evicted {evicted} blocks during PUT, so it is "
                               f"too small for {count} blocks of {block} bytes")
        return rate
    finally:
        for conn in conns:
            conn.close()


def measure_get(holder: Holder, block: int, threads: int, seconds: float) -> float:
    """Measure GET of the holder's data set, then check the blocks last read by each
    thread."""
    dataset = holder.dataset
    per_batch = keys_per_batch(block)
    shares = dataset.shares(threads, per_batch)
    rings = [DestinationRing(block, per_batch) for _ in range(threads)]
    conns = [holder.connect() for _ in range(threads)]
    try:
        for conn, share, ring in zip(conns, shares, rings):
            # Warm-up, outside the timing: a first full batch lets the server grow its
            # per-connection response buffer to the batch size.
            first = share[0]
            views = ring.views[0][:len(first.sources)]
            check_get(conn.get_many_into(first.keys, views, CALL_TIMEOUT_MS), first, block)
        workers = [get_worker(conn, share, ring, block)
                   for conn, share, ring in zip(conns, shares, rings)]
        rate = run_timed(workers, seconds)
    finally:
        for conn in conns:
            conn.close()
    checked = sum(ring.verify(block) for ring in rings)
    log.debug("GET: %d blocks of %d bytes match their sources", checked, block)
    return rate


def ems_bandwidth(op: str, block: int, threads: int, total_bytes: int,
                  seconds: float = DEFAULT_SECONDS) -> float:
    """Return EMS 'put' or 'get' bandwidth in bytes per second over TCP on 127.0.0.1.

    The data set is total_bytes of distinct keys of `block` bytes (at least one key per
    thread). PUT writes it pass after pass for `seconds`, deleting each thread's keys
    between passes. GET reads it for `seconds`, pass after pass, then checks every block
    left in the destination buffers against its source and raises on a wrong byte. A GET
    reuses the data set that the last PUT of the same block size and key count stored.
    Without one, it stores a data set first with an untimed PUT phase.
    """
    if op not in ("get", "put"):
        raise ValueError(f"op must be 'get' or 'put', got {op!r}")
    check_arguments(block, threads, total_bytes)
    count = key_count(block, threads, total_bytes)
    try:
        holder = holder_for(block, count)
        if op == "put":
            return measure_put(holder, block, threads, count, seconds)
        dataset = holder.dataset
        if dataset is None or dataset.block != block or dataset.count != count:
            measure_put(holder, block, threads, count, seconds=0.0)
        return measure_get(holder, block, threads, seconds)
    except BaseException:
        discard_holder(f"EMS {op} of {block}-byte blocks")
        raise


def local_shm_get_bandwidth(block: int, threads: int, total_bytes: int,
                            seconds: float = DEFAULT_SECONDS) -> float:
    """Return the bandwidth, in bytes per second, of reads from the holder's pool through
    shared memory, as a client on the same host reads.

    Each thread attaches the pool over the holder's Unix socket and copies blocks out of
    the mapping with Pool.get_many_into. The data set (as in ems_bandwidth) is first put
    through the same connection, which copies into the mapping too.
    """
    check_arguments(block, threads, total_bytes)
    count = key_count(block, threads, total_bytes)
    per_batch = keys_per_batch(block)
    conns: list[core.Connection] = []
    readers: list[ems.Pool] = []
    try:
        holder = holder_for(block, count)
        for _ in range(threads):
            conn = holder.connect_local()
            conns.append(conn)
            fd = conn.local_attach(CALL_TIMEOUT_MS)
            try:
                readers.append(ems.Pool.attach(fd))
            finally:
                os.close(fd)  # the attached pool keeps a duplicate of the descriptor

        dataset = Dataset.create(block, count)
        replace_dataset(holder, conns[0], dataset)
        fill(conns[0], dataset, per_batch)

        shares = dataset.shares(threads, per_batch)
        stored = [[core.tenant_keys(TENANT, batch.keys) for batch in share]
                  for share in shares]
        rings = [DestinationRing(block, per_batch) for _ in range(threads)]
        for reader, keys, share, ring in zip(readers, stored, shares, rings):
            # Warm-up: one batch, outside the timing.
            hits = reader.get_many_into(keys[0], ring.views[0][:len(share[0].sources)])
            if not all(hits):
                raise RuntimeError(f"shared-memory GET of key "
                                   f"{share[0].first + hits.index(False)} missed")
        workers = [local_get_worker(reader, share, keys, ring, block)
                   for reader, share, keys, ring in zip(readers, shares, stored, rings)]
        rate = run_timed(workers, seconds)
        checked = sum(ring.verify(block) for ring in rings)
        log.debug("shared-memory GET: %d blocks of %d bytes match their sources", checked,
                  block)
        return rate
    except BaseException:
        discard_holder(f"shared-memory GET of {block}-byte blocks")
        raise
    finally:
        for reader in readers:
            reader.close()
        for conn in conns:
            conn.close()


def memcpy_bandwidth(block: int, seconds: float = DEFAULT_SECONDS) -> float:
    """Return the bytes per second one thread copies with numpy.copyto, `block` bytes per
    call, from MEMCPY_BYTES of source to as many of target. Each byte copied counts once,
    although the copy both reads and writes it."""
    if not 0 < block <= MEMCPY_BYTES:
        raise ValueError(f"block {block} is out of range 1..{MEMCPY_BYTES} bytes")
    source = source_ring(MEMCPY_BYTES)
    target = np.empty(MEMCPY_BYTES, dtype=np.uint8)
    target.fill(0)
    pairs = [(target[offset:offset + block], source[offset:offset + block])
             for offset in range(0, MEMCPY_BYTES - block + 1, block)]
    for destination, origin in pairs[:4]:  # warm-up
        np.copyto(destination, origin)

    copies = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for destination, origin in pairs:
            np.copyto(destination, origin)
        copies += len(pairs)
        now = time.perf_counter()
        if now >= deadline:
            break
    if not np.array_equal(target[:block], source[:block]):
        raise RuntimeError("numpy.copyto left different bytes in the target")
    return copies * block / (now - start)


# ---- table -------------------------------------------------------------------------------

def size_label(block: int) -> str:
    for suffix, factor in (("MiB", MiB), ("KiB", KiB)):
        if block >= factor and block % factor == 0:
            return f"{block // factor} {suffix}"
    return f"{block} B"


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    blocks = (64 * KiB, MiB, 4 * MiB)
    thread_counts = (1, 4)
    total_bytes = 1 << 30
    print(f"EMS between two processes on this host, {os.cpu_count()} CPUs, "
          f"{total_bytes >> 20} MiB of keys, {DEFAULT_SECONDS:g} s per figure, "
          f"GB/s = 1e9 bytes/s")
    print(f"{'block':>8} {'threads':>7} {'TCP put':>8} {'TCP get':>8} {'shm get':>8} "
          f"{'memcpy':>8}")
    try:
        for block in blocks:
            memcpy = memcpy_bandwidth(block)
            for threads in thread_counts:
                put = ems_bandwidth("put", block, threads, total_bytes)
                get = ems_bandwidth("get", block, threads, total_bytes)
                shm = local_shm_get_bandwidth(block, threads, total_bytes)
                print(f"{size_label(block):>8} {threads:>7} {put / 1e9:>8.2f} "
                      f"{get / 1e9:>8.2f} {shm / 1e9:>8.2f} {memcpy / 1e9:>8.2f}",
                      flush=True)
    finally:
        stop_holder()


if __name__ == "__main__":
    main()
