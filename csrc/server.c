/* Transfer server: listening sockets, one thread per connection, framing, the log and
 * the new-key queue. The operations themselves are in server_ops.c, and the miss handler
 * in server_miss.c.
 *
 * A connection thread waits at most idle_timeout_ms for a header, decodes it and hands
 * it to ems_srv_dispatch. The rest of the frame must arrive within io_timeout_ms. A header
 * that fails to decode gets an error status, a log line, and the connection is closed,
 * because the stream can no longer be trusted to be in step. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "crc32c.h"
#include "netio.h"
#include "server_internal.h"
#include "wire.h"

#define EMS_ACCEPT_POLL_MS 200

/* ---- log and key queue ----------------------------------------------------------- */

void ems_srv_log(struct ems_server *server, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (len < 0)
        return;
    if ((size_t)len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';

    pthread_mutex_lock(&server->log_lock);
    if (server->log_len + (size_t)len <= sizeof server->log) {
        memcpy(server->log + server->log_len, line, (size_t)len);
        server->log_len += (size_t)len;
    } else {
        server->log_dropped++;
    }
    pthread_mutex_unlock(&server->log_lock);
}

size_t ems_server_take_log(ems_server_t *server, char *buf, size_t len)
{
    pthread_mutex_lock(&server->log_lock);
    size_t take = server->log_len;
    if (take > len) {
        /* Cut at the last whole line that fits. */
        take = len;
        while (take > 0 && server->log[take - 1] != '\n')
            take--;
    }
    memcpy(buf, server->log, take);
    memmove(server->log, server->log + take, server->log_len - take);
    server->log_len -= take;
    if (server->log_len == 0 && server->log_dropped > 0) {
        int n = snprintf(server->log, sizeof server->log, "%llu log lines dropped\n",
                         (unsigned long long)server->log_dropped);
        server->log_len = n > 0 ? (size_t)n : 0;
        server->log_dropped = 0;
    }
    pthread_mutex_unlock(&server->log_lock);
    return take;
}

void ems_srv_note_new_keys(struct ems_server *server, const uint8_t *keys, uint64_t n)
{
    pthread_mutex_lock(&server->keys_lock);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t slot = (server->new_head + server->new_count) % EMS_NEW_KEYS_MAX;
        memcpy(server->new_keys + slot * EMS_KEY_BYTES, keys + i * EMS_KEY_BYTES,
               EMS_KEY_BYTES);
        if (server->new_count == EMS_NEW_KEYS_MAX) {
            server->new_head = (server->new_head + 1) % EMS_NEW_KEYS_MAX;
            server->new_dropped++;
        } else {
            server->new_count++;
        }
    }
    pthread_mutex_unlock(&server->keys_lock);
}

uint64_t ems_server_take_new_keys(ems_server_t *server, uint8_t *out, uint64_t max,
                                  uint64_t *dropped)
{
    pthread_mutex_lock(&server->keys_lock);
    uint64_t n = server->new_count < max ? server->new_count : max;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t slot = (server->new_head + i) % EMS_NEW_KEYS_MAX;
        memcpy(out + i * EMS_KEY_BYTES, server->new_keys + slot * EMS_KEY_BYTES,
               EMS_KEY_BYTES);
    }
    server->new_head = (server->new_head + n) % EMS_NEW_KEYS_MAX;
    server->new_count -= n;
    *dropped = server->new_dropped;
    server->new_dropped = 0;
    pthread_mutex_unlock(&server->keys_lock);
    return n;
}

/* ---- directory and statistics ------------------------------------------------------ */

uint64_t ems_server_dir_register(ems_server_t *server, const uint8_t *keys, uint64_t n,
                                 uint32_t holder)
{
    return ems_directory_register(&server->dir, keys, n, holder);
}

uint64_t ems_server_dir_forget(ems_server_t *server, uint32_t holder)
{
    return ems_directory_forget(&server->dir, holder);
}

