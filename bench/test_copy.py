"""Block copies: Pool.get_into and Pool.put against numpy.copyto of the same bytes.

For each block size the module runs, in this order (a module-scoped parametrized fixture
keeps the tests of one size together, so each limit is measured seconds before the pool
call it is compared with):

  warm: - numpy.copyto into the user's array from one pool-side buffer (read limit).
        - get_into of one stored block into the same user array.
        - numpy.copyto from the user's array into one pool-side buffer (write limit).
        - put of a new key into a pool that holds exactly one block. Every put evicts the
          previous block and writes the same slot again, so it touches the same memory
          every call, as copyto does.
  cold: - numpy.copyto from (or into) a ring of pool-side buffers of 64 MiB or more in
          total, one ring element per call: the limit when the pool is much larger than
          the caches.
        - get_into cycling over the same number of stored blocks.
        - put of a new key into a full pool of that size, each put evicting one block.

User-side arrays are ordinary numpy arrays in both the pool call and its limit. Pool-side
buffers are anonymous mappings with the page size the pool got (MADV_NOHUGEPAGE when the
pool got 4 KiB pages, MADV_HUGEPAGE otherwise). numpy requests transparent huge pages for
large arrays, and a limit on 2 MiB pages would otherwise measure the page size rather than
the pool.

Ratio = copyto seconds per call / pool seconds per call (1.0 = as fast as numpy.copyto).
Targets: get_into >= 0.9 and put >= 0.8 at 256 KiB and above, for the warm rows. The cold
rows are recorded without a target. Every put stores a key that was never stored before
(keys are generated up front, one per call), which the pool counters confirm after each
run.
"""
from __future__ import annotations

import itertools
import mmap
import statistics
import time

import numpy as np
import pytest

import ems
from bench_common import KiB, MiB, random_keys
from report import Record

SIZES = [64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]
ROUNDS = 300
WARMUP_ROUNDS = 5
COLD_BYTES = 64 * MiB  # at least this many bytes per ring, 32x the 2 MiB L2 of the bench VM
COLD_MIN_BLOCKS = 64

# Limits measured in this run: (size, kind) -> seconds per call; kind is "warm_read",
# "warm_write", "cold_read" or "cold_write".
_limits: dict[tuple[int, str], float] = {}


