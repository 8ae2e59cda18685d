"""EMSConnector under failures: copies that raise in each load mode, the saves that follow a
failed asynchronous load, and settings that must be rejected at start.
"""
import os

import pytest

pytest.importorskip("vllm")

import vllm_helpers as vh  # noqa: E402
from connector_rig import (NUM_BLOCKS, close_rig, keys_of, load_step, lookup,  # noqa: E402
                           make_rig, run_step, saved_turn)
from ems.integrations.vllm_config import load_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("vllm_env")

LOAD_BLOCKS = [7, 0, 13, 3, 5]   # vLLM blocks of the second turn: 3 loaded, 2 computed


def fail_copies(rig):
    """Make every pool read of the worker raise, as a failing copy would."""
    def get_many_into(keys, buffers):
        raise RuntimeError("injected copy failure")

    rig.worker.worker.pool.get_many_into = get_many_into


# ---- copy failures ---------------------------------------------------------------------


@pytest.mark.parametrize("load_mode", ["layer", "sync"])
def test_copy_error_reported(model_dir, load_mode):
    """A copy that raises reports every planned block as a load error, and the block the
    step computed over them is not saved."""
    rig = make_rig(model_dir, load_mode=load_mode)
    try:
        _, _, prompt2 = saved_turn(rig, 70)
        request, (matched, _) = lookup(rig, "turn2", prompt2)
        assert matched == 3 * rig.block_size
        fail_copies(rig)
        errors = load_step(rig, request, LOAD_BLOCKS, 0, matched, compute_blocks=[3, 5])
        assert errors == {7, 0, 13}
        assert not rig.pool.exists(keys_of(rig, prompt2)[3][0])
    finally:
        close_rig(rig)


# ---- saves after a failed asynchronous load ----------------------------------------------


def test_async_miss_recompute_saves(model_dir):
    """After a failed async load vLLM schedules the request as new, with its computed
    tokens cut at the failed block. That step recomputes the failed block, and the
    connector must save it, or every later turn misses from there."""
    rig = make_rig(model_dir, load_mode="async")
    try:
        bs = rig.block_size
        _, _, prompt2 = saved_turn(rig, 72)
        request, (matched, _) = lookup(rig, "turn2", prompt2)
        assert matched == 3 * bs
        rig.scheduler.update_state_after_alloc(request, vh.kv_blocks(LOAD_BLOCKS), matched)
        keys = keys_of(rig, prompt2)
        assert rig.pool.delete(keys[1][0])   # evicted after the lookup
        run_step(rig, vh.empty_step())
        finished = rig.finished_loads or rig.worker.get_finished(set())[1]
        assert finished == {"turn2"}
        assert rig.worker.get_block_ids_with_load_errors() == {0}

        # vLLM cuts num_computed_tokens at block 1 and schedules the rest as a new request.
        request.num_computed_tokens = bs
        run_step(rig, vh.new_request_step(request, LOAD_BLOCKS, len(prompt2) - bs),
                 LOAD_BLOCKS[1:])
        assert rig.pool.exists(keys[3][0])
        assert rig.pool.exists(keys[1][0])
    finally:
        close_rig(rig)


# ---- settings ----------------------------------------------------------------------------


def test_null_setting_default():
    """A JSON null means the default, as an absent setting does."""
    config = load_config({"pool_capacity_bytes": None, "tenant": None, "async_saves": None},
                         "e")
    assert config.pool_capacity_bytes == load_config({}, "e").pool_capacity_bytes
    assert config.tenant == "default"
    assert config.async_saves is True


@pytest.mark.parametrize("value", [1.7, True, "1e9", [1]])
def test_capacity_not_whole_number(value):
    with pytest.raises(ValueError, match="pool_capacity_bytes.*whole number"):
        load_config({"pool_capacity_bytes": value}, "e")


def test_capacity_whole_float_accepted():
    assert load_config({"pool_capacity_bytes": 2.0 ** 30}, "e").pool_capacity_bytes == 1 << 30


def test_pool_pages_checked():
    with pytest.raises(ValueError, match="pool_pages.*'huge'"):
        load_config({"pool_pages": "huge"}, "e")


def test_capacity_above_memory_rejected(model_dir):
    """A pool larger than the machine's physical memory is rejected when the worker
    connector is built. The test never registers KV tensors, because creating that pool
    gets the process killed for memory instead of raising."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    config = vh.engine_config(model_dir, vh.unique_pool_name("huge"), capacity=4 * physical)
    try:
        connector = vh.worker_connector(config, NUM_BLOCKS)
    except ValueError as exc:
        assert "pool_capacity_bytes" in str(exc)
        return
    connector.shutdown()
    pytest.fail(f"pool_capacity_bytes {4 * physical} (4x physical memory) was accepted")
