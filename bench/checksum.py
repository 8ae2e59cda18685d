"""CRC-32C throughput against numpy.copyto of the same bytes, measured in one run.

    python bench/checksum.py

Prints GB/s for ems.crc32c (CPU instruction and table loop) and numpy.copyto on 64 KiB and
1 MiB buffers (warm in cache: each call reads the same buffer), best of 7 rounds.
"""
import time

import numpy as np

import ems

SIZES = [64 << 10, 1 << 20]
ROUNDS = 7


def best_seconds(call, repeat):
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(repeat):
            call()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def main():
    for size in SIZES:
        data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        target = np.empty_like(data)
        repeat = max(10, (256 << 20) // size // ROUNDS)
        rows = {
            "numpy.copyto": best_seconds(lambda: np.copyto(target, data), repeat),
            "crc32c": best_seconds(lambda: ems.crc32c(data), repeat),
            "crc32c software": best_seconds(lambda: ems.crc32c(data, software=True), repeat),
        }
        copy = rows["numpy.copyto"]
        for name, seconds in rows.items():
            print(f"{size >> 10:>5} KiB  {name:<16} {size / seconds / 1e9:6.2f} GB/s  "
                  f"{copy / seconds:5.2f}x copyto")


if __name__ == "__main__":
    main()
