"""Worker half of the EMS vLLM connector (runs in vLLM's model-worker process).

It owns the embedded pool, registers vLLM's KV tensors, copies cached blocks from EMS into
them and copies newly computed full blocks into EMS. A block is stored layer by layer (one
EMS block per layer and vLLM block), because each layer's slice of a vLLM block is
contiguous while the layers of one block are not. So every copy goes straight between the
pool and vLLM's KV cache, with no staging on the CPU.

Copies run on one background thread (CopyThread), in C with the GIL released:
  loads, "layer" mode: layer i is copied while the forward pass computes layers before i;
      vLLM's attention layer calls wait_for_layer_load(i) before reading it.
  loads, "async" mode: the copy runs between engine steps; vLLM keeps the request waiting
      until get_finished reports it.
  loads, "sync" mode: every layer is copied before the forward pass starts.
  saves: layer i is queued as soon as vLLM's attention has written it (save_kv_layer), and
      the step returns without waiting for it.
Invariant that makes this safe: every copy in flight is drained at the start of the next
step (begin_step, called from vLLM's handle_preemptions before it zeroes or reuses any
block), so a block that vLLM frees after this step is never overwritten while a copy reads
or writes it. Within a step, loads write only the blocks planned for loading and saves
read only full blocks, neither of which the forward pass writes.

Blocks are copied whole: the byte order inside a block depends on vLLM's attention kernel,
and EMS never interprets it.
"""
from __future__ import annotations

import logging
import threading
import time
from functools import partial

from ems._core import default_slab_size
from ems.client import EmbeddedClient
from ems.integrations.copy_thread import CopyThread
from ems.integrations.vllm_config import LOAD_MODES
from ems.integrations.vllm_prefetch import PrefetchListener, socket_path
from ems.pool import Pool
from ems.tiering.tier import open_tier

logger = logging.getLogger(__name__)


class _Step:
    """The plan and progress of one engine step, replaced when the next step begins."""

    def __init__(self, plan=None):
        self.plan = plan
        self.transfers = []           # blocks this step loads before its forward pass
        self.loads_started = False
        self.layerwise = False        # loads queued layer by layer ("layer" mode)
        self.missed: set[int] = set()   # block ids whose load missed (copy thread writes)
        self.layers_loaded = 0        # leading layers whose loads finished
        self.layers_waited: set[int] = set()
        self.layers_saved: set[int] = set()
        # Lowest layer at which a load of this step missed, else None. Layers from there
        # on computed over KV that was not loaded: vLLM discards them, EMS saves none.
        self.failed_layer: int | None = None


