"""Scheduler half of the EMS vLLM connector (runs in vLLM's engine-core process).

It finds how many prompt blocks beyond vLLM's own prefix-cache hit are stored in EMS,
reports them so vLLM allocates blocks for them, and emits per step the blocks the worker
must load and the newly computed full blocks it must save. It reads the pool through a
read-only handle (ems.Pool.attach), so no block data crosses into this process, and each
lookup is a batched index probe in C: the scheduler never waits on I/O.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ems.errors import AttachError, MembershipError, TransferError
from ems.keys import chain_keys, layer_keys
from ems.pool import Pool
from ems.integrations.vllm_prefetch import PrefetchSender
from ems.tiering.view import SpillView

logger = logging.getLogger(__name__)

_ATTACH_RETRY_S = 1.0


@dataclass
class BlockTransfer:
    """One block to load or save: its per-layer keys and vLLM's block id."""

    block_id: int
    keys: list[bytes]


@dataclass
class StepPlan:
    """Connector metadata for one step, sent from the scheduler to the worker."""

    loads: dict[str, list[BlockTransfer]] = field(default_factory=dict)
    saves: list[BlockTransfer] = field(default_factory=list)
    # True: the loads run between steps and finish through get_finished (vLLM keeps
    # their requests waiting). False: they finish within this step's forward pass.
    async_loads: bool = False
    # Spill tier hints (embedded mode with a spill directory):
    unprotect: list[bytes] = field(default_factory=list)  # prefetched, now loaded or dropped
    # session id (the key of a request's first block) -> layer keys it used this step
    sessions: dict[bytes, list[bytes]] = field(default_factory=dict)


@dataclass
class _Request:
    prompt: list[int]
    block_keys: list[bytes] = field(default_factory=list)
    layer_keys: dict[int, list[bytes]] = field(default_factory=dict)
    block_ids: list[int] = field(default_factory=list)
    load_start: int = 0      # first block loaded from EMS
    load_end: int = 0        # one past the last block loaded from EMS
    saved_until: int = 0     # blocks below this index were saved or loaded
    prefetched: list[bytes] = field(default_factory=list)   # keys protected for it