void ems_server_dir_lookup(ems_server_t *server, const uint8_t *keys, uint64_t n,
                           uint32_t *holders)
{
    ems_directory_lookup(&server->dir, keys, n, holders);
}

uint16_t ems_server_port(const ems_server_t *server)
{
    return server->port;
}

void ems_server_set_draining(ems_server_t *server, int draining)
{
    atomic_store(&server->draining, draining ? 1 : 0);
}

int ems_server_draining(const ems_server_t *server)
{
    return atomic_load(&server->draining);
}

#define LOAD(field) atomic_load_explicit(&server->count.field, memory_order_relaxed)

void ems_server_stats(ems_server_t *server, ems_server_stats_t *s)
{
    memset(s, 0, sizeof *s);
    s->connections = LOAD(connections);
    s->refused_busy = LOAD(refused_busy);
    s->auth_failures = LOAD(auth_failures);
    s->bad_frames = LOAD(bad_frames);
    s->requests = LOAD(requests);
    s->errors = LOAD(errors);
    s->gets = LOAD(gets);
    s->get_hits = LOAD(get_hits);
    s->get_misses = LOAD(get_misses);
    s->puts = LOAD(puts);
    s->put_stored = LOAD(put_stored);
    s->bytes_in = LOAD(bytes_in);
    s->bytes_out = LOAD(bytes_out);
    s->local_puts = LOAD(local_puts);
    s->miss_calls = LOAD(miss_calls);
    s->miss_keys = LOAD(miss_keys);
    s->miss_found = LOAD(miss_found);
    s->err_bad_request = LOAD(status_errors[EMS_STATUS_BAD_REQUEST]);
    s->err_unauthenticated = LOAD(status_errors[EMS_STATUS_UNAUTHENTICATED]);
    s->err_unsupported_version = LOAD(status_errors[EMS_STATUS_UNSUPPORTED_VERSION]);
    s->err_too_large = LOAD(status_errors[EMS_STATUS_TOO_LARGE]);
    s->err_internal = LOAD(status_errors[EMS_STATUS_INTERNAL]);
    s->err_timeout = LOAD(timeouts);
    s->err_transport = LOAD(transport_errors);

    pthread_mutex_lock(&server->conns_lock);
    s->connections_open = server->nconns;
    pthread_mutex_unlock(&server->conns_lock);

    pthread_mutex_lock(&server->dir.lock);
    s->dir_entries = server->dir.entries;
    s->dir_registered = server->dir.registered;
    s->dir_lookups = server->dir.lookups;
    s->dir_hits = server->dir.hits;
    s->dir_evictions = server->dir.evictions;
    pthread_mutex_unlock(&server->dir.lock);
}

int ems_server_latency(ems_server_t *server, uint16_t opcode, ems_latency_snapshot_t *out)
{
    if (opcode < EMS_OP_PING || opcode > EMS_OP_LAST) {
        memset(out, 0, sizeof *out);
        return -EINVAL;
    }
    ems_latency_read(&server->count.latency[opcode], out);
    return 0;
}

void ems_srv_count_io_error(struct ems_server *server, int rc)
{
    if (atomic_load(&server->stopping))
        return;
    if (rc == -ETIMEDOUT)
        atomic_fetch_add_explicit(&server->count.timeouts, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&server->count.transport_errors, 1, memory_order_relaxed);
}

/* ---- frames ------------------------------------------------------------------------ */

int ems_srv_reserve_buf(uint8_t **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t size = *cap ? *cap : 4096;
    while (size < need)
        size *= 2;
    uint8_t *grown = realloc(*buf, size);
    if (!grown)
        return -ENOMEM;
    *buf = grown;
    *cap = size;
    return 0;
}

