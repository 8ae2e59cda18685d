"""Capacity-weighted rendezvous hashing: which node owns a key.

Every node scores every key; the node with the highest score owns it, the next ones are
the fallbacks in order. A node's score for a key is weight / -ln(u), where u in (0, 1) is a
hash of the key and the node's id. With that score a node owns a share of the keys
proportional to its weight, and when a node joins or leaves only the keys it wins or held
move. Keys are 32-byte BLAKE3 digests, already uniform, so the hash mixes the key's first
8 bytes with a per-node seed (splitmix64) instead of hashing the whole key again.

Everything is batched in numpy: no Python loop runs per key.
"""
from __future__ import annotations

from dataclasses import dataclass

import blake3
import numpy as np

KEY_BYTES = 32
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class Node:
    """A placement target: a stable id (the same on every host) and a weight > 0,
    typically its free capacity in bytes."""

    node_id: str
    weight: float

    def __post_init__(self):
        if not self.node_id:
            raise ValueError("node_id must be a non-empty string")
        if not np.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"weight of node {self.node_id!r} must be positive and finite, "
                             f"got {self.weight!r}")


def node_seed(node_id: str) -> int:
    """Return the 64-bit seed of a node: the first 8 bytes of BLAKE3(node_id), little-endian."""
    return int.from_bytes(blake3.blake3(node_id.encode()).digest()[:8], "little")


def _key_words(keys) -> np.ndarray:
    """Return the first 8 bytes of each key as uint64, from a list of 32-byte keys or an
    (n, 32) uint8 array."""
    if isinstance(keys, np.ndarray):
        if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != KEY_BYTES:
            raise ValueError(f"keys array must be uint8 of shape (n, {KEY_BYTES}), got "
                             f"{keys.dtype} {keys.shape}")
        array = np.ascontiguousarray(keys)
    else:
        bad = next((k for k in keys if len(k) != KEY_BYTES), None)
        if bad is not None:
            raise ValueError(f"keys must be {KEY_BYTES} bytes, got one of {len(bad)}")
        joined = b"".join(keys)
        array = np.frombuffer(joined, dtype=np.uint8).reshape(len(keys), KEY_BYTES)
    return array[:, :8].copy().view("<u8").reshape(-1)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise (uint64 arithmetic wraps)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def scores(keys, nodes: list[Node]) -> np.ndarray:
    """Return the (len(keys), len(nodes)) matrix of rendezvous scores."""
    if not nodes:
        raise ValueError("no nodes to place keys on")
    words = _key_words(keys)
    seeds = np.array([node_seed(n.node_id) for n in nodes], dtype=np.uint64)
    weights = np.array([n.weight for n in nodes], dtype=np.float64)
    with np.errstate(over="ignore"):
        hashed = _mix(words[:, None] ^ seeds[None, :])
    # The top 53 bits give u in (0, 1): never 0, never 1.
    u = ((hashed >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    return weights[None, :] / -np.log(u)


def owners(keys, nodes: list[Node], count: int = 1) -> np.ndarray:
    """Return, per key, the indices into `nodes` of its `count` best nodes, best first
    (an (n, count) int array). count is capped at len(nodes)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    matrix = scores(keys, nodes)
    count = min(count, len(nodes))
    return np.argsort(-matrix, axis=1, kind="stable")[:, :count]