class SchedulerSide:
    def __init__(self, pool_name: str, namespace: bytes, block_size: int, num_layers: int,
                 async_loads: bool = False, client_factory=None, spill_dir: str | None = None,
                 prefetch: bool = True):
        self.pool_name = pool_name
        self.spill = SpillView(spill_dir) if spill_dir else None
        self.hints = PrefetchSender(pool_name) if prefetch and self.spill else None
        self._unprotect_next: list[bytes] = []
        self.blocks_on_disk = 0
        self.client_factory = client_factory   # daemon modes: opens an ems.connect client
        self.async_loads = async_loads
        self.namespace = namespace
        self.block_size = block_size
        self.num_layers = num_layers
        self._pool: Pool | None = None
        self._next_attach = 0.0
        self._requests: dict[str, _Request] = {}
        self._pending_loads: dict[str, list[BlockTransfer]] = {}
        self.lookups = 0
        self.blocks_matched = 0
        self.prefetches = 0

    # -- pool access --

    def _reader(self):
        """Return the attached pool (or the daemon client), or None while the worker has
        not created the pool yet (or the daemon cannot be reached)."""
        if self.client_factory is not None and self._pool is not None:
            return self._pool
        if self._pool is not None and not self._pool.closed:
            return self._pool
        now = time.monotonic()
        if now < self._next_attach:
            return None
        try:
            if self.client_factory is not None:
                self._pool = self.client_factory()
                logger.info("EMS scheduler connected in %s mode", self._pool.mode)
                return self._pool
            self._pool = Pool.attach(self.pool_name)
            logger.info("EMS scheduler attached to pool %s", self.pool_name)
        except (AttachError, TransferError, MembershipError, OSError) as exc:
            self._next_attach = now + _ATTACH_RETRY_S
            logger.debug("EMS pool %s not attachable yet: %s", self.pool_name, exc)
            return None
        return self._pool

    # -- keys --

    def _request(self, request) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None:
            state = _Request(prompt=list(request.prompt_token_ids))
            state.block_keys = chain_keys(self.namespace, state.prompt, self.block_size)
            self._requests[request.request_id] = state
        return state

    def _layer_keys(self, state: _Request, block: int) -> list[bytes]:
        keys = state.layer_keys.get(block)
        if keys is None:
            keys = layer_keys(state.block_keys[block], self.num_layers)
            state.layer_keys[block] = keys
        return keys

    # -- vLLM scheduler hooks --

    def match(self, request, num_computed_tokens: int) -> int:
        """Count prompt tokens beyond num_computed_tokens whose blocks are all in EMS.

        The last prompt token is never counted, so vLLM always computes at least one token
        and produces logits. Only whole blocks are counted. With a spill tier, blocks on
        disk count too: the worker reads the ones that are not in DRAM by then."""
        state = self._request(request)
        usable = min(len(state.block_keys), (len(state.prompt) - 1) // self.block_size)
        first = num_computed_tokens // self.block_size
        if usable <= first:
            return 0
        pool = self._reader()
        if pool is None:
            return 0

        probe = [key for block in range(first, usable)
                 for key in self._layer_keys(state, block)]
        present = pool.exists_many(probe)
        hits = self._leading_blocks(present)
        self.lookups += 1
        if self.spill is not None and hits < usable - first:
            rest = probe[hits * self.num_layers:]
            on_disk = self.spill.exists_many(rest)
            merged = [a or b for a, b in zip(present[hits * self.num_layers:], on_disk)]
            disk_hits = self._leading_blocks(merged)
            self.blocks_on_disk += disk_hits
            hits += disk_hits
        self.blocks_matched += hits
        return hits * self.block_size

    def _leading_blocks(self, present: list[bool]) -> int:
        blocks = 0
        for start in range(0, len(present) - self.num_layers + 1, self.num_layers):
            if not all(present[start:start + self.num_layers]):
                break
            blocks += 1
        return blocks

    def prefetch(self, request) -> None:
        """Called when a request enters vLLM's waiting queue: when its prefix continues on
        disk, ask the worker to read those blocks into DRAM now and to protect the whole
        prefix until the request is scheduled."""
        if self.hints is None:
            return
        state = self._request(request)
        usable = min(len(state.block_keys), (len(state.prompt) - 1) // self.block_size)
        pool = self._reader()
        if usable <= 0 or pool is None:
            return
        probe = [key for block in range(usable) for key in self._layer_keys(state, block)]
        present = pool.exists_many(probe)
        in_dram = self._leading_blocks(present)
        if in_dram == usable:
            return
        rest = probe[in_dram * self.num_layers:]
        merged = [a or b for a, b in zip(present[in_dram * self.num_layers:],
                                          self.spill.exists_many(rest))]
        on_disk = self._leading_blocks(merged)
        if not on_disk:
            return
        state.prefetched = probe[:(in_dram + on_disk) * self.num_layers]
        self.hints.send(state.prefetched)
        self.prefetches += 1

    def after_alloc(self, request, block_ids: list[int], num_external_tokens: int,
                    num_computed_tokens: int) -> None:
        """Record the blocks vLLM allocated for the tokens EMS will provide."""
        state = self._request(request)
        if num_external_tokens <= 0:   # a retry that loads nothing: every block is computed
            state.load_start = state.load_end = 0
            self._pending_loads.pop(request.request_id, None)
            return
        first = num_computed_tokens // self.block_size
        count = num_external_tokens // self.block_size
        state.load_start, state.load_end = first, first + count
        self._pending_loads[request.request_id] = [
            BlockTransfer(block_ids[block], self._layer_keys(state, block))
            for block in range(first, first + count)
        ]

    def plan_step(self, scheduler_output) -> StepPlan:
        """Emit this step's loads and the saves of blocks this step completes."""
        plan = StepPlan(loads=self._pending_loads, async_loads=self.async_loads,
                        unprotect=self._unprotect_next)
        self._pending_loads, self._unprotect_next = {}, []
        if self.spill is not None:
            self.spill.new_step()
        scheduled = scheduler_output.num_scheduled_tokens

        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                state = _Request(prompt=list(new.prompt_token_ids or []))
                state.block_keys = chain_keys(self.namespace, state.prompt, self.block_size)
                self._requests[new.req_id] = state
            state.block_ids = list(new.block_ids[0])
            # After a failed async load vLLM schedules the request as new, computed only up
            # to the first failed block: blocks from there on are computed and saved.
            done = new.num_computed_tokens // self.block_size
            state.saved_until = min(state.saved_until, done)
            state.load_end = min(state.load_end, max(done, state.load_start))
            self._plan_saves(state, new.num_computed_tokens + scheduled.get(new.req_id, 0),
                             plan)
            if self.spill is not None and state.block_keys:
                # The session is the chain's first block: every turn of a conversation
                # starts with the same tokens, so it names the conversation.
                full = min(len(state.block_keys), len(state.prompt) // self.block_size)
                plan.sessions[state.block_keys[0]] = [
                    key for block in range(full) for key in self._layer_keys(state, block)]
                # Loaded (or recomputed) in this step: the worker unprotects the blocks
                # once the step's copies are done.
                plan.unprotect.extend(state.prefetched)
                state.prefetched = []

        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])

            # vLLM moves num_computed_tokens back when it recomputes (after a failed load
            # or a preemption): blocks from there on must be saved again.
            done = cached.num_computed_tokens[i] // self.block_size
            state.saved_until = min(state.saved_until, done)
            state.load_end = min(state.load_end, max(done, state.load_start))
            self._plan_saves(state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0),
                             plan)
        return plan

    def _plan_saves(self, state: _Request, computed_after_step: int, plan: StepPlan) -> None:
        # Prompt blocks only: a later turn's prompt re-tokenizes earlier replies, so their
        # decode-time blocks rarely match. Blocks loaded from EMS are not saved back.
        full = min(computed_after_step, len(state.prompt)) // self.block_size
        full = min(full, len(state.block_keys), len(state.block_ids))
        for block in range(state.saved_until, full):
            if state.load_start <= block < state.load_end:
                continue
            plan.saves.append(BlockTransfer(state.block_ids[block],
                                            self._layer_keys(state, block)))
        state.saved_until = max(state.saved_until, full)

    def finished(self, request) -> None:
        state = self._requests.pop(request.request_id, None)
        if state is not None and state.prefetched:
            self._unprotect_next.extend(state.prefetched)   # aborted while waiting
        self._pending_loads.pop(request.request_id, None)

    def close(self) -> None:
        if self.spill is not None:
            logger.info("EMS scheduler: %d lookups, %d blocks matched, %d of them on disk; "
                        "%d prefetches", self.lookups, self.blocks_matched,
                        self.blocks_on_disk, self.prefetches)
            self.spill.close()
        if self.hints is not None:
            self.hints.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
