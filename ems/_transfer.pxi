# Bindings of the transfer engine (csrc/transfer.h), included into ems/_core.pyx so that
# they share its buffer helpers. Thin: argument checks, GIL released around every network
# call, C errors turned into ems.errors exceptions. Routing and retries live in ems.client.

from cpython.ref cimport PyObject, Py_XDECREF, Py_XINCREF
from libc.string cimport strlen
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport close as c_close

import json
import logging
import threading

from ems.errors import AuthenticationError, ProtocolVersionError, TransferError


cdef extern from "frame.h":
    ctypedef enum ems_opcode_t:
        EMS_OP_PING
        EMS_OP_HELLO
        EMS_OP_AUTH
        EMS_OP_GET
        EMS_OP_PUT
        EMS_OP_EXISTS
        EMS_OP_MATCH_PREFIX
        EMS_OP_DELETE
        EMS_OP_DIR_REGISTER
        EMS_OP_DIR_LOOKUP
        EMS_OP_STATS
        EMS_OP_LOCAL_ATTACH
        EMS_OP_LOCAL_RESERVE
        EMS_OP_LOCAL_COMMIT
        EMS_OP_PROTECT
        EMS_OP_PREFETCH
        EMS_OP_DRAIN
        EMS_OP_LAST

    enum:
        EMS_PROTO_VERSION_MIN
        EMS_PROTO_VERSION_MAX


cdef extern from "latency.h":
    enum: EMS_LATENCY_BOUNDS
    ctypedef struct ems_latency_snapshot_t:
        uint64_t counts[EMS_LATENCY_BOUNDS + 1]
        uint64_t sum_ns
    const uint64_t ems_latency_bounds_ns[EMS_LATENCY_BOUNDS]


cdef extern from "transfer.h":
    ctypedef struct ems_server_t:
        pass
    ctypedef struct ems_conn_t:
        pass

    ctypedef struct ems_server_config_t:
        ems_pool_t *pool
        const char *host
        uint16_t port
        const char *unix_path
        const uint8_t *secret
        size_t secret_len
        uint32_t node_id
        uint32_t max_payload
        uint32_t max_connections
        uint32_t directory_capacity
        uint32_t idle_timeout_ms
        uint32_t io_timeout_ms
        uint16_t proto_min
        uint16_t proto_max

    ctypedef struct ems_server_stats_t:
        uint64_t connections, connections_open, refused_busy, auth_failures
        uint64_t bad_frames, requests, errors
        uint64_t gets, get_hits, get_misses, puts, put_stored, bytes_in, bytes_out
        uint64_t local_puts
        uint64_t dir_entries, dir_registered, dir_lookups, dir_hits, dir_evictions
        uint64_t miss_calls, miss_keys, miss_found
        uint64_t err_bad_request, err_unauthenticated, err_unsupported_version, err_too_large
        uint64_t err_internal
        uint64_t err_timeout, err_transport

    ctypedef enum ems_miss_mode_t:
        EMS_MISS_LOAD
        EMS_MISS_PROBE
        EMS_MISS_PREFETCH
        EMS_MISS_DELETE

    ctypedef void (*ems_miss_fn)(void *ctx, int mode, const uint8_t *keys, uint64_t n,
                                 uint8_t *found) noexcept

    ctypedef struct ems_conn_config_t:
        const char *host
        uint16_t port
        const char *unix_path
        const uint8_t *secret
        size_t secret_len
        const char *tenant
        uint16_t role
        uint32_t max_payload
        uint32_t timeout_ms
        uint16_t proto_min
        uint16_t proto_max

    void ems_tenant_salt(const char *tenant, size_t len, uint8_t *salt) nogil
    void ems_tenant_keys(const uint8_t *salt, const uint8_t *keys, uint64_t n, uint8_t *out) nogil

    int ems_server_start(const ems_server_config_t *config, ems_server_t **out) nogil
    uint16_t ems_server_port(const ems_server_t *server) nogil
    void ems_server_stop(ems_server_t *server) nogil
    void ems_server_stats(ems_server_t *server, ems_server_stats_t *stats) nogil
    int ems_server_latency(ems_server_t *server, uint16_t opcode,
                           ems_latency_snapshot_t *out) nogil
    void ems_server_set_miss_handler(ems_server_t *server, ems_miss_fn fn, void *ctx) nogil
    void ems_server_set_draining(ems_server_t *server, int draining) nogil
    int ems_server_draining(const ems_server_t *server) nogil
    size_t ems_server_take_log(ems_server_t *server, char *buf, size_t len) nogil
    uint64_t ems_server_take_new_keys(ems_server_t *server, uint8_t *out, uint64_t max,
                                      uint64_t *dropped) nogil
    uint64_t ems_server_dir_register(ems_server_t *server, const uint8_t *keys, uint64_t n,
                                     uint32_t holder) nogil
    uint64_t ems_server_dir_forget(ems_server_t *server, uint32_t holder) nogil
    void ems_server_dir_lookup(ems_server_t *server, const uint8_t *keys, uint64_t n,
                               uint32_t *holders) nogil

    int ems_conn_open(const ems_conn_config_t *config, ems_conn_t **out, char *error,
                      size_t error_len) nogil
    void ems_conn_close(ems_conn_t *conn) nogil
    int ems_conn_alive(const ems_conn_t *conn) nogil
    uint16_t ems_conn_version(const ems_conn_t *conn) nogil
    int ems_conn_get_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n, void *const *dsts,
                          const uint64_t *lengths, int64_t *results, uint32_t timeout_ms) nogil
    int ems_conn_put_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n,
                          const void *const *srcs, const uint64_t *lengths, int64_t *results,
                          uint32_t timeout_ms) nogil
    int ems_conn_exists_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint8_t *out,
                             uint32_t timeout_ms) nogil
    int ems_conn_match_prefix(ems_conn_t *conn, const uint8_t *keys, uint64_t n,
                              uint64_t *count, uint32_t timeout_ms) nogil
    int ems_conn_prefetch(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint64_t *count,
                          uint32_t timeout_ms) nogil
    int ems_conn_delete_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n,
                             int64_t *results, uint32_t timeout_ms) nogil
    int ems_conn_protect(ems_conn_t *conn, const uint8_t *keys, uint64_t n, int protect,
                         uint64_t *present, uint32_t timeout_ms) nogil
    int ems_conn_dir_register(ems_conn_t *conn, const uint8_t *stored_keys, uint64_t n,
                              uint32_t holder, uint32_t timeout_ms) nogil
    int ems_conn_dir_lookup(ems_conn_t *conn, const uint8_t *keys, uint64_t n,
                            uint32_t *holders, uint32_t timeout_ms) nogil
    int ems_conn_drain(ems_conn_t *conn, int drain, uint32_t *in_flight,
                       uint32_t timeout_ms) nogil
    int ems_conn_stats(ems_conn_t *conn, char *buf, size_t len, uint32_t timeout_ms) nogil
    int ems_conn_ping(ems_conn_t *conn, uint32_t timeout_ms) nogil
    int ems_conn_local_attach(ems_conn_t *conn, int *fd, uint32_t timeout_ms) nogil
    int ems_conn_local_put_many(ems_conn_t *conn, uint8_t *base, uint64_t map_size,
                                const uint8_t *keys, uint64_t n, const void *const *srcs,
                                const uint64_t *lengths, int64_t *results,
                                uint32_t timeout_ms) nogil


