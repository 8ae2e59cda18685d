"""End to end: real vLLM on the CPU with a pool smaller than the sessions' KV and a spill tier.

The pool holds 2 MiB (16 of the tiny model's 128 KiB block layers) while three sessions of
three turns save about three times that, so later turns find most of their history on disk
only. Each run must still produce exactly the tokens of vLLM alone, and its later turns must
load their history (from DRAM or disk). Two runs: CLOCK eviction, and whole-session
eviction; both with scheduler-aware prefetch (the default). Runs as in test_vllm_e2e.py.
"""
import re

import pytest

pytest.importorskip("vllm")

import vllm_helpers as vh  # noqa: E402
from test_vllm_e2e import finish, later_turns, start, stop  # noqa: E402

POOL_BYTES = 2 << 20
RUNS = {"spill-clock": "clock", "spill-session": "session"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model_dir = vh.tiny_model_dir(tmp_path_factory)
    log_dir = str(tmp_path_factory.mktemp("vllm-spill-logs"))
    started = {"plain": start("plain", model_dir, None, log_dir,
                              VLLM_ENABLE_V1_MULTIPROCESSING="0")}
    results = {}
    try:
        for name, policy in RUNS.items():
            pool_name = vh.unique_pool_name(name)
            extra = {"pool_name": pool_name, "pool_capacity_bytes": POOL_BYTES,
                     "pool_pages": "small", "eviction": policy, "spill_bytes": 256 << 20,
                     "spill_dir": str(tmp_path_factory.mktemp(name))}
            started[name] = start(name, model_dir, pool_name, log_dir, extra=extra)
            results[name] = finish(*started[name])
        results["plain"] = finish(*started["plain"])
        return results
    finally:
        for process, _ in started.values():
            stop(process)


@pytest.mark.parametrize("name", RUNS)
def test_spill_outputs_identical(runs, name):
    plain = [[record["tokens"] for record in turn] for turn in runs["plain"]["turns"]]
    assert [[record["tokens"] for record in turn] for turn in runs[name]["turns"]] == plain


@pytest.mark.parametrize("name", RUNS)
def test_spill_pool_evicted_to_disk(runs, name):
    stats, spill = runs[name]["stats"], runs[name]["spill"]
    assert stats["evictions"] > 0, "the pool was large enough to hold everything"
    assert spill["blocks"] > 0, "nothing reached the spill directory"
    assert stats["spill_dropped"] == 0


@pytest.mark.parametrize("name", RUNS)
def test_spill_later_turns_cached(runs, name):
    cached = [record["cached"] for _, record in later_turns(runs[name])]
    assert all(count > 0 for count in cached), cached


@pytest.mark.parametrize("name", RUNS)
def test_spill_prefetch_used(runs, name):
    log = runs[name]["log"]
    assert "EMS spill tier in" in log
    assert "EMS load missed" not in log
    found = re.search(r"EMS scheduler: .* (\d+) prefetches", log)
    assert found, "the scheduler did not report its spill lookups"
    assert int(found.group(1)) > 0, "no waiting request was prefetched"