int ems_srv_respond(ems_srv_conn_t *conn, const ems_frame_t *req, uint16_t status,
                    struct iovec *parts, int nparts)
{
    uint64_t len = 0;
    uint32_t crc = 0;
    for (int i = 0; i < nparts; i++) {
        len += parts[i].iov_len;
        crc = ems_crc32c(crc, parts[i].iov_base, parts[i].iov_len);
    }
    /* Before the handshake the response carries the request's version, which the client
     * can decode whatever range this server speaks. */
    ems_frame_t resp = {
        .version = conn->version ? conn->version : req->version,
        .opcode = req->opcode,
        .request_id = req->request_id,
        .payload_len = (uint32_t)len,
        .payload_crc = len ? crc : 0,
        .status = status,
        .flags = EMS_FRAME_RESPONSE,
    };
    uint8_t header[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&resp, header);

    struct iovec iov[8];
    if (nparts > 7)
        return -EINVAL;
    iov[0].iov_base = header;
    iov[0].iov_len = sizeof header;
    for (int i = 0; i < nparts; i++)
        iov[i + 1] = parts[i];
    if (status != EMS_STATUS_OK) {
        atomic_fetch_add_explicit(&conn->server->count.errors, 1, memory_order_relaxed);
        if (status <= EMS_STATUS_INTERNAL)
            atomic_fetch_add_explicit(&conn->server->count.status_errors[status], 1,
                                      memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&conn->server->count.bytes_out, sizeof header + len,
                              memory_order_relaxed);
    int rc = ems_send_all(conn->fd, iov, nparts + 1,
                          ems_deadline_in(conn->server->cfg.io_timeout_ms));
    if (rc < 0)
        ems_srv_count_io_error(conn->server, rc);
    return rc;
}

int ems_srv_read_payload(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    if (ems_srv_reserve_buf(&conn->in, &conn->in_cap, req->payload_len) < 0)
        return -ENOMEM;
    int rc = ems_recv_all(conn->fd, conn->in, req->payload_len,
                          ems_deadline_in(conn->server->cfg.io_timeout_ms));
    if (rc < 0)
        return rc;
    atomic_fetch_add_explicit(&conn->server->count.bytes_in, req->payload_len,
                              memory_order_relaxed);
    if (req->payload_len && ems_crc32c(0, conn->in, req->payload_len) != req->payload_crc)
        return -EBADMSG;
    return 0;
}

static uint16_t status_of_decode_error(int rc)
{
    switch (rc) {
    case -EPROTONOSUPPORT: return EMS_STATUS_UNSUPPORTED_VERSION;
    case -EMSGSIZE: return EMS_STATUS_TOO_LARGE;
    default: return EMS_STATUS_BAD_REQUEST;
    }
}

static const char *decode_error_name(int rc)
{
    switch (rc) {
    case -EPROTO: return "bad magic or header checksum";
    case -EPROTONOSUPPORT: return "unsupported protocol version";
    case -EMSGSIZE: return "payload larger than the limit";
    default: return "bad opcode, flags or status";
    }
}

/* ---- connections ------------------------------------------------------------------- */

static void conn_free(ems_srv_conn_t *conn)
{
    ems_server_t *server = conn->server;
    /* A local client may still be copying into the slots of its pending reservation when
     * the server stops: it had the LOCAL_RESERVE response and has not sent LOCAL_COMMIT.
     * Freeing a slot under that copy would let it overwrite the free-list link stored in
     * the slot, so on stop the slots stay reserved until the pool closes. */
    for (uint64_t i = 0; i < conn->npending && !atomic_load(&server->stopping); i++)
        if (conn->pending[i].data && !conn->pending[i].exists)
            ems_pool_abort(server->cfg.pool, &conn->pending[i]);
    free(conn->pending);
    free(conn->pending_keys);
    free(conn->pending_rc);
    free(conn->in);
    free(conn->out);
    free(conn->keys);
    ems_srv_miss_free(conn);

    /* The fd is closed only once the connection is off the list: ems_server_stop shuts
     * down every listed fd, and a closed fd number may already belong to another socket. */
    pthread_mutex_lock(&server->conns_lock);
    if (conn->prev)
        conn->prev->next = conn->next;
    else
        server->conns = conn->next;
    if (conn->next)
        conn->next->prev = conn->prev;
    server->nconns--;
    if (server->nconns == 0)
        pthread_cond_broadcast(&server->conns_idle);
    pthread_mutex_unlock(&server->conns_lock);
    close(conn->fd);
    free(conn);
}

/* Reads one header. Returns 0, 1 when the peer closed cleanly between frames, or a
 * negative errno. */
static int read_header(ems_srv_conn_t *conn, uint8_t header[EMS_FRAME_HEADER_BYTES])
{
    ems_server_t *server = conn->server;
    int ready = ems_wait_readable(conn->fd, ems_deadline_in(server->cfg.idle_timeout_ms));
    if (ready == 0)
        return -ETIMEDOUT;   /* idle: not counted as an error */
    if (ready < 0) {
        ems_srv_count_io_error(server, ready);
        return ready;
    }
    ssize_t peek = recv(conn->fd, header, 1, MSG_PEEK | MSG_DONTWAIT);
    if (peek == 0)
        return 1;
    if (peek < 0 && errno != EAGAIN && errno != EINTR) {
        int err = -errno;
        ems_srv_count_io_error(server, err);
        return err;
    }
    int rc = ems_recv_all(conn->fd, header, EMS_FRAME_HEADER_BYTES,
                          ems_deadline_in(server->cfg.io_timeout_ms));
    /* A header has begun, so an end of stream here cuts a frame in two. Unlike a close
     * between frames, that is logged and counted as a transport error. */
    if (rc == -ECONNRESET)
        ems_srv_log(server, "connection from %s closed in the middle of a frame header",
                    conn->peer);
    if (rc < 0)
        ems_srv_count_io_error(server, rc);
    return rc;
}

/* Responds to a header that failed to decode, and logs why. The response to an
 * unsupported version carries this server's range as the payload (u16 min, u16 max), so
 * that the client can name both ranges. */
static void refuse_frame(ems_srv_conn_t *conn, const uint8_t header[EMS_FRAME_HEADER_BYTES],
                         int rc)
{
    ems_server_t *server = conn->server;
    atomic_fetch_add_explicit(&server->count.bad_frames, 1, memory_order_relaxed);
    ems_frame_t echo = {.opcode = EMS_OP_PING};
    if (rc != -EPROTONOSUPPORT) {
        ems_srv_log(server, "refused a frame from %s: %s; closing the connection", conn->peer,
                    decode_error_name(rc));
        echo.version = server->cfg.proto_min;
        ems_srv_respond(conn, &echo, status_of_decode_error(rc), NULL, 0);
        return;
    }
    echo.version = ems_get16(header + 4);   /* the magic and header checksum are valid */
    ems_srv_log(server, "refused a frame from %s: %s %u (this connection accepts %u-%u); "
                "closing the connection", conn->peer, decode_error_name(rc), echo.version,
                conn->hello_done ? conn->version : server->cfg.proto_min,
                conn->hello_done ? conn->version : server->cfg.proto_max);
    uint8_t range[4];
    ems_put16(range, server->cfg.proto_min);
    ems_put16(range + 2, server->cfg.proto_max);
    struct iovec part = {range, sizeof range};
    ems_srv_respond(conn, &echo, status_of_decode_error(rc), &part, 1);
}

static void *conn_main(void *arg)
{
    ems_srv_conn_t *conn = arg;
    ems_server_t *server = conn->server;

    while (!atomic_load(&server->stopping)) {
        uint8_t header[EMS_FRAME_HEADER_BYTES];
        int rc = read_header(conn, header);
        if (rc == 1)
            break;
        if (rc < 0) {
            if (rc == -ETIMEDOUT)
                ems_srv_log(server, "closing idle or stalled connection from %s", conn->peer);
            else if (rc != -ECONNRESET && !atomic_load(&server->stopping))
                ems_srv_log(server, "connection from %s failed: %s", conn->peer, strerror(-rc));
            break;
        }
        atomic_fetch_add_explicit(&server->count.bytes_in, sizeof header, memory_order_relaxed);
        uint64_t started = ems_now_ns();   /* a request's duration starts with its header */

        /* After the handshake every frame carries the agreed version. Before it, a HELLO
         * of any version is read, because its layout is the same in every version and
         * op_hello rejects a range it cannot meet. Other frames need a version of the
         * server's range. */
        uint16_t low = server->cfg.proto_min, high = server->cfg.proto_max;
        if (conn->hello_done) {
            low = high = conn->version;
        } else if (ems_get16(header + 6) == EMS_OP_HELLO) {
            low = 0;
            high = UINT16_MAX;
        }
        ems_frame_t req;
        rc = ems_frame_decode(header, server->cfg.max_payload, low, high, &req);
        if (rc == 0 && (req.flags & EMS_FRAME_RESPONSE))
            rc = -EBADMSG;
        if (rc < 0) {
            refuse_frame(conn, header, rc);
            break;
        }
        atomic_fetch_add_explicit(&server->count.requests, 1, memory_order_relaxed);
        atomic_fetch_add(&server->active, 1);
        rc = ems_srv_dispatch(conn, &req);
        atomic_fetch_sub(&server->active, 1);
        ems_latency_observe(&server->count.latency[req.opcode], ems_now_ns() - started);
        if (rc < 0)
            break;
    }
    conn_free(conn);
    return NULL;
}

static void describe_peer(int fd, int is_local, char *out, size_t len)
{
    struct sockaddr_in addr;
    socklen_t alen = sizeof addr;
    if (is_local || getpeername(fd, (struct sockaddr *)&addr, &alen) < 0 ||
        addr.sin_family != AF_INET) {
        snprintf(out, len, "%s", is_local ? "local socket" : "unknown peer");
        return;
    }
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &addr.sin_addr, ip, sizeof ip);
    snprintf(out, len, "%s:%u", ip, ntohs(addr.sin_port));
}