ROLES = {"client": 0, "node": 1}

# Opcode of each request kind of the protocol (docs/protocol.md), by the name the
# metrics use as their `op` label.
OPCODES = {"PING": EMS_OP_PING, "HELLO": EMS_OP_HELLO, "AUTH": EMS_OP_AUTH,
           "GET": EMS_OP_GET, "PUT": EMS_OP_PUT, "EXISTS": EMS_OP_EXISTS,
           "MATCH_PREFIX": EMS_OP_MATCH_PREFIX, "DELETE": EMS_OP_DELETE,
           "DIR_REGISTER": EMS_OP_DIR_REGISTER, "DIR_LOOKUP": EMS_OP_DIR_LOOKUP,
           "STATS": EMS_OP_STATS, "LOCAL_ATTACH": EMS_OP_LOCAL_ATTACH,
           "LOCAL_RESERVE": EMS_OP_LOCAL_RESERVE, "LOCAL_COMMIT": EMS_OP_LOCAL_COMMIT,
           "PROTECT": EMS_OP_PROTECT, "PREFETCH": EMS_OP_PREFETCH,
           "DRAIN": EMS_OP_DRAIN}
OP_LAST = EMS_OP_LAST

# Upper bounds of the request latency buckets (Server.latency), in seconds, ascending.
LATENCY_BOUNDS_S = tuple(ems_latency_bounds_ns[i] / 1e9 for i in range(EMS_LATENCY_BOUNDS))

# Protocol versions this build speaks (csrc/frame.h). docs/protocol.md lists what each adds.
PROTO_VERSION_MIN = EMS_PROTO_VERSION_MIN
PROTO_VERSION_MAX = EMS_PROTO_VERSION_MAX
HOLDER_NONE = 0xffffffff
DEFAULT_MAX_PAYLOAD = 64 << 20

