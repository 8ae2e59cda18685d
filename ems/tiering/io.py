"""Positional file I/O for the spill tier: io_uring through liburing, or os.preadv/os.pwritev.

A backend is a queue of read and write requests (fd, offset, buffer) with at most `depth` in
flight. submit() queues one request under a caller-chosen integer tag, and complete() returns
finished requests as (tag, result) pairs. A result is a byte count or the OSError the request
failed with. A write is finished only when all its bytes are written, so its count is the
buffer's length. read_many() and write_many() run a list of requests through the queue.
Buffers for O_DIRECT files must be 4096-byte aligned (slices of an mmap are), and a buffer must
stay alive and unchanged until its request completes. A backend is used by one thread at a
time, which the store's lock ensures.
"""
import ctypes
import errno
import logging
import os

log = logging.getLogger(__name__)

MODES = ("auto", "uring", "posix")

READ = 0
WRITE = 1

# Requests in flight per backend unless the caller sets another depth.
DEFAULT_DEPTH = 32
# Upper bound on depth: each request in flight pins a staging buffer of one record.
MAX_DEPTH = 4096

_fallback_logged = False


class _Queue:
    """Batch helpers shared by both backends, built on submit() and complete()."""

    depth = 1

    def read_many(self, requests):
        """Read each (fd, offset, view); return per request the byte count or its OSError."""
        return self._run(READ, requests)

    def write_many(self, requests):
        """Write each (fd, offset, view) whole; return per request len(view) or its OSError."""
        return self._run(WRITE, requests)

    def drain(self):
        """Wait for every request in flight and discard the results."""
        while self.in_flight:
            self.complete()

    def _run(self, op, requests):
        results = [None] * len(requests)
        submitted = 0
        try:
            while submitted < len(requests) or self.in_flight:
                while submitted < len(requests) and self.in_flight < self.depth:
                    fd, offset, view = requests[submitted]
                    self.submit(op, fd, offset, view, submitted)
                    submitted += 1
                for tag, result in self.complete():
                    results[tag] = result
        finally:
            # Buffers of unfinished requests belong to the caller, so none may outlive this call.
            self.drain()
        return results


class PosixBackend(_Queue):
    """Blocking os.preadv/os.pwritev in the calling thread, one request at a time.

    submit() does the system call, so a request is finished before submit() returns and
    complete() only hands back the buffered results.
    """

    mode = "posix"
    depth = 1

    def __init__(self):
        self._finished = []

    @property
    def in_flight(self) -> int:
        return len(self._finished)

    def submit(self, op, fd, offset, view, tag):
        try:
            if op == READ:
                result = os.preadv(fd, [view], offset)
            else:
                result = _pwrite_all(fd, offset, view)
        except OSError as error:
            result = error
        self._finished.append((tag, result))

    def complete(self):
        finished, self._finished = self._finished, []
        return finished

    def close(self):
        self._finished = []


def _pwrite_all(fd, offset, view) -> int:
    done = 0
    while done < len(view):
        written = os.pwritev(fd, [view[done:]], offset + done)
        if written == 0:
            raise OSError(errno.EIO, f"pwritev wrote 0 bytes at offset {offset + done}")
        done += written
    return done