static void refuse_busy(ems_server_t *server, int fd, const char *peer)
{
    atomic_fetch_add_explicit(&server->count.refused_busy, 1, memory_order_relaxed);
    ems_srv_log(server, "refused a connection from %s: %u connections open (the limit)", peer,
                server->cfg.max_connections);
    /* No request has been read, so the oldest version served is the best guess of one
     * the client decodes. */
    ems_frame_t resp = {.version = server->cfg.proto_min, .opcode = EMS_OP_PING,
                        .status = EMS_STATUS_BUSY, .flags = EMS_FRAME_RESPONSE};
    uint8_t header[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&resp, header);
    struct iovec iov = {header, sizeof header};
    ems_send_all(fd, &iov, 1, ems_deadline_in(100));
    close(fd);
}

static void start_conn(ems_server_t *server, int fd, int is_local)
{
    char peer[64];
    describe_peer(fd, is_local, peer, sizeof peer);
    ems_tune_socket(fd, !is_local);

    pthread_mutex_lock(&server->conns_lock);
    if (server->nconns >= server->cfg.max_connections) {
        pthread_mutex_unlock(&server->conns_lock);
        refuse_busy(server, fd, peer);
        return;
    }
    ems_srv_conn_t *conn = calloc(1, sizeof *conn);
    if (!conn) {
        pthread_mutex_unlock(&server->conns_lock);
        ems_srv_log(server, "out of memory for a connection from %s", peer);
        close(fd);
        return;
    }
    conn->server = server;
    conn->fd = fd;
    conn->is_local = is_local;
    memcpy(conn->peer, peer, sizeof peer);
    conn->next = server->conns;
    if (server->conns)
        server->conns->prev = conn;
    server->conns = conn;
    server->nconns++;
    pthread_mutex_unlock(&server->conns_lock);
    atomic_fetch_add_explicit(&server->count.connections, 1, memory_order_relaxed);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int rc = pthread_create(&thread, &attr, conn_main, conn);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        ems_srv_log(server, "cannot start a thread for %s: %s", peer, strerror(rc));
        conn_free(conn);
    }
}

