"""A background thread that runs the connector's pool copies in submission order.

The copies themselves run in C with the GIL released (ems.Pool.get_many_into and put_many),
so they proceed while vLLM's forward pass runs in the main thread. Jobs run one at a time
in FIFO order: a later job may rely on every earlier one having finished.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

logger = logging.getLogger(__name__)


class CopyThread:
    """One daemon thread with a FIFO of jobs, and a barrier that waits for all of them."""

    def __init__(self, name: str = "ems-copy"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0           # jobs submitted and not yet finished
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`. It must catch its own errors; one that escapes is logged."""
        with self._idle:
            self._pending += 1
        self._jobs.put(job)

    def drain(self) -> None:
        """Return once every job submitted before this call has finished."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                logger.exception("EMS copy job failed")
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
