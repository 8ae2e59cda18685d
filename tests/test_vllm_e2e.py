"""End to end: real vLLM on the CPU with and without the EMS connector.

Each configuration runs in its own subprocess (tests/vllm_e2e_run.py): one LLM, three
sessions of three turns, greedy decoding in float32, vLLM's prefix cache reset between
turns. The runs with EMS, one with the default per-layer loads ("ems") and one with
asynchronous loads ("ems-async"), must produce exactly the tokens of the run without it,
and their later turns must load their history from EMS.

The EMS run uses vLLM's default process split (engine core and worker in processes of
their own), which the connector is built for. The reference run keeps the engine in one
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which starts in a few seconds instead of
15-40 s, and both runs go in parallel. In float32 both modes gave identical tokens here.
Both run the model on one OpenMP thread with no core binding. By default vLLM gives the
worker one thread without a KV connector and two with one (on 2 cores), and it pins
threads to cores, which stalls a run when other work keeps that core busy.
"""
import json
import os
import random
import signal
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

import vllm_helpers as vh  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "vllm_e2e_run.py")
TIMEOUT_S = 240
MAX_TOKENS = 16


def sessions():
    """Return the new token ids of each session and turn: 300 to open, then 120 per turn."""
    rng = random.Random(7)
    return [[[rng.randrange(10, 2000) for _ in range(n)] for n in (300, 120, 120)]
            for _ in range(3)]


EMS_RUNS = ("ems", "ems-async")


def start(name, model_dir, pool_name, log_dir, turns=None, extra=None, **extra_env):
    """Start one vLLM run: `turns` replaces sessions(), `extra` the connector settings."""
    env = {k: v for k, v in os.environ.items() if k not in vh.EMS_ENV}
    # INFO: the tests read the connector's log lines.
    env.update(vh.VLLM_ENV, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
               VLLM_LOGGING_LEVEL="INFO", **extra_env)
    args = json.dumps({"model": model_dir, "pool_name": pool_name,
                       "sessions": turns or sessions(), "max_tokens": MAX_TOKENS,
                       "extra": extra})
    # vLLM logs to stdout, so both streams go to one file that a failure message quotes.
    log = open(os.path.join(log_dir, f"{name}.log"), "w+")
    # A session of its own, so a timeout kills vLLM's engine and worker processes too.
    process = subprocess.Popen([sys.executable, SCRIPT, args], env=env, text=True,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def stop(process):
    """Kill a run that is still going, with the vLLM processes it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def finish(process, log):
    try:
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop(process)
    log.seek(0)
    output = log.read()
    log.close()
    lines = [line for line in output.splitlines() if line.startswith("E2E_RESULT ")]
    if process.returncode != 0 or not lines:
        pytest.fail(f"vLLM run failed (exit {process.returncode}):\n{output[-6000:]}")
    result = json.loads(lines[-1][len("E2E_RESULT "):])
    result["log"] = output
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model_dir = vh.tiny_model_dir(tmp_path_factory)
    log_dir = str(tmp_path_factory.mktemp("vllm-e2e-logs"))
    started = {"plain": start("plain", model_dir, None, log_dir,
                              VLLM_ENABLE_V1_MULTIPROCESSING="0"),
               "ems": start("ems", model_dir, vh.unique_pool_name("e2e"), log_dir)}
    try:
        results = {name: finish(*run) for name, run in started.items()}
        # The third run starts after the first two, so no more than two share the CPUs.
        started["ems-async"] = start("ems-async", model_dir, vh.unique_pool_name("e2e-async"),
                                     log_dir, EMS_LOAD_MODE="async")
        results["ems-async"] = finish(*started["ems-async"])
        return results
    finally:
        for process, _ in started.values():
            stop(process)


def later_turns(run):
    """Return the (previous turn, turn) record pairs of every session for turns 2 and 3."""
    turns = run["turns"]
    return [(turns[t - 1][s], turns[t][s])
            for t in range(1, len(turns)) for s in range(len(turns[t]))]


@pytest.mark.parametrize("name", EMS_RUNS)
def test_e2e_outputs_identical(runs, name):
    plain = [[record["tokens"] for record in turn] for turn in runs["plain"]["turns"]]
    with_ems = [[record["tokens"] for record in turn] for turn in runs[name]["turns"]]
    assert with_ems == plain


@pytest.mark.parametrize("name", EMS_RUNS)
def test_e2e_outputs_full_length(runs, name):
    lengths = {len(record["tokens"]) for turn in runs[name]["turns"] for record in turn}
    assert lengths == {MAX_TOKENS}


def test_e2e_plain_prefix_reset(runs):
    """Without EMS nothing is cached in later turns: the prefix-cache reset works, so the
    cached tokens of the EMS runs came from EMS."""
    cached = [record["cached"] for _, record in later_turns(runs["plain"])]
    assert cached == [0] * len(cached)


@pytest.mark.parametrize("name", EMS_RUNS)
def test_e2e_first_turn_cold(runs, name):
    cached = [record["cached"] for record in runs[name]["turns"][0]]
    assert cached == [0] * len(cached)


@pytest.mark.parametrize("name", EMS_RUNS)
def test_e2e_later_turns_cached(runs, name):
    cached = [record["cached"] for _, record in later_turns(runs[name])]
    assert all(count > 0 for count in cached), cached


@pytest.mark.parametrize("name", EMS_RUNS)
def test_e2e_cached_block_aligned(runs, name):
    block_size = runs[name]["block_size"]
    cached = [record["cached"] for _, record in later_turns(runs[name])]
    assert all(count % block_size == 0 for count in cached), cached


@pytest.mark.parametrize("name", EMS_RUNS)
def test_e2e_computes_new_tokens_only(runs, name):
    """Computed tokens (prompt - cached) are the turn's new tokens, up to block rounding."""
    block_size = runs[name]["block_size"]
    for previous, record in later_turns(runs[name]):
        new_tokens = record["prompt_len"] - previous["prompt_len"]
        computed = record["prompt_len"] - record["cached"]
        assert new_tokens <= computed < new_tokens + block_size, (previous, record)


@pytest.mark.parametrize("name", EMS_RUNS)
def test_e2e_pool_puts(runs, name):
    assert runs[name]["stats"]["puts"] > 0


@pytest.mark.parametrize("name", EMS_RUNS)
def test_e2e_pool_hits(runs, name):
    assert runs[name]["stats"]["hits"] > 0


def test_e2e_layer_hooks_used(runs):
    """vLLM's attention called the per-layer hooks, so the default run kept loading layer
    by layer (the connector logs an error and falls back to synchronous loads if not)."""
    log = runs["ems"]["log"]
    assert "layer loads" in log
    assert "did not call wait_for_layer_load" not in log


@pytest.mark.parametrize("name", EMS_RUNS)
def test_e2e_no_load_misses(runs, name):
    assert "EMS load missed" not in runs[name]["log"]
