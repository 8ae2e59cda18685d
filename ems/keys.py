"""Block keys: chained BLAKE3 over token ids, salted by everything that makes KV differ.

The key of block i hashes its token ids together with the key of block i - 1, so a key
names a whole prefix: two prompts share the key of block i exactly when their first
(i + 1) * block_size tokens are equal. Every key is a BLAKE3 keyed hash under a 32-byte
namespace derived from tenant, model identity, KV layout and tensor-parallel rank, so
blocks of different tenants, models, layouts or ranks never share a key.

Keys depend only on these inputs: token ids are hashed as little-endian uint32, and
nothing uses Python's hash(), so keys are identical across processes, hosts, restarts and
PYTHONHASHSEED values.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import blake3
import numpy as np

KEY_BYTES = 32
_NAMESPACE_CONTEXT = "ems 2026 kv-block-namespace v1"
_ROOT = bytes(KEY_BYTES)


@dataclass(frozen=True)
class KVLayout:
    """Shape and encoding of the KV data a block holds; any change makes other bytes."""

    dtype: str
    block_size: int
    num_kv_heads: int
    head_size: int
    num_layers: int
    # Backend-specific arrangement inside a block (for vLLM's CPU backend this includes
    # the attention ISA, because AMX and vector kernels order K and V differently).
    encoding: str = ""


@dataclass(frozen=True)
class KeySpace:
    """Everything that salts block keys."""

    tenant: str
    model: str
    layout: KVLayout
    rank: int = 0
    extra: dict = field(default_factory=dict)

    def namespace(self) -> bytes:
        """Return the 32-byte BLAKE3 key under which this space hashes its blocks."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return blake3.blake3(canonical.encode(), derive_key_context=_NAMESPACE_CONTEXT).digest()


def chain_keys(namespace: bytes, token_ids, block_size: int, start_key: bytes | None = None,
               max_blocks: int | None = None) -> list[bytes]:
    """Return the keys of the full blocks of `token_ids` (a trailing partial block has none).

    `start_key` continues a chain: pass the key of the block before token_ids[0]. At most
    `max_blocks` keys are computed.
    """
    if len(namespace) != KEY_BYTES:
        raise ValueError(f"namespace must be {KEY_BYTES} bytes, got {len(namespace)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")

    tokens = np.asarray(token_ids, dtype="<u4")
    nblocks = len(tokens) // block_size
    if max_blocks is not None:
        nblocks = min(nblocks, max_blocks)
    data = tokens[: nblocks * block_size].tobytes()
    step = block_size * 4

    keys = []
    previous = _ROOT if start_key is None else start_key
    for i in range(nblocks):
        hasher = blake3.blake3(previous, key=namespace)
        hasher.update(data[i * step:(i + 1) * step])
        previous = hasher.digest()
        keys.append(previous)
    return keys


def layer_keys(block_key: bytes, num_layers: int) -> list[bytes]:
    """Return one key per layer for a block stored layer by layer."""
    return [blake3.blake3(block_key + layer.to_bytes(4, "little")).digest()
            for layer in range(num_layers)]
