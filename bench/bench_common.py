"""Constants and helpers shared by the benchmark modules (imported by name: pytest puts
bench/ on sys.path because the directory is not a package)."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np

KiB = 1 << 10
MiB = 1 << 20

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
CORE_SOURCES = ["arena.c", "slab.c", "index.c", "pool.c", "pool_read.c", "pool_write.c",
                "spill_ring.c"]


def run_json(binary: str, *args: str, timeout: float = 120) -> dict:
    """Run the C bench program and return the JSON object it prints."""
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{binary} {' '.join(args)} exited with {result.returncode}:\n"
                           f"{result.stderr}")
    return json.loads(result.stdout)


def random_keys(n: int, seed: int) -> list[bytes]:
    """n distinct random 32-byte keys (collisions among 2^256 values are negligible)."""
    raw = np.random.default_rng(seed).bytes(32 * n)
    return [raw[i * 32:(i + 1) * 32] for i in range(n)]