# Modes of a miss handler call (Server.set_miss_handler).
MISS_LOAD = EMS_MISS_LOAD
MISS_PROBE = EMS_MISS_PROBE
MISS_PREFETCH = EMS_MISS_PREFETCH
MISS_DELETE = EMS_MISS_DELETE
_MISS_MODE_NAMES = {EMS_MISS_LOAD: "LOAD", EMS_MISS_PROBE: "PROBE",
                    EMS_MISS_PREFETCH: "PREFETCH", EMS_MISS_DELETE: "DELETE"}

_server_log = logging.getLogger("ems.server")


def tenant_keys(str tenant, keys):
    """Return the stored keys (n x 32 bytes) a daemon keeps `keys` under for `tenant`."""
    cdef KeyBatch batch = KeyBatch(keys)
    cdef uint8_t salt[32]
    cdef bytes name = _tenant_bytes(tenant)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, batch.n * 32)
    cdef uint8_t *dst = <uint8_t *>PyBytes_AS_STRING(out)
    ems_tenant_salt(name, len(name), salt)
    with nogil:
        ems_tenant_keys(salt, batch.data, batch.n, dst)
    return out


def protocol_range(proto_min=None, proto_max=None):
    """Return the (min, max) protocol versions a Server or Connection speaks: the arguments,
    else the environment variables EMS_PROTO_MIN and EMS_PROTO_MAX, else the build's range.
    EMS_PROTO_MAX=1 makes a process speak version 1 only, as the previous release did: a
    test fixture, and a pin while a cluster is upgraded. Raises ValueError for a version
    outside the build's range or a reversed range."""
    values = []
    for name, value, default in (("EMS_PROTO_MIN", proto_min, PROTO_VERSION_MIN),
                                 ("EMS_PROTO_MAX", proto_max, PROTO_VERSION_MAX)):
        source = name.lower().removeprefix("ems_")
        if value is None and os.environ.get(name):
            value, source = os.environ[name], name
        if value is None:
            value = default
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{source} {value!r} is not a protocol version (an integer)") \
                from None
        if not PROTO_VERSION_MIN <= value <= PROTO_VERSION_MAX:
            raise ValueError(f"{source} {value} is outside this build's protocol versions "
                             f"{PROTO_VERSION_MIN}-{PROTO_VERSION_MAX}")
        values.append(value)
    if values[0] > values[1]:
        raise ValueError(f"protocol range {values[0]}-{values[1]} is reversed (min > max)")
    return values[0], values[1]


cdef bytes _tenant_bytes(str tenant):
    # Strict ASCII: replacing other characters would merge distinct tenants ("caf?").
    name = tenant.encode("ascii", "ignore")
    if len(name) != len(tenant) or not 1 <= len(name) <= 64 or \
            any(c < 0x21 or c > 0x7e for c in name):
        raise ValueError(f"tenant {tenant!r} is invalid: use 1 to 64 printable ASCII "
                         "characters without spaces")
    return name


cdef object _transfer_error(int rc, str what):
    if rc == -EACCES:
        return AuthenticationError(-rc, what)
    if rc == -EPROTONOSUPPORT:
        return ProtocolVersionError(-rc, what)
    return TransferError(-rc, what)


# ---- miss handler -------------------------------------------------------------------

# Kinds of handler failure, as bits of MissHook.logged: each kind is logged once per
# handler, then only counted.
cdef enum:
    MISS_FAILED_RAISED = 1
    MISS_FAILED_RESULT = 2


cdef struct MissHook:
    # The Python miss handler of one Server: the ctx of _miss_trampoline. Every field is
    # read and written with the GIL held.
    PyObject *handler     # owned reference, NULL when none is set
    int logged            # MISS_FAILED_* kinds logged since the handler was set
    uint64_t failures     # calls that raised or returned a wrong result


cdef void _miss_failed(MissHook *hook, int kind, object exc, str message, tuple args):
    """Count a failed handler call, and log it when it is the first of its kind."""
    hook.failures += 1
    if hook.logged & kind:
        return
    hook.logged |= kind
    _server_log.error(message + " (later failures of this kind are counted in "
                      "Server.stats()['miss_handler_failures'], not logged)", *args,
                      exc_info=exc)


