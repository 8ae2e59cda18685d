"""EMSConnector copies off the forward pass: per-layer loads, background saves, async loads,
the fallback when vLLM skips the per-layer hooks, transfer statistics and load settings.
"""
import threading

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

import vllm_helpers as vh  # noqa: E402
from connector_rig import (bind_load_step, block_bytes, close_rig, drain,  # noqa: E402
                           keys_of, load_step, lookup, make_rig, reset_kv, run_step,
                           saved_turn, tokens)
from ems.integrations.vllm import EMSConnector  # noqa: E402
from ems.integrations.vllm_config import load_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("vllm_env")

LOAD_BLOCKS = [7, 0, 13, 3, 5]   # vLLM blocks of the second turn: 3 loaded, 2 computed


@pytest.fixture
def rig(model_dir):
    rig = make_rig(model_dir)
    yield rig
    close_rig(rig)


@pytest.fixture
def async_rig(model_dir):
    rig = make_rig(model_dir, load_mode="async")
    yield rig
    close_rig(rig)


class Hold:
    """Blocks the worker's copy thread from start() until release()."""

    def __init__(self, rig):
        self.rig = rig
        self.event = threading.Event()

    def start(self):
        self.rig.worker.worker._copies.submit(self.event.wait)

    def release(self, after_s=0.0):
        threading.Timer(after_s, self.event.set).start()


# ---- per-layer loads -------------------------------------------------------------------


def test_layer_ready_when_waited(rig):
    """Each layer contains the cached bytes when wait_for_layer_load returns for it, though
    later layers may still be copying."""
    _, saved, prompt2 = saved_turn(rig, 40)
    reset_kv(rig)
    request, (matched, is_async) = lookup(rig, "turn2", prompt2)
    assert (matched, is_async) == (3 * rig.block_size, False)
    rig.scheduler.update_state_after_alloc(request, vh.kv_blocks(LOAD_BLOCKS), matched)
    request.num_computed_tokens = matched
    output = vh.new_request_step(request, LOAD_BLOCKS, len(prompt2) - matched)
    rig.worker.bind_connector_metadata(rig.scheduler.build_connector_meta(output))
    hold = Hold(rig)
    hold.start()
    rig.worker.start_load_kv(vh.forward_context())
    fill = torch.full(rig.layers[0][7].shape, -7.0).view(torch.uint8)
    assert torch.equal(block_bytes(rig, 0, 7), fill)   # queued behind the held job
    hold.release()
    for layer, name in enumerate(vh.layer_names(rig.config)):
        rig.worker.wait_for_layer_load(name)
        for block, block_id in enumerate(LOAD_BLOCKS[:3]):
            assert torch.equal(block_bytes(rig, layer, block_id), saved[(layer, block)])
        rig.worker.save_kv_layer(name, rig.layers[layer], None)
    rig.worker.wait_for_save()
    assert rig.worker.get_block_ids_with_load_errors() == set()
    rig.worker.clear_connector_metadata()


def test_load_before_start_load_kv(rig):
    """A forward pass that reaches attention before start_load_kv still waits for loads."""
    _, saved, prompt2 = saved_turn(rig, 41)
    reset_kv(rig)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    bind_load_step(rig, request, LOAD_BLOCKS, matched)
    names = vh.layer_names(rig.config)
    rig.worker.wait_for_layer_load(names[2])
    assert torch.equal(block_bytes(rig, 2, 13), saved[(2, 2)])
    rig.worker.start_load_kv(vh.forward_context())
    for name in names:
        rig.worker.wait_for_layer_load(name)
    rig.worker.wait_for_save()
    assert rig.worker.get_block_ids_with_load_errors() == set()
    rig.worker.clear_connector_metadata()


def test_layer_miss_saves_lower_layers(rig):
    """A miss on layer 2 fails the block; new blocks keep layers 0 and 1 (computed over
    loaded KV) and lose layers from 2 on."""
    _, _, prompt2 = saved_turn(rig, 42)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert rig.pool.delete(keys_of(rig, prompt2)[1][2])
    errors = load_step(rig, request, LOAD_BLOCKS, 0, matched, compute_blocks=[3, 5])
    assert errors == {0}
    new_block = keys_of(rig, prompt2)[3]
    present = [rig.pool.exists(key) for key in new_block]
    assert present == [True, True] + [False] * (len(new_block) - 2)


