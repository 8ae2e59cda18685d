"""Lookups of reader threads while a writer thread puts and deletes (C, bench_index mixed).

The pool holds 1,000,000 blocks of 64 B that the readers look up in random order with
ems_pool_exists. When busy, the writer thread puts a new key and deletes the key it put
65,536 puts earlier, without pause, so the index changes under the readers all the time.
Idle and busy phases of 1 s alternate (5 of each); the report gives medians.

Physical limit: the readers' lookup rate in the idle phases of the same run. Ratio = busy
rate / idle rate; target: readers slow by no more than 30% (ratio >= 0.7).

The bench machine has 2 cores. With 2 readers and a busy writer, 3 runnable threads share
2 cores, so the scheduler alone takes about a third of the readers' CPU time. Each run is
therefore also reported per reader CPU-second (lookups / CPU time of the reader threads,
from CLOCK_THREAD_CPUTIME_ID). That removes the scheduling share and leaves the cost of
sharing cache lines with the writer. A 1-reader variant (2 threads on 2 cores) runs too.
Two diagnostic 1-reader runs locate where a busy writer slows the readers down. One calls
ems_index_lookup alone. The other makes every check of ems_pool_exists but reads the pool
geometry (entry count, slab count, data offset) from reader-private copies instead of the
shared pool header (bench_index.c, exists_cached_geometry).

pytest-benchmark's own time for these tests is the wall time of the C program.
"""
from __future__ import annotations

import pytest

from bench_common import run_json
from report import Record

BLOCKS = 1_000_000
BLOCK_SIZE = 64
WINDOW = 65536
PHASES = 5
PHASE_MS = 1000
TARGET_RATIO = 0.7


def run_mixed(binary, readers, op, phases=PHASES):
    return run_json(binary, "mixed", "--blocks", str(BLOCKS), "--block-size", str(BLOCK_SIZE),
                    "--window", str(WINDOW), "--readers", str(readers), "--phases",
                    str(phases), "--phase-ms", str(PHASE_MS), "--op", op, timeout=300)


def details_of(result) -> dict:
    keys = ("readers", "op", "phases", "phase_ms", "present_keys", "window", "page_kind",
            "evictions", "fill_evictions", "writer_puts", "deletes", "busy_lookups", "busy_hits", "idle_reader_per_s",
            "busy_reader_per_s", "idle_reader_cpu_share", "busy_reader_cpu_share",
            "writer_ops_per_s_median", "idle_reader_per_cpu_s_median",
            "busy_reader_per_cpu_s_median")
    return {key: result[key] for key in keys}


def add_rows(record, result, label, wall_target):
    threads = result["readers"] + 1
    share = (f"Readers got {result['idle_reader_cpu_share']:.2f} CPU seconds per wall "
             f"second idle and {result['busy_reader_cpu_share']:.2f} busy.")
    churn_evictions = result["evictions"] - result["fill_evictions"]
    writer = (f"The writer made {result['writer_ops_per_s_median'] / 1e6:.2f} M ops/s "
              f"(put or delete). {churn_evictions:,} of its {result['writer_puts']:,} puts "
              f"({100 * churn_evictions / max(1, result['writer_puts']):.2f}%) evicted a "
              "block from a full pair of index buckets, though the pool had free entries "
              f"and slots. {result['busy_lookups'] - result['busy_hits']:,} of "
              f"{result['busy_lookups']:,} busy-phase lookups missed reader keys evicted "
              "that way.")
    idle, busy = result["idle_reader_per_s_median"], result["busy_reader_per_s_median"]
    record(Record(group="concurrency",
                  name=f"{label}: readers' lookups/s, {threads} threads on 2 cores",
                  value=busy, unit="lookups/s", limit=idle, limit_name="writer idle",
                  ratio=busy / idle, target_field="ratio" if wall_target else None,
                  target_op=">=", target=TARGET_RATIO if wall_target else None,
                  notes=f"{share} {writer}", page_kind=result["page_kind"]),
           **details_of(result))
    idle_cpu = result["idle_reader_per_cpu_s_median"]
    busy_cpu = result["busy_reader_per_cpu_s_median"]
    record(Record(group="concurrency", name=f"{label}: lookups per reader CPU-second",
                  value=busy_cpu, unit="lookups/s", limit=idle_cpu, limit_name="writer idle",
                  ratio=busy_cpu / idle_cpu, notes="", page_kind=result["page_kind"]))


@pytest.mark.parametrize("readers", [2, 1])
def test_readers_with_writer(benchmark, record, bench_binary, readers):
    result = benchmark.pedantic(run_mixed, args=(bench_binary, readers, "exists"),
                                rounds=1, iterations=1)
    add_rows(record, result, f"{readers} reader{'s' if readers > 1 else ''}, ems_pool_exists",
             wall_target=True)


DIAGNOSTIC_OPS = {
    "index": "1 reader, ems_index_lookup only (diagnostic)",
    "cached": "1 reader, exists checks with header fields copied (diagnostic)",
}


@pytest.mark.parametrize("op", list(DIAGNOSTIC_OPS))
def test_reader_variant_with_writer(benchmark, record, bench_binary, op):
    result = benchmark.pedantic(run_mixed, args=(bench_binary, 1, op, 3), rounds=1,
                                iterations=1)
    add_rows(record, result, DIAGNOSTIC_OPS[op], wall_target=False)
