/* Transfer engine: the EMS protocol over TCP (and a Unix socket for same-host clients).
 *
 * The server serves one pool and one directory shard on its own threads: an accept thread
 * per listening socket and one thread per connection, with no Python anywhere on the data
 * path. The client is a single connection with blocking calls bounded by a deadline.
 * Payload formats are in docs/protocol.md.
 *
 * Tenants: a connection names its tenant in HELLO, and the server stores every block under
 * ems_tenant_key(tenant salt, key), so a tenant can neither read nor probe another
 * tenant's blocks. The directory is keyed by the same stored keys.
 *
 * Lower tier: a miss handler (ems_server_set_miss_handler) may serve the keys a request
 * does not find in the pool. GET then loads them, and EXISTS and MATCH_PREFIX count the
 * keys the handler reports as available.
 *
 * Versions: each side speaks a range of protocol versions (the build's, or a part of it
 * set in the config) and HELLO agrees on the newest one both speak. A connection then uses
 * only that version's frames and opcodes.
 *
 * Draining (version 2): a DRAIN request makes the server store no new block until it is
 * ended, so that writers turn to other nodes before this one restarts. Reads go on.
 *
 * Errors follow the core's convention: 0 or a count on success, a negative errno on
 * failure. Client calls return -ETIMEDOUT when the deadline passed and -ECONNRESET,
 * -EPIPE or -ECONNREFUSED when the peer is gone; after any transport error the connection
 * is closed and every later call returns -ENOTCONN. */
#ifndef EMS_TRANSFER_H
#define EMS_TRANSFER_H

#include <stddef.h>
#include <stdint.h>

#include "latency.h"
#include "pool.h"

#define EMS_TENANT_MAX 64          /* bytes of a tenant name */
#define EMS_CHALLENGE_BYTES 32
#define EMS_PROOF_BYTES 32
#define EMS_HOLDER_NONE 0xffffffffu
#define EMS_ROLE_CLIENT 0u         /* may read and write blocks of its tenant */
#define EMS_ROLE_NODE 1u           /* a peer daemon: may register directory entries */

/* Stored key of `key` for a tenant: SHA-256(salt || key). `salt` is ems_tenant_salt. */
void ems_tenant_salt(const char *tenant, size_t len, uint8_t salt[32]);
void ems_tenant_keys(const uint8_t salt[32], const uint8_t *keys, uint64_t n, uint8_t *out);

/* HMAC-SHA256 proof of the cluster secret for a challenge, bound to tenant and role. */
void ems_auth_proof(const uint8_t *secret, size_t secret_len,
                    const uint8_t challenge[EMS_CHALLENGE_BYTES], const char *tenant,
                    size_t tenant_len, uint16_t role, uint8_t proof[EMS_PROOF_BYTES]);

/* ---- server ------------------------------------------------------------------------ */

typedef struct ems_server ems_server_t;

typedef struct ems_server_config {
    ems_pool_t *pool;            /* owner handle; the server never closes it */
    const char *host;            /* TCP listen address, e.g. "127.0.0.1" */
    uint16_t port;               /* 0 = any free port (see ems_server_port) */
    const char *unix_path;       /* local socket path, NULL for none */
    const uint8_t *secret;       /* cluster secret; NULL = no authentication */
    size_t secret_len;
    uint32_t node_id;            /* this node's holder id in the directory */
    uint32_t max_payload;        /* largest frame payload accepted, bytes */
    uint32_t max_connections;    /* beyond it a new connection gets BUSY and is closed */
    uint32_t directory_capacity; /* directory entries this shard can contain */
    uint32_t idle_timeout_ms;    /* a connection silent this long is closed; 0 = never */
    uint32_t io_timeout_ms;      /* a frame must arrive whole within this */
    uint16_t proto_min;          /* protocol versions served; 0 and 0 = the build's range */
    uint16_t proto_max;
} ems_server_config_t;

typedef struct ems_server_stats {
    uint64_t connections, connections_open, refused_busy, auth_failures;
    uint64_t bad_frames, requests, errors;
    uint64_t gets, get_hits, get_misses, puts, put_stored, bytes_in, bytes_out;
    uint64_t local_puts;
    uint64_t dir_entries, dir_registered, dir_lookups, dir_hits, dir_evictions;
    uint64_t miss_calls;         /* calls of the miss handler */
    uint64_t miss_keys;          /* keys passed to it */
    uint64_t miss_found;         /* keys it reported found */
    /* Error responses by status, which add up to `errors`. */
    uint64_t err_bad_request, err_unauthenticated, err_unsupported_version, err_too_large;
    uint64_t err_internal;
    /* Connections closed because a frame stalled for io_timeout_ms (not idle ones), and
     * connections that broke in the middle of a request (reset, cut frame, failed send).
     * Neither is counted while the server stops. */
    uint64_t err_timeout, err_transport;
} ems_server_stats_t;

