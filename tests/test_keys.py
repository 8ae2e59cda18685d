"""Block keys: stable across processes and hash seeds, distinct across every salt."""
import json
import os
import subprocess
import sys

import pytest

from ems.keys import KEY_BYTES, KeySpace, KVLayout, chain_keys, layer_keys

LAYOUT = KVLayout(dtype="bfloat16", block_size=16, num_kv_heads=2, head_size=64,
                  num_layers=4, encoding="cpu-amx")
SPACE = KeySpace(tenant="alpha", model="llama@main", layout=LAYOUT, rank=0)
TOKENS = list(range(1000, 1000 + 16 * 6 + 5))  # 6 full blocks and a partial one

SCRIPT = """
import json, sys
from ems.keys import KeySpace, KVLayout, chain_keys
layout = KVLayout(dtype="bfloat16", block_size=16, num_kv_heads=2, head_size=64,
                  num_layers=4, encoding="cpu-amx")
space = KeySpace(tenant="alpha", model="llama@main", layout=layout, rank=0)
tokens = list(range(1000, 1000 + 16 * 6 + 5))
print(json.dumps([k.hex() for k in chain_keys(space.namespace(), tokens, 16)]))
"""


def keys_in_subprocess(seed: str) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_keys_stable_across_hash_seeds():
    first = keys_in_subprocess("1")
    second = keys_in_subprocess("4242")
    assert first == second
    assert first == [k.hex() for k in chain_keys(SPACE.namespace(), TOKENS, 16)]


def test_keys_full_blocks_only():
    keys = chain_keys(SPACE.namespace(), TOKENS, 16)
    assert len(keys) == 6
    assert all(len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == 6


def test_keys_chain_continues():
    ns = SPACE.namespace()
    whole = chain_keys(ns, TOKENS, 16)
    tail = chain_keys(ns, TOKENS[32:], 16, start_key=whole[1])
    assert tail == whole[2:]


def test_keys_shared_prefix_shared_keys():
    ns = SPACE.namespace()
    other = TOKENS[:48] + [7] * 60
    assert chain_keys(ns, other, 16)[:3] == chain_keys(ns, TOKENS, 16)[:3]


@pytest.mark.parametrize("position", [0, 17, 40, 95])
def test_token_change_changes_later_keys(position):
    ns = SPACE.namespace()
    base = chain_keys(ns, TOKENS, 16)
    changed_tokens = list(TOKENS)
    changed_tokens[position] += 1
    changed = chain_keys(ns, changed_tokens, 16)
    block = position // 16
    assert changed[:block] == base[:block]
    for i in range(block, len(base)):
        assert changed[i] != base[i]


@pytest.mark.parametrize("space", [
    KeySpace(tenant="beta", model="llama@main", layout=LAYOUT),
    KeySpace(tenant="alpha", model="llama@v2", layout=LAYOUT),
    KeySpace(tenant="alpha", model="llama@main", layout=LAYOUT, rank=1),
    KeySpace(tenant="alpha", model="llama@main",
             layout=KVLayout("float32", 16, 2, 64, 4, "cpu-amx")),
    KeySpace(tenant="alpha", model="llama@main",
             layout=KVLayout("bfloat16", 32, 2, 64, 4, "cpu-amx")),
    KeySpace(tenant="alpha", model="llama@main",
             layout=KVLayout("bfloat16", 16, 4, 64, 4, "cpu-amx")),
    KeySpace(tenant="alpha", model="llama@main",
             layout=KVLayout("bfloat16", 16, 2, 128, 4, "cpu-amx")),
    KeySpace(tenant="alpha", model="llama@main",
             layout=KVLayout("bfloat16", 16, 2, 64, 8, "cpu-amx")),
    KeySpace(tenant="alpha", model="llama@main",
             layout=KVLayout("bfloat16", 16, 2, 64, 4, "cpu-vec")),
])
def test_salt_change_changes_every_key(space):
    base = chain_keys(SPACE.namespace(), TOKENS, 16)
    other = chain_keys(space.namespace(), TOKENS, 16)
    assert not set(base) & set(other)


def test_layer_keys_distinct():
    block = chain_keys(SPACE.namespace(), TOKENS, 16)[0]
    keys = layer_keys(block, 4)
    assert len(set(keys)) == 4
    assert block not in keys
    assert layer_keys(block, 4) == keys


def test_keys_bad_namespace():
    with pytest.raises(ValueError, match="32 bytes"):
        chain_keys(b"short", TOKENS, 16)


def test_keys_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        chain_keys(SPACE.namespace(), TOKENS, 0)
