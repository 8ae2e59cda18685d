"""Four threads put, read and delete overlapping keys on one owner pool.

Each block is rebuilt from the key and version in its header (see conftest.make_block),
so a reader thread can tell that a block it got is exactly one that some thread stored
for that key. The pool is small enough that blocks are evicted during the run.
"""

import random
import threading
import time

import ems
from conftest import KiB, MiB, block_version, make_block, make_key

NTHREADS = 4
NKEYS = 96
SECONDS = 3.0
KEYS = [make_key(i, "threads") for i in range(NKEYS)]


def size_for(k, version):
    return 1000 + (k * 7919 + version * 104729) % 30000


def worker(pool, tid, results, errors):
    rng = random.Random(tid)
    counts = dict(puts=0, stored=0, hits=0, misses=0, deletes=0, resized=0, wrong=0)
    attempted = []
    accepted = []

    def accept(k, block):
        key = KEYS[k]
        version = block_version(block) if len(block) >= 56 else -1
        if block[:32] != key or block != make_block(key, version, size_for(k, version)):
            counts["wrong"] += 1
            return
        counts["hits"] += 1
        accepted.append((k, version))

    try:
        end = time.monotonic() + SECONDS
        serial = 0
        while time.monotonic() < end:
            k = rng.randrange(NKEYS)
            key = KEYS[k]
            op = rng.randrange(10)
            if op < 3:
                serial += 1
                # Versions are unique across threads: the thread id is in the low bits.
                version = serial * NTHREADS + tid
                attempted.append((k, version))
                counts["puts"] += 1
                counts["stored"] += pool.put(key, make_block(key, version, size_for(k, version)))
            elif op == 3:
                serial += 1
                version = serial * NTHREADS + tid
                size = size_for(k, version)
                attempted.append((k, version))
                with pool.reserve(key, size) as res:
                    if not res.exists:
                        res.buffer[:] = make_block(key, version, size)
            elif op == 4:
                counts["deletes"] += pool.delete(key)
            elif op < 7:
                block = pool.get(key)
                if block is None:
                    counts["misses"] += 1
                else:
                    accept(k, block)
            elif op < 9:
                length = pool.length(key)
                if length is None:
                    counts["misses"] += 1
                    continue
                buf = bytearray(length)
                try:
                    hit = pool.get_into(key, buf)
                except ems.errors.BufferSizeError:
                    counts["resized"] += 1
                    continue
                if hit:
                    accept(k, bytes(buf))
                else:
                    counts["misses"] += 1
            else:
                ks = [rng.randrange(NKEYS) for _ in range(3)]
                lengths = [pool.length(KEYS[j]) for j in ks]
                if None in lengths:
                    counts["misses"] += 1
                    continue
                bufs = [bytearray(n) for n in lengths]
                try:
                    hits = pool.get_many_into([KEYS[j] for j in ks], bufs)
                except ems.errors.BufferSizeError:
                    counts["resized"] += 1
                    continue
                for j, buf, hit in zip(ks, bufs, hits):
                    if hit:
                        accept(j, bytes(buf))
                    else:
                        counts["misses"] += 1
    except BaseException as exc:  # collected so the main thread fails the test
        errors.append((tid, exc))
    results[tid] = (counts, attempted, accepted)


def test_threads_overlapping_keys(make_pool):
    pool = make_pool(2 * MiB, slab_size=64 * KiB, pages="small")
    results = [None] * NTHREADS
    errors = []
    threads = [
        threading.Thread(target=worker, args=(pool, tid, results, errors))
        for tid in range(NTHREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []

    attempted = set()
    for counts, tried, _ in results:
        attempted.update(tried)
    total = {name: sum(r[0][name] for r in results) for name in results[0][0]}
    assert total["wrong"] == 0, total
    assert total["hits"] > 1000, total
    assert total["misses"] > 0, total
    assert total["stored"] > 1000, total
    assert total["deletes"] > 0, total
    for _, _, accepted in results:
        assert set(accepted) <= attempted

    stats = pool.stats()
    assert stats["evictions"] > 0, stats
    assert stats["pool_full"] == 0
    assert sum(r["blocks"] for r in stats["classes"]) == stats["blocks"]
    for k, key in enumerate(KEYS):
        block = pool.get(key)
        if block is not None:
            version = block_version(block)
            assert (k, version) in attempted
            assert block == make_block(key, version, size_for(k, version))
