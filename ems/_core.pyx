# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython bindings of the EMS C core: a thin layer that checks arguments, turns C error
codes into ems.errors exceptions and releases the GIL around every copy. Policy (pool
names, fork handling) lives in ems.pool.
"""
from cpython.buffer cimport (PyBUF_RECORDS_RO, PyBuffer_FillInfo, PyBuffer_IsContiguous,
                             PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport (EACCES, EEXIST, EINVAL, EMSGSIZE, ENOENT, ENOMEM, ENOSPC, ENOTCONN,
                         EPERM, EPROTO, EPROTONOSUPPORT, ERANGE)
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from posix.unistd cimport usleep

from ems._core cimport *

import operator
import os

from ems.errors import (ArenaError, AttachError, BlockTooLargeError, BufferNotContiguousError,
                        BufferNotWritableError, BufferSizeError, CapacityError, EmptyBlockError,
                        InvalidKeyError, PoolClosedError, PoolFullError, PoolSuspendedError,
                        ReadOnlyPoolError)

KEY_BYTES = 32
PAGE_KINDS = {"auto": EMS_PAGES_AUTO, "hugetlb": EMS_PAGES_HUGETLB, "thp": EMS_PAGES_THP,
              "small": EMS_PAGES_SMALL}
MIN_SLAB_SIZE = 64 << 10
MAX_SLAB_SIZE = 1 << 30
SPILL_RECORD_HEADER_BYTES = EMS_SPILL_RECORD_HEADER  # key and length before each payload


def default_slab_size(uint64_t capacity):
    """Return the slab size a pool of `capacity` bytes gets when none is given."""
    return ems_pool_default_slab_size(capacity)


# ---- buffers ------------------------------------------------------------------------

cdef struct Span:
    char *ptr
    Py_ssize_t size
    bint has_view
    Py_buffer view


cdef int _is_c_contiguous(tuple shape, tuple strides, Py_ssize_t itemsize):
    cdef Py_ssize_t expected = itemsize
    for dim in range(len(shape) - 1, -1, -1):
        if shape[dim] != 1 and strides[dim] != expected:
            return 0
        expected *= shape[dim]
    return 1


cdef int _span_from_interface(object obj, Span *span, bint writable, str what) except -1:
    """Fill `span` from __array_interface__ or a torch-style tensor (data_ptr)."""
    cdef Py_ssize_t nbytes
    interface = getattr(obj, "__array_interface__", None)
    if interface is not None:
        address, readonly = interface["data"]
        shape = tuple(interface["shape"])
        itemsize = int(interface["typestr"][2:])
        nbytes = itemsize
        for extent in shape:
            nbytes *= extent
        strides = interface.get("strides")
        if strides is not None and not _is_c_contiguous(shape, tuple(strides), itemsize):
            raise BufferNotContiguousError(
                f"{what} is not contiguous (shape {shape}, strides {tuple(strides)}); "
                "pass a contiguous copy")
        if writable and readonly:
            raise BufferNotWritableError(f"{what} of type {type(obj).__name__} is read-only")
        span.ptr = <char *><uintptr_t>address
        span.size = nbytes
        return 0

    if hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous"):
        device = getattr(obj, "device", None)
        if device is not None and getattr(device, "type", "cpu") != "cpu":
            raise TypeError(f"{what} is on device {device}; copy it to a CPU tensor first")
        if not obj.is_contiguous():
            raise BufferNotContiguousError(
                f"{what} tensor is not contiguous (shape {tuple(obj.shape)}, strides "
                f"{tuple(obj.stride())}); pass tensor.contiguous()")
        span.ptr = <char *><uintptr_t>obj.data_ptr()
        span.size = obj.numel() * obj.element_size()
        return 0

    raise TypeError(f"{what} must support the buffer protocol or __array_interface__, or be "
                    f"a CPU torch tensor; got {type(obj).__name__}")


cdef int span_acquire(object obj, Span *span, bint writable, str what) except -1:
    """Point `span` at the bytes of `obj`; span_release must follow a success."""
    span.has_view = False
    if not PyObject_CheckBuffer(obj):
        return _span_from_interface(obj, span, writable, what)

    PyObject_GetBuffer(obj, &span.view, PyBUF_RECORDS_RO)
    span.has_view = True
    if not PyBuffer_IsContiguous(&span.view, b'A'):
        span_release(span)
        raise BufferNotContiguousError(f"{what} of type {type(obj).__name__} is not "
                                       "contiguous; pass a contiguous copy")
    if writable and span.view.readonly:
        span_release(span)
        raise BufferNotWritableError(f"{what} of type {type(obj).__name__} is read-only")
    span.ptr = <char *>span.view.buf
    span.size = span.view.len
    return 0


cdef inline void span_release(Span *span):
    if span.has_view:
        PyBuffer_Release(&span.view)
        span.has_view = False


# ---- checksums ----------------------------------------------------------------------

CRC32C_RELEASE_GIL_BYTES = 64 << 10   # shorter buffers keep the GIL: a release costs more


def crc32c(object data, uint32_t crc=0, *, bint software=False):
    """Return the CRC-32C (Castagnoli) of `data`, any contiguous buffer.

    Chains like zlib.crc32: crc32c(b, crc32c(a)) == crc32c(a + b). software=True uses the
    table loop even where the CPU instruction exists (for tests); both give the same value.
    """
    cdef Span span
    cdef uint32_t result
    span_acquire(data, &span, False, "data")
    try:
        if span.size >= CRC32C_RELEASE_GIL_BYTES:
            with nogil:
                if software:
                    result = ems_crc32c_software(crc, span.ptr, span.size)
                else:
                    result = ems_crc32c(crc, span.ptr, span.size)
        elif software:
            result = ems_crc32c_software(crc, span.ptr, span.size)
        else:
            result = ems_crc32c(crc, span.ptr, span.size)
    finally:
        span_release(&span)
    return result


def crc32c_hardware():
    """Return True where crc32c uses the CPU's CRC-32C instruction (SSE4.2)."""
    return bool(ems_crc32c_hardware())