def test_hooks_missing_recompute(rig):
    """vLLM ran attention without wait_for_layer_load: every loaded block is reported
    failed, nothing of the step is saved, and later loads are synchronous."""
    _, saved, prompt2 = saved_turn(rig, 43)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    rig.scheduler.update_state_after_alloc(request, vh.kv_blocks(LOAD_BLOCKS), matched)
    request.num_computed_tokens = matched
    output = vh.new_request_step(request, LOAD_BLOCKS, len(prompt2) - matched)
    errors = run_step(rig, output, compute_blocks=[3, 5], hooks=False)
    assert errors == {7, 0, 13}
    assert not any(rig.pool.exists(key) for key in keys_of(rig, prompt2)[3])
    assert rig.worker.worker.load_mode == "sync"

    reset_kv(rig)
    request, (matched, _) = lookup(rig, "turn2-again", prompt2)
    errors = load_step(rig, request, [1, 2, 4, 6, 8], 0, matched)
    assert errors == set()
    assert torch.equal(block_bytes(rig, 3, 4), saved[(3, 2)])


# ---- background saves ------------------------------------------------------------------


def test_save_after_step_returns(rig):
    """wait_for_save returns while the saves are still queued; the next step's first hook
    (handle_preemptions) returns only when they are stored."""
    prompt = tokens(2 * rig.block_size + 5, 44)
    request = vh.make_request("a", prompt)
    rig.scheduler.get_num_new_matched_tokens(request, 0)
    hold = Hold(rig)
    run_step(rig, vh.new_request_step(request, [2, 4, 6], len(prompt)), [2, 4, 6],
             settle=False, after_bind=hold.start)
    keys = keys_of(rig, prompt)
    assert not rig.pool.exists(keys[0][0])
    hold.release(after_s=0.2)
    next_step = rig.scheduler.build_connector_meta(vh.cached_request_step(request, [], 0, 0))
    rig.worker.handle_preemptions(next_step)
    assert all(rig.pool.exists(key) for block in keys for key in block)
    assert rig.pool.get(keys[1][3]) == block_bytes(rig, 3, 4).numpy().tobytes()


def test_sync_saves_setting(model_dir):
    rig = make_rig(model_dir, async_saves=False)
    try:
        prompt = tokens(rig.block_size + 5, 45)
        request = vh.make_request("a", prompt)
        rig.scheduler.get_num_new_matched_tokens(request, 0)
        run_step(rig, vh.new_request_step(request, [3, 8], len(prompt)), [3, 8], settle=False)
        assert all(rig.pool.exists(key) for key in keys_of(rig, prompt)[0])
    finally:
        close_rig(rig)


def test_shutdown_finishes_saves(model_dir):
    """Saves still queued when vLLM shuts the worker down run before the pool closes."""
    rig = make_rig(model_dir)
    reader = rig.pool.attach(rig.pool_name)
    try:
        prompt = tokens(rig.block_size + 5, 46)
        request = vh.make_request("a", prompt)
        rig.scheduler.get_num_new_matched_tokens(request, 0)
        hold = Hold(rig)
        run_step(rig, vh.new_request_step(request, [3, 8], len(prompt)), [3, 8],
                 settle=False, after_bind=hold.start)
        assert not reader.exists(keys_of(rig, prompt)[0][1])
        hold.release(after_s=0.2)
    finally:
        close_rig(rig)
        reader.close()
    totals = rig.worker.worker.totals
    assert (totals["blocks_saved"], totals["save_errors"]) == (1, 0)


# ---- async loads -----------------------------------------------------------------------


def test_async_lookup_flags_async(async_rig):
    _, _, prompt2 = saved_turn(async_rig, 50)
    _, (matched, is_async) = lookup(async_rig, "turn2", prompt2)
    assert (matched, is_async) == (3 * async_rig.block_size, True)
    _, (none, none_async) = lookup(async_rig, "other", tokens(300, 51))
    assert (none, none_async) == (0, False)


def test_async_load_finishes(async_rig):
    """The load runs outside the forward pass and its request is reported finished once
    the bytes are in place."""
    rig = async_rig
    _, saved, prompt2 = saved_turn(rig, 52)
    reset_kv(rig)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    rig.scheduler.update_state_after_alloc(request, vh.kv_blocks(LOAD_BLOCKS), matched)
    hold = Hold(rig)
    errors = run_step(rig, vh.empty_step(), settle=False, after_bind=hold.start)
    assert errors == set()
    assert rig.finished_loads == set()
    hold.release()
    drain(rig)
    finished = rig.worker.get_finished(set())[1]
    assert finished == {"turn2"}
    assert rig.worker.get_block_ids_with_load_errors() == set()
    for (layer, block), expected in saved.items():
        assert torch.equal(block_bytes(rig, layer, LOAD_BLOCKS[block]), expected)