def size_label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def iterations_for(size: int) -> int:
    """Calls per timed round: about 2 MiB copied per round, so that timer resolution
    (tens of ns) is far below a round's duration."""
    return max(1, (2 * MiB) // size)


def cold_blocks(size: int) -> int:
    return max(COLD_MIN_BLOCKS, COLD_BYTES // size)


def total_calls(size: int) -> int:
    """Calls pytest-benchmark's pedantic mode makes: warmup and timed rounds, plus one
    untimed call for the result when iterations > 1 (more under --benchmark-cprofile)."""
    iterations = iterations_for(size)
    return (ROUNDS + WARMUP_ROUNDS) * iterations + (1 if iterations > 1 else 0)


class KeySource:
    """Hands out never-used keys, one per call, and counts them."""

    def __init__(self, keys):
        self.keys = keys
        self.used = 0

    def next(self) -> bytes:
        key = self.keys[self.used]
        self.used += 1
        return key


def run(benchmark, fn, size, args=()):
    benchmark.pedantic(fn, args=args, rounds=ROUNDS, iterations=iterations_for(size),
                       warmup_rounds=WARMUP_ROUNDS)


def median_seconds(benchmark) -> float | None:
    """Median seconds per call of the benchmark just run, None under --benchmark-disable."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def inline_median(fn, size) -> float:
    """Measure the median seconds per call without pytest-benchmark, with the same rounds
    and iterations. Used only when the limit test of this size did not run (-k)."""
    iterations = iterations_for(size)
    for _ in range(WARMUP_ROUNDS * iterations):
        fn()
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        times.append((time.perf_counter() - start) / iterations)
    return statistics.median(times)


def limit_for(size, kind, fallback) -> tuple[float, str]:
    if (size, kind) in _limits:
        return _limits[(size, kind)], "numpy.copyto"
    return inline_median(fallback, size), "numpy.copyto, inline"


def harness_seconds(size) -> float:
    """Cost of the lambda and KeySource.next call that the put rows pay per call and the
    warm copyto does not; reported, not subtracted."""
    keys = KeySource(random_keys(total_calls(size) + 1, seed=9))
    return inline_median(lambda: keys.next(), size)


def add_row(record, name, size, seconds, limit, limit_name, target, notes,
            page_kind=None, **details):
    gbps = size / seconds / 1e9
    limit_gbps = size / limit / 1e9
    record(Record(group="copy", name=name, value=gbps, unit="GB/s", limit=limit_gbps,
                  limit_name=limit_name, ratio=limit / seconds,
                  target_field="ratio" if target is not None else None,
                  target_op=">=", target=target, notes=notes, page_kind=page_kind),
           seconds_per_call=seconds, limit_seconds_per_call=limit, block_bytes=size,
           **details)


# ---- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool_page_kind():
    """Page kind a pages="auto" pool gets on this machine."""
    with ems.Pool(4 * MiB, pages="auto") as pool:
        return pool.page_kind


def pool_side_array(nbytes: int, page_kind: str) -> np.ndarray:
    """Return a zero-filled uint8 array on an anonymous mapping with the pool's page size.
    For hugetlb pools it requests transparent huge pages, which give the same 2 MiB TLB
    reach when /sys/kernel/mm/transparent_hugepage/enabled allows madvise."""
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_NOHUGEPAGE if page_kind == "small" else mmap.MADV_HUGEPAGE)
    array = np.frombuffer(mapping, dtype=np.uint8)  # keeps `mapping` alive
    array[:] = 0
    return array


@pytest.fixture(scope="module", params=SIZES, ids=size_label)
def size(request):
    return request.param


@pytest.fixture(scope="module")
def user(size):
    """The user's source and destination arrays (ordinary numpy arrays), both written once
    so their pages exist and are cached."""
    src = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    return src, dst


@pytest.fixture(scope="module")
def pool_side(size, user, pool_page_kind):
    """One pool-side buffer of `size` bytes holding the user's source bytes."""
    buffer = pool_side_array(size, pool_page_kind)
    np.copyto(buffer, user[0])
    return buffer


@pytest.fixture(scope="module")
def ring(size, user, pool_page_kind):
    """`cold_blocks(size)` pool-side rows of `size` bytes, all written once."""
    n = cold_blocks(size)
    rows = pool_side_array(n * size, pool_page_kind).reshape(n, size)
    rows[:] = user[0]
    return rows


# ---- warm --------------------------------------------------------------------------------

def record_limit(benchmark, size, kind, **details):
    seconds = median_seconds(benchmark)
    if seconds is not None:
        _limits[(size, kind)] = seconds
        benchmark.extra_info.update(role="limit", kind=kind, block_bytes=size,
                                    gb_per_s=size / seconds / 1e9, **details)


def test_copyto_warm_read(benchmark, size, user, pool_side):
    run(benchmark, np.copyto, size, args=(user[1], pool_side))
    record_limit(benchmark, size, "warm_read")


def test_get_into_warm(benchmark, record, size, user, pool_side):
    src, dst = user
    with ems.Pool(4 * size, slab_size=size, pages="auto") as pool:
        key = random_keys(1, seed=3)[0]
        pool.put(key, src)
        dst[:] = 0
        run(benchmark, pool.get_into, size, args=(key, dst))
        stats = pool.stats()
        page_kind = pool.page_kind
    assert np.array_equal(dst, src), "get_into did not copy the stored block"
    assert stats["hits"] >= total_calls(size), stats
    assert stats["misses"] == 0, stats
    seconds = median_seconds(benchmark)
    if seconds is None:
        return
    limit, limit_name = limit_for(size, "warm_read", lambda: np.copyto(dst, pool_side))
    add_row(record, f"get_into {size_label(size)}, warm", size, seconds, limit,
            limit_name, 0.9 if size >= 256 * KiB else None,
            "One stored block read into one reused numpy array.", page_kind)


def test_copyto_warm_write(benchmark, size, user, pool_side):
    run(benchmark, np.copyto, size, args=(pool_side, user[0]))
    record_limit(benchmark, size, "warm_write")


def test_put_warm(benchmark, record, size, user, pool_side):
    src = user[0]
    first, *rest = random_keys(2 * total_calls(size) + 1, seed=4)
    keys = KeySource(rest)
    with ems.Pool(size, slab_size=size, pages="auto") as pool:
        pool.put(first, src)  # the pool is full from the first timed put on
        run(benchmark, lambda: pool.put(keys.next(), src), size)
        stats = pool.stats()
        page_kind = pool.page_kind
    assert stats["put_exists"] == 0, stats
    assert stats["puts"] == keys.used + 1, stats
    assert stats["evictions"] == keys.used, stats
    seconds = median_seconds(benchmark)
    if seconds is None:
        return
    limit, limit_name = limit_for(size, "warm_write", lambda: np.copyto(pool_side, src))
    overhead = harness_seconds(size)
    add_row(record, f"put {size_label(size)}, warm", size, seconds, limit,
            limit_name, 0.8 if size >= 256 * KiB else None,
            f"New key every call into a 1-block pool, so each put evicts 1 block and "
            f"rewrites the same slot. Includes {overhead * 1e9:.0f} ns per call of harness "
            "(lambda + next key) that the limit does not pay.", page_kind,
            harness_seconds_per_call=overhead, evictions=stats["evictions"])


# ---- cold --------------------------------------------------------------------------------

def test_copyto_cold_read(benchmark, size, user, ring):
    dst = user[1]
    rows = itertools.cycle(list(ring))
    run(benchmark, lambda: np.copyto(dst, next(rows)), size)
    record_limit(benchmark, size, "cold_read", ring_blocks=len(ring))


def test_get_into_cold(benchmark, record, size, user, ring):
    dst = user[1]
    n = len(ring)
    with ems.Pool(n * size, pages="auto") as pool:
        keys = random_keys(n, seed=5)
        for key, row in zip(keys, ring):
            pool.put(key, row)
        assert pool.stats()["blocks"] == n, "the cold pool must hold every block"
        next_key = itertools.cycle(keys).__next__
        run(benchmark, lambda: pool.get_into(next_key(), dst), size)
        stats = pool.stats()
        page_kind = pool.page_kind
    assert stats["hits"] >= total_calls(size), stats
    assert stats["misses"] == 0, stats
    seconds = median_seconds(benchmark)
    if seconds is None:
        return
    rows = itertools.cycle(list(ring))
    limit, limit_name = limit_for(size, "cold_read", lambda: np.copyto(dst, next(rows)))
    add_row(record, f"get_into {size_label(size)}, cold", size, seconds, limit,
            limit_name + ", ring source", None,
            f"Cycles over {n} stored blocks ({n * size // MiB} MiB). The limit copies from "
            "a ring of as many pool-side buffers.", page_kind, ring_blocks=n)


def test_copyto_cold_write(benchmark, size, user, ring):
    src = user[0]
    rows = itertools.cycle(list(ring))
    run(benchmark, lambda: np.copyto(next(rows), src), size)
    record_limit(benchmark, size, "cold_write", ring_blocks=len(ring))


def test_put_cold(benchmark, record, size, user, ring):
    src = user[0]
    n = len(ring)
    all_keys = random_keys(n + 2 * total_calls(size), seed=6)
    keys = KeySource(all_keys[n:])
    with ems.Pool(n * size, pages="auto") as pool:
        for key in all_keys[:n]:
            pool.put(key, src)
        assert pool.stats()["blocks"] == n, "the cold pool must start full"
        run(benchmark, lambda: pool.put(keys.next(), src), size)
        stats = pool.stats()
        page_kind = pool.page_kind
    assert stats["put_exists"] == 0, stats
    assert stats["puts"] == n + keys.used, stats
    assert stats["evictions"] == keys.used, stats
    seconds = median_seconds(benchmark)
    if seconds is None:
        return
    rows = itertools.cycle(list(ring))
    limit, limit_name = limit_for(size, "cold_write", lambda: np.copyto(next(rows), src))
    add_row(record, f"put {size_label(size)}, cold", size, seconds, limit,
            limit_name + ", ring destination", None,
            f"New key every call into a full pool of {n} blocks ({n * size // MiB} MiB), "
            "each put evicting 1 block. The limit copies into a ring of as many pool-side "
            "buffers.", page_kind, ring_blocks=n, evictions=stats["evictions"])
