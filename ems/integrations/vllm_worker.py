"""Worker half of the EMS vLLM connector (runs in vLLM's model-worker process).

It owns the embedded pool, registers vLLM's KV tensors, copies blocks from EMS into them
before the forward pass and copies newly computed full blocks into EMS after it. A block
is stored layer by layer (one EMS block per layer and vLLM block), because each layer's
slice of a vLLM block is contiguous while the layers of one block are not, so every copy
goes straight between the pool and vLLM's KV cache with no staging on the CPU.

Blocks are copied whole: the byte order inside a block depends on vLLM's attention kernel,
and EMS never interprets it.
"""
from __future__ import annotations

import logging

from ems._core import default_slab_size
from ems.pool import Pool

logger = logging.getLogger(__name__)


class WorkerSide:
    def __init__(self, pool_name: str, capacity_bytes: int, pages: str):
        self.pool_name = pool_name
        self.capacity_bytes = capacity_bytes
        self.pages = pages
        self.pool: Pool | None = None
        self._layers: list = []       # per layer: array of blocks, [num_blocks, block_bytes]
        self._device_layers: list = []  # per layer: the device tensor, when not on the CPU
        self._layer_index: dict[str, int] = {}
        self._load_errors: set[int] = set()
        # True when a load of the current step missed. vLLM then discards what the step
        # computed, so nothing of it may be saved.
        self.step_load_failed = False
        self.blocks_loaded = 0
        self.blocks_saved = 0
        self.load_misses = 0

    def register(self, kv_caches: dict) -> None:
        """Map vLLM's per-layer KV tensors and create the pool sized for their blocks."""
        for index, (name, tensor) in enumerate(kv_caches.items()):
            self._layer_index[name] = index
            self._layers.append(self._block_view(tensor))
        block_bytes = self._layers[0].shape[1]

        # A slab must hold one block; one entry per (vLLM block, layer) that fits.
        slab_size = max(default_slab_size(self.capacity_bytes),
                        1 << (block_bytes - 1).bit_length())
        capacity = max(self.capacity_bytes, slab_size)
        self.pool = Pool(capacity, slab_size=slab_size,
                         max_blocks=max(64, capacity // block_bytes), pages=self.pages,
                         name=self.pool_name)
        logger.info("EMS pool %s: %d bytes, %s pages, %d layers of %d-byte blocks",
                    self.pool_name, capacity, self.pool.page_kind, len(self._layers),
                    block_bytes)

    def _block_view(self, tensor):
        """Return a [num_blocks, block_bytes] uint8 numpy view of one layer's KV tensor."""
        import torch

        num_blocks = tensor.shape[0]
        if tensor.device.type != "cpu":
            # NOTE: the staging path for accelerator tensors has not run on a GPU yet.
            self._device_layers.append(tensor)
            staging = torch.empty((num_blocks, tensor[0].numel() * tensor.element_size()),
                                  dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            return staging.numpy()
        if not tensor.is_contiguous():
            raise ValueError(f"vLLM KV tensor with strides {tensor.stride()} is not contiguous")
        return tensor.view(torch.uint8).reshape(num_blocks, -1).numpy()

    # -- loads --

    def load(self, loads: dict) -> None:
        """Copy every planned block into vLLM's KV cache; misses become load errors."""
        self.step_load_failed = False
        if not loads or self.pool is None:
            return
        transfers = [transfer for blocks in loads.values() for transfer in blocks]
        for layer, blocks in enumerate(self._layers):
            keys = [transfer.keys[layer] for transfer in transfers]
            destinations = [blocks[transfer.block_id] for transfer in transfers]
            hits = self.pool.get_many_into(keys, destinations)
            for transfer, hit in zip(transfers, hits):
                if not hit:
                    self._load_errors.add(transfer.block_id)
            if self._device_layers:
                self._upload(layer, [t.block_id for t in transfers])

        failed = sum(1 for t in transfers if t.block_id in self._load_errors)
        self.blocks_loaded += len(transfers) - failed
        if failed:
            self.step_load_failed = True
            self.load_misses += failed
            logger.warning("EMS load missed %d of %d blocks (evicted since lookup); vLLM "
                           "recomputes them", failed, len(transfers))

    def fail_loads(self, loads: dict) -> None:
        """Report every planned block of a step as not loaded."""
        for blocks in loads.values():
            self._load_errors.update(transfer.block_id for transfer in blocks)
        self.step_load_failed = True

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves --

    def save(self, saves: list) -> None:
        """Store the planned blocks, one EMS block per layer. Stored keys are skipped.

        A step whose load missed saves nothing: the blocks it computed attended to KV that
        was never loaded (vLLM recomputes them, and a later step saves them). Requests of
        one step can share blocks, so the whole step is skipped."""
        if not saves or self.pool is None or self.step_load_failed:
            return
        for layer, blocks in enumerate(self._layers):
            if self._device_layers:
                self._download(layer, [t.block_id for t in saves])
            keys = [transfer.keys[layer] for transfer in saves]
            sources = [blocks[transfer.block_id] for transfer in saves]
            try:
                self.pool.put_many(keys, sources)
            except Exception as exc:  # a cache never fails the forward pass
                logger.warning("EMS save of %d blocks failed on layer %d: %s", len(saves),
                               layer, exc)
                return
        self.blocks_saved += len(saves)

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
        if self.pool is not None:
            self.pool.close()
            self.pool = None

