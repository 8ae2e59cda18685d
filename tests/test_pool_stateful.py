"""Model-based test: a small pool under eviction pressure against a plain dict.

The model maps each key that was put and not deleted since to the block the pool stored
for it. Eviction makes any model key a possible miss, but a key outside the model must
miss, and a block returned for a key must be exactly the model's block for that key.
"""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import ems
from conftest import KiB, make_block, make_key

NKEYS = 48
KEYS = [make_key(i, "stateful") for i in range(NKEYS)]
# 8 slabs of 64 KiB: a handful of the larger blocks already force eviction and moving
# slabs between size classes. In a local run with 200 steps, about 80% of the examples
# evicted.
SIZES = [700, 3000, 12_000, 40_000, 64 * KiB]
CAPACITY = 512 * KiB

key_ids = st.integers(0, NKEYS - 1)
sizes = st.sampled_from(SIZES)


class PoolModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = ems.Pool(CAPACITY, slab_size=64 * KiB, pages="small")
        self.model = {}
        self.version = 0

    def teardown(self):
        self.pool.close()

    def next_block(self, key, size):
        self.version += 1
        return make_block(key, self.version, size)

    def check_read(self, key, got):
        if key not in self.model:
            assert got is None
        elif got is not None:
            assert got == self.model[key]

    @rule(i=key_ids, size=sizes)
    def put(self, i, size):
        key = KEYS[i]
        block = self.next_block(key, size)
        if self.pool.put(key, block):
            self.model[key] = block
        else:
            assert key in self.model
        assert self.pool.get(key) == self.model[key]

    @rule(ids=st.lists(key_ids, min_size=1, max_size=6, unique=True), size=sizes)
    def put_many(self, ids, size):
        keys = [KEYS[i] for i in ids]
        blocks = [self.next_block(key, size) for key in keys]
        present = self.pool.exists_many(keys)
        stored = self.pool.put_many(keys, blocks)
        # A later block of the batch can evict a key that was present before its own put
        # came, and then the new block is stored for it too.
        assert present.count(False) <= stored <= len(keys)
        replaced = 0
        for key, block, was_present in zip(keys, blocks, present):
            got = self.pool.get(key)
            if not was_present:
                self.model[key] = block
            elif got == block:
                replaced += 1
                self.model[key] = block
            elif got is not None:
                assert got == self.model[key]
        assert present.count(False) + replaced <= stored
        for key in keys:
            self.check_read(key, self.pool.get(key))

    @rule(i=key_ids)
    def get(self, i):
        key = KEYS[i]
        self.check_read(key, self.pool.get(key))

    @rule(i=key_ids)
    def get_into(self, i):
        key = KEYS[i]
        length = self.pool.length(key)
        if length is None:
            return
        assert key in self.model
        assert length == len(self.model[key])
        buf = bytearray(length)
        assert self.pool.get_into(key, buf) is True
        assert bytes(buf) == self.model[key]

    @rule(ids=st.lists(key_ids, min_size=1, max_size=6, unique=True))
    def get_many_into(self, ids):
        keys = [KEYS[i] for i in ids]
        lengths = [self.pool.length(key) for key in keys]
        bufs = [bytearray(n if n is not None else 1) for n in lengths]
        hits = self.pool.get_many_into(keys, bufs)
        for key, length, buf, hit in zip(keys, lengths, bufs, hits):
            assert hit is (length is not None)
            if hit:
                assert bytes(buf) == self.model[key]

    @rule(i=key_ids)
    def delete(self, i):
        key = KEYS[i]
        removed = self.pool.delete(key)
        if key not in self.model:
            assert removed is False
        self.model.pop(key, None)
        assert self.pool.get(key) is None
        assert self.pool.exists(key) is False

    @rule(i=key_ids)
    def exists(self, i):
        key = KEYS[i]
        if self.pool.exists(key):
            assert key in self.model

    @rule(ids=st.lists(key_ids, min_size=0, max_size=8))
    def match_prefix(self, ids):
        keys = [KEYS[i] for i in ids]
        count = self.pool.match_prefix(keys)
        assert 0 <= count <= len(keys)
        for key in keys[:count]:
            assert key in self.model
        if count < len(keys):
            assert self.pool.exists(keys[count]) is False

    @rule(ids=st.lists(key_ids, min_size=1, max_size=8, unique=True), on=st.booleans())
    def protect(self, ids, on):
        keys = [KEYS[i] for i in ids]
        present = sum(self.pool.exists_many(keys))
        if on:
            assert self.pool.protect(keys) == present
        else:
            assert self.pool.unprotect(keys) == present

    @rule(i=key_ids, size=sizes, commit=st.booleans())
    def reserve(self, i, size, commit):
        key = KEYS[i]
        block = self.next_block(key, size)
        res = self.pool.reserve(key, size)
        if res.exists:
            assert key in self.model
            res.commit()
            assert self.pool.get(key) == self.model[key]
            return
        res.buffer[:] = block
        if commit:
            res.commit()
            self.model[key] = block
            assert self.pool.get(key) == block
        else:
            res.abort()
            self.check_read(key, self.pool.get(key))

    @invariant()
    def blocks_match_model(self):
        for key in KEYS:
            self.check_read(key, self.pool.get(key))

    @invariant()
    def stats_consistent(self):
        stats = self.pool.stats()
        rows = stats["classes"]
        assert stats["blocks"] <= len(self.model)
        assert sum(r["blocks"] for r in rows) == stats["blocks"]
        assert sum(r["payload_bytes"] for r in rows) == stats["bytes_used"]
        assert sum(r["slabs"] for r in rows) + stats["free_slabs"] == stats["slabs"]
        assert stats["pool_full"] == 0


PoolModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=200, deadline=None
)
TestPoolModel = PoolModel.TestCase


def test_model_evicts():
    """Check that the workload above really evicts, so the model test runs under pressure."""
    with ems.Pool(CAPACITY, slab_size=64 * KiB, pages="small") as pool:
        for i in range(NKEYS):
            key = KEYS[i]
            pool.put(key, make_block(key, 1, SIZES[i % len(SIZES)]))
        stats = pool.stats()
    assert stats["evictions"] > 0
    assert stats["slab_moves"] > 0
