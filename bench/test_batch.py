"""Python cost per key of the batch calls at 256 keys per call.

Measured value: seconds of one batch call / 256, for exists_many, get_many_into and
put_many on 64-byte blocks, so that copying costs little next to the per-key work.
Physical limit: the same C batch call (ems_pool_exists_many, ems_pool_get_many,
ems_pool_put_many) on a pool of the same configuration, timed by bench/c/bench_index.c
(mode batch) in this run, built with the optimization flags of the extension's core. It is
what the call costs without the binding. Ratio = C time
per key / Python time per key (1.0 = the binding adds nothing). Target: <= 1 us per key.

Pool: 1 MiB of 1 MiB slabs (16,384 slots of 64 B) with max_blocks = 16,384, filled with
16,384 keys. Reads cycle over batches of the present keys. put_many stores batches of keys
never stored before, so every put evicts one block, in Python as in C.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import ems
from bench_common import MiB, random_keys, run_json
from report import Record

BATCH = 256
STORED = 16384
BLOCK_SIZE = 64
ROUNDS = 100
ITERATIONS = 10
WARMUP_ROUNDS = 2
C_ROUNDS = 2000
TARGET_NS = 1000.0


def make_pool() -> ems.Pool:
    """The pool bench_index's batch mode creates for --stored 16384 --block-size 64."""
    return ems.Pool(1 * MiB, slab_size=1 * MiB, max_blocks=STORED, pages="auto")


@pytest.fixture(scope="module")
def c_limits(bench_binary_like_extension):
    return run_json(bench_binary_like_extension, "batch", "--batch", str(BATCH), "--stored", str(STORED),
                    "--rounds", str(C_ROUNDS), "--block-size", str(BLOCK_SIZE))


@pytest.fixture(scope="module")
def read_pool():
    """A full pool and batches of its present keys (a few keys can be missing because
    index bucket overflow evicts during the fill, as in the C program)."""
    pool = make_pool()
    keys = random_keys(STORED, seed=21)
    payload = bytes(range(BLOCK_SIZE))
    for key in keys:
        pool.put(key, payload)
    present = [k for k, hit in zip(keys, pool.exists_many(keys)) if hit]
    batches = [present[i:i + BATCH] for i in range(0, len(present) - BATCH + 1, BATCH)]
    yield pool, batches
    pool.close()


def run(benchmark, fn):
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=WARMUP_ROUNDS)


def add_row(benchmark, record, name, c_limits, c_field, notes, page_kind):
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    python_ns = stats.stats.median / BATCH * 1e9
    c_ns = c_limits[c_field + "_median"]
    record(Record(group="batch", name=name, value=python_ns, unit="ns", limit=c_ns,
                  limit_name="same C batch call, per key", ratio=c_ns / python_ns,
                  target_field="value", target_op="<=", target=TARGET_NS,
                  notes=notes + f" The binding adds {python_ns - c_ns:.0f} ns per key.",
                  page_kind=page_kind),
           python_ns_per_key=python_ns, c_ns_per_key=c_ns, c_runs=c_limits[c_field],
           batch=BATCH)


def test_exists_many_key_list(benchmark, record, read_pool, c_limits):
    pool, batches = read_pool
    next_batch = itertools.cycle(batches).__next__
    run(benchmark, lambda: pool.exists_many(next_batch()))
    assert all(pool.exists_many(batches[0]))
    add_row(benchmark, record, "exists_many, keys as a list of 256 bytes", c_limits,
            "exists_many_ns_per_key", "Returns a list of 256 bools.", pool.page_kind)


def test_exists_many_packed_keys(benchmark, record, read_pool, c_limits):
    pool, batches = read_pool
    next_batch = itertools.cycle([b"".join(batch) for batch in batches]).__next__
    run(benchmark, lambda: pool.exists_many(next_batch()))
    add_row(benchmark, record, "exists_many, keys packed in one 8 KiB bytes", c_limits,
            "exists_many_ns_per_key", "Returns a list of 256 bools.", pool.page_kind)


def test_get_many_into_one_buffer(benchmark, record, read_pool, c_limits):
    pool, batches = read_pool
    next_batch = itertools.cycle(batches).__next__
    dst = np.zeros(BATCH * BLOCK_SIZE, dtype=np.uint8)
    run(benchmark, lambda: pool.get_many_into(next_batch(), dst))
    assert all(pool.get_many_into(batches[0], dst))
    add_row(benchmark, record, "get_many_into, key list, one 16 KiB numpy buffer", c_limits,
            "get_many_ns_per_key", "The buffer is split into 256 blocks of 64 B.",
            pool.page_kind)


def test_get_many_into_buffer_list(benchmark, record, read_pool, c_limits):
    pool, batches = read_pool
    next_batch = itertools.cycle(batches).__next__
    dsts = [np.zeros(BLOCK_SIZE, dtype=np.uint8) for _ in range(BATCH)]
    run(benchmark, lambda: pool.get_many_into(next_batch(), dsts))
    assert all(pool.get_many_into(batches[0], dsts))
    add_row(benchmark, record, "get_many_into, key list, list of 256 numpy arrays", c_limits,
            "get_many_ns_per_key", "One buffer-protocol export per destination.",
            pool.page_kind)


def test_put_many_new_keys(benchmark, record, c_limits):
    calls = (ROUNDS + WARMUP_ROUNDS) * ITERATIONS + 1
    keys = random_keys(STORED + 2 * calls * BATCH, seed=22)
    batches = [keys[i:i + BATCH] for i in range(STORED, len(keys), BATCH)]
    datas = [bytes([i % 251]) * BLOCK_SIZE for i in range(BATCH)]
    used = 0

    def put_batch():
        nonlocal used
        batch = batches[used]
        used += 1
        return pool.put_many(batch, datas)

    with make_pool() as pool:
        for key in keys[:STORED]:
            pool.put(key, datas[0])
        before = pool.stats()
        run(benchmark, put_batch)
        after = pool.stats()
        page_kind = pool.page_kind
    stored = after["puts"] - before["puts"]
    assert after["put_exists"] == before["put_exists"], "a put_many key already existed"
    assert stored == used * BATCH, (stored, used)
    add_row(benchmark, record, "put_many, 256 new keys, list of 256 bytes of 64 B", c_limits,
            "put_many_ns_per_key",
            f"Full pool, so each put evicts one block ({after['evictions'] - before['evictions']}"
            f" evictions for {stored} puts).", page_kind)