class UringBackend(_Queue):
    """io_uring through the liburing package, with up to `depth` requests in flight.

    liburing 2026.3.30 keeps the GIL in its wait calls, so complete() never calls them: the
    ring signals completions on an eventfd, and complete() waits in os.read on it, which
    releases the GIL. Other Python threads (a vLLM worker's forward pass) run meanwhile.

    NOTE: liburing's Iovec never releases the buffer export it takes of a memoryview, so
    memory once passed to submit() stays allocated until the process exits (see _iovec_for).
    """

    mode = "uring"

    def __init__(self, depth: int = DEFAULT_DEPTH):
        import liburing

        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"invalid io depth {depth}; expected 1 to {MAX_DEPTH}")
        self._lib = liburing
        self.depth = depth
        self._ring = liburing.Ring()
        self._cqe = liburing.Cqe()
        liburing.io_uring_queue_init(depth, self._ring)
        self._eventfd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            liburing.io_uring_register_eventfd(self._ring, self._eventfd)
        except BaseException:
            os.close(self._eventfd)
            liburing.io_uring_queue_exit(self._ring)
            raise
        self._open = True
        # tag -> [op, fd, offset, view, bytes done, Iovec]. The kernel reads the buffer's
        # address from the Iovec, so the Iovec must live until the completion is reaped.
        self._pending = {}
        self._iovecs = {}  # (buffer address, length) -> Iovec, see _iovec_for

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(self, op, fd, offset, view, tag):
        if len(self._pending) >= self.depth:
            raise RuntimeError(f"io_uring queue is full: {self.depth} requests in flight")
        if tag in self._pending:
            raise ValueError(f"tag {tag} is already in flight")
        state = [op, fd, offset, view, 0, None]
        self._queue(tag, state)
        self._pending[tag] = state
        # Enter the kernel now, so the device works while the caller prepares the next request.
        self._lib.io_uring_submit(self._ring)

    def _queue(self, tag, state):
        lib = self._lib
        op, fd, offset, view, done, _ = state
        # Build the Iovec before taking an SQE, so a bad buffer leaves no SQE half-filled.
        iovec = self._iovec_for(view[done:] if done else view)
        sqe = lib.io_uring_get_sqe(self._ring)  # never None: at most `depth` SQEs are queued
        if op == READ:
            lib.io_uring_prep_readv(sqe, fd, iovec, offset + done)
        else:
            lib.io_uring_prep_writev(sqe, fd, iovec, offset + done)
        lib.io_uring_sqe_set_data64(sqe, tag)
        state[5] = iovec

    def _iovec_for(self, view):
        """Return an Iovec of view, reusing the one made earlier for the same memory.

        Each new Iovec pins its memoryview (about 190 bytes) and the buffer under it for the
        life of the process, because liburing 2026.3.30 never releases the export. One Iovec
        per (address, length) keeps that to the buffers a caller reuses, such as the store's
        staging slots. The key is safe because pinned memory is never freed, so its address
        cannot come back for other memory.
        """
        try:
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        except (TypeError, ValueError):  # read-only or empty: no address without an export
            return self._lib.Iovec([view])
        key = (address, len(view))
        iovec = self._iovecs.get(key)
        if iovec is None:
            iovec = self._iovecs[key] = self._lib.Iovec([view])
        return iovec

    def complete(self):
        """Wait for at least one request to finish; return every finished one."""
        while self._pending:
            finished = self._reap()
            if finished:
                return finished
            # Blocks with the GIL released until the kernel posts a completion. The counter
            # may also hold completions reaped already; then the next _reap finds none and
            # this read blocks for real.
            os.read(self._eventfd, 8)
        return []

    def _reap(self):
        """Return the finished requests among the posted completions, without waiting."""
        lib = self._lib
        finished, requeued, seen = [], False, 0
        # CqeIter follows the completion ring's head through wraparound, unlike cqe[i].
        for _ in lib.CqeIter(self._ring, self._cqe):
            seen += 1
            entry = self._cqe[0]
            tag = entry.user_data
            try:
                count = entry.res
            except OSError as error:  # liburing raises for a negative res (-errno)
                self._pending.pop(tag)
                finished.append((tag, error))
                continue
            state = self._pending[tag]
            if state[0] == READ:
                self._pending.pop(tag)
                finished.append((tag, count))
                continue

            # A write is finished when all its bytes are on the file; queue the rest of a
            # short write again under the same tag.
            state[4] += count
            if count == 0:
                self._pending.pop(tag)
                finished.append((tag, OSError(
                    errno.EIO, f"io_uring write returned 0 bytes at offset {state[2] + state[4]}")))
            elif state[4] >= len(state[3]):
                self._pending.pop(tag)
                finished.append((tag, state[4]))
            else:
                self._queue(tag, state)
                requeued = True
        lib.io_uring_cq_advance(self._ring, seen)
        if requeued:
            lib.io_uring_submit(self._ring)
        return finished

    def close(self):
        if self._open:
            self.drain()
            self._open = False
            self._lib.io_uring_queue_exit(self._ring)
            os.close(self._eventfd)


def open_backend(mode: str = "auto", depth: int = DEFAULT_DEPTH):
    """Return (backend, fallback_reason) for mode "auto", "uring" or "posix".

    "auto" tries io_uring and falls back to posix, logging the reason as a warning once per
    process; fallback_reason is None unless that happened. "uring" raises OSError where io_uring
    cannot be set up (package missing, old kernel, seccomp, memlock limit). depth bounds the
    io_uring requests in flight; the posix backend always has one.
    """
    if mode not in MODES:
        raise ValueError(f"invalid spill io mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "posix":
        return PosixBackend(), None
    try:
        return UringBackend(depth), None
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
