"""EMSConnector against real vLLM classes, both roles in this process (connector_rig):
lookups, saves, loads, load misses and settings, with the default "layer" loads.
"""
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

import ems  # noqa: E402
import vllm_helpers as vh  # noqa: E402
from connector_rig import (FILL, NUM_BLOCKS, block_bytes, close_rig, keys_of,  # noqa: E402
                           load_step, lookup, make_rig, prefill, reset_kv, run_step,
                           saved_turn, snapshot, tokens)


pytestmark = pytest.mark.usefixtures("vllm_env")


@pytest.fixture
def rig(model_dir):
    """A worker connector with registered CPU KV tensors and a scheduler connector."""
    rig = make_rig(model_dir)
    yield rig
    close_rig(rig)


# ---- worker: registration and saves ----------------------------------------------------


def test_register_pool_attachable(rig):
    reader = ems.Pool.attach(rig.pool_name)
    try:
        assert reader.stats()["blocks"] == 0
    finally:
        reader.close()


def test_save_full_blocks_only(rig):
    bs = rig.block_size
    prefill(rig, "a", tokens(3 * bs + 40, 1), [4, 9, 2, 11])
    assert rig.pool.stats()["blocks"] == 3 * len(rig.layers)


def test_save_bytes_equal_kv(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 1)
    block_ids = [4, 9, 2, 11]
    prefill(rig, "a", prompt, block_ids)
    for block, per_layer in enumerate(keys_of(rig, prompt)):
        for layer, key in enumerate(per_layer):
            stored = rig.pool.get(key)
            assert stored == block_bytes(rig, layer, block_ids[block]).numpy().tobytes()


def test_save_chunked_prefill(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 2)
    request = vh.make_request("a", prompt)
    assert rig.scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    rig.scheduler.update_state_after_alloc(request, vh.kv_blocks([5, 6]), 0)
    run_step(rig, vh.new_request_step(request, [5, 6], bs + 72), [5, 6])
    assert rig.pool.stats()["blocks"] == 1 * len(rig.layers)
    run_step(rig, vh.cached_request_step(request, [7, 8], bs + 72, len(prompt) - bs - 72),
             [7, 8])
    assert rig.pool.stats()["blocks"] == 3 * len(rig.layers)
    key = keys_of(rig, prompt)[2][1]
    assert rig.pool.get(key) == block_bytes(rig, 1, 7).numpy().tobytes()


def test_save_skips_decode_blocks(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 3)
    request = prefill(rig, "a", prompt, [0, 1, 2, 3], finish=False)
    # Decode steps past the prompt until a fourth block fills with generated tokens.
    run_step(rig, vh.cached_request_step(request, [], 4 * bs - 1, 1), [3])
    run_step(rig, vh.cached_request_step(request, [12], 4 * bs, 1), [12])
    assert rig.pool.stats()["blocks"] == 3 * len(rig.layers)


# ---- scheduler: lookups ----------------------------------------------------------------


def test_match_block_aligned(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 4)
    prefill(rig, "a", prompt, [0, 1, 2, 3])
    _, (matched, _) = lookup(rig, "b", prompt + tokens(50, 5))
    assert matched == 3 * bs


def test_match_sync(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 4)
    prefill(rig, "a", prompt, [0, 1, 2, 3])
    _, (matched, is_async) = lookup(rig, "b", prompt)
    assert matched > 0
    assert is_async is False


def test_match_leaves_last_token(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs, 6)
    prefill(rig, "a", prompt, [0, 1, 2])
    assert rig.pool.stats()["blocks"] == 3 * len(rig.layers)
    _, (matched, _) = lookup(rig, "b", prompt)
    assert matched == 2 * bs


def test_match_beyond_computed(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 7)
    prefill(rig, "a", prompt, [0, 1, 2, 3])
    _, (matched, _) = lookup(rig, "b", prompt, num_computed=bs)
    assert matched == 2 * bs


def test_match_all_computed(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 7)
    prefill(rig, "a", prompt, [0, 1, 2, 3])
    _, result = lookup(rig, "b", prompt, num_computed=3 * bs)
    assert result == (0, False)


def test_match_repeatable(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 8)
    prefill(rig, "a", prompt, [0, 1, 2, 3])
    request, first = lookup(rig, "b", prompt)
    second = rig.scheduler.get_num_new_matched_tokens(request, 0)
    assert first[0] == 3 * bs
    assert second == first


def test_match_stops_at_missing_layer(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 9)
    prefill(rig, "a", prompt, [0, 1, 2, 3])
    assert rig.pool.delete(keys_of(rig, prompt)[1][2])
    _, (matched, _) = lookup(rig, "b", prompt)
    assert matched == bs


def test_match_missing_first_block(rig):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 10)
    prefill(rig, "a", prompt, [0, 1, 2, 3])
    assert rig.pool.delete(keys_of(rig, prompt)[0][len(rig.layers) - 1])
    _, result = lookup(rig, "b", prompt)
    assert result == (0, False)


