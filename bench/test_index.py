"""Index lookups per second, single-threaded, in C (bench/c/bench_index.c, mode lookup).

The program fills a pool with max_blocks = 1,000,000 blocks of 64 bytes (data region and
entry table sized to hold them all), then times, in interleaved passes over every present
key in random order: ems_index_lookup on pool.index, ems_pool_exists (index lookup plus
the entry checks of the public call) and ems_pool_exists_many in batches of 256.

Physical limit: random 64-byte line reads per second over a buffer as large as the index
buckets plus the entry table (63.6 MB here), with independent precomputed addresses, on the
same page size as the pool. A lookup needs at least one such line (its bucket), so the
line rate bounds the lookup rate; ratio = lookups/s / lines/s. The latency of one
dependent miss over the same buffer is recorded too, because a lookup's loads are
dependent (bucket, then the entry it names). Target: >= 10 million lookups/s. A second run
on 16,384 blocks, whose tables fit in L2, gives the CPU cost of the same calls.

pytest-benchmark's own time for this test is the wall time of the whole C program, fill
included. The lookup rates are in extra_info and in the report.
"""
from __future__ import annotations

from bench_common import run_json
from report import Record

BLOCKS = 1_000_000
CACHED_BLOCKS = 16_384
BLOCK_SIZE = 64
PASSES = 7
TARGET_PER_S = 10e6


def run_lookup(binary, blocks, min_lookups):
    return run_json(binary, "lookup", "--blocks", str(blocks), "--block-size", str(BLOCK_SIZE),
                    "--passes", str(PASSES), "--min-lookups", str(min_lookups))


def add_rows(record, result, label, with_target):
    limit = result["random_lines_per_s_median"]
    footprint_mb = result["footprint_bytes"] / 1e6
    common = (f"{result['present_keys']:,} present keys of {result['requested_blocks']:,} put, "
              f"because {result['evictions']} were evicted by index bucket overflow during "
              f"the fill. Median of {PASSES} passes of {result['lookups_per_pass']:,} lookups. "
              f"The limit reads random lines over {footprint_mb:.1f} MB (index + entry "
              f"table), where one dependent miss takes "
              f"{result['dependent_line_latency_ns']:.0f} ns.")
    details = {key: result[key] for key in (
        "present_keys", "evictions", "page_kind", "footprint_bytes",
        "dependent_line_latency_ns", "index_lookup_per_s", "exists_per_s",
        "exists_many_256_per_s", "random_lines_per_s", "fill_s")}
    rows = [("ems_index_lookup", "index_lookup_per_s_median", "index_lookup_hits"),
            ("ems_pool_exists", "exists_per_s_median", "exists_hits"),
            ("ems_pool_exists_many, batches of 256", "exists_many_256_per_s_median",
             "exists_many_hits")]
    for i, (name, field, hits_field) in enumerate(rows):
        assert result[hits_field] == PASSES * result["lookups_per_pass"], \
            f"{name} missed keys that are present"
        value = result[field]
        record(Record(group="lookup", name=f"{name}, {label}", value=value, unit="lookups/s",
                      limit=limit, limit_name="random 64-byte line reads", limit_unit="lines/s",
                      ratio=value / limit, target_field="value" if with_target else None,
                      target_op=">=", target=TARGET_PER_S if with_target else None,
                      notes=common if i == 0 else "", page_kind=result["page_kind"]),
               **(details if i == 0 else {}))


def test_index_lookup_c(benchmark, record, bench_binary):
    result = benchmark.pedantic(run_lookup, args=(bench_binary, BLOCKS, 0), rounds=1,
                                iterations=1)
    add_rows(record, result, "1M blocks of 64 B, random present keys", with_target=True)


def test_index_lookup_c_in_cache(benchmark, record, bench_binary):
    """The same calls on 16,384 blocks, whose index and entry table (1 MB) fit in the 2 MiB
    L2 of one core: the CPU cost of a lookup without cache misses (diagnostic)."""
    result = benchmark.pedantic(run_lookup, args=(bench_binary, CACHED_BLOCKS, 2_000_000),
                                rounds=1, iterations=1)
    add_rows(record, result, "16K blocks, index in L2 (diagnostic)", with_target=False)
