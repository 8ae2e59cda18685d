"""SpillView: which keys a spill directory holds, as seen by a process that does not write it.

The vLLM scheduler uses it to count blocks the worker spilled. It indexes published segments
through a read-only SpillStore. It also reads the record headers of segments that writers
still have open, resuming each file where the last scan stopped, because a busy writer
publishes a segment only when it is full and its blocks must count before that.

A key it names is a hint. The writer reads the block through its own index and checksums,
so a record that was torn, reclaimed or never finished costs a miss there, never wrong bytes.
"""
from __future__ import annotations

import logging
import os
import time

from ems.tiering import segment as fmt
from ems.tiering.store import SpillStore

log = logging.getLogger(__name__)

RESCAN_S = 0.2      # without new_step() calls, the directory is rescanned this often


class SpillView:
    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self._store: SpillStore | None = None
        self._scanned = 0.0
        self._stale = True
        # open segment file name -> (bytes scanned, keys of its complete records)
        self._open: dict[str, tuple[int, set[bytes]]] = {}

    def new_step(self) -> None:
        """Mark the view stale after an engine step (the writer may have spilled since), so
        the next lookup rescans. Lookups between two steps share one scan."""
        self._stale = True

    def exists_many(self, keys: list[bytes]) -> list[bool]:
        """Return, per key, whether the directory has a record of it."""
        now = time.monotonic()
        if self._stale or now - self._scanned >= RESCAN_S:
            self._scanned, self._stale = now, False
            self._rescan()
        if self._store is None:
            return [False] * len(keys)
        present = self._store.exists_many(keys)
        if self._open and not all(present):
            open_keys = set().union(*(found for _, found in self._open.values()))
            present = [p or bytes(key) in open_keys for p, key in zip(present, keys)]
        return present

    def count(self) -> int:
        """Rescan and return how many records the directory holds, published or open."""
        self._scanned, self._stale = time.monotonic(), False
        self._rescan()
        published = self._store.stats()["blocks"] if self._store is not None else 0
        return published + sum(len(found) for _, found in self._open.values())

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # ---- scanning ---------------------------------------------------------------------

    def _rescan(self) -> None:
        # Open segments first, then the store: a segment the writer publishes (renames)
        # between the two steps is then in one of them. In the other order it would be in
        # neither until the next scan, and its blocks would count as misses.
        try:
            names = [n for n in os.listdir(self.directory) if n.endswith(fmt.TEMP_SUFFIX)]
        except OSError as exc:
            log.debug("spill directory %s not readable yet: %s", self.directory, exc)
            return
        for gone in set(self._open) - set(names):    # published (now in the store) or removed
            del self._open[gone]
        for name in names:
            offset, found = self._open.get(name, (0, set()))
            self._open[name] = (self._scan_open(name, offset, found), found)

        try:
            if self._store is None:
                self._store = SpillStore(self.directory, quota_bytes=1 << 62, read_only=True)
            else:
                self._store.refresh()
        except OSError as exc:
            log.debug("spill directory %s not readable yet: %s", self.directory, exc)

    def _scan_open(self, name: str, offset: int, found: set[bytes]) -> int:
        """Add the keys of complete records from `offset` on; return where to resume."""
        try:
            with open(os.path.join(self.directory, name), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                while offset + fmt.HEADER_BYTES <= size:
                    header = fmt.parse_header(memoryview(os.pread(f.fileno(), fmt.HEADER_BYTES,
                                                                  offset)))
                    end = offset + fmt.record_bytes(header.length) if header else size + 1
                    if end > size:   # not written yet (or torn): look again next scan
                        break
                    found.add(header.key)
                    offset = end
        except FileNotFoundError:
            pass   # published or removed between listdir and open
        return offset