def test_match_chained_prefix(rig):
    """Block 1 of prompt A after block 0 of prompt B is another prefix: a miss."""
    bs = rig.block_size
    first = tokens(3 * bs + 40, 11)
    second = tokens(3 * bs + 40, 111)
    prefill(rig, "a", first, [0, 1, 2, 3])
    prefill(rig, "b", second, [4, 5, 6, 7])
    mixed = second[:bs] + first[bs:]
    _, (matched, _) = lookup(rig, "c", mixed)
    assert matched == bs


def test_match_other_tenant(rig, model_dir):
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, 12)
    prefill(rig, "a", prompt, [0, 1, 2, 3])
    _, (own, _) = lookup(rig, "b", prompt)
    assert own == 3 * bs
    config = vh.engine_config(model_dir, rig.pool_name, tenant="other")
    other = vh.scheduler_connector(config, NUM_BLOCKS)
    try:
        matched, _ = other.get_num_new_matched_tokens(vh.make_request("b", prompt), 0)
    finally:
        other.shutdown()
    assert matched == 0


def test_lookup_before_pool(model_dir):
    config = vh.engine_config(model_dir, vh.unique_pool_name("nopool"))
    scheduler = vh.scheduler_connector(config, NUM_BLOCKS)
    try:
        result = scheduler.get_num_new_matched_tokens(
            vh.make_request("a", list(range(10, 10 + 400))), 0)
    finally:
        scheduler.shutdown()
    assert result == (0, False)


def test_lookup_attaches_later(model_dir):
    """A scheduler whose first lookup came before the worker created the pool attaches
    on a later lookup."""
    pool_name = vh.unique_pool_name("late")
    config = vh.engine_config(model_dir, pool_name)
    scheduler = vh.scheduler_connector(config, NUM_BLOCKS)
    worker = vh.worker_connector(config, NUM_BLOCKS)
    try:
        kv = vh.cpu_kv_caches(config, NUM_BLOCKS)
        rig = SimpleNamespace(config=config, kv=kv, worker=worker, scheduler=scheduler,
                              block_size=config.cache_config.block_size,
                              layers=list(kv.values()),
                              generator=torch.Generator().manual_seed(5))
        prompt = tokens(2 * rig.block_size + 10, 13)
        assert lookup(rig, "a", prompt)[1] == (0, False)
        worker.register_kv_caches(kv)
        prefill(rig, "b", prompt, [0, 1, 2])
        deadline = time.monotonic() + 5
        matched = 0
        while matched == 0 and time.monotonic() < deadline:
            _, (matched, _) = lookup(rig, "c", prompt)
            time.sleep(0.1)
    finally:
        scheduler.shutdown()
        worker.shutdown()
    assert matched == 2 * rig.block_size


# ---- loads -----------------------------------------------------------------------------


def test_load_bytes_equal(rig):
    bs = rig.block_size
    _, saved, prompt2 = saved_turn(rig, 20)
    reset_kv(rig)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert matched == 3 * bs
    block_ids = [7, 0, 13, 3, 5]
    errors = load_step(rig, request, block_ids, 0, matched, compute_blocks=[3, 5])
    assert errors == set()
    for (layer, block), expected in saved.items():
        assert torch.equal(block_bytes(rig, layer, block_ids[block]), expected)


def test_load_leaves_other_blocks(rig):
    _, _, prompt2 = saved_turn(rig, 21)
    reset_kv(rig)
    untouched = [b for b in range(NUM_BLOCKS) if b not in (7, 0, 13)]
    before = snapshot(rig, untouched)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert matched == 3 * rig.block_size
    load_step(rig, request, [7, 0, 13, 3, 5], 0, matched)
    after = snapshot(rig, untouched)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_load_after_local_hit(rig):
    """vLLM's own prefix cache contains block 0, so EMS loads blocks 1 and 2 only."""
    bs = rig.block_size
    _, saved, prompt2 = saved_turn(rig, 22)
    reset_kv(rig)
    request, (matched, _) = lookup(rig, "turn2", prompt2, num_computed=bs)
    assert matched == 2 * bs
    block_ids = [4, 0, 13, 3, 5]  # block 0 is the local hit, still in place
    load_step(rig, request, block_ids, bs, matched)
    assert torch.equal(block_bytes(rig, 1, 0), saved[(1, 1)])
    assert torch.equal(block_bytes(rig, 2, 13), saved[(2, 2)])
    fill = torch.full(rig.layers[0][4].shape, FILL).view(torch.uint8)
    assert torch.equal(block_bytes(rig, 0, 4), fill)