# ---- keys ---------------------------------------------------------------------------

cdef int load_key(object key, uint8_t *out, str what) except -1:
    """Copy a 32-byte key into `out`; bytes take the fast path, other buffers the slow one."""
    cdef Span span
    if PyBytes_CheckExact(key):
        if PyBytes_GET_SIZE(key) != 32:
            raise InvalidKeyError(f"{what} must be 32 bytes, got {PyBytes_GET_SIZE(key)}")
        memcpy(out, PyBytes_AS_STRING(key), 32)
        return 0
    if isinstance(key, str):
        raise InvalidKeyError(f"{what} must be 32 bytes, got str; encode or hash it first")
    span_acquire(key, &span, False, what)
    try:
        if span.size != 32:
            raise InvalidKeyError(f"{what} must be 32 bytes, got {span.size}")
        memcpy(out, span.ptr, 32)
    finally:
        span_release(&span)
    return 0


cdef class KeyBatch:
    """Contiguous n x 32-byte keys from a list/tuple of keys or from one bytes-like object."""
    cdef uint8_t *data
    cdef Py_ssize_t n
    cdef bint owned
    cdef Span span

    def __cinit__(self, object keys):
        cdef Py_ssize_t i
        self.span.has_view = False
        if isinstance(keys, (list, tuple)):
            self.n = len(keys)
            self.data = <uint8_t *>malloc(max(self.n, 1) * 32)
            if self.data == NULL:
                raise MemoryError(f"cannot allocate {self.n} keys")
            self.owned = True
            for i in range(self.n):
                load_key(keys[i], self.data + i * 32, f"key {i} of the batch")
            return
        span_acquire(keys, &self.span, False, "batch of keys")
        if (self.span.has_view and self.span.view.ndim >= 2 and
                self.span.view.shape[self.span.view.ndim - 1] * self.span.view.itemsize != 32):
            raise InvalidKeyError(
                "keys must be 32 bytes, but the rows of the batch are "
                f"{self.span.view.shape[self.span.view.ndim - 1] * self.span.view.itemsize} bytes")
        if self.span.size % 32 != 0:
            raise InvalidKeyError(f"batch of keys is {self.span.size} bytes, which is not a "
                                  "multiple of the 32-byte key size")
        self.n = self.span.size // 32
        self.data = <uint8_t *>self.span.ptr

    def __dealloc__(self):
        if self.owned:
            free(self.data)
        span_release(&self.span)

    def __len__(self):
        return self.n


# ---- errors -------------------------------------------------------------------------

