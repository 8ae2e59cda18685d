/* State shared by server.c (lifecycle, connections, framing) and server_ops.c (the
 * operations). Not part of the public API.
 *
 * Ownership: a connection and its buffers belong to its own thread. The server's list of
 * connections, the log and the new-key queue are guarded by their mutexes, and the
 * counters are relaxed atomics. */
#ifndef EMS_SERVER_INTERNAL_H
#define EMS_SERVER_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/uio.h>

#include "directory.h"
#include "frame.h"
#include "transfer.h"

#define EMS_LOG_BYTES (64u << 10)
#define EMS_NEW_KEYS_MAX (256u << 10)

typedef struct ems_srv_counters {
    _Atomic uint64_t connections, refused_busy, auth_failures, bad_frames, requests, errors;
    _Atomic uint64_t gets, get_hits, get_misses, puts, put_stored, bytes_in, bytes_out;
    _Atomic uint64_t local_puts;
    _Atomic uint64_t miss_calls, miss_keys, miss_found;
    _Atomic uint64_t status_errors[EMS_STATUS_INTERNAL + 1];   /* by response status */
    _Atomic uint64_t timeouts, transport_errors;
    ems_latency_t latency[EMS_OP_LAST + 1];                    /* by opcode; [0] unused */
    _Atomic uint64_t hellos[EMS_PROTO_VERSION_MAX + 1][2];  /* by agreed version and role */
} ems_srv_counters_t;

typedef struct ems_srv_conn {
    struct ems_server *server;
    int fd;
    int is_local;                  /* accepted on the Unix socket */
    char peer[64];                 /* address for log lines */

    /* Set by HELLO and AUTH. */
    int hello_done, authed;
    uint16_t version, role;
    char tenant[EMS_TENANT_MAX + 1];
    uint8_t salt[32];
    uint8_t challenge[EMS_CHALLENGE_BYTES];

    uint8_t *in;                   /* request payload */
    size_t in_cap;
    uint8_t *out;                  /* response payload */
    size_t out_cap;
    uint8_t *keys;                 /* stored keys of the current batch */
    size_t keys_cap;

    ems_reservation_t *pending;    /* local reservations awaiting LOCAL_COMMIT */
    uint8_t *pending_keys;         /* their stored keys */
    int64_t *pending_rc;           /* each key's reserve result, returned again at commit */
    uint64_t npending;

    /* Scratch of miss handler calls (server_miss.c): the indexes of the missed keys in
     * the request, their stored keys and the handler's results. */
    uint64_t *miss_index;
    size_t miss_index_cap;         /* entries */
    uint8_t *miss_keys;
    size_t miss_keys_cap;
    uint8_t *miss_found;
    size_t miss_found_cap;

    struct ems_srv_conn *prev, *next;
} ems_srv_conn_t;

struct ems_server {
    ems_server_config_t cfg;
    uint8_t *secret;               /* own copy of cfg.secret */
    int tcp_fd, unix_fd;
    uint16_t port;
    char unix_path[108];           /* socket file to remove at stop ("" = none) */
    pthread_t tcp_thread, unix_thread;
    int have_tcp_thread, have_unix_thread;
    atomic_int stopping;

    pthread_mutex_t conns_lock;
    pthread_cond_t conns_idle;     /* signalled when the last connection thread exits */
    ems_srv_conn_t *conns;
    uint32_t nconns;

    ems_directory_t dir;
    ems_srv_counters_t count;
    atomic_int draining;           /* set by DRAIN: PUT and LOCAL_RESERVE store nothing */
    _Atomic uint64_t active;       /* requests being dispatched now, for DRAIN's response */

    pthread_mutex_t log_lock;
    char log[EMS_LOG_BYTES];
    size_t log_len;
    uint64_t log_dropped;

    pthread_mutex_t keys_lock;     /* ring of stored keys committed since the last take */
    uint8_t *new_keys;
    uint64_t new_head, new_count, new_dropped;

    /* Miss handler. miss_fn and miss_ctx change only under miss_lock. Each call copies
     * them under the lock and counts itself in miss_active[miss_gen] until it returns.
     * Replacing the handler flips miss_gen and waits on miss_idle for the old generation
     * to drain, so calls that start meanwhile cannot delay it. miss_installed mirrors
     * miss_fn != NULL, for a lock-free check before a request gathers its misses. */
    pthread_mutex_t miss_lock;
    pthread_mutex_t miss_set_lock; /* serializes ems_server_set_miss_handler */
    pthread_cond_t miss_idle;
    ems_miss_fn miss_fn;
    void *miss_ctx;
    unsigned miss_gen;             /* 0 or 1 */
    uint64_t miss_active[2];
    atomic_int miss_installed;
};

/* One log line (no trailing newline needed). */
void ems_srv_log(struct ems_server *server, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Counts a connection given up on a failed receive or send with error `rc`: a timeout
 * for -ETIMEDOUT, else a transport error. Counts nothing while the server stops, because
 * stopping shuts the sockets down. */
void ems_srv_count_io_error(struct ems_server *server, int rc);

/* Appends stored keys of newly committed blocks to the announce queue. */
void ems_srv_note_new_keys(struct ems_server *server, const uint8_t *keys, uint64_t n);

/* Grows *buf to at least `need` bytes. Returns 0 or -ENOMEM. */
int ems_srv_reserve_buf(uint8_t **buf, size_t *cap, size_t need);

/* Sends a response frame with a payload made of `iovcnt` parts. Returns 0 or a negative
 * errno (the connection is then unusable). */
int ems_srv_respond(ems_srv_conn_t *conn, const ems_frame_t *req, uint16_t status,
                    struct iovec *parts, int nparts);

/* Handles one request whose header is decoded. For every opcode but PUT the payload is in
 * conn->in and its checksum verified; PUT reads its own payload. Returns 0 to keep the
 * connection, or a negative value to close it. */
int ems_srv_dispatch(ems_srv_conn_t *conn, const ems_frame_t *req);

/* Returns conn->miss_index with room for n indexes, or NULL when no miss handler is set
 * (or no memory is left, which is logged), in which case the request is served from the
 * pool alone. */
uint64_t *ems_srv_miss_index(ems_srv_conn_t *conn, uint64_t n);

/* Calls the miss handler once with the stored keys keys[conn->miss_index[j]] for
 * j < nmiss, and leaves each key's result (0 or 1) in conn->miss_found[j]. Returns how
 * many were found. Calls nothing, and finds nothing, when the handler was removed
 * meanwhile or the server is stopping. */
uint64_t ems_srv_miss_call(ems_srv_conn_t *conn, int mode, const uint8_t *keys,
                           uint64_t nmiss);

/* Frees the miss scratch of a connection. */
void ems_srv_miss_free(ems_srv_conn_t *conn);

/* Reads a whole payload into conn->in and checks its checksum: 0, -EBADMSG on a checksum
 * mismatch (the payload was consumed), or a transport error. */
int ems_srv_read_payload(ems_srv_conn_t *conn, const ems_frame_t *req);

#endif