cdef void _miss_trampoline(void *ctx, int mode, const uint8_t *keys, uint64_t n,
                           uint8_t *found) noexcept with gil:
    """ems_miss_fn of a Server with a Python handler. Runs on a server connection thread,
    which takes the GIL here. found[] arrives zeroed and stays so on any failure."""
    cdef MissHook *hook = <MissHook *>ctx
    cdef Span span
    if hook.handler == NULL:
        return
    # A reference of this call's own, so that set_miss_handler cannot free the handler
    # while it runs.
    handler = <object>hook.handler
    try:
        result = handler(mode, PyBytes_FromStringAndSize(<const char *>keys, n * 32))
    except BaseException as exc:
        _miss_failed(hook, MISS_FAILED_RAISED, exc,
                     "miss handler %r failed on a %s call of %d keys: %r; treating the "
                     "keys as not found", (handler, _MISS_MODE_NAMES.get(mode, mode), n, exc))
        return
    try:
        span_acquire(result, &span, False, "miss handler result")
    except Exception:
        _miss_failed(hook, MISS_FAILED_RESULT, None,
                     "miss handler %r returned %s on a %s call of %d keys, expected a "
                     "bytes-like object of %d bytes; treating the keys as not found",
                     (handler, type(result).__name__, _MISS_MODE_NAMES.get(mode, mode), n,
                      n))
        return
    try:
        if <uint64_t>span.size != n:
            _miss_failed(hook, MISS_FAILED_RESULT, None,
                         "miss handler %r returned %d bytes on a %s call of %d keys, "
                         "expected %d; treating the keys as not found",
                         (handler, span.size, _MISS_MODE_NAMES.get(mode, mode), n, n))
            return
        memcpy(found, span.ptr, n)
    finally:
        span_release(&span)