def test_async_miss_reported_with_finish(async_rig):
    """A failed async load reports its blocks no later than the request's finish."""
    rig = async_rig
    _, _, prompt2 = saved_turn(rig, 53)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    rig.scheduler.update_state_after_alloc(request, vh.kv_blocks(LOAD_BLOCKS), matched)
    assert rig.pool.delete(keys_of(rig, prompt2)[2][1])
    run_step(rig, vh.empty_step(), settle=True)
    finished = rig.finished_loads or rig.worker.get_finished(set())[1]
    errors = rig.worker.get_block_ids_with_load_errors()
    assert finished == {"turn2"}
    assert errors == {13}


# ---- statistics and settings -----------------------------------------------------------


def test_stats_count_transfers(rig):
    _, _, prompt2 = saved_turn(rig, 60)
    stats = rig.worker.get_kv_connector_stats()
    assert stats.data["blocks_saved"] == 3
    assert rig.worker.get_kv_connector_stats() is None     # reset by the read
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert rig.pool.delete(keys_of(rig, prompt2)[0][0])
    load_step(rig, request, LOAD_BLOCKS, 0, matched, compute_blocks=[3, 5])
    data = rig.worker.get_kv_connector_stats().data
    assert data["blocks_loaded"] == 2
    assert data["load_misses"] == 1
    assert data["saves_skipped"] == 1      # block 3 of prompt2
    assert data["blocks_saved"] == 0


def test_stats_aggregate():
    total = EMSConnector.build_kv_connector_stats({"blocks_loaded": 2, "load_wait_s": 0.5})
    total.aggregate(EMSConnector.build_kv_connector_stats({"blocks_loaded": 3}))
    assert total.reduce() == {"blocks_loaded": 5, "load_wait_s": 0.5}
    assert EMSConnector.build_kv_connector_stats({"blocks_saved": 0}).is_empty()


def test_load_mode_setting(monkeypatch):
    assert load_config({}, "e").load_mode == "layer"
    assert load_config({"load_mode": "sync"}, "e").load_mode == "sync"
    monkeypatch.setenv("EMS_LOAD_MODE", "async")
    assert load_config({"load_mode": "sync"}, "e").load_mode == "async"
    monkeypatch.setenv("EMS_LOAD_MODE", "eager")
    with pytest.raises(ValueError, match="'eager'"):
        load_config({}, "e")


def test_async_saves_setting(monkeypatch):
    assert load_config({}, "e").async_saves is True
    assert load_config({"async_saves": False}, "e").async_saves is False
    monkeypatch.setenv("EMS_ASYNC_SAVES", "off")
    assert load_config({}, "e").async_saves is False
    monkeypatch.setenv("EMS_ASYNC_SAVES", "maybe")
    with pytest.raises(ValueError, match="async_saves.*boolean.*'maybe'"):
        load_config({}, "e")


def test_sync_mode_loads(model_dir):
    rig = make_rig(model_dir, load_mode="sync")
    try:
        _, saved, prompt2 = saved_turn(rig, 61)
        reset_kv(rig)
        request, (matched, _) = lookup(rig, "turn2", prompt2)
        bind_load_step(rig, request, LOAD_BLOCKS, matched)
        hold = Hold(rig)
        hold.start()                         # sync loads do not use the copy thread
        rig.worker.start_load_kv(vh.forward_context())
        assert torch.equal(block_bytes(rig, 2, 0), saved[(2, 1)])
        hold.release()
        rig.worker.wait_for_save()
        assert rig.worker.get_block_ids_with_load_errors() == set()
    finally:
        close_rig(rig)


def test_unknown_layer_ignored(rig):
    """A layer vLLM did not register with the connector (for example a draft model's) has
    nothing to load or save, so its hooks return without error."""
    _, saved, prompt2 = saved_turn(rig, 62)
    reset_kv(rig)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    bind_load_step(rig, request, LOAD_BLOCKS, matched)
    rig.worker.start_load_kv(vh.forward_context())
    rig.worker.wait_for_layer_load("draft.layers.0.attn")
    rig.worker.save_kv_layer("draft.layers.0.attn", rig.layers[0], None)
    for layer, name in enumerate(vh.layer_names(rig.config)):
        rig.worker.wait_for_layer_load(name)
        rig.worker.save_kv_layer(name, rig.layers[layer], None)
    rig.worker.wait_for_save()
    assert rig.worker.get_block_ids_with_load_errors() == set()
    assert torch.equal(block_bytes(rig, 1, 0), saved[(1, 1)])
    rig.worker.clear_connector_metadata()
