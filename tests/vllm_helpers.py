"""Helpers for the vLLM connector tests: a local tiny model and real vLLM objects.

Everything here builds real vLLM classes (VllmConfig through EngineArgs, KVCacheConfig,
Request, SchedulerOutput, KVCacheBlocks) so the connector is driven the way vLLM's
scheduler and model runner drive it, minus the model. Import this module only after
`pytest.importorskip("vllm")`.
"""
import os
import uuid

import torch

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.engine.arg_utils import EngineArgs
from vllm.forward_context import ForwardContext
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                        KVCacheTensor)
from vllm.v1.request import Request

# Environment for every vLLM process the tests start: no telemetry, no hub, loopback only,
# and a fixed KV cache size (without it vLLM's CPU startup check fails on this machine).
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
# Environment variables that override EMS connector settings, so tests remove them.
EMS_ENV = ("EMS_POOL_CAPACITY_BYTES", "EMS_POOL_NAME", "EMS_POOL_PAGES", "EMS_TENANT",
           "EMS_LOAD_MODE", "EMS_ASYNC_SAVES")

_MODEL_DIR = None


def tiny_model_dir(tmp_path_factory):
    """Return the directory of the `tiny` model, built once per test session (no download)."""
    global _MODEL_DIR
    if _MODEL_DIR is None:
        from ems.tools.build_model import build

        outdir = str(tmp_path_factory.mktemp("tiny-model"))
        build(outdir, preset="tiny", seed=0)
        _MODEL_DIR = outdir
    return _MODEL_DIR


def unique_pool_name(tag="t"):
    return f"ems-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


def engine_config(model_dir, pool_name, capacity=16 << 20, **extra):
    """Build a real VllmConfig for the tiny model with EMSConnector configured."""
    kv_transfer = {
        "kv_connector": "EMSConnector",
        "kv_connector_module_path": "ems.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"pool_name": pool_name, "pool_capacity_bytes": capacity,
                                      "pool_pages": "small", **extra},
    }
    args = EngineArgs(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048,
                      kv_transfer_config=kv_transfer)
    return args.create_engine_config()


def layer_names(vllm_config):
    count = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
    return [f"model.layers.{i}.self_attn.attn" for i in range(count)]


def kv_shape(vllm_config, num_blocks):
    """Return vLLM's CPU per-layer KV shape: [num_blocks, kv_heads, block_size, 2 * head_size]."""
    model = vllm_config.model_config
    return (num_blocks, model.get_num_kv_heads(vllm_config.parallel_config),
            vllm_config.cache_config.block_size, 2 * model.get_head_size())


def kv_cache_config(vllm_config, num_blocks):
    """Build a real KVCacheConfig: one full-attention group, layers outermost in one tensor."""
    model = vllm_config.model_config
    spec = FullAttentionSpec(block_size=vllm_config.cache_config.block_size,
                             num_kv_heads=model.get_num_kv_heads(vllm_config.parallel_config),
                             head_size=model.get_head_size(), dtype=model.dtype)
    names = layer_names(vllm_config)
    page = spec.page_size_bytes
    tensor = KVCacheTensor(size=page * num_blocks * len(names), layers=names,
                           layer_stride=page * num_blocks, block_stride=page)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[tensor],
                         kv_cache_groups=[KVCacheGroupSpec(names, spec)])


def cpu_kv_caches(vllm_config, num_blocks):
    """Allocate per-layer KV tensors as vLLM's CPU backend does: each layer is a contiguous
    [num_blocks, H, N, 2C] slice of one storage, in layer order."""
    shape = kv_shape(vllm_config, num_blocks)
    names = layer_names(vllm_config)
    storage = torch.zeros((len(names),) + shape, dtype=vllm_config.model_config.dtype)
    return {name: storage[i] for i, name in enumerate(names)}


def make_connector(vllm_config, role, num_blocks):
    """Instantiate the connector the way vLLM does: through KVConnectorFactory."""
    return KVConnectorFactory.create_connector(vllm_config, role,
                                               kv_cache_config(vllm_config, num_blocks))


def scheduler_connector(vllm_config, num_blocks):
    return make_connector(vllm_config, KVConnectorRole.SCHEDULER, num_blocks)


def worker_connector(vllm_config, num_blocks):
    return make_connector(vllm_config, KVConnectorRole.WORKER, num_blocks)


def make_request(req_id, tokens, max_tokens=4):
    return Request(request_id=req_id, prompt_token_ids=list(tokens),
                   sampling_params=SamplingParams(max_tokens=max_tokens), pooling_params=None)


def kv_blocks(block_ids):
    """Build a real KVCacheBlocks for one KV cache group."""
    return KVCacheBlocks((tuple(KVCacheBlock(block_id) for block_id in block_ids),))


def new_request_step(request, block_ids, num_scheduled):
    """Build the SchedulerOutput of a step that schedules `request` for the first time.

    request.num_computed_tokens must already count local and external (EMS) hits, because
    vLLM's scheduler sets it before it builds the output."""
    new = NewRequestData.from_request(request, (list(block_ids),))
    return SchedulerOutput(
        scheduled_new_reqs=[new], scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={request.request_id: num_scheduled},
        total_num_scheduled_tokens=num_scheduled, scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[])


def cached_request_step(request, new_block_ids, num_computed, num_scheduled):
    """Build the SchedulerOutput of a later step of a running request."""
    cached = CachedRequestData(
        req_ids=[request.request_id], resumed_req_ids=set(), new_token_ids=[[]],
        all_token_ids={}, new_block_ids=[(list(new_block_ids),) if new_block_ids else None],
        num_computed_tokens=[num_computed], num_output_tokens=[0])
    return SchedulerOutput(
        scheduled_new_reqs=[], scheduled_cached_reqs=cached,
        num_scheduled_tokens={request.request_id: num_scheduled},
        total_num_scheduled_tokens=num_scheduled, scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[])


def forward_context():
    return ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={})


def empty_step():
    """Build the SchedulerOutput of a step that schedules no tokens (vLLM runs such a step
    while requests wait for asynchronous loads)."""
    return SchedulerOutput(
        scheduled_new_reqs=[], scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={}, total_num_scheduled_tokens=0, scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[])