typedef struct {
    ems_server_t *server;
    int is_local;
} accept_arg_t;

static void *accept_main(void *arg)
{
    ems_server_t *server = ((accept_arg_t *)arg)->server;
    int is_local = ((accept_arg_t *)arg)->is_local;
    free(arg);
    int lfd = is_local ? server->unix_fd : server->tcp_fd;

    while (!atomic_load(&server->stopping)) {
        struct pollfd p = {.fd = lfd, .events = POLLIN};
        if (poll(&p, 1, EMS_ACCEPT_POLL_MS) <= 0)
            continue;
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
                ems_srv_log(server, "accept failed: %s", strerror(errno));
            if (errno == EMFILE || errno == ENFILE)
                poll(NULL, 0, EMS_ACCEPT_POLL_MS);
            continue;
        }
        start_conn(server, fd, is_local);
    }
    return NULL;
}

/* ---- lifecycle --------------------------------------------------------------------- */

static int listen_tcp(ems_server_t *server, const char *host)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(server->cfg.port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1)
        return -EINVAL;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    socklen_t alen = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &alen);
    server->port = ntohs(addr.sin_port);
    server->tcp_fd = fd;
    return 0;
}

/* Returns 0 when nothing listens on the socket file at `path`, -EADDRINUSE when a
 * server does (it accepted a probe connection or its backlog is full), or another
 * negative errno when the probe failed. */
