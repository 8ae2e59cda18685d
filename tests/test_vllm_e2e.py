"""End to end: real vLLM on the CPU with and without the EMS connector.

Each configuration runs in its own subprocess (tests/vllm_e2e_run.py): one LLM, three
sessions of three turns, greedy decoding in float32, vLLM's prefix cache reset between
turns. The run with EMS must produce exactly the tokens of the run without it, and its
later turns must load their history from EMS.

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


def start(model_dir, pool_name, log_dir, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in vh.EMS_ENV}
    env.update(vh.VLLM_ENV, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
               **extra_env)
    args = json.dumps({"model": model_dir, "pool_name": pool_name, "sessions": sessions(),
                       "max_tokens": MAX_TOKENS})
    name = "ems" if pool_name else "plain"
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
    return json.loads(lines[-1][len("E2E_RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model_dir = vh.tiny_model_dir(tmp_path_factory)
    log_dir = str(tmp_path_factory.mktemp("vllm-e2e-logs"))
    plain = start(model_dir, None, log_dir, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    with_ems = start(model_dir, vh.unique_pool_name("e2e"), log_dir)
    try:
        return {"plain": finish(*plain), "ems": finish(*with_ems)}
    finally:
        stop(plain[0])
        stop(with_ems[0])


def later_turns(run):
    """Return the (previous turn, turn) record pairs of every session for turns 2 and 3."""
    turns = run["turns"]
    return [(turns[t - 1][s], turns[t][s])
            for t in range(1, len(turns)) for s in range(len(turns[t]))]


def test_e2e_outputs_identical(runs):
    plain = [[record["tokens"] for record in turn] for turn in runs["plain"]["turns"]]
    with_ems = [[record["tokens"] for record in turn] for turn in runs["ems"]["turns"]]
    assert with_ems == plain


def test_e2e_outputs_full_length(runs):
    lengths = {len(record["tokens"]) for turn in runs["ems"]["turns"] for record in turn}
    assert lengths == {MAX_TOKENS}


def test_e2e_plain_prefix_reset(runs):
    """Without EMS nothing is cached in later turns: the prefix-cache reset works, so the
    cached tokens of the EMS run came from EMS."""
    cached = [record["cached"] for _, record in later_turns(runs["plain"])]
    assert cached == [0] * len(cached)


def test_e2e_first_turn_cold(runs):
    cached = [record["cached"] for record in runs["ems"]["turns"][0]]
    assert cached == [0] * len(cached)


def test_e2e_later_turns_cached(runs):
    cached = [record["cached"] for _, record in later_turns(runs["ems"])]
    assert all(count > 0 for count in cached), cached


def test_e2e_cached_block_aligned(runs):
    block_size = runs["ems"]["block_size"]
    cached = [record["cached"] for _, record in later_turns(runs["ems"])]
    assert all(count % block_size == 0 for count in cached), cached


def test_e2e_computes_new_tokens_only(runs):
    """Computed tokens (prompt - cached) are the turn's new tokens, up to block rounding."""
    block_size = runs["ems"]["block_size"]
    for previous, record in later_turns(runs["ems"]):
        new_tokens = record["prompt_len"] - previous["prompt_len"]
        computed = record["prompt_len"] - record["cached"]
        assert new_tokens <= computed < new_tokens + block_size, (previous, record)


def test_e2e_pool_puts(runs):
    assert runs["ems"]["stats"]["puts"] > 0


def test_e2e_pool_hits(runs):
    assert runs["ems"]["stats"]["hits"] > 0
