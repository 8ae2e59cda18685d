"""Prefetch hints from the vLLM scheduler process to the worker that owns the spill tier.

The scheduler learns of a request when it enters vLLM's waiting queue (on_new_request), which
can be a whole step before the request is scheduled. Step metadata would reach the worker
only with the step that loads the blocks. So hints go at once, as datagrams on a Unix socket
next to the pool's name record: each datagram is a run of 32-byte keys to read from disk
into DRAM and protect. Sending never blocks; a hint that cannot be sent is dropped (the load
then reads the disk itself).
"""
from __future__ import annotations

import logging
import os
import socket
import threading

from ems import KEY_BYTES
from ems.pool import run_dir

logger = logging.getLogger(__name__)

DATAGRAM_KEYS = 1024       # keys per datagram: 32 KiB, well under the socket's default limit


def socket_path(pool_name: str) -> str:
    return os.path.join(run_dir(), f"{pool_name}.prefetch")


class PrefetchListener:
    """Worker side: receives hints and hands them to tier.prefetch(keys, protect=True)."""

    def __init__(self, pool_name: str, tier):
        self.tier = tier
        self.path = socket_path(pool_name)
        self.received = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)   # left by a killed worker: the pool name is ours now
            self._sock.bind(self.path)
            os.chmod(self.path, 0o600)
        except OSError:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._run, name="ems-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._sock.recv(DATAGRAM_KEYS * KEY_BYTES)
            except OSError:
                return   # closed
            if not data:
                return   # the wake-up close() sends
            keys = [data[i:i + KEY_BYTES] for i in range(0, len(data) - KEY_BYTES + 1, KEY_BYTES)]
            try:
                self.tier.prefetch(keys, protect=True)
                self.received += len(keys)
            except Exception:   # a hint never takes the worker down
                logger.exception("EMS prefetch of %d keys failed", len(keys))

    def close(self) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as wake:
                wake.sendto(b"", self.path)
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class PrefetchSender:
    """Scheduler side: sends hints without blocking. Returns nothing; failures are counted."""

    def __init__(self, pool_name: str):
        self.path = socket_path(pool_name)
        self.sent = 0
        self.dropped = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def send(self, keys: list[bytes]) -> None:
        for start in range(0, len(keys), DATAGRAM_KEYS):
            chunk = keys[start:start + DATAGRAM_KEYS]
            try:
                self._sock.sendto(b"".join(chunk), self.path)
                self.sent += len(chunk)
            except OSError as exc:   # no worker yet, or its queue is full
                self.dropped += len(chunk)
                logger.debug("EMS prefetch hint dropped: %s", exc)

    def close(self) -> None:
        self._sock.close()