static int socket_in_use(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, path);
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (probe < 0)
        return -errno;
    int rc = connect(probe, (struct sockaddr *)&addr, sizeof addr) == 0 ? -EADDRINUSE : -errno;
    close(probe);
    if (rc == -ECONNREFUSED || rc == -ENOENT)
        return 0;
    return rc == -EAGAIN ? -EADDRINUSE : rc;
}

static int listen_unix(ems_server_t *server, const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        return -ENAMETOOLONG;
    strcpy(addr.sun_path, path);

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;

    /* A socket file left by a daemon that died is replaced; any other file is not. Only a
     * refused connection proves that no one listens on it any more. */
    struct stat st;
    if (lstat(addr.sun_path, &st) == 0) {
        int rc = S_ISSOCK(st.st_mode) ? socket_in_use(addr.sun_path) : -EEXIST;
        if (rc < 0) {
            close(fd);
            return rc;
        }
        unlink(addr.sun_path);
    }
    /* Same-user clients only: they map the pool read-write. */
    mode_t old = umask(077);
    int rc = bind(fd, (struct sockaddr *)&addr, sizeof addr);
    umask(old);
    if (rc < 0 || listen(fd, 128) < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    server->unix_fd = fd;
    strcpy(server->unix_path, path);
    return 0;
}

static int spawn_acceptor(ems_server_t *server, int is_local, pthread_t *thread)
{
    accept_arg_t *arg = malloc(sizeof *arg);
    if (!arg)
        return -ENOMEM;
    arg->server = server;
    arg->is_local = is_local;
    int rc = pthread_create(thread, NULL, accept_main, arg);
    if (rc != 0) {
        free(arg);
        return -rc;
    }
    return 0;
}

int ems_server_start(const ems_server_config_t *config, ems_server_t **out)
{
    if (!config->pool || !config->pool->owner || !config->host || config->max_payload < 4096 ||
        config->max_connections == 0)
        return -EINVAL;
    uint16_t proto_min = config->proto_min, proto_max = config->proto_max;
    if (proto_min == 0 && proto_max == 0) {
        proto_min = EMS_PROTO_VERSION_MIN;
        proto_max = EMS_PROTO_VERSION_MAX;
    }
    if (proto_min < EMS_PROTO_VERSION_MIN || proto_max > EMS_PROTO_VERSION_MAX ||
        proto_min > proto_max)
        return -EINVAL;
    ems_server_t *server = calloc(1, sizeof *server);
    if (!server)
        return -ENOMEM;
    server->cfg = *config;
    server->cfg.proto_min = proto_min;
    server->cfg.proto_max = proto_max;
    server->tcp_fd = server->unix_fd = -1;
    pthread_mutex_init(&server->conns_lock, NULL);
    pthread_cond_init(&server->conns_idle, NULL);
    pthread_mutex_init(&server->log_lock, NULL);
    pthread_mutex_init(&server->keys_lock, NULL);
    pthread_mutex_init(&server->miss_lock, NULL);
    pthread_mutex_init(&server->miss_set_lock, NULL);
    pthread_cond_init(&server->miss_idle, NULL);

    int rc = 0;
    if (config->secret && config->secret_len) {
        server->secret = malloc(config->secret_len);
        if (!server->secret)
            rc = -ENOMEM;
        else
            memcpy(server->secret, config->secret, config->secret_len);
    } else {
        server->cfg.secret = NULL;
        server->cfg.secret_len = 0;
    }
    server->cfg.secret = server->secret;
    server->cfg.unix_path = NULL;   /* the caller's strings may not outlive the call */
    server->cfg.host = NULL;
    server->new_keys = malloc((size_t)EMS_NEW_KEYS_MAX * EMS_KEY_BYTES);
    if (rc == 0 && !server->new_keys)
        rc = -ENOMEM;
    if (rc == 0)
        rc = ems_directory_init(&server->dir, config->directory_capacity);

    if (rc == 0)
        rc = listen_tcp(server, config->host);
    if (rc == 0 && config->unix_path)
        rc = listen_unix(server, config->unix_path);

    if (rc == 0) {
        rc = spawn_acceptor(server, 0, &server->tcp_thread);
        server->have_tcp_thread = rc == 0;
    }
    if (rc == 0 && server->unix_fd >= 0) {
        rc = spawn_acceptor(server, 1, &server->unix_thread);
        server->have_unix_thread = rc == 0;
    }
    if (rc < 0) {
        ems_server_stop(server);
        return rc;
    }
    *out = server;
    return 0;
}

void ems_server_stop(ems_server_t *server)
{
    if (!server)
        return;
    atomic_store(&server->stopping, 1);
    if (server->have_tcp_thread)
        pthread_join(server->tcp_thread, NULL);
    if (server->have_unix_thread)
        pthread_join(server->unix_thread, NULL);
    if (server->tcp_fd >= 0)
        close(server->tcp_fd);
    if (server->unix_fd >= 0)
        close(server->unix_fd);
    if (server->unix_path[0])
        unlink(server->unix_path);

    /* Wake every connection thread out of its poll or recv, then wait for them all. */
    pthread_mutex_lock(&server->conns_lock);
    for (ems_srv_conn_t *c = server->conns; c; c = c->next)
        shutdown(c->fd, SHUT_RDWR);
    while (server->nconns > 0)
        pthread_cond_wait(&server->conns_idle, &server->conns_lock);
    pthread_mutex_unlock(&server->conns_lock);

    ems_directory_free(&server->dir);
    pthread_mutex_destroy(&server->conns_lock);
    pthread_cond_destroy(&server->conns_idle);
    pthread_mutex_destroy(&server->log_lock);
    pthread_mutex_destroy(&server->keys_lock);
    pthread_mutex_destroy(&server->miss_lock);
    pthread_mutex_destroy(&server->miss_set_lock);
    pthread_cond_destroy(&server->miss_idle);
    if (server->secret) {
        memset(server->secret, 0, server->cfg.secret_len);
        free(server->secret);
    }
    free(server->new_keys);
    free(server);
}