cdef object _integer_argument(object value, str name):
    """Return `value` as a Python int: any integer type (numpy ones too), but not bool."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


cdef object _errno_name(int rc):
    return os.strerror(-rc) if rc < 0 else str(rc)


# Per-block results of the C writes: 0 stored now, 1 stored before, or a negative errno.
# -EACCES comes from a suspended pool for every block. put, put_many and commit treat it
# as "not stored", because a cache that does not serve must not fail the engine's write;
# reserve raises it as PoolSuspendedError. Every other negative code raises.
cdef int raise_write_error(int rc, uint64_t length, _CorePool pool) except -1:
    if rc == -EACCES:
        raise PoolSuspendedError("the pool is suspended (set_suspended): it stores no "
                                 "block until it is resumed")
    if rc == -EPERM:
        raise ReadOnlyPoolError("this pool handle is read-only (attached, or inherited "
                                "through fork); write through the owner process")
    if rc == -ENOSPC:
        raise PoolFullError(f"pool is full: no block could be evicted to store {length} "
                            "bytes because every candidate block is pinned or reserved")
    if rc == -EINVAL:
        raise EmptyBlockError(f"block length {length} is invalid; blocks hold at least 1 byte")
    if rc == -EMSGSIZE:
        raise BlockTooLargeError(f"block of {length} bytes exceeds the maximum block size "
                                 f"{pool._max_block} bytes (the slab size); create the pool "
                                 "with a larger slab_size")
    raise OSError(-rc, f"pool write failed: {_errno_name(rc)}")


# ---- reservations -------------------------------------------------------------------

cdef class _SlotBuffer:
    """Writable buffer over a reserved slot; counts exports so commit can refuse while a
    view still points into the slot."""
    cdef char *ptr
    cdef Py_ssize_t size
    cdef int exports
    cdef bint valid

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if not self.valid:
            raise ValueError("the reservation is already committed or aborted")
        PyBuffer_FillInfo(buffer, self, self.ptr, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1


cdef class Reservation:
    """A slot reserved for one block: fill `buffer`, then commit() to publish the block or
    abort() to free the slot. Readers never see the block before commit. As a context
    manager it commits on a normal exit and aborts on an exception."""
    cdef _CorePool pool
    cdef ems_reservation_t r
    cdef _SlotBuffer slot
    cdef object view
    cdef bint done
    cdef readonly bytes key

    @property
    def exists(self):
        """True when the key was already stored: there is nothing to fill or commit."""
        return bool(self.r.exists)

    @property
    def nbytes(self):
        return self.r.length

    @property
    def buffer(self):
        """Writable memoryview of the slot (nbytes long); None when the key exists."""
        if self.r.exists:
            return None
        if self.done:
            raise ValueError("the reservation is already committed or aborted")
        if self.view is None:
            self.view = memoryview(self.slot)
        return self.view

    cdef int _close_view(self) except -1:
        if self.view is not None:
            try:
                self.view.release()
            except BufferError:
                raise BufferError("a view of the reservation buffer is still in use; "
                                  "delete arrays or memoryviews made from it first") from None
            self.view = None
        if self.slot is not None and self.slot.exports:
            raise BufferError("a view of the reservation buffer is still in use; "
                              "delete arrays or memoryviews made from it first")
        if self.slot is not None:
            self.slot.valid = False
        return 0

    def commit(self):
        """Publish the block. Returns True (also when another writer stored the key first),
        or False when the pool was suspended since the reservation (the block is dropped)."""
        cdef int rc
        if not self.pool._open:
            raise PoolClosedError("the pool is closed; the reservation was aborted")
        if self.done:
            raise ValueError("the reservation is already committed or aborted")
        self._close_view()
        self.done = True
        self.pool._reservations.discard(self)
        if self.r.exists:
            return True
        self.pool._enter()
        try:
            with nogil:
                rc = ems_pool_commit(&self.pool.pool, &self.r)
        finally:
            self.pool._leave()
        if rc == -EACCES:
            return False
        if rc < 0:
            raise_write_error(rc, self.r.length, self.pool)
        return True

    def abort(self):
        """Free the slot without publishing. Calling it again, or after commit, does nothing."""
        if self.done:
            return
        self._close_view()
        self.done = True
        self.pool._reservations.discard(self)
        if self.pool._open and not self.r.exists:
            ems_pool_abort(&self.pool.pool, &self.r)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    def __dealloc__(self):
        if not self.done and not self.r.exists and self.pool is not None and self.pool._open:
            ems_pool_abort(&self.pool.pool, &self.r)


# ---- pool ---------------------------------------------------------------------------

cdef class _CorePool:
    """Owner or attached handle of one pool. See ems.Pool for the documented API."""
    cdef ems_pool_t pool
    cdef bint _open
    cdef bint _closing
    cdef Py_ssize_t _inflight
    cdef readonly uint64_t _max_block
    cdef uint64_t _spill_ring_bytes   # size last set through this handle, bounds take_evicted
    cdef set _reservations
    cdef set _servers

    def __cinit__(self, *args, **kwargs):
        self._open = False
        self._reservations = set()
        self._servers = set()

    def __dealloc__(self):
        if self._open:
            ems_pool_close(&self.pool)
            self._open = False

    # -- lifecycle --

    def _create(self, uint64_t capacity, slab_size, max_blocks, str pages, str debug_name):
        cdef ems_pool_config_t config
        cdef int rc
        if pages not in PAGE_KINDS:
            raise ValueError(f"pages must be one of {sorted(PAGE_KINDS)}, got {pages!r}")
        slab = ems_pool_default_slab_size(capacity) if slab_size is None else int(slab_size)
        if slab < MIN_SLAB_SIZE or slab > MAX_SLAB_SIZE or slab & (slab - 1):
            raise CapacityError(f"slab_size {slab} is invalid: it must be a power of two "
                                f"from {MIN_SLAB_SIZE} to {MAX_SLAB_SIZE} bytes")
        if capacity < slab:
            raise CapacityError(f"capacity {capacity} bytes is too small to hold one slab of "
                                f"{slab} bytes; raise capacity_bytes or lower slab_size")
        if max_blocks is not None and not 1 <= max_blocks <= 0xfffffff0:
            raise ValueError(f"max_blocks {max_blocks} is out of range 1..{0xfffffff0}")

        name_bytes = debug_name.encode()
        config.capacity = capacity
        config.slab_size = slab
        config.max_blocks = 0 if max_blocks is None else max_blocks
        config.pages = PAGE_KINDS[pages]
        config.debug_name = name_bytes
        with nogil:
            rc = ems_pool_create(&self.pool, &config)
        if rc != 0:
            raise ArenaError(-rc, f"cannot map a pool of {capacity} bytes with pages={pages!r}: "
                                  f"{_errno_name(rc)}" +
                             ("; reserve hugepages with /proc/sys/vm/nr_hugepages or use "
                              "pages='auto'" if pages == "hugetlb" else ""))
        self._open = True
        self._max_block = ems_pool_max_block(&self.pool)

    def _attach_fd(self, int fd, str source):
        cdef int rc
        with nogil:
            rc = ems_pool_attach(&self.pool, fd)
        if rc == -EPROTO:
            raise AttachError(-rc, f"{source} holds an EMS pool of an unsupported layout "
                                   "version; upgrade ems in this process")
        if rc == -EINVAL:
            raise AttachError(-rc, f"{source} is not an EMS pool")
        if rc != 0:
            raise AttachError(-rc, f"cannot attach to {source}: {_errno_name(rc)}")
        self._open = True
        self._max_block = ems_pool_max_block(&self.pool)

    def _disown(self):
        """Make this handle read-only (used in the child after fork)."""
        if self._open:
            ems_pool_disown(&self.pool)

    def close(self):
        """Unmap the pool. Waits for calls running in other threads; open reservations are
        aborted. Further calls raise PoolClosedError. Closing twice does nothing."""
        if not self._open:
            return
        for server in list(self._servers):
            server.stop()
        for reservation in list(self._reservations):
            reservation.abort()
        self._closing = True
        while self._inflight:
            with nogil:
                usleep(1000)
        ems_pool_close(&self.pool)
        self._open = False

    cdef inline int _enter(self) except -1:
        if not self._open or self._closing:
            raise PoolClosedError("the pool is closed")
        self._inflight += 1
        return 0

    cdef inline void _leave(self):
        self._inflight -= 1

    # -- properties --

    @property
    def closed(self):
        return not self._open

    @property
    def is_owner(self):
        return self._open and bool(self.pool.owner)

    @property
    def fd(self):
        """File descriptor of the pool's memfd (pass it to Pool.attach in a child)."""
        self._check_open()
        return self.pool.arena.fd

    @property
    def page_kind(self):
        """Page kind of the mapping: 'hugetlb', 'thp' or 'small'."""
        self._check_open()
        return ems_page_kind_name(self.pool.arena.page_kind).decode()

    @property
    def max_block_size(self):
        """Largest block in bytes (the slab size)."""
        return self._max_block

    @property
    def suspended(self):
        """True while the owner has suspended the pool (see set_suspended)."""
        self._check_open()
        return bool(ems_pool_suspended(&self.pool))

    def set_suspended(self, bint suspended):
        """Suspend (True) or resume (False) the pool, for a node that must not serve.
        Owner only.

        While suspended, every read of this handle and of attached handles misses, put and
        put_many store nothing (put returns False, put_many counts 0), commit drops its
        block and returns False, reserve raises PoolSuspendedError, and each rejected
        block counts in stats()["suspended_drops"]. Stored blocks stay, so after a resume
        they are served again. Deletes and protect hints keep working.
        """
        cdef int rc
        self._enter()
        try:
            rc = ems_pool_set_suspended(&self.pool, suspended)
            if rc < 0:
                raise_write_error(rc, 0, self)
        finally:
            self._leave()

    def _check_open(self):
        if not self._open:
            raise PoolClosedError("the pool is closed")

    # -- single-key calls --

    def put(self, key, data):
        """Store `data` (any contiguous buffer) under `key`. Returns True when stored now,
        False when the key already existed (the stored block is kept) or the pool is
        suspended (nothing is stored)."""
        cdef uint8_t k[32]
        cdef Span src
        cdef int rc
        load_key(key, k, "key")
        span_acquire(data, &src, False, "data")
        self._enter()
        try:
            if src.size == 0 or <uint64_t>src.size > self._max_block:
                raise_write_error(-EINVAL if src.size == 0 else -EMSGSIZE, src.size, self)
            with nogil:
                rc = ems_pool_put(&self.pool, k, src.ptr, src.size)
            if rc < 0 and rc != -EACCES:
                raise_write_error(rc, src.size, self)
            return rc == 0
        finally:
            self._leave()
            span_release(&src)

    def reserve(self, key, Py_ssize_t nbytes):
        """Reserve a slot of `nbytes` for `key` to fill in place (see Reservation).
        Raises PoolSuspendedError while the pool is suspended."""
        cdef uint8_t k[32]
        cdef Reservation res = Reservation.__new__(Reservation)
        cdef int rc
        load_key(key, k, "key")
        self._enter()
        try:
            if nbytes <= 0 or <uint64_t>nbytes > self._max_block:
                raise_write_error(-EINVAL if nbytes <= 0 else -EMSGSIZE, max(nbytes, 0), self)
            with nogil:
                rc = ems_pool_reserve(&self.pool, k, nbytes, &res.r)
            if rc != 0:
                raise_write_error(rc, nbytes, self)
        finally:
            self._leave()
        res.pool = self
        res.key = (<char *>k)[:32]
        if not res.r.exists:
            res.slot = _SlotBuffer.__new__(_SlotBuffer)
            res.slot.ptr = <char *>res.r.data
            res.slot.size = nbytes
            res.slot.valid = True
            self._reservations.add(res)
        return res

    def get_into(self, key, buffer):
        """Copy the block under `key` into `buffer`, whose size must equal the block's.
        Returns True on a hit, False on a miss."""
        cdef uint8_t k[32]
        cdef Span dst
        cdef int64_t rc
        cdef uint64_t actual = 0
        load_key(key, k, "key")
        span_acquire(buffer, &dst, True, "destination buffer")
        self._enter()
        try:
            with nogil:
                rc = ems_pool_get(&self.pool, k, dst.ptr, dst.size, &actual)
            if rc == -EMSGSIZE:
                raise BufferSizeError(f"destination buffer is {dst.size} bytes but the block "
                                      f"under key {(<char *>k)[:32].hex()} is {actual} bytes")
            return rc >= 0
        finally:
            self._leave()
            span_release(&dst)

    def get(self, key):
        """Return the block under `key` as bytes, or None on a miss."""
        cdef uint8_t k[32]
        cdef int64_t length, rc
        cdef uint64_t actual = 0
        cdef char *dst
        load_key(key, k, "key")
        self._enter()
        try:
            # The block may be replaced between the length lookup and the copy: retry then.
            for _ in range(8):
                with nogil:
                    length = ems_pool_length(&self.pool, k)
                if length < 0:
                    with nogil:
                        ems_pool_get(&self.pool, k, NULL, 0, NULL)  # counts the miss
                    return None
                out = PyBytes_FromStringAndSize(NULL, length)
                dst = PyBytes_AS_STRING(out)
                with nogil:
                    rc = ems_pool_get(&self.pool, k, dst, length, &actual)
                if rc >= 0:
                    return out
                if rc == -ENOENT:
                    return None
            return None
        finally:
            self._leave()

    def exists(self, key):
        """True when a block is stored under `key`. Counts no hit or miss."""
        cdef uint8_t k[32]
        cdef int rc
        load_key(key, k, "key")
        self._enter()
        try:
            with nogil:
                rc = ems_pool_exists(&self.pool, k)
            return rc == 1
        finally:
            self._leave()

    def length(self, key):
        """Length in bytes of the block under `key`, or None when absent."""
        cdef uint8_t k[32]
        cdef int64_t rc
        load_key(key, k, "key")
        self._enter()
        try:
            with nogil:
                rc = ems_pool_length(&self.pool, k)
            return rc if rc >= 0 else None
        finally:
            self._leave()

    def delete(self, key):
        """Remove the block under `key`. Returns True when it was present."""
        cdef uint8_t k[32]
        cdef int rc
        load_key(key, k, "key")
        self._enter()
        try:
            with nogil:
                rc = ems_pool_delete(&self.pool, k)
            if rc == -EPERM:
                raise_write_error(rc, 0, self)
            return rc == 0
        finally:
            self._leave()

    # -- batch calls --

    def put_many(self, keys, datas):
        """Store datas[i] under keys[i]. Returns how many were stored now: keys stored
        before are skipped, and a suspended pool stores none."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef Py_ssize_t n = batch.n, i, acquired = 0
        cdef Span *spans
        cdef const void **srcs
        cdef uint64_t *lengths
        cdef int64_t *results
        if len(datas) != n:
            raise ValueError(f"put_many got {n} keys but {len(datas)} data buffers")
        spans = <Span *>malloc(max(n, 1) * (sizeof(Span) + sizeof(void *) + 16))
        if spans == NULL:
            raise MemoryError(f"cannot allocate a batch of {n}")
        srcs = <const void **>(spans + max(n, 1))
        lengths = <uint64_t *>(srcs + max(n, 1))
        results = <int64_t *>(lengths + max(n, 1))
        self._enter()
        try:
            for i in range(n):
                span_acquire(datas[i], &spans[i], False, f"data {i} of the batch")
                acquired += 1
                srcs[i] = spans[i].ptr
                lengths[i] = spans[i].size
                if lengths[i] == 0 or lengths[i] > self._max_block:
                    raise_write_error(-EINVAL if lengths[i] == 0 else -EMSGSIZE, lengths[i], self)
            with nogil:
                ems_pool_put_many(&self.pool, batch.data, n, srcs, lengths, results)
            stored = 0
            for i in range(n):
                if results[i] < 0 and results[i] != -EACCES:
                    raise_write_error(results[i], lengths[i], self)
                stored += results[i] == 0
            return stored
        finally:
            self._leave()
            for i in range(acquired):
                span_release(&spans[i])
            free(spans)

    def get_many_into(self, keys, buffers):
        """Copy each block into its buffer. `buffers` is a list with one buffer per key, or
        one buffer split evenly across the keys. Returns a list of hits (True) and misses."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef Py_ssize_t n = batch.n, i, acquired = 0, per
        cdef Span *spans
        cdef Span whole
        cdef void **dsts
        cdef uint64_t *lengths
        cdef int64_t *results
        cdef bint split = not isinstance(buffers, (list, tuple))
        if not split and len(buffers) != n:
            raise ValueError(f"get_many_into got {n} keys but {len(buffers)} buffers")
        spans = <Span *>malloc(max(n, 1) * (sizeof(Span) + sizeof(void *) + 16))
        if spans == NULL:
            raise MemoryError(f"cannot allocate a batch of {n}")
        dsts = <void **>(spans + max(n, 1))
        lengths = <uint64_t *>(dsts + max(n, 1))
        results = <int64_t *>(lengths + max(n, 1))
        whole.has_view = False
        self._enter()
        try:
            if split:
                span_acquire(buffers, &whole, True, "destination buffer")
                if n and whole.size % n != 0:
                    raise BufferSizeError(f"destination buffer of {whole.size} bytes cannot be "
                                          f"split evenly into {n} blocks")
                per = whole.size // n if n else 0
                for i in range(n):
                    dsts[i] = whole.ptr + i * per
                    lengths[i] = per
            else:
                for i in range(n):
                    span_acquire(buffers[i], &spans[i], True, f"destination buffer {i}")
                    acquired += 1
                    dsts[i] = spans[i].ptr
                    lengths[i] = spans[i].size
            with nogil:
                ems_pool_get_many(&self.pool, batch.data, n, dsts, lengths, results)
            hits = [False] * n
            for i in range(n):
                if results[i] >= 0:
                    hits[i] = True
                elif results[i] == -EMSGSIZE:
                    raise BufferSizeError(
                        f"destination buffer {i} is {spans[i].size if not split else per} bytes "
                        f"but the block under key {bytes(batch.data[i * 32:i * 32 + 32]).hex()} "
                        f"is {lengths[i]} bytes")
            return hits
        finally:
            self._leave()
            span_release(&whole)
            for i in range(acquired):
                span_release(&spans[i])
            free(spans)

    def exists_many(self, keys):
        """Return a list telling for each key whether it is stored."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef Py_ssize_t n = batch.n, i
        cdef uint8_t *out = <uint8_t *>malloc(max(n, 1))
        if out == NULL:
            raise MemoryError(f"cannot allocate a batch of {n}")
        self._enter()
        try:
            with nogil:
                ems_pool_exists_many(&self.pool, batch.data, n, out)
            return [out[i] != 0 for i in range(n)]
        finally:
            self._leave()
            free(out)

    def delete_many(self, keys):
        """Delete each key (owner only). Returns a list telling which keys were stored."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef Py_ssize_t n = batch.n, i
        cdef int *out = <int *>malloc(max(n, 1) * sizeof(int))
        if out == NULL:
            raise MemoryError(f"cannot allocate a batch of {n}")
        self._enter()
        try:
            with nogil:
                for i in range(n):
                    out[i] = ems_pool_delete(&self.pool, batch.data + i * 32)
            if n and out[0] == -EPERM:
                raise_write_error(out[0], 0, self)
            return [out[i] == 0 for i in range(n)]
        finally:
            self._leave()
            free(out)

    def match_prefix(self, keys):
        """Number of leading keys of a chain that are stored (stops at the first miss)."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef uint64_t found
        self._enter()
        try:
            with nogil:
                found = ems_pool_match_prefix(&self.pool, batch.data, batch.n)
            return found
        finally:
            self._leave()

    def protect(self, keys):
        """Mark stored keys as protected: eviction takes them only when nothing else can
        go. Returns how many of the keys were stored. Keys stored later are not marked."""
        return self._protect(keys, 1)

    def unprotect(self, keys):
        """Clear the protected mark. Returns how many of the keys were stored."""
        return self._protect(keys, 0)

    cdef object _protect(self, keys, int flag):
        cdef KeyBatch batch = KeyBatch(keys)
        cdef int64_t present
        self._enter()
        try:
            with nogil:
                present = ems_pool_protect(&self.pool, batch.data, batch.n, flag)
            if present < 0:
                raise_write_error(present, 0, self)
            return present
        finally:
            self._leave()

    # -- spill capture --

    def set_spill_ring(self, nbytes):
        """Capture evicted blocks for a spill tier in a ring of `nbytes` bytes of this
        process's heap, which take_evicted() drains. Owner only.

        0 turns capture off and frees the ring. Any other size must have room for the record
        of the largest block: max_block_size + SPILL_RECORD_HEADER_BYTES bytes or more. Only
        blocks evicted to make room are captured, not deleted ones or ones marked with
        mark_spilled(). When the ring is full, a new block is dropped and counted in
        stats()["spill_dropped"]. Resizing keeps the held blocks, oldest first. Those that
        no longer fit, and all held blocks when capture is turned off, count as dropped too.
        """
        cdef uint64_t size
        cdef int rc
        nbytes = _integer_argument(nbytes, "nbytes")
        minimum = self._max_block + EMS_SPILL_RECORD_HEADER
        if nbytes < 0:
            raise ValueError(f"spill ring size {nbytes} bytes is negative; pass 0 to turn "
                             f"capture off or at least {minimum} bytes")
        if 0 < nbytes < minimum:
            raise ValueError(f"spill ring size {nbytes} bytes is too small: it must hold the "
                             f"record of the largest block, {minimum} bytes (max_block_size "
                             f"{self._max_block} + {EMS_SPILL_RECORD_HEADER}-byte header); "
                             "pass 0 to turn capture off")
        if nbytes > 0xffffffffffffffff:
            raise ValueError(f"spill ring size {nbytes} bytes exceeds the maximum 2**64 - 1")
        size = nbytes
        self._enter()
        try:
            with nogil:
                rc = ems_pool_set_spill_ring(&self.pool, size)
            if rc == -EPERM:
                raise_write_error(rc, 0, self)
            if rc == -ENOMEM:
                raise MemoryError(f"cannot allocate a spill ring of {nbytes} bytes")
            if rc != 0:
                raise OSError(-rc, f"setting the spill ring failed: {_errno_name(rc)}")
            self._spill_ring_bytes = size
        finally:
            self._leave()

    def take_evicted(self, buffer, max_blocks):
        """Pop up to `max_blocks` captured blocks, oldest first, into `buffer`, a writable
        contiguous buffer (bytearray, numpy array, mmap). Owner only.

        Payloads are written one after another from offset 0, so block i starts at
        sum(lengths[:i]). A block that does not fit in the rest of the buffer stays in the
        ring for the next call. Returns (keys, lengths), lists of 32-byte keys and payload
        lengths that are empty when nothing was taken. The call waits for the ring's lock
        only, never for pool writes.
        """
        cdef Span dst
        cdef uint64_t limit, got, i
        cdef uint64_t *lengths = NULL
        cdef bytes keys_out
        cdef uint8_t *keys_ptr
        max_blocks = _integer_argument(max_blocks, "max_blocks")
        if max_blocks < 0:
            raise ValueError(f"max_blocks {max_blocks} is negative; it must be 0 or more")
        span_acquire(buffer, &dst, True, "buffer")
        self._enter()
        try:
            if not self.pool.owner:
                raise_write_error(-EPERM, 0, self)

            # Every payload is at least 1 byte and every record at least
            # ems_spill_record_bytes(1), so more records than this cannot come back.
            limit = min(max_blocks, dst.size,
                        self._spill_ring_bytes // ems_spill_record_bytes(1))
            if limit == 0:
                return [], []
            keys_out = PyBytes_FromStringAndSize(NULL, limit * 32)
            keys_ptr = <uint8_t *>PyBytes_AS_STRING(keys_out)
            lengths = <uint64_t *>malloc(limit * sizeof(uint64_t))
            if lengths == NULL:
                raise MemoryError(f"cannot allocate the lengths of {limit} blocks")
            with nogil:
                got = ems_pool_take_evicted(&self.pool, keys_ptr, lengths,
                                            <uint8_t *>dst.ptr, dst.size, limit)
            return ([keys_out[i * 32:i * 32 + 32] for i in range(got)],
                    [lengths[i] for i in range(got)])
        finally:
            self._leave()
            free(lengths)
            span_release(&dst)

    def mark_spilled(self, keys):
        """Mark stored keys as already in the spill tier, so evicting them copies nothing
        into the spill ring. Returns how many of the keys were stored. A later put of one
        of the keys stores an unmarked block."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef int64_t present
        self._enter()
        try:
            with nogil:
                present = ems_pool_mark_spilled(&self.pool, batch.data, batch.n)
            if present < 0:
                raise_write_error(present, 0, self)
            return present
        finally:
            self._leave()

    def evict_many(self, keys):
        """Evict the stored, unpinned, unprotected keys now, as CLOCK would (a spill ring
        captures them). Owner only. Returns the payload bytes freed."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef uint64_t freed
        self._enter()
        try:
            if not self.pool.owner:
                raise_write_error(-EPERM, 0, self)
            with nogil:
                freed = ems_pool_evict_many(&self.pool, batch.data, batch.n)
            return freed
        finally:
            self._leave()

    # -- statistics --

    def keys(self, uint64_t chunk=65536):
        """Yield the keys of stored blocks, n x 32 bytes per chunk (owner only). Blocks
        stored or evicted during the walk may be missed or listed."""
        cdef uint64_t cursor = 0, n, total
        cdef bytes out
        cdef uint8_t *dst
        self._check_open()
        total = self.stats()["max_blocks"]
        while cursor < total:
            out = PyBytes_FromStringAndSize(NULL, chunk * 32)
            dst = <uint8_t *>PyBytes_AS_STRING(out)
            self._enter()
            try:
                with nogil:
                    n = ems_pool_keys(&self.pool, &cursor, dst, chunk)
            finally:
                self._leave()
            if n:
                yield out[:n * 32]
            if not self.pool.owner:
                return

    def stats(self):
        """Counters and usage as a plain dict (see docs/architecture.md for each field)."""
        cdef ems_pool_stats_t s
        cdef ems_class_stats_t *rows
        cdef int nclasses, i
        self._enter()
        try:
            nclasses = ems_pool_stats(&self.pool, &s, NULL, 0)
            rows = <ems_class_stats_t *>malloc(max(nclasses, 1) * sizeof(ems_class_stats_t))
            if rows == NULL:
                raise MemoryError("cannot allocate the class table")
            try:
                nclasses = min(ems_pool_stats(&self.pool, &s, rows, nclasses), nclasses)
                classes = [dict(size_class=rows[i].size_class, slot_size=rows[i].slot_size,
                                slabs=rows[i].slabs, blocks=rows[i].blocks,
                                payload_bytes=rows[i].payload_bytes,
                                wasted_bytes=rows[i].wasted_bytes, evictions=rows[i].evictions)
                           for i in range(nclasses)]
            finally:
                free(rows)
        finally:
            self._leave()
        return dict(
            capacity_bytes=s.capacity, slab_size=s.slab_size, slabs=s.slabs,
            free_slabs=s.free_slabs, max_blocks=s.max_blocks, blocks=s.blocks,
            bytes_used=s.bytes_used, bytes_free=s.bytes_free, bytes_wasted=s.bytes_wasted,
            metadata_bytes=s.metadata_bytes,
            metadata_bytes_per_block=s.metadata_bytes / s.max_blocks if s.max_blocks else 0.0,
            hits=s.hits, misses=s.misses, puts=s.puts, put_exists=s.put_exists,
            evictions=s.evictions, deletes=s.deletes, slab_moves=s.slab_moves,
            pool_full=s.pool_full, suspended=bool(s.suspended),
            suspended_drops=s.suspended_drops, reader_hits=s.reader_hits,
            reader_misses=s.reader_misses, reader_retries=s.reader_retries,
            spill_captured=s.spill_captured, spill_dropped=s.spill_dropped,
            spill_ring_bytes=s.spill_ring_bytes, spill_ring_used=s.spill_ring_used,
            page_kind=ems_page_kind_name(<ems_page_kind_t>s.page_kind).decode(),
            is_owner=bool(self.pool.owner), classes=classes)


include "_transfer.pxi"