class WorkerSide:
    def __init__(self, pool_name: str, capacity_bytes: int, pages: str,
                 load_mode: str = "layer", async_saves: bool = True, client_factory=None,
                 spill=None):
        if load_mode not in LOAD_MODES:
            raise ValueError(f"load_mode must be one of {LOAD_MODES}, got {load_mode!r}")
        self.pool_name = pool_name
        self.capacity_bytes = capacity_bytes
        self.pages = pages
        self.load_mode = load_mode
        self.async_saves = async_saves
        self.client_factory = client_factory   # daemon modes: opens an ems.connect client
        # Embedded mode with a spill tier: dict(directory, quota_bytes, io, policy).
        self.spill = spill
        self.pool: Pool | None = None
        self._unprotect_later: list[bytes] = []
        self._hints: PrefetchListener | None = None    # the scheduler's prefetch hints
        self._tier_seen: dict = {}       # spill tier counters at the last take_counters
        self._layers: list = []         # per layer: array of blocks, [num_blocks, block_bytes]
        self._device_layers: list = []  # per layer: the device tensor, when not on the CPU
        self._layer_index: dict[str, int] = {}
        self._copies = CopyThread()
        self._step = _Step()
        self._layer_done = threading.Condition()
        self._lock = threading.Lock()   # guards what the copy thread reports below
        self._load_errors: set[int] = set()
        self._finished_loads: set[str] = set()
        self.counters = dict(blocks_loaded=0, blocks_saved=0, load_misses=0,
                             saves_skipped=0, save_errors=0, load_wait_s=0.0)
        self.totals = dict(self.counters)   # since start, updated by take_counters

    def register(self, kv_caches: dict) -> None:
        """Map vLLM's per-layer KV tensors and create the pool sized for their blocks."""
        for index, (name, tensor) in enumerate(kv_caches.items()):
            self._layer_index[name] = index
            self._layers.append(self._block_view(tensor))
        block_bytes = self._layers[0].shape[1]
        if self.client_factory is not None:
            # NOTE: the daemon's slab size must hold one block (block_bytes); larger blocks
            # are refused by the daemon and counted as save errors.
            self.pool = self.client_factory()
            logger.info("EMS worker in %s mode: %d layers of %d-byte blocks, %s loads",
                        self.pool.mode, len(self._layers), block_bytes, self.load_mode)
            return

        # A slab must hold one block; one entry per (vLLM block, layer) that fits.
        slab_size = max(default_slab_size(self.capacity_bytes),
                        1 << (block_bytes - 1).bit_length())
        capacity = max(self.capacity_bytes, slab_size)
        pool = Pool(capacity, slab_size=slab_size,
                    max_blocks=max(64, capacity // block_bytes), pages=self.pages,
                    name=self.pool_name)
        logger.info("EMS pool %s: %d bytes, %s pages, %d layers of %d-byte blocks, %s loads",
                    self.pool_name, capacity, pool.page_kind, len(self._layers),
                    block_bytes, self.load_mode)
        if self.spill is None:
            self.pool = pool
            return
        try:
            tier = open_tier(pool, self.spill["directory"], self.spill["quota_bytes"],
                             io=self.spill["io"], policy=self.spill["policy"])
        except BaseException:
            pool.close()
            raise
        self.pool = EmbeddedClient(pool, tier)
        try:
            self._hints = PrefetchListener(self.pool_name, tier)
        except OSError as exc:   # prefetch is an optimization: loads still read the disk
            logger.warning("EMS prefetch hints disabled: cannot bind %s: %s",
                           socket_path(self.pool_name), exc)
        logger.info("EMS spill tier in %s: quota %d bytes, %s eviction",
                    self.spill["directory"], self.spill["quota_bytes"], self.spill["policy"])

    def _block_view(self, tensor):
        """Return a [num_blocks, block_bytes] uint8 numpy view of one layer's KV tensor."""
        import torch

        num_blocks = tensor.shape[0]
        if tensor.device.type != "cpu":
            # NOTE: the staging path for accelerator tensors has not run on a GPU yet, and it
            # mirrors each layer's whole KV tensor in host memory.
            self._device_layers.append(tensor)
            staging = torch.empty((num_blocks, tensor[0].numel() * tensor.element_size()),
                                  dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            return staging.numpy()
        if not tensor.is_contiguous():
            raise ValueError(f"vLLM KV tensor with strides {tensor.stride()} is not contiguous")
        return tensor.view(torch.uint8).reshape(num_blocks, -1).numpy()

    # -- step boundaries --

    def begin_step(self, plan) -> None:
        """Wait for every copy of earlier steps, then take this step's plan."""
        self._copies.drain()
        if self._step.plan is not plan:
            self._step = _Step(plan)
            self._spill_hints(plan)

    def _spill_hints(self, plan) -> None:
        """Apply the plan's spill tier hints (embedded mode with a spill directory)."""
        tier = getattr(self.pool, "tier", None)
        if tier is None or plan is None:
            return
        # Last step's loads are done (the copies were drained): release their protection.
        if self._unprotect_later:
            tier.unprotect(self._unprotect_later)
        self._unprotect_later = list(plan.unprotect)
        for session, keys in plan.sessions.items():
            tier.touch(session, keys)
    def end_forward(self) -> None:
        """Check the forward pass waited for every loaded layer; queue unsent saves."""
        step = self._step
        if step.plan is None:
            return
        if step.layerwise and len(step.layers_waited) < len(self._layers):
            self._hooks_missing(step)
        for layer in range(len(self._layers)):
            self.save_layer(layer)
        if not self.async_saves:
            self._copies.drain()

    def _hooks_missing(self, step: _Step) -> None:
        """vLLM ran attention without calling wait_for_layer_load (a build or mode whose
        attention skips the per-layer hooks), so it may have read KV before it was loaded.
        Report every block of the step as failed, so vLLM recomputes them, and load
        synchronously from now on."""
        self._copies.drain()
        self._fail(step, 0, step.transfers, "the forward pass did not wait for them")
        if self.load_mode == "layer":
            logger.error("vLLM did not call wait_for_layer_load for every layer; EMS "
                         "loads synchronously from now on")
            self.load_mode = "sync"

    # -- loads --

    def start_loads(self) -> None:
        """Start this step's planned loads (at most once per step)."""
        step = self._step
        if step.plan is None or step.loads_started or self.pool is None:
            return
        step.loads_started = True
        transfers = [transfer for blocks in step.plan.loads.values() for transfer in blocks]
        if not transfers:
            return
        if step.plan.async_loads:
            self._copies.submit(partial(self._load_requests, dict(step.plan.loads)))
            return

        step.transfers = transfers
        if self.load_mode == "layer":
            step.layerwise = True
            for layer in range(len(self._layers)):
                self._copies.submit(partial(self._load_layer_job, step, layer))
            return
        for layer in range(len(self._layers)):
            try:
                self._load_layer(step, layer)
            except Exception:
                logger.exception("EMS load of layer %d failed; vLLM recomputes its blocks",
                                 layer)
                self._fail(step, layer, step.transfers, "copy failed")
        step.layers_loaded = len(self._layers)

    def wait_layer(self, layer_name: str) -> None:
        """Block until this step's loads into `layer_name` are done."""
        step = self._step
        layer = self._layer_index.get(layer_name)
        if step.plan is None or layer is None:   # not a registered KV layer: nothing to load
            return
        step.layers_waited.add(layer)
        if not step.loads_started:   # vLLM started the forward pass before start_load_kv
            self.start_loads()
        if not step.layerwise or step.layers_loaded > layer:
            return
        t0 = time.perf_counter()
        with self._layer_done:
            self._layer_done.wait_for(lambda: step.layers_loaded > layer)
        self._count("load_wait_s", time.perf_counter() - t0)

    def _load_layer_job(self, step: _Step, layer: int) -> None:
        try:
            self._load_layer(step, layer)
        except Exception:
            logger.exception("EMS load of layer %d failed; vLLM recomputes its blocks", layer)
            self._fail(step, layer, step.transfers, "copy failed")
        with self._layer_done:
            step.layers_loaded = layer + 1
            self._layer_done.notify_all()

    def _load_layer(self, step: _Step, layer: int) -> None:
        transfers = step.transfers
        hits = self._get_layer(layer, transfers)
        missed = [t for t, hit in zip(transfers, hits) if not hit]
        if missed:
            self._fail(step, layer, missed)
        if layer == len(self._layers) - 1:
            self._count("blocks_loaded", len({t.block_id for t in transfers} - step.missed))

    def _load_requests(self, loads: dict) -> None:
        """Load whole requests (async mode), then report them finished, failed or not."""
        transfers = [transfer for blocks in loads.values() for transfer in blocks]
        step = _Step()
        try:
            for layer in range(len(self._layers)):
                hits = self._get_layer(layer, transfers)
                missed = [t for t, hit in zip(transfers, hits) if not hit]
                if missed:
                    self._fail(step, layer, missed)
        except Exception:
            logger.exception("EMS load failed; vLLM recomputes the blocks")
            self._fail(step, 0, transfers, "copy failed")
        self._count("blocks_loaded", len({t.block_id for t in transfers} - step.missed))
        with self._lock:
            self._finished_loads.update(loads)

    def _get_layer(self, layer: int, transfers: list) -> list[bool]:
        blocks = self._layers[layer]
        hits = self.pool.get_many_into([t.keys[layer] for t in transfers],
                                       [blocks[t.block_id] for t in transfers])
        if self._device_layers:
            self._upload(layer, [t.block_id for t in transfers])
        return hits

    def _fail(self, step: _Step, layer: int, transfers: list,
              reason: str = "evicted since lookup") -> None:
        fresh = {t.block_id for t in transfers} - step.missed
        step.missed.update(fresh)
        with self._lock:
            self._load_errors.update(fresh)
            self.counters["load_misses"] += len(fresh)
        if step.failed_layer is None or layer < step.failed_layer:
            step.failed_layer = layer
        logger.warning("EMS load missed %d blocks on layer %d (%s); vLLM recomputes them",
                       len(transfers), layer, reason)

    def _count(self, name: str, value) -> None:
        with self._lock:
            self.counters[name] += value

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def take_finished_loads(self) -> set[str]:
        with self._lock:
            finished, self._finished_loads = self._finished_loads, set()
        return finished

    # -- saves --

    def save_layer(self, layer: int | str) -> None:
        """Queue the save of one layer of this step's planned blocks (once per layer).

        Stored keys are skipped. Layers at or above a layer whose load missed are not
        saved: they were computed over KV that was never loaded (vLLM recomputes them, and
        a later step saves them). Requests of one step can share blocks, so the whole
        step is skipped from that layer on."""
        step = self._step
        if isinstance(layer, str):
            layer = self._layer_index.get(layer)
        if step.plan is None or layer is None or layer in step.layers_saved or self.pool is None:
            return
        step.layers_saved.add(layer)
        saves = step.plan.saves
        if not saves:
            return
        if step.failed_layer is not None and layer >= step.failed_layer:
            if layer == len(self._layers) - 1:   # count blocks, not block layers
                self._count("saves_skipped", len(saves))
            return
        if self._device_layers:    # the device tensor may change after this step
            self._download(layer, [t.block_id for t in saves])
        self._copies.submit(partial(self._save_layer_job, layer, saves))

    def _save_layer_job(self, layer: int, saves: list) -> None:
        blocks = self._layers[layer]
        try:
            self.pool.put_many([t.keys[layer] for t in saves],
                               [blocks[t.block_id] for t in saves])
        except Exception as exc:  # a cache never fails the forward pass
            logger.warning("EMS save of %d blocks failed on layer %d: %s", len(saves),
                           layer, exc)
            self._count("save_errors", len(saves))
            return
        if layer == len(self._layers) - 1:
            self._count("blocks_saved", len(saves))

    def take_counters(self) -> dict:
        """Return the counters since the last call and reset them. With a spill tier they
        include, in EMS blocks (one per layer): disk_reads (loads served from disk),
        prefetched, spills (blocks written to disk) and spill_dropped (evicted blocks the
        tier could not take)."""
        self._add_tier_counters()
        with self._lock:
            counters = dict(self.counters)
            for name, value in counters.items():
                self.totals[name] += value
                self.counters[name] = type(value)()
        return counters

    def _add_tier_counters(self) -> None:
        tier = getattr(self.pool, "tier", None)
        if tier is None:
            return
        now = tier.stats()
        now = dict(disk_reads=now.get("hits", 0), prefetched=now.get("prefetched", 0),
                   spills=now.get("spills", 0), spill_dropped=now.get("spill_dropped", 0))
        last, self._tier_seen = self._tier_seen, now
        with self._lock:
            for name, value in now.items():
                self.counters[name] = self.counters.get(name, 0) + value - last.get(name, 0)
                self.totals.setdefault(name, 0)

    # -- accelerator staging --

    def _upload(self, layer: int, block_ids: list[int]) -> None:
        import torch

        device_tensor = self._device_layers[layer]
        staging = torch.from_numpy(self._layers[layer])
        for block_id in block_ids:
            device_tensor[block_id].view(torch.uint8).view(-1).copy_(staging[block_id])

    def _download(self, layer: int, block_ids: list[int]) -> None:
        import torch

        device_tensor = self._device_layers[layer]
        staging = torch.from_numpy(self._layers[layer])
        for block_id in block_ids:
            staging[block_id].copy_(device_tensor[block_id].view(torch.uint8).view(-1))

    def close(self) -> None:
        """Finish queued copies, then close the pool."""
        if self._hints is not None:
            self._hints.close()
        self._copies.close()
        self.take_counters()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