def test_load_saves_new_blocks(rig):
    """The loading step saves the blocks it computes, not the blocks it loaded."""
    _, _, prompt2 = saved_turn(rig, 23)
    layers = len(rig.layers)
    puts, put_exists = rig.pool.stats()["puts"], rig.pool.stats()["put_exists"]
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert matched == 3 * rig.block_size
    load_step(rig, request, [7, 0, 13, 3, 5], 0, matched, compute_blocks=[3, 5])
    stats = rig.pool.stats()
    assert stats["puts"] == puts + layers
    assert stats["put_exists"] == put_exists
    key = keys_of(rig, prompt2)[3][0]
    assert rig.pool.get(key) == block_bytes(rig, 0, 3).numpy().tobytes()


def test_load_miss_reports_block(rig):
    bs = rig.block_size
    _, _, prompt2 = saved_turn(rig, 24)
    reset_kv(rig)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert matched == 3 * bs
    assert rig.pool.delete(keys_of(rig, prompt2)[1][0])  # evicted after the lookup
    errors = load_step(rig, request, [7, 0, 13, 3, 5], 0, matched)
    assert errors == {0}


def test_load_miss_errors_taken_once(rig):
    _, _, prompt2 = saved_turn(rig, 25)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert rig.pool.delete(keys_of(rig, prompt2)[2][3])
    errors = load_step(rig, request, [7, 0, 13, 3, 5], 0, matched)
    assert errors == {13}
    assert rig.worker.get_block_ids_with_load_errors() == set()


def test_load_miss_no_wrong_bytes(rig):
    _, saved, prompt2 = saved_turn(rig, 26)
    reset_kv(rig)
    untouched = [b for b in range(NUM_BLOCKS) if b not in (7, 0, 13)]
    before = snapshot(rig, untouched)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert matched == 3 * rig.block_size
    assert rig.pool.delete(keys_of(rig, prompt2)[1][0])
    load_step(rig, request, [7, 0, 13, 3, 5], 0, matched)
    after = snapshot(rig, untouched)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(block_bytes(rig, 0, 7), saved[(0, 0)])
    assert torch.equal(block_bytes(rig, 3, 13), saved[(3, 2)])


def test_load_miss_recompute_lookup(rig):
    """After a miss, a new lookup of the same prompt stops before the missing block."""
    bs = rig.block_size
    _, _, prompt2 = saved_turn(rig, 27)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert matched == 3 * bs
    assert rig.pool.delete(keys_of(rig, prompt2)[1][0])
    load_step(rig, request, [7, 0, 13, 3, 5], 0, matched)
    _, (again, _) = lookup(rig, "turn2-retry", prompt2)
    assert again == bs


def test_load_miss_no_save(rig):
    """The step of a failed load computes block 3 over a block that was not loaded, so
    those bytes are wrong and must not reach the pool.

    With synchronous loads vLLM runs the forward pass in the same step, then discards the
    request's output and recomputes from the first failed block."""
    bs = rig.block_size
    _, _, prompt2 = saved_turn(rig, 28)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert matched == 3 * bs
    assert rig.pool.delete(keys_of(rig, prompt2)[1][0])
    errors = load_step(rig, request, [7, 0, 13, 3, 5], 0, matched, compute_blocks=[3, 5])
    assert errors == {0}
    assert not rig.pool.exists(keys_of(rig, prompt2)[3][0])


def test_load_miss_recompute_saves(rig):
    """vLLM recomputes from the failed block in the next step, and that step saves the
    recomputed blocks, the missing one included."""
    bs = rig.block_size
    _, _, prompt2 = saved_turn(rig, 29)
    request, (matched, _) = lookup(rig, "turn2", prompt2)
    assert rig.pool.delete(keys_of(rig, prompt2)[1][0])
    errors = load_step(rig, request, [7, 0, 13, 3, 5], 0, matched, compute_blocks=[3, 5])
    assert errors == {0}
    # vLLM truncates num_computed_tokens to the first failed block (block 1).
    run_step(rig, vh.cached_request_step(request, [], bs, len(prompt2) - bs), [0, 13, 3, 5])
    keys = keys_of(rig, prompt2)
    assert rig.pool.get(keys[1][0]) == block_bytes(rig, 0, 0).numpy().tobytes()
    assert rig.pool.get(keys[3][2]) == block_bytes(rig, 2, 3).numpy().tobytes()


# ---- connector surface -----------------------------------------------------------------


def test_request_finished_frees_now(rig):
    request = vh.make_request("a", tokens(200, 30))
    assert rig.scheduler.request_finished(request, [1, 2]) == (False, None)


def test_kv_delivery_not_required(rig):
    assert rig.worker.requires_kv_delivery is False


def test_unknown_setting_rejected(model_dir):
    config = vh.engine_config(model_dir, vh.unique_pool_name("bad"), no_such_setting=1)
    with pytest.raises(ValueError, match="no_such_setting"):
        vh.scheduler_connector(config, NUM_BLOCKS)