cdef class Server:
    """The transfer server of one pool: serves it over TCP (and a Unix socket for clients
    on this host) on C threads. Stop it before closing the pool; Pool.close stops it.

    Any thread may call any method. stop() waits for calls that run without the GIL, and a
    call made once stop() has begun raises TransferError."""
    cdef ems_server_t *server
    cdef _CorePool pool
    cdef readonly uint32_t node_id
    cdef readonly uint16_t proto_min     # protocol versions served (protocol_range)
    cdef readonly uint16_t proto_max
    cdef Py_ssize_t _inflight     # calls using the server with the GIL released
    cdef bint _stopping
    cdef MissHook _hook           # ctx of the C miss handler; valid until __dealloc__ ends
    cdef object _hook_lock        # serializes set_miss_handler

    def __cinit__(self):
        self.server = NULL
        self._inflight = 0
        self._stopping = False
        self._hook.handler = NULL
        self._hook.logged = 0
        self._hook.failures = 0
        self._hook_lock = threading.Lock()

    def __init__(self, _CorePool pool, str host="127.0.0.1", int port=0, unix_path=None,
                 secret=None, uint32_t node_id=0, uint32_t max_payload=DEFAULT_MAX_PAYLOAD,
                 uint32_t max_connections=256, uint32_t directory_capacity=1 << 20,
                 uint32_t idle_timeout_ms=0, uint32_t io_timeout_ms=30000,
                 proto_min=None, proto_max=None):
        cdef ems_server_config_t cfg
        cdef int rc
        pool._check_open()
        low, high = protocol_range(proto_min, proto_max)
        if not pool.pool.owner:
            raise ValueError("a server needs the owner handle of its pool, not an attached one")
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 0..65535")
        cdef bytes host_b = host.encode()
        cdef bytes path_b = os.fsencode(unix_path) if unix_path else None
        cdef bytes secret_b = bytes(secret) if secret else None
        cfg.pool = &pool.pool
        cfg.host = host_b
        cfg.port = port
        cfg.unix_path = NULL
        cfg.secret = NULL
        cfg.secret_len = 0
        if path_b is not None:
            cfg.unix_path = path_b
        if secret_b is not None:
            cfg.secret = secret_b
            cfg.secret_len = len(secret_b)
        cfg.node_id = node_id
        cfg.max_payload = max_payload
        cfg.max_connections = max_connections
        cfg.directory_capacity = directory_capacity
        cfg.idle_timeout_ms = idle_timeout_ms
        cfg.io_timeout_ms = io_timeout_ms
        cfg.proto_min = low
        cfg.proto_max = high
        with nogil:
            rc = ems_server_start(&cfg, &self.server)
        if rc != 0:
            self.server = NULL
            where = f"{host}:{port}" + (f" and {unix_path}" if unix_path else "")
            raise TransferError(-rc, f"cannot serve on {where}: {_errno_name(rc)}")
        self.pool = pool
        self.node_id = node_id
        self.proto_min = low
        self.proto_max = high
        pool._servers.add(self)

    def __dealloc__(self):
        # The C server is stopped first: its connection threads may still be running the
        # trampoline, which reads self._hook.
        if self.server != NULL:
            with nogil:
                ems_server_stop(self.server)
            self.server = NULL
        Py_XDECREF(self._hook.handler)
        self._hook.handler = NULL

    @property
    def port(self):
        """TCP port the server listens on."""
        self._check()
        return ems_server_port(self.server)

    @property
    def running(self):
        return self.server != NULL

    @property
    def draining(self):
        """True while the server stores no new block (a DRAIN request or set_draining)."""
        self._check()
        return bool(ems_server_draining(self.server))

    def set_draining(self, bint draining):
        """Start or end draining: while draining, PUT and LOCAL_RESERVE store nothing and
        answer -ESHUTDOWN per key. Reads go on."""
        self._check()
        ems_server_set_draining(self.server, draining)

    cdef int _check(self) except -1:
        if self.server == NULL:
            raise TransferError(0, "the server is stopped")
        return 0

    cdef ems_server_t *_enter(self) except NULL:
        """Return the server for a call that releases the GIL. The caller uses this pointer,
        not self.server, which stop() may clear meanwhile, and calls _leave() afterwards."""
        self._check()
        self._inflight += 1
        return self.server

    cdef void _leave(self):
        self._inflight -= 1

    def stop(self):
        """Close every connection and join the server's threads. A stop() while another
        thread stops the server waits for that one to finish; stopping twice does nothing."""
        cdef ems_server_t *server = self.server
        if server == NULL:
            while self._stopping:
                with nogil:
                    usleep(1000)
            return
        # Cleared first, so that calls in other threads raise instead of using the server
        # while it is freed.
        self.server = NULL
        self._stopping = True
        try:
            while self._inflight:
                with nogil:
                    usleep(1000)
            with nogil:
                ems_server_stop(server)
        finally:
            self._stopping = False
            self.pool._servers.discard(self)
            # No connection thread is left to call the handler, so its reference can go,
            # breaking any cycle through a handler that refers to this server.
            self._replace_handler(None)

    cdef void _replace_handler(self, object handler):
        """Point the hook at `handler` (None for none) and reset its logged kinds."""
        cdef PyObject *old = self._hook.handler
        if handler is None:
            self._hook.handler = NULL
        else:
            Py_XINCREF(<PyObject *>handler)
            self._hook.handler = <PyObject *>handler
        self._hook.logged = 0
        Py_XDECREF(old)

    def set_miss_handler(self, handler):
        """Let `handler` serve the keys requests do not find in the pool, or with None
        stop asking one.

        The server calls handler(mode, keys) from its connection threads with the GIL
        held, once per request, where keys is the missed stored keys joined (32 bytes
        each, after the tenant transform) and mode is MISS_LOAD (GET: put the blocks into
        the pool before returning), MISS_PROBE (EXISTS, MATCH_PREFIX: only report which a
        lower tier has) or MISS_PREFETCH (PREFETCH: start loading and return at once). It
        returns a bytes-like object of one byte per key, nonzero where the key was found.
        A handler that raises or returns anything else finds nothing. That is logged to
        the "ems.server" logger once per kind of failure and counted in
        stats()["miss_handler_failures"].

        Returns once no call of the previous handler is running. A handler must not call
        set_miss_handler or stop() of its server, which would wait for the handler itself.
        stop() drops the handler."""
        cdef ems_server_t *server
        cdef bint clear = handler is None
        if handler is not None and not callable(handler):
            raise TypeError(f"miss handler must be callable or None, got "
                            f"{type(handler).__name__}")
        with self._hook_lock:
            server = self._enter()
            try:
                self._replace_handler(handler)
                # Without the GIL: the wait for running calls needs them to finish, and
                # they take the GIL in the trampoline.
                with nogil:
                    if clear:
                        ems_server_set_miss_handler(server, NULL, NULL)
                    else:
                        ems_server_set_miss_handler(server, _miss_trampoline, &self._hook)
            finally:
                self._leave()

    def stats(self):
        cdef ems_server_stats_t s
        self._check()
        ems_server_stats(self.server, &s)
        cdef dict stats = s
        stats["miss_handler_failures"] = self._hook.failures
        return stats

    def latency(self):
        """Request durations per opcode since the server started: {op name: (counts,
        sum in seconds)}, where counts[i] is the number of requests that took at most
        LATENCY_BOUNDS_S[i] and more than the bound before it (not cumulative), and the
        last count is the number above the largest bound. Every opcode of OPCODES is
        present, with zero counts until a request of it arrives."""
        cdef ems_latency_snapshot_t snap
        cdef int i
        # Through _enter: building the result runs Python code, during which another
        # thread may call stop().
        cdef ems_server_t *server = self._enter()
        result = {}
        try:
            for name, opcode in OPCODES.items():
                ems_server_latency(server, opcode, &snap)
                result[name] = ([snap.counts[i] for i in range(EMS_LATENCY_BOUNDS + 1)],
                                snap.sum_ns / 1e9)
        finally:
            self._leave()
        return result

    def take_log(self):
        """Lines the server logged since the last call (errors it survived)."""
        cdef char buf[16384]
        cdef size_t n
        self._check()
        lines = []
        while True:
            n = ems_server_take_log(self.server, buf, sizeof(buf))
            if n == 0:
                return lines
            lines.extend(buf[:n].decode("utf-8", "replace").splitlines())

    def take_new_keys(self, uint64_t max_keys=65536):
        """(stored keys committed since the last call as n x 32 bytes, keys dropped)."""
        cdef uint64_t dropped = 0, n
        self._check()
        cdef bytes out = PyBytes_FromStringAndSize(NULL, max_keys * 32)
        cdef uint8_t *dst = <uint8_t *>PyBytes_AS_STRING(out)
        cdef ems_server_t *server = self._enter()
        try:
            with nogil:
                n = ems_server_take_new_keys(server, dst, max_keys, &dropped)
        finally:
            self._leave()
        return out[:n * 32], dropped

    def dir_register(self, stored_keys, uint32_t holder):
        cdef KeyBatch batch = KeyBatch(stored_keys)
        cdef ems_server_t *server = self._enter()
        try:
            with nogil:
                ems_server_dir_register(server, batch.data, batch.n, holder)
        finally:
            self._leave()

    def dir_forget(self, uint32_t holder):
        """Drop every directory entry of a lost holder; returns how many."""
        self._check()
        return ems_server_dir_forget(self.server, holder)

    def dir_lookup(self, stored_keys):
        """Holder id of each stored key, HOLDER_NONE where unknown."""
        cdef KeyBatch batch = KeyBatch(stored_keys)
        self._check()
        cdef bytes out = PyBytes_FromStringAndSize(NULL, max(batch.n, 1) * 4)
        cdef uint32_t *dst = <uint32_t *>PyBytes_AS_STRING(out)
        cdef ems_server_t *server = self._enter()
        try:
            with nogil:
                ems_server_dir_lookup(server, batch.data, batch.n, dst)
        finally:
            self._leave()
        return list(memoryview(out).cast("I"))[:batch.n]