/* Modes of a miss handler call. */
typedef enum {
    EMS_MISS_LOAD = 0,       /* bring the keys into the pool before returning */
    EMS_MISS_PROBE = 1,      /* only report whether a lower tier has them */
    EMS_MISS_PREFETCH = 2,   /* start loading them into the pool and return at once */
    EMS_MISS_DELETE = 3,     /* a DELETE: remove them from the lower tier too (all its keys,
                              * after the pool deleted them); found[i] = 1 when removed */
} ems_miss_mode_t;

/* Handler of the keys a request did not find in the pool, so that a lower tier (a spill
 * tier on disk) can serve them. The server calls it from connection threads, holding no
 * server or pool lock, at most once per request, with the n >= 1 stored keys (32 bytes
 * each, after the tenant transform) that the request missed. found[0..n) is zeroed before
 * the call, and the handler sets found[i] = 1 for each key it has. With LOAD that means the
 * block is now in the pool, with PROBE that a lower tier contains it, and with PREFETCH
 * that a load has started. Any nonzero byte counts as 1. The handler must be thread-safe,
 * because connections call it concurrently, and must not call ems_server_stop or
 * ems_server_set_miss_handler, which wait for it. A GET keeps its hits pinned during the
 * LOAD call, so the blocks the LOAD adds cannot evict them. While the pool is suspended
 * (ems_pool_set_suspended) the server calls the handler with DELETE only, so a suspended
 * node serves no block from a lower tier either. */
typedef void (*ems_miss_fn)(void *ctx, int mode, const uint8_t *keys, uint64_t n,
                            uint8_t *found);

/* Starts listening and serving. Returns 0, -EINVAL for a bad config (a protocol range
 * outside the build's among them), or the errno of socket/bind/listen/pthread_create. */
int ems_server_start(const ems_server_config_t *config, ems_server_t **out);

/* The TCP port the server listens on (the chosen one when config.port was 0). */
uint16_t ems_server_port(const ems_server_t *server);

/* Stops accepting, closes every connection, joins the threads and frees the server. The
 * pool stays open. A PUT's reservations are aborted, but a local client's pending
 * reservations (LOCAL_RESERVE without LOCAL_COMMIT) are not, because the client may still
 * be copying into their slots.
 * NOTE: those slots stay reserved, and count as used, until the pool closes. */
void ems_server_stop(ems_server_t *server);

void ems_server_stats(ems_server_t *server, ems_server_stats_t *stats);

/* Copies the latency histogram of the requests with `opcode` (an ems_opcode_t) into out.
 * A request's duration runs from the moment its header was read to the moment its
 * response was sent or the request failed, and every decoded request counts, whatever its
 * status. Returns 0, or -EINVAL (out zeroed) for an opcode the protocol does not define. */
int ems_server_latency(ems_server_t *server, uint16_t opcode, ems_latency_snapshot_t *out);

/* Installs `fn` with its `ctx` as the miss handler, or removes the handler when fn is
 * NULL. Returns after every call of the handler it replaced has returned, so the caller
 * may then free the old ctx. Calls to it are serialized. It must not be called from a miss
 * handler, which would wait for itself. ems_server_stop joins every connection thread, so
 * no handler runs once stop has returned. */
void ems_server_set_miss_handler(ems_server_t *server, ems_miss_fn fn, void *ctx);

/* Starts (draining = 1) or ends draining, as a DRAIN request does: while draining, PUT and
 * LOCAL_RESERVE store nothing and return -ESHUTDOWN for every key. */
void ems_server_set_draining(ems_server_t *server, int draining);
int ems_server_draining(const ems_server_t *server);

/* Copies up to `len` bytes of pending log lines (each ending in '\n') into buf and removes
 * them; returns the byte count. The server logs every error it survives here, so the
 * daemon can forward the lines to its logger. Lines that overflow the buffer are counted
 * and replaced by one "N log lines dropped" line. */
size_t ems_server_take_log(ems_server_t *server, char *buf, size_t len);

/* Moves up to `max` stored keys committed since the last call into out (32 bytes each)
 * and returns how many. The daemon announces them to their directory shards. When more
 * keys were committed than the queue can contain, the oldest are dropped and *dropped
 * counts them. */
uint64_t ems_server_take_new_keys(ems_server_t *server, uint8_t *out, uint64_t max,
                                  uint64_t *dropped);

/* Directory shard, for the daemon: register stored keys under a holder, drop every entry
 * of a lost holder, and look up. */
uint64_t ems_server_dir_register(ems_server_t *server, const uint8_t *keys, uint64_t n,
                                 uint32_t holder);
uint64_t ems_server_dir_forget(ems_server_t *server, uint32_t holder);
void ems_server_dir_lookup(ems_server_t *server, const uint8_t *keys, uint64_t n,
                           uint32_t *holders);

/* ---- client ------------------------------------------------------------------------ */

typedef struct ems_conn ems_conn_t;

