"""Positional file I/O for the spill tier: io_uring through liburing, or os.preadv/os.pwritev.

Both backends read batches of (fd, offset, buffer) requests and return byte counts. A failed
read returns its OSError in place of a count, so one bad file cannot fail a batch. A failed
write raises OSError. Buffers for O_DIRECT files must be 4096-byte aligned (slices of an
mmap are). A backend is used by one thread at a time, which the store's lock ensures.
"""
import errno
import logging
import os

log = logging.getLogger(__name__)

MODES = ("auto", "uring", "posix")

# Reads submitted to the ring before waiting for their completions.
URING_DEPTH = 64

_fallback_logged = False


class PosixBackend:
    """Blocking os.preadv/os.pwritev, one system call per request."""

    mode = "posix"

    def read_many(self, requests):
        results = []
        for fd, offset, view in requests:
            try:
                results.append(os.preadv(fd, [view], offset))
            except OSError as error:
                results.append(error)
        return results

    def write(self, fd, offset, view):
        """Write all of view at offset, raising OSError on failure."""
        done = 0
        while done < len(view):
            written = os.pwritev(fd, [view[done:]], offset + done)
            if written == 0:
                raise OSError(errno.EIO, f"pwritev wrote 0 bytes at offset {offset + done}")
            done += written

    def close(self):
        pass


class UringBackend:
    """io_uring through the liburing package, with up to URING_DEPTH reads in flight."""

    mode = "uring"

    def __init__(self, depth: int = URING_DEPTH):
        import liburing

        self._lib = liburing
        self._depth = depth
        self._ring = liburing.Ring()
        self._cqe = liburing.Cqe()
        liburing.io_uring_queue_init(depth, self._ring)
        self._open = True

    def read_many(self, requests):
        lib = self._lib
        results = [None] * len(requests)
        for start in range(0, len(requests), self._depth):
            window = requests[start:start + self._depth]

            # Queue the window. Each Iovec must stay alive until its completion arrives, and
            # all are built before any SQE is taken so a bad buffer leaves no SQE half-filled.
            iovecs = [lib.Iovec([view]) for _, _, view in window]
            for index, (fd, offset, _), iovec in zip(range(start, start + len(window)), window, iovecs):
                sqe = lib.io_uring_get_sqe(self._ring)
                lib.io_uring_prep_readv(sqe, fd, iovec, offset)
                lib.io_uring_sqe_set_data64(sqe, index)
            lib.io_uring_submit_and_wait(self._ring, len(window))

            # Reap one completion per request; completions arrive in any order.
            for _ in window:
                lib.io_uring_wait_cqe(self._ring, self._cqe)
                entry = self._cqe[0]
                index = entry.user_data
                try:
                    results[index] = entry.res
                except OSError as error:  # liburing raises for a negative res (-errno)
                    results[index] = error
                lib.io_uring_cq_advance(self._ring, 1)
        return results

    def write(self, fd, offset, view):
        """Write all of view at offset, raising OSError on failure."""
        lib = self._lib
        done = 0
        while done < len(view):
            iovec = lib.Iovec([view[done:]])
            sqe = lib.io_uring_get_sqe(self._ring)
            lib.io_uring_prep_writev(sqe, fd, iovec, offset + done)
            lib.io_uring_submit_and_wait(self._ring, 1)
            lib.io_uring_wait_cqe(self._ring, self._cqe)
            try:
                written = self._cqe[0].res
            finally:
                lib.io_uring_cq_advance(self._ring, 1)
            if written == 0:
                raise OSError(errno.EIO, f"io_uring write returned 0 bytes at offset {offset + done}")
            done += written

    def close(self):
        if self._open:
            self._open = False
            self._lib.io_uring_queue_exit(self._ring)


def open_backend(mode: str = "auto"):
    """Return (backend, fallback_reason) for mode "auto", "uring" or "posix".

    "auto" tries io_uring and falls back to posix, logging the reason as a warning once per
    process; fallback_reason is None unless that happened. "uring" raises OSError where io_uring
    cannot be set up (package missing, old kernel, seccomp, memlock limit).
    """
    if mode not in MODES:
        raise ValueError(f"invalid spill io mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "posix":
        return PosixBackend(), None
    try:
        return UringBackend(), None
    except (ImportError, OSError) as error:
        if mode == "uring":
            raise OSError(getattr(error, "errno", None) or errno.ENOSYS,
                          f"io_uring is unavailable: {error}; use io='posix' or io='auto'") from error
        global _fallback_logged
        reason = f"{type(error).__name__}: {error}"
        level = logging.DEBUG if _fallback_logged else logging.WARNING
        _fallback_logged = True
        log.log(level, "io_uring is unavailable (%s); the spill tier uses os.preadv/os.pwritev", reason)
        return PosixBackend(), reason