cdef class Connection:
    """One authenticated connection to a daemon, over TCP or its Unix socket.

    Not thread-safe: use one per thread (ems.client keeps a pool per peer). Every call
    takes a deadline in milliseconds; a transport failure raises TransferError and closes
    the connection (`alive` turns False)."""
    cdef ems_conn_t *conn
    cdef readonly str address
    cdef uint8_t *map_base
    cdef uint64_t map_size

    def __cinit__(self):
        self.conn = NULL
        self.map_base = NULL

    def __init__(self, host=None, int port=0, unix_path=None, secret=None,
                 str tenant="default", str role="client",
                 uint32_t max_payload=DEFAULT_MAX_PAYLOAD, uint32_t timeout_ms=2000,
                 proto_min=None, proto_max=None):
        cdef ems_conn_config_t cfg
        cdef char error[256]
        cdef int rc
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        low, high = protocol_range(proto_min, proto_max)
        if (host is None) == (unix_path is None):
            raise ValueError("give either host and port or unix_path")
        cdef bytes tenant_b = _tenant_bytes(tenant)
        cdef bytes host_b = host.encode() if host is not None else None
        cdef bytes path_b = os.fsencode(unix_path) if unix_path is not None else None
        cdef bytes secret_b = bytes(secret) if secret else None
        self.address = unix_path if unix_path is not None else f"{host}:{port}"
        cfg.host = NULL
        cfg.unix_path = NULL
        cfg.secret = NULL
        cfg.secret_len = 0
        if host_b is not None:
            cfg.host = host_b
        if path_b is not None:
            cfg.unix_path = path_b
        if secret_b is not None:
            cfg.secret = secret_b
            cfg.secret_len = len(secret_b)
        cfg.port = port
        cfg.tenant = tenant_b
        cfg.role = ROLES[role]
        cfg.max_payload = max_payload
        cfg.timeout_ms = timeout_ms
        cfg.proto_min = low
        cfg.proto_max = high
        with nogil:
            rc = ems_conn_open(&cfg, &self.conn, error, sizeof(error))
        if rc != 0:
            self.conn = NULL
            raise _transfer_error(rc, f"{self.address}: {error.decode('utf-8', 'replace')}")

    def __dealloc__(self):
        self._release()

    cdef void _release(self):
        if self.map_base != NULL:
            munmap(self.map_base, self.map_size)
            self.map_base = NULL
        if self.conn != NULL:
            ems_conn_close(self.conn)
            self.conn = NULL

    def close(self):
        self._release()

    @property
    def alive(self):
        return self.conn != NULL and ems_conn_alive(self.conn)

    @property
    def version(self):
        """Protocol version agreed with the server."""
        return ems_conn_version(self.conn) if self.conn != NULL else 0

    cdef int _check(self, int rc, str what) except -1:
        if rc < 0:
            raise _transfer_error(rc, f"{what} on {self.address} failed: {_errno_name(rc)}")
        return 0

    cdef int _open(self) except -1:
        if self.conn == NULL or not ems_conn_alive(self.conn):
            raise TransferError(ENOTCONN, f"connection to {self.address} is closed")
        return 0

    def get_many_into(self, keys, buffers, uint32_t timeout_ms=1000):
        """Copy each block into its buffer (a list, one per key). Returns per key the
        block length, or a negative errno (-ENOENT miss, -EMSGSIZE other length)."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef Py_ssize_t n = batch.n, i, acquired = 0
        cdef Span *spans
        cdef void **dsts
        cdef uint64_t *lengths
        cdef int64_t *results
        cdef int rc
        self._open()
        if len(buffers) != n:
            raise ValueError(f"get_many_into got {n} keys but {len(buffers)} buffers")
        spans = <Span *>malloc(max(n, 1) * (sizeof(Span) + sizeof(void *) + 16))
        if spans == NULL:
            raise MemoryError(f"cannot allocate a batch of {n}")
        dsts = <void **>(spans + max(n, 1))
        lengths = <uint64_t *>(dsts + max(n, 1))
        results = <int64_t *>(lengths + max(n, 1))
        try:
            for i in range(n):
                span_acquire(buffers[i], &spans[i], True, f"destination buffer {i}")
                acquired += 1
                dsts[i] = spans[i].ptr
                lengths[i] = spans[i].size
            with nogil:
                rc = ems_conn_get_many(self.conn, batch.data, n, dsts, lengths, results,
                                       timeout_ms)
            self._check(rc, "GET")
            return [results[i] for i in range(n)]
        finally:
            for i in range(acquired):
                span_release(&spans[i])
            free(spans)

    def put_many(self, keys, datas, uint32_t timeout_ms=1000):
        """Store datas[i] under keys[i]. Returns per key 0 (stored), 1 (already stored) or
        a negative errno."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef Py_ssize_t n = batch.n, i, acquired = 0
        cdef Span *spans
        cdef const void **srcs
        cdef uint64_t *lengths
        cdef int64_t *results
        cdef int rc
        self._open()
        if len(datas) != n:
            raise ValueError(f"put_many got {n} keys but {len(datas)} data buffers")
        spans = <Span *>malloc(max(n, 1) * (sizeof(Span) + sizeof(void *) + 16))
        if spans == NULL:
            raise MemoryError(f"cannot allocate a batch of {n}")
        srcs = <const void **>(spans + max(n, 1))
        lengths = <uint64_t *>(srcs + max(n, 1))
        results = <int64_t *>(lengths + max(n, 1))
        try:
            for i in range(n):
                span_acquire(datas[i], &spans[i], False, f"data {i} of the batch")
                acquired += 1
                srcs[i] = spans[i].ptr
                lengths[i] = spans[i].size
            with nogil:
                if self.map_base != NULL:
                    rc = ems_conn_local_put_many(self.conn, self.map_base, self.map_size,
                                                 batch.data, n, srcs, lengths, results,
                                                 timeout_ms)
                else:
                    rc = ems_conn_put_many(self.conn, batch.data, n, srcs, lengths, results,
                                           timeout_ms)
            self._check(rc, "PUT")
            return [results[i] for i in range(n)]
        finally:
            for i in range(acquired):
                span_release(&spans[i])
            free(spans)

    def exists_many(self, keys, uint32_t timeout_ms=1000):
        """List of booleans, one per key."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef int rc
        self._open()
        cdef bytes out = PyBytes_FromStringAndSize(NULL, max(batch.n, 1))
        cdef uint8_t *dst = <uint8_t *>PyBytes_AS_STRING(out)
        with nogil:
            rc = ems_conn_exists_many(self.conn, batch.data, batch.n, dst, timeout_ms)
        self._check(rc, "EXISTS")
        return [bool(b) for b in out[:batch.n]]

    def match_prefix(self, keys, uint32_t timeout_ms=1000):
        """Number of leading keys stored on this server."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef uint64_t count = 0
        cdef int rc
        self._open()
        with nogil:
            rc = ems_conn_match_prefix(self.conn, batch.data, batch.n, &count, timeout_ms)
        self._check(rc, "MATCH_PREFIX")
        return count

    def prefetch(self, keys, uint32_t timeout_ms=1000):
        """Ask the server to start loading the keys it lacks from its lower tier. Returns
        how many keys were in its pool already or had a load started."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef uint64_t count = 0
        cdef int rc
        self._open()
        with nogil:
            rc = ems_conn_prefetch(self.conn, batch.data, batch.n, &count, timeout_ms)
        self._check(rc, "PREFETCH")
        return count

    def delete_many(self, keys, uint32_t timeout_ms=1000):
        cdef KeyBatch batch = KeyBatch(keys)
        cdef int64_t *results = <int64_t *>malloc(max(batch.n, 1) * 8)
        cdef int rc
        if results == NULL:
            raise MemoryError(f"cannot allocate a batch of {batch.n}")
        try:
            self._open()
            with nogil:
                rc = ems_conn_delete_many(self.conn, batch.data, batch.n, results, timeout_ms)
            self._check(rc, "DELETE")
            return [results[i] for i in range(batch.n)]
        finally:
            free(results)

    def protect(self, keys, bint protect=True, uint32_t timeout_ms=1000):
        """Set (or with protect=False clear) the evict-last hint on the stored keys; returns
        how many of them were present."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef uint64_t present = 0
        cdef int rc
        self._open()
        with nogil:
            rc = ems_conn_protect(self.conn, batch.data, batch.n, protect, &present,
                                  timeout_ms)
        self._check(rc, "PROTECT")
        return present

    def dir_register(self, stored_keys, uint32_t holder, uint32_t timeout_ms=1000):
        """Node role: register stored keys held by `holder` at this directory shard."""
        cdef KeyBatch batch = KeyBatch(stored_keys)
        cdef int rc
        self._open()
        with nogil:
            rc = ems_conn_dir_register(self.conn, batch.data, batch.n, holder, timeout_ms)
        self._check(rc, "DIR_REGISTER")

    def dir_lookup(self, keys, uint32_t timeout_ms=1000):
        """Holder id of each key at this directory shard (HOLDER_NONE where unknown)."""
        cdef KeyBatch batch = KeyBatch(keys)
        cdef int rc
        self._open()
        cdef bytes out = PyBytes_FromStringAndSize(NULL, max(batch.n, 1) * 4)
        cdef uint32_t *dst = <uint32_t *>PyBytes_AS_STRING(out)
        with nogil:
            rc = ems_conn_dir_lookup(self.conn, batch.data, batch.n, dst, timeout_ms)
        self._check(rc, "DIR_LOOKUP")
        return list(memoryview(out).cast("I"))[:batch.n]

    def drain(self, bint drain=True, uint32_t timeout_ms=1000):
        """Node role, protocol version 2: start (or with drain=False end) draining on the
        server, which then stores no new block. Returns the requests its other
        connections are handling at that moment. Raises ProtocolVersionError on a
        connection of version 1, without sending anything."""
        cdef uint32_t in_flight = 0
        cdef int rc
        self._open()
        with nogil:
            rc = ems_conn_drain(self.conn, drain, &in_flight, timeout_ms)
        if rc == -EPROTONOSUPPORT:
            raise ProtocolVersionError(EPROTONOSUPPORT,
                                       f"DRAIN on {self.address} needs protocol version 2; "
                                       f"this connection agreed on {self.version}")
        self._check(rc, "DRAIN")
        return in_flight

    def stats(self, uint32_t timeout_ms=1000):
        """The server's statistics as a dict."""
        cdef char buf[4096]
        cdef int rc
        self._open()
        with nogil:
            rc = ems_conn_stats(self.conn, buf, sizeof(buf), timeout_ms)
        self._check(rc, "STATS")
        return json.loads(buf[:strlen(buf)].decode())

    def ping(self, uint32_t timeout_ms=1000):
        cdef int rc
        self._open()
        with nogil:
            rc = ems_conn_ping(self.conn, timeout_ms)
        self._check(rc, "PING")

    def local_attach(self, uint32_t timeout_ms=1000):
        """Local socket only: receive the pool's memfd and map it read-write, so that
        put_many copies straight into reserved slots. Returns the fd (the caller owns it)."""
        cdef int fd = -1, rc
        cdef void *base
        self._open()
        with nogil:
            rc = ems_conn_local_attach(self.conn, &fd, timeout_ms)
        self._check(rc, "LOCAL_ATTACH")
        size = os.fstat(fd).st_size
        base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if base == MAP_FAILED:
            c_close(fd)
            raise TransferError(ENOMEM, f"cannot map the pool of {self.address}")
        if self.map_base != NULL:   # attached before: the new mapping replaces the old one
            munmap(self.map_base, self.map_size)
        self.map_base = <uint8_t *>base
        self.map_size = size
        return fd