typedef struct ems_conn_config {
    const char *host;            /* TCP peer, or NULL with unix_path */
    uint16_t port;
    const char *unix_path;       /* local socket of a daemon on this host */
    const uint8_t *secret;       /* NULL when the server runs without authentication */
    size_t secret_len;
    const char *tenant;
    uint16_t role;               /* EMS_ROLE_CLIENT or EMS_ROLE_NODE */
    uint32_t max_payload;        /* largest response payload accepted */
    uint32_t timeout_ms;         /* deadline of connect + handshake */
    uint16_t proto_min;          /* protocol versions offered; 0 and 0 = the build's range */
    uint16_t proto_max;
} ems_conn_config_t;

/* Connects, negotiates the version and authenticates. Returns 0, -ECONNREFUSED,
 * -ETIMEDOUT, -EACCES (wrong or missing secret), -EPROTONOSUPPORT (no version in common;
 * the error names both ranges when the server sent its own), -EINVAL (a protocol range
 * outside the build's among other causes), or another negative errno. On failure `error`
 * (may be NULL) receives a sentence naming the cause. */
int ems_conn_open(const ems_conn_config_t *config, ems_conn_t **out, char *error,
                  size_t error_len);
void ems_conn_close(ems_conn_t *conn);

/* 1 while the connection is usable. */
int ems_conn_alive(const ems_conn_t *conn);
/* The agreed protocol version. */
uint16_t ems_conn_version(const ems_conn_t *conn);

/* Batched operations. Keys are n contiguous 32-byte keys (not stored keys: the server
 * applies the tenant). Each call is one request and one response, split by the caller to
 * fit max_payload. `timeout_ms` bounds the whole call. Per-key results are as in pool.h:
 * get: length or -ENOENT / -EMSGSIZE; put: 0 stored, 1 already stored, or a negative
 * errno. A checksum mismatch on a GET response makes every key of the call a miss
 * (-EIO returned, destination contents undefined). Returns 0 or a negative errno. */
int ems_conn_get_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n, void *const *dsts,
                      const uint64_t *lengths, int64_t *results, uint32_t timeout_ms);
int ems_conn_put_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n,
                      const void *const *srcs, const uint64_t *lengths, int64_t *results,
                      uint32_t timeout_ms);
int ems_conn_exists_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint8_t *out,
                         uint32_t timeout_ms);
int ems_conn_match_prefix(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint64_t *count,
                          uint32_t timeout_ms);
/* Asks the server to start loading the keys it lacks from its lower tier. *count gets how
 * many of the keys were in the pool already or had a load started. Without a miss handler
 * on the server that is the count already in the pool. */
int ems_conn_prefetch(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint64_t *count,
                      uint32_t timeout_ms);
int ems_conn_delete_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n, int64_t *results,
                         uint32_t timeout_ms);
/* Sets (protect = 1) or clears the evict-last hint on the present keys; *present gets
 * how many were present. */
int ems_conn_protect(ems_conn_t *conn, const uint8_t *keys, uint64_t n, int protect,
                     uint64_t *present, uint32_t timeout_ms);
/* Node role only: register stored keys held by `holder` at this directory shard. */
int ems_conn_dir_register(ems_conn_t *conn, const uint8_t *stored_keys, uint64_t n,
                          uint32_t holder, uint32_t timeout_ms);
/* holders[i] = holder id of key i, or EMS_HOLDER_NONE. */
int ems_conn_dir_lookup(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint32_t *holders,
                        uint32_t timeout_ms);
/* Node role, version 2: starts (drain = 1) or ends draining on the server, and sets
 * *in_flight to the requests its other connections are handling at that moment. A request
 * counts until its thread is done with it, which may be just after its response arrived.
 * Returns -EPROTONOSUPPORT, sending nothing, on a connection of version 1. */
int ems_conn_drain(ems_conn_t *conn, int drain, uint32_t *in_flight, uint32_t timeout_ms);
/* Writes the server's statistics as JSON (NUL-terminated) into buf. */
int ems_conn_stats(ems_conn_t *conn, char *buf, size_t len, uint32_t timeout_ms);
int ems_conn_ping(ems_conn_t *conn, uint32_t timeout_ms);

/* Local socket only. Receives the pool's memfd; the caller maps it (read-write, to fill
 * reservations) and owns the returned fd. */
int ems_conn_local_attach(ems_conn_t *conn, int *fd, uint32_t timeout_ms);
/* Reserves slots (results[i]: 0 reserved, 1 already stored, negative errno), copies
 * srcs[i] into the shared mapping at base + offset, and commits. No payload crosses the
 * socket. Returns 0 or a negative errno; a failure after reserving aborts the rest. */
int ems_conn_local_put_many(ems_conn_t *conn, uint8_t *base, uint64_t map_size,
                            const uint8_t *keys, uint64_t n, const void *const *srcs,
                            const uint64_t *lengths, int64_t *results, uint32_t timeout_ms);

#endif
