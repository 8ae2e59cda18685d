"""Capacity-weighted rendezvous placement (ems.cluster.placement)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ems.cluster.placement import Node, node_seed, owners, scores


def random_keys(count, seed):
    return np.random.default_rng(seed).integers(0, 256, (count, 32), dtype=np.uint8)


NODES = [Node("node-a", 1.0), Node("node-b", 1.0), Node("node-c", 2.0), Node("node-d", 4.0)]


def test_owner_deterministic():
    keys = random_keys(1000, 1)
    assert np.array_equal(owners(keys, NODES), owners(keys.copy(), list(NODES)))


def test_owner_list_and_array_agree():
    keys = random_keys(50, 2)
    as_bytes = [bytes(row) for row in keys]
    assert np.array_equal(owners(as_bytes, NODES, 3), owners(keys, NODES, 3))


def test_owner_stable_across_processes():
    """Placement depends on nothing process-local: a process with another PYTHONHASHSEED
    picks the same owners."""
    code = ("import numpy as np; from ems.cluster.placement import Node, owners; "
            "keys = np.random.default_rng(9).integers(0, 256, (200, 32), dtype=np.uint8); "
            "nodes = [Node('node-a', 1.0), Node('node-b', 1.0), Node('node-c', 2.0), "
            "Node('node-d', 4.0)]; print(owners(keys, nodes, 2).tolist())")
    expected = owners(random_keys(200, 9), NODES, 2).tolist()
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONHASHSEED=seed), timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == expected


def test_seed_differs_per_node():
    assert node_seed("node-a") != node_seed("node-b")


def test_shares_follow_weights():
    keys = random_keys(80_000, 3)
    counts = np.bincount(owners(keys, NODES)[:, 0], minlength=len(NODES))
    total_weight = sum(n.weight for n in NODES)
    for node, count in zip(NODES, counts):
        expected = len(keys) * node.weight / total_weight
        assert abs(count - expected) < 0.05 * expected, (node, count, expected)


def test_join_moves_only_won_keys():
    keys = random_keys(20_000, 4)
    before = owners(keys, NODES)[:, 0]
    joined = NODES + [Node("node-e", 2.0)]
    after = owners(keys, joined)[:, 0]
    moved = before != after
    assert np.all(after[moved] == len(NODES))          # every moved key went to node-e
    share = moved.mean()
    assert abs(share - 2.0 / 10.0) < 0.02


def test_leave_moves_only_held_keys():
    keys = random_keys(20_000, 5)
    before = owners(keys, NODES)[:, 0]
    remaining = [n for i, n in enumerate(NODES) if i != 2]
    after_names = np.array([remaining[i].node_id for i in owners(keys, remaining)[:, 0]])
    before_names = np.array([NODES[i].node_id for i in before])
    moved = before_names != after_names
    assert np.all(before_names[moved] == "node-c")
    assert not np.any(after_names == "node-c")


def test_fallbacks_distinct_and_ordered():
    keys = random_keys(500, 6)
    ranked = owners(keys, NODES, count=3)
    assert ranked.shape == (500, 3)
    assert all(len(set(row)) == 3 for row in ranked.tolist())
    matrix = scores(keys, NODES)
    picked = np.take_along_axis(matrix, ranked, axis=1)
    assert np.all(picked[:, 0] >= picked[:, 1])
    assert np.all(picked[:, 1] >= picked[:, 2])
    assert owners(keys, NODES, count=10).shape == (500, len(NODES))


@pytest.mark.parametrize("weight", [0, -1.0, float("inf"), float("nan")])
def test_bad_weight_rejected(weight):
    with pytest.raises(ValueError, match="node-x"):
        Node("node-x", weight)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="no nodes"):
        owners(random_keys(3, 7), [])
    with pytest.raises(ValueError, match="31"):
        owners([os.urandom(32), os.urandom(31)], NODES)
    with pytest.raises(ValueError, match=r"\(3, 16\)"):
        owners(np.zeros((3, 16), dtype=np.uint8), NODES)
    with pytest.raises(ValueError, match="count"):
        owners(random_keys(3, 8), NODES, count=0)
    with pytest.raises(ValueError, match="node_id"):
        Node("", 1.0)
