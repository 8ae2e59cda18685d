"""A test rig for EMSConnector: both roles in one process, driven as vLLM drives them.

The scheduler connector attaches to the pool by name and the worker connector owns it.
Every rig gets its own pool name. Steps run as vLLM's scheduler and model runner run
them: lookup, allocation, build_connector_meta (pickled, as it crosses processes in vLLM),
handle_preemptions, start_load_kv, the forward pass layer by layer (here: writing KV
bytes), wait_for_save, get_finished, get_block_ids_with_load_errors.
"""
import pickle
from types import SimpleNamespace

import torch

from ems.integrations.vllm_config import key_space
from ems.keys import chain_keys, layer_keys
import vllm_helpers as vh

NUM_BLOCKS = 16
FILL = -7.0  # the value of reset KV tensors, so a block that no load touches keeps it


def make_rig(model_dir, **settings):
    """Return a worker connector with registered CPU KV tensors and a scheduler connector,
    both built with the given connector settings."""
    pool_name = vh.unique_pool_name()
    config = vh.engine_config(model_dir, pool_name, **settings)
    kv = vh.cpu_kv_caches(config, NUM_BLOCKS)
    worker = vh.worker_connector(config, NUM_BLOCKS)
    worker.register_kv_caches(kv)
    scheduler = vh.scheduler_connector(config, NUM_BLOCKS)
    generator = torch.Generator().manual_seed(1234)
    return SimpleNamespace(config=config, pool_name=pool_name, kv=kv, worker=worker,
                           scheduler=scheduler, pool=worker.worker.pool,
                           block_size=config.cache_config.block_size,
                           layers=list(kv.values()), generator=generator,
                           finished_loads=set())


def close_rig(rig):
    rig.scheduler.shutdown()
    rig.worker.shutdown()


def tokens(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, 2000, (count,), generator=generator).tolist()


def compute(rig, block_ids, layers=None):
    """Write fresh KV bytes into the given blocks, as the forward pass would."""
    for index in range(len(rig.layers)) if layers is None else layers:
        layer = rig.layers[index]
        for block_id in block_ids:
            layer[block_id].copy_(torch.randn(layer[block_id].shape, generator=rig.generator))


def reset_kv(rig):
    for layer in rig.layers:
        layer.fill_(FILL)


def block_bytes(rig, layer, block_id):
    return rig.layers[layer][block_id].view(torch.uint8).clone()


def snapshot(rig, block_ids):
    return {(layer, b): block_bytes(rig, layer, b)
            for layer in range(len(rig.layers)) for b in block_ids}


def keys_of(rig, prompt, tenant="default"):
    """Return the per-layer EMS keys of each full block of `prompt`."""
    namespace = key_space(rig.config, tenant, rank=0).namespace()
    return [layer_keys(key, len(rig.layers))
            for key in chain_keys(namespace, prompt, rig.block_size)]


def run_step(rig, output, compute_blocks=(), hooks=True, settle=True, after_bind=None):
    """Run one engine step as vLLM's model runner does: metadata to the worker, loads,
    the forward pass layer by layer (wait_for_layer_load, write KV, save_kv_layer),
    wait_for_save, finished transfers, load errors. Returns the load errors; the
    finished loads are kept in rig.finished_loads. hooks=False runs the forward pass
    without the per-layer hooks, as an attention build that skips them would.
    settle=True waits for the background saves, as the start of vLLM's next step does.
    after_bind, if given, is called once the step's metadata is bound to the worker."""
    metadata = rig.scheduler.build_connector_meta(output)
    metadata = pickle.loads(pickle.dumps(metadata))
    output.kv_connector_metadata = metadata
    rig.worker.handle_preemptions(metadata)
    rig.worker.bind_connector_metadata(metadata)
    if after_bind is not None:
        after_bind()
    rig.worker.start_load_kv(vh.forward_context())
    for layer, name in enumerate(vh.layer_names(rig.config)):
        if hooks:
            rig.worker.wait_for_layer_load(name)
        compute(rig, compute_blocks, [layer])
        if hooks:
            rig.worker.save_kv_layer(name, rig.layers[layer], None)
    rig.worker.wait_for_save()
    _, finished = rig.worker.get_finished(set())
    rig.finished_loads = finished or set()
    errors = rig.worker.get_block_ids_with_load_errors()
    rig.worker.clear_connector_metadata()
    if settle:
        drain(rig)
    return errors


def drain(rig):
    """Wait for the worker's background copies, as the start of vLLM's next step does."""
    rig.worker.worker.begin_step(None)


def prefill(rig, req_id, prompt, block_ids, finish=True):
    """Run a first turn: nothing is cached and one step computes the whole prompt."""
    request = vh.make_request(req_id, prompt)
    matched, is_async = rig.scheduler.get_num_new_matched_tokens(request, 0)
    assert (matched, is_async) == (0, False)
    rig.scheduler.update_state_after_alloc(request, vh.kv_blocks(block_ids), 0)
    errors = run_step(rig, vh.new_request_step(request, block_ids, len(prompt)), block_ids)
    assert errors == set()
    if finish:
        rig.scheduler.request_finished(request, block_ids)
    return request


def lookup(rig, req_id, prompt, num_computed=0):
    request = vh.make_request(req_id, prompt)
    return request, rig.scheduler.get_num_new_matched_tokens(request, num_computed)


def bind_load_step(rig, request, block_ids, matched):
    """Allocate blocks after a lookup and bind the step that loads `matched` tokens to the
    worker, without running it (tests then call the worker hooks one by one)."""
    rig.scheduler.update_state_after_alloc(request, vh.kv_blocks(block_ids), matched)
    request.num_computed_tokens = matched
    output = vh.new_request_step(request, block_ids,
                                 len(request.prompt_token_ids) - matched)
    rig.worker.bind_connector_metadata(rig.scheduler.build_connector_meta(output))


def load_step(rig, request, block_ids, num_computed, matched, compute_blocks=()):
    """Allocate blocks after a lookup, then run the step that loads `matched` tokens."""
    rig.scheduler.update_state_after_alloc(request, vh.kv_blocks(block_ids), matched)
    request.num_computed_tokens = num_computed + matched
    scheduled = len(request.prompt_token_ids) - request.num_computed_tokens
    return run_step(rig, vh.new_request_step(request, block_ids, scheduled), compute_blocks)


def saved_turn(rig, seed):
    """Save a prompt of 3 blocks and 40 tokens from KV blocks [4, 9, 2, 11].

    Returns the prompt, the saved bytes by (layer, block) and the second-turn prompt
    (the first plus 200 new tokens)."""
    bs = rig.block_size
    prompt = tokens(3 * bs + 40, seed)
    prefill(rig, "turn1", prompt, [4, 9, 2, 11])
    saved = {(layer, block): block_bytes(rig, layer, block_id)
             for layer in range(len(rig.layers))
             for block, block_id in enumerate([4, 9, 2])}
    return prompt, saved, prompt + tokens(200, seed + 1000)
