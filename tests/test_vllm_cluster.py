"""vLLM end to end in cluster mode: KV saved through one daemon is loaded through another.

Two real `ems serve` daemons (separate processes, static peers, a cluster secret) run on
127.0.0.1. A first vLLM run is attached to daemon a and saves the first turn of every
session. A second vLLM run, attached to daemon b, replays the same first turn and must
load it from the cluster (b's own pool is empty), then runs a second turn.
"""
import os

import pytest

pytest.importorskip("vllm")

import cluster_rig as rig  # noqa: E402
import vllm_helpers as vh  # noqa: E402
from test_vllm_e2e import finish, sessions, start, stop  # noqa: E402

import ems._core as core  # noqa: E402

pytestmark = pytest.mark.usefixtures("vllm_env")


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    model_dir = vh.tiny_model_dir(tmp_path_factory)
    run_dir = str(tmp_path_factory.mktemp("cluster-run"))
    a, b = rig.plan(run_dir, ["a", "b"])
    peers = f"{a.peer},{b.peer}"
    for daemon in (a, b):
        rig.start(daemon, run_dir, peers=peers, capacity="256M")
    all_turns = sessions()
    runs = {}
    try:
        for name, daemon, turns in (("via-a", a, [s[:1] for s in all_turns]),
                                    ("via-b", b, [s[:2] for s in all_turns])):
            extra = {"mode": "cluster", "peers": peers, "socket_path": daemon.socket_path}
            process, log = start(name, model_dir, "cluster", run_dir, turns=turns, extra=extra,
                                 EMS_SECRET=rig.SECRET, EMS_RUN_DIR=run_dir)
            try:
                runs[name] = finish(process, log)
            finally:
                stop(process)
        stats = {}
        for daemon in (a, b):
            conn = core.Connection("127.0.0.1", daemon.port, secret=rig.SECRET.encode(),
                                   tenant="probe")
            stats[daemon.node_id] = conn.stats()
            conn.close()
        yield runs, stats, (a, b)
    finally:
        for daemon in (a, b):
            rig.stop(daemon)


def test_first_run_saves_through_daemon_a(cluster_runs):
    runs, stats, _ = cluster_runs
    assert all(r["cached"] == 0 for r in runs["via-a"]["turns"][0])
    assert stats["a"]["blocks"] > 0
    assert stats["a"]["local_puts"] > 0, "the worker should write through a's shared memory"


def test_second_run_loads_from_daemon_a(cluster_runs):
    runs, stats, _ = cluster_runs
    block = runs["via-b"]["block_size"]
    for record in runs["via-b"]["turns"][0]:
        usable = (record["prompt_len"] - 1) // block * block
        assert record["cached"] == usable, record
    # Those blocks crossed TCP from a, found through the directory.
    assert stats["a"]["remote_get_hits"] > 0
    assert stats["a"]["dir_lookups"] + stats["b"]["dir_lookups"] > 0


def test_outputs_identical_across_daemons(cluster_runs):
    runs, _, _ = cluster_runs
    first_a = [r["tokens"] for r in runs["via-a"]["turns"][0]]
    first_b = [r["tokens"] for r in runs["via-b"]["turns"][0]]
    assert first_a == first_b


def test_second_turn_cached_through_daemon_b(cluster_runs):
    runs, stats, _ = cluster_runs
    block = runs["via-b"]["block_size"]
    for record in runs["via-b"]["turns"][1]:
        assert record["cached"] >= (record["prompt_len"] - 1) // block * block - block
    assert stats["b"]["local_puts"] > 0


def test_daemons_logged_no_errors(cluster_runs):
    _, _, daemons = cluster_runs
    for daemon in daemons:
        log = daemon.log()
        assert "ERROR" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
