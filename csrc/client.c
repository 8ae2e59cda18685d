/* Transfer client: one connection to one server, blocking calls bounded by deadlines.
 *
 * A connection is used by one thread at a time (the Python layer keeps a pool of them
 * per peer). Any transport error, protocol error or error status closes it: the caller
 * opens a new one, so a stream is never reused after it may have fallen out of step. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "crc32c.h"
#include "frame.h"
#include "netio.h"
#include "transfer.h"
#include "wire.h"

#define BATCH_HEAD 8u

struct ems_conn {
    int fd;                 /* -1 once closed */
    int is_local;
    uint16_t version;       /* agreed in HELLO; 0 before */
    uint16_t proto_min, proto_max;  /* versions this client offers */
    uint16_t peer_min, peer_max;    /* the server's range from an UNSUPPORTED_VERSION
                                     * response; 0 when it sent none */
    uint64_t next_id;
    uint32_t max_payload;
    uint8_t *buf;           /* request heads and small response payloads */
    size_t cap;
};

static void conn_fail(ems_conn_t *conn)
{
    if (conn->fd >= 0) {
        close(conn->fd);
        conn->fd = -1;
    }
}

static int status_errno(uint16_t status)
{
    switch (status) {
    case EMS_STATUS_OK: return 0;
    case EMS_STATUS_UNAUTHENTICATED: return -EACCES;
    case EMS_STATUS_UNSUPPORTED_VERSION: return -EPROTONOSUPPORT;
    case EMS_STATUS_TOO_LARGE: return -EMSGSIZE;
    case EMS_STATUS_BUSY: return -EBUSY;
    case EMS_STATUS_INTERNAL: return -EIO;
    default: return -EINVAL;
    }
}

static int grow(ems_conn_t *conn, size_t need)
{
    if (need <= conn->cap)
        return 0;
    size_t size = conn->cap ? conn->cap : 4096;
    while (size < need)
        size *= 2;
    uint8_t *p = realloc(conn->buf, size);
    if (!p)
        return -ENOMEM;
    conn->buf = p;
    conn->cap = size;
    return 0;
}

/* Reads the server's range (u16 min, u16 max) that an UNSUPPORTED_VERSION response
 * carries since version 2. Older servers send none, and then the range stays unknown. */
static void read_peer_range(ems_conn_t *conn, const ems_frame_t *resp, uint64_t deadline)
{
    uint8_t range[4];
    if (resp->payload_len != sizeof range ||
        ems_recv_all(conn->fd, range, sizeof range, deadline) < 0 ||
        ems_crc32c(0, range, sizeof range) != resp->payload_crc)
        return;
    conn->peer_min = ems_get16(range);
    conn->peer_max = ems_get16(range + 2);
}

/* Sends one request (header + parts, one sendmsg where the socket allows) and reads the
 * response header. Returns 0 with *resp filled, or a negative errno (connection closed).
 * An error status is returned as its errno after closing. */
static int exchange(ems_conn_t *conn, uint16_t op, struct iovec *parts, int nparts,
                    uint64_t deadline, ems_frame_t *resp)
{
    if (conn->fd < 0)
        return -ENOTCONN;
    uint64_t len = 0;
    uint32_t crc = 0;
    for (int i = 0; i < nparts; i++) {
        len += parts[i].iov_len;
        crc = ems_crc32c(crc, parts[i].iov_base, parts[i].iov_len);
    }
    if (len > UINT32_MAX)
        return -EMSGSIZE;
    /* Before the handshake: the oldest version offered, which every server that shares a
     * version with this client decodes. */
    ems_frame_t req = {.version = conn->version ? conn->version : conn->proto_min,
                       .opcode = op, .request_id = conn->next_id++,
                       .payload_len = (uint32_t)len, .payload_crc = len ? crc : 0};
    uint8_t header[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&req, header);

    struct iovec stack_iov[8], *iov = stack_iov;
    if (nparts + 1 > 8) {
        iov = malloc((size_t)(nparts + 1) * sizeof *iov);
        if (!iov)
            return -ENOMEM;
    }
    iov[0].iov_base = header;
    iov[0].iov_len = sizeof header;
    if (nparts > 0)   /* parts may be NULL then, and memcpy's source must not be */
        memcpy(iov + 1, parts, (size_t)nparts * sizeof *iov);
    int sent = ems_send_all(conn->fd, iov, nparts + 1, deadline);
    if (iov != stack_iov)
        free(iov);

    /* A server that rejects a connection sends its frame and closes at once, so on a Unix
     * socket the send fails with EPIPE while that frame still waits to be read. */
    int rc = sent;
    uint8_t in[EMS_FRAME_HEADER_BYTES];
    if (sent == 0 || sent == -EPIPE || sent == -ECONNRESET)
        rc = ems_recv_all(conn->fd, in, sizeof in, deadline);
    /* A response carries the agreed version. Before the handshake it may carry any: a
     * rejection of HELLO comes in whatever version the server picked. */
    if (rc == 0)
        rc = conn->version ? ems_frame_decode(in, conn->max_payload, conn->version,
                                              conn->version, resp)
                           : ems_frame_decode(in, conn->max_payload, 0, UINT16_MAX, resp);
    /* An error status with request id 0 belongs to no request. The server rejected the
     * connection (BUSY at its connection limit) or a header it could not decode. */
    int rejected = rc == 0 && resp->request_id == 0 && resp->status != EMS_STATUS_OK;
    if (sent < 0 && !rejected)
        rc = sent;
    if (rc == 0 && !rejected &&
        (!(resp->flags & EMS_FRAME_RESPONSE) || resp->request_id != req.request_id ||
         (resp->status == 0 && resp->opcode != op)))
        rc = -EPROTO;
    if (rc == 0 && resp->status != EMS_STATUS_OK) {
        rc = status_errno(resp->status);
        if (resp->status == EMS_STATUS_UNSUPPORTED_VERSION)
            read_peer_range(conn, resp, deadline);
    }
    if (rc < 0)
        conn_fail(conn);
    return rc;
}

/* exchange() and read the whole response payload into conn->buf, checking its checksum
 * and, when `expect` is not SIZE_MAX, its length. */
static int call(ems_conn_t *conn, uint16_t op, struct iovec *parts, int nparts,
                uint64_t deadline, size_t expect, ems_frame_t *resp)
{
    int rc = exchange(conn, op, parts, nparts, deadline, resp);
    if (rc < 0)
        return rc;
    if ((expect != SIZE_MAX && resp->payload_len != expect) || grow(conn, resp->payload_len + 1) < 0) {
        conn_fail(conn);
        return -EPROTO;
    }
    rc = ems_recv_all(conn->fd, conn->buf, resp->payload_len, deadline);
    if (rc == 0 && resp->payload_len && ems_crc32c(0, conn->buf, resp->payload_len) != resp->payload_crc)
        rc = -EIO;
    if (rc < 0)
        conn_fail(conn);
    return rc;
}

/* ---- connecting -------------------------------------------------------------------- */

static int connect_socket(const ems_conn_config_t *cfg, uint64_t deadline, int *out)
{
    int fd;
    int rc;
    if (cfg->unix_path) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        if (strlen(cfg->unix_path) >= sizeof addr.sun_path)
            return -ENAMETOOLONG;
        strcpy(addr.sun_path, cfg->unix_path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -errno;
        rc = connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 ? -errno : 0;
    } else {
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(cfg->port)};
        if (!cfg->host || inet_pton(AF_INET, cfg->host, &addr.sin_addr) != 1)
            return -EINVAL;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
            return -errno;
        rc = connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 ? -errno : 0;
        if (rc == -EINPROGRESS) {
            /* Wait for the connection with the deadline, then read its outcome. */
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            uint64_t now = ems_now_ms();
            int wait = deadline == EMS_NO_DEADLINE ? -1 : (int)(deadline > now ? deadline - now : 0);
            rc = poll(&p, 1, wait);
            if (rc == 0) {
                rc = -ETIMEDOUT;
            } else if (rc < 0) {
                rc = -errno;
            } else {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                rc = -err;
            }
        }
        if (rc == 0)
            rc = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0 ? -errno : 0;
    }
    if (rc < 0) {
        close(fd);
        return rc;
    }
    ems_tune_socket(fd, cfg->unix_path == NULL);
    *out = fd;
    return 0;
}

static void say(char *error, size_t len, const char *text)
{
    if (error && len)
        snprintf(error, len, "%s", text);
}

static int handshake(ems_conn_t *conn, const ems_conn_config_t *cfg, uint64_t deadline,
                     char *error, size_t error_len)
{
    size_t tlen = cfg->tenant ? strlen(cfg->tenant) : 0;
    if (tlen == 0 || tlen > EMS_TENANT_MAX) {
        say(error, error_len, "tenant must be 1 to 64 printable ASCII characters");
        return -EINVAL;
    }
    uint8_t hello[8 + EMS_TENANT_MAX];
    ems_put16(hello, conn->proto_min);
    ems_put16(hello + 2, conn->proto_max);
    ems_put16(hello + 4, cfg->role);
    ems_put16(hello + 6, (uint16_t)tlen);
    memcpy(hello + 8, cfg->tenant, tlen);
    struct iovec part = {hello, 8 + tlen};
    ems_frame_t resp;
    int rc = call(conn, EMS_OP_HELLO, &part, 1, deadline, 4 + EMS_CHALLENGE_BYTES, &resp);
    if (rc == -EPROTONOSUPPORT) {
        char text[192];
        if (conn->peer_max)
            snprintf(text, sizeof text, "no protocol version in common: this client speaks "
                     "versions %u-%u, the server %u-%u", conn->proto_min, conn->proto_max,
                     conn->peer_min, conn->peer_max);
        else
            snprintf(text, sizeof text, "no protocol version in common: this client speaks "
                     "versions %u-%u, the server did not send its range (a release before "
                     "version 2 speaks only version 1)", conn->proto_min, conn->proto_max);
        say(error, error_len, text);
        return rc;
    }
    if (rc == -EBUSY) {
        say(error, error_len, "the server is at its connection limit; retry later");
        return rc;
    }
    if (rc < 0) {
        say(error, error_len, rc == -EINVAL ? "the server refused the HELLO (bad tenant or role)"
                                            : "the handshake failed");
        return rc;
    }
    uint16_t version = ems_get16(conn->buf);
    if (version < conn->proto_min || version > conn->proto_max || resp.version != version) {
        char text[160];
        snprintf(text, sizeof text, "the server agreed on protocol version %u in a frame of "
                 "version %u; this client speaks %u-%u", version, resp.version,
                 conn->proto_min, conn->proto_max);
        say(error, error_len, text);
        conn_fail(conn);
        return -EPROTO;
    }
    conn->version = version;
    int auth_required = ems_get16(conn->buf + 2) != 0;
    if (!auth_required)
        return 0;
    if (!cfg->secret || cfg->secret_len == 0) {
        say(error, error_len, "the server requires the cluster secret and none was given");
        conn_fail(conn);
        return -EACCES;
    }

    uint8_t challenge[EMS_CHALLENGE_BYTES], proof[EMS_PROOF_BYTES];
    memcpy(challenge, conn->buf + 4, sizeof challenge);
    ems_auth_proof(cfg->secret, cfg->secret_len, challenge, cfg->tenant, tlen, cfg->role, proof);
    part.iov_base = proof;
    part.iov_len = sizeof proof;
    rc = call(conn, EMS_OP_AUTH, &part, 1, deadline, 0, &resp);
    if (rc < 0)
        say(error, error_len, rc == -EACCES ? "authentication refused: wrong cluster secret"
                                            : "authentication failed");
    return rc;
}

int ems_conn_open(const ems_conn_config_t *cfg, ems_conn_t **out, char *error, size_t error_len)
{
    say(error, error_len, "");
    uint64_t deadline = ems_deadline_in(cfg->timeout_ms);
    ems_conn_t *conn = calloc(1, sizeof *conn);
    if (!conn)
        return -ENOMEM;
    conn->fd = -1;
    conn->is_local = cfg->unix_path != NULL;
    conn->next_id = 1;
    conn->max_payload = cfg->max_payload ? cfg->max_payload : (64u << 20);
    conn->proto_min = cfg->proto_min;
    conn->proto_max = cfg->proto_max;
    if (conn->proto_min == 0 && conn->proto_max == 0) {
        conn->proto_min = EMS_PROTO_VERSION_MIN;
        conn->proto_max = EMS_PROTO_VERSION_MAX;
    }
    if (conn->proto_min < EMS_PROTO_VERSION_MIN || conn->proto_max > EMS_PROTO_VERSION_MAX ||
        conn->proto_min > conn->proto_max) {
        char text[128];
        snprintf(text, sizeof text, "protocol range %u-%u is invalid: this build speaks %u-%u",
                 cfg->proto_min, cfg->proto_max, EMS_PROTO_VERSION_MIN, EMS_PROTO_VERSION_MAX);
        say(error, error_len, text);
        free(conn);
        return -EINVAL;
    }

    int rc = connect_socket(cfg, deadline, &conn->fd);
    if (rc < 0) {
        char text[160];
        snprintf(text, sizeof text, "cannot connect: %s", strerror(-rc));
        say(error, error_len, text);
        free(conn);
        return rc;
    }
    rc = handshake(conn, cfg, deadline, error, error_len);
    if (rc < 0) {
        ems_conn_close(conn);
        return rc;
    }
    *out = conn;
    return 0;
}

void ems_conn_close(ems_conn_t *conn)
{
    if (!conn)
        return;
    conn_fail(conn);
    free(conn->buf);
    free(conn);
}

int ems_conn_alive(const ems_conn_t *conn)
{
    return conn->fd >= 0;
}

uint16_t ems_conn_version(const ems_conn_t *conn)
{
    return conn->version;
}

/* ---- batched calls ----------------------------------------------------------------- */

static void batch_head(uint8_t head[BATCH_HEAD], uint64_t n, uint32_t arg)
{
    ems_put32(head, (uint32_t)n);
    ems_put32(head + 4, arg);
}

static int check_batch(const ems_conn_t *conn, uint64_t n, uint64_t per_key)
{
    if (conn->fd < 0)
        return -ENOTCONN;
    if (n > UINT32_MAX || BATCH_HEAD + n * per_key > conn->max_payload)
        return -EMSGSIZE;
    return 0;
}

int ems_conn_get_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n, void *const *dsts,
                      const uint64_t *lengths, int64_t *results, uint32_t timeout_ms)
{
    int rc = check_batch(conn, n, EMS_KEY_BYTES + 8);
    if (rc < 0)
        return rc;
    uint64_t deadline = ems_deadline_in(timeout_ms);
    if (grow(conn, 8 * n + 1) < 0)
        return -ENOMEM;
    uint8_t head[BATCH_HEAD];
    batch_head(head, n, 0);
    for (uint64_t i = 0; i < n; i++)
        ems_put64(conn->buf + 8 * i, lengths[i]);
    struct iovec parts[3] = {{head, BATCH_HEAD}, {(void *)keys, n * EMS_KEY_BYTES},
                             {conn->buf, 8 * n}};
    ems_frame_t resp;
    rc = exchange(conn, EMS_OP_GET, parts, 3, deadline, &resp);
    if (rc < 0)
        return rc;

    /* The results table, then each hit straight into its destination. */
    rc = resp.payload_len < 8 * n ? -EPROTO : ems_recv_all(conn->fd, conn->buf, 8 * n, deadline);
    uint32_t crc = rc == 0 ? ems_crc32c(0, conn->buf, 8 * n) : 0;
    uint64_t got = 8 * n;
    for (uint64_t i = 0; i < n && rc == 0; i++) {
        results[i] = (int64_t)ems_get64(conn->buf + 8 * i);
        if (results[i] <= 0)
            continue;
        if ((uint64_t)results[i] != lengths[i] || got + lengths[i] > resp.payload_len) {
            rc = -EPROTO;
            break;
        }
        rc = ems_recv_crc(conn->fd, dsts[i], lengths[i], deadline, &crc);
        got += lengths[i];
    }
    if (rc == 0 && got != resp.payload_len)
        rc = -EPROTO;
    if (rc == 0 && crc != resp.payload_crc)
        rc = -EIO;
    if (rc < 0) {
        for (uint64_t i = 0; i < n; i++)
            results[i] = -ENOENT;
        conn_fail(conn);
    }
    return rc;
}

int ems_conn_put_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n,
                      const void *const *srcs, const uint64_t *lengths, int64_t *results,
                      uint32_t timeout_ms)
{
    int rc = check_batch(conn, n, EMS_KEY_BYTES + 8);
    if (rc < 0)
        return rc;
    uint64_t total = BATCH_HEAD + n * (EMS_KEY_BYTES + 8);
    for (uint64_t i = 0; i < n; i++)
        total += lengths[i];
    if (total > conn->max_payload)
        return -EMSGSIZE;
    struct iovec *parts = malloc((size_t)(n + 3) * sizeof *parts);
    if (!parts || grow(conn, 8 * n + 1) < 0) {
        free(parts);
        return -ENOMEM;
    }

    /* Head, keys and lengths, then every block from the caller's memory. */
    uint8_t head[BATCH_HEAD];
    batch_head(head, n, 0);
    for (uint64_t i = 0; i < n; i++)
        ems_put64(conn->buf + 8 * i, lengths[i]);
    parts[0] = (struct iovec){head, BATCH_HEAD};
    parts[1] = (struct iovec){(void *)keys, n * EMS_KEY_BYTES};
    parts[2] = (struct iovec){conn->buf, 8 * n};
    for (uint64_t i = 0; i < n; i++)
        parts[3 + i] = (struct iovec){(void *)srcs[i], lengths[i]};
    ems_frame_t resp;
    rc = call(conn, EMS_OP_PUT, parts, (int)(n + 3), ems_deadline_in(timeout_ms), 8 * n, &resp);
    free(parts);
    if (rc < 0)
        return rc;
    for (uint64_t i = 0; i < n; i++)
        results[i] = (int64_t)ems_get64(conn->buf + 8 * i);
    return 0;
}

/* Sends "head + keys" for `op` and reads a response of exactly `expect` bytes. */
static int key_call(ems_conn_t *conn, uint16_t op, const uint8_t *keys, uint64_t n,
                    uint32_t arg, size_t expect, uint32_t timeout_ms)
{
    int rc = check_batch(conn, n, EMS_KEY_BYTES);
    if (rc < 0)
        return rc;
    uint8_t head[BATCH_HEAD];
    batch_head(head, n, arg);
    struct iovec parts[2] = {{head, BATCH_HEAD}, {(void *)keys, n * EMS_KEY_BYTES}};
    ems_frame_t resp;
    return call(conn, op, parts, 2, ems_deadline_in(timeout_ms), expect, &resp);
}

int ems_conn_exists_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint8_t *out,
                         uint32_t timeout_ms)
{
    int rc = key_call(conn, EMS_OP_EXISTS, keys, n, 0, n, timeout_ms);
    if (rc == 0)
        memcpy(out, conn->buf, n);
    return rc;
}

int ems_conn_match_prefix(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint64_t *count,
                          uint32_t timeout_ms)
{
    int rc = key_call(conn, EMS_OP_MATCH_PREFIX, keys, n, 0, 8, timeout_ms);
    if (rc == 0)
        *count = ems_get64(conn->buf);
    return rc;
}

int ems_conn_prefetch(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint64_t *count,
                      uint32_t timeout_ms)
{
    int rc = key_call(conn, EMS_OP_PREFETCH, keys, n, 0, 8, timeout_ms);
    if (rc == 0)
        *count = ems_get64(conn->buf);
    return rc;
}

int ems_conn_delete_many(ems_conn_t *conn, const uint8_t *keys, uint64_t n, int64_t *results,
                         uint32_t timeout_ms)
{
    int rc = key_call(conn, EMS_OP_DELETE, keys, n, 0, 8 * n, timeout_ms);
    for (uint64_t i = 0; i < n && rc == 0; i++)
        results[i] = (int64_t)ems_get64(conn->buf + 8 * i);
    return rc;
}

int ems_conn_protect(ems_conn_t *conn, const uint8_t *keys, uint64_t n, int protect,
                     uint64_t *present, uint32_t timeout_ms)
{
    int rc = key_call(conn, EMS_OP_PROTECT, keys, n, protect ? 1 : 0, 8, timeout_ms);
    if (rc == 0)
        *present = ems_get64(conn->buf);
    return rc;
}

int ems_conn_dir_register(ems_conn_t *conn, const uint8_t *stored_keys, uint64_t n,
                          uint32_t holder, uint32_t timeout_ms)
{
    return key_call(conn, EMS_OP_DIR_REGISTER, stored_keys, n, holder, 8, timeout_ms);
}

int ems_conn_dir_lookup(ems_conn_t *conn, const uint8_t *keys, uint64_t n, uint32_t *holders,
                        uint32_t timeout_ms)
{
    int rc = key_call(conn, EMS_OP_DIR_LOOKUP, keys, n, 0, 4 * n, timeout_ms);
    for (uint64_t i = 0; i < n && rc == 0; i++)
        holders[i] = ems_get32(conn->buf + 4 * i);
    return rc;
}

int ems_conn_stats(ems_conn_t *conn, char *buf, size_t len, uint32_t timeout_ms)
{
    ems_frame_t resp;
    int rc = call(conn, EMS_OP_STATS, NULL, 0, ems_deadline_in(timeout_ms), SIZE_MAX, &resp);
    if (rc < 0)
        return rc;
    if (resp.payload_len >= len)
        return -ENOBUFS;
    memcpy(buf, conn->buf, resp.payload_len);
    buf[resp.payload_len] = 0;
    return 0;
}

int ems_conn_drain(ems_conn_t *conn, int drain, uint32_t *in_flight, uint32_t timeout_ms)
{
    if (conn->fd < 0)
        return -ENOTCONN;
    if (conn->version < 2)
        return -EPROTONOSUPPORT;
    uint8_t body[4];
    ems_put32(body, drain ? 1 : 0);
    struct iovec part = {body, sizeof body};
    ems_frame_t resp;
    int rc = call(conn, EMS_OP_DRAIN, &part, 1, ems_deadline_in(timeout_ms), 4, &resp);
    if (rc == 0)
        *in_flight = ems_get32(conn->buf);
    return rc;
}

int ems_conn_ping(ems_conn_t *conn, uint32_t timeout_ms)
{
    uint8_t token[8];
    ems_put64(token, conn->next_id * 0x9e3779b97f4a7c15ULL);
    struct iovec part = {token, sizeof token};
    ems_frame_t resp;
    int rc = call(conn, EMS_OP_PING, &part, 1, ems_deadline_in(timeout_ms), sizeof token, &resp);
    if (rc == 0 && memcmp(conn->buf, token, sizeof token) != 0) {
        conn_fail(conn);
        rc = -EPROTO;
    }
    return rc;
}

/* ---- local socket ------------------------------------------------------------------ */

int ems_conn_local_attach(ems_conn_t *conn, int *fd, uint32_t timeout_ms)
{
    if (!conn->is_local)
        return -EINVAL;
    if (conn->fd < 0)
        return -ENOTCONN;
    uint64_t deadline = ems_deadline_in(timeout_ms);
    ems_frame_t req = {.version = conn->version, .opcode = EMS_OP_LOCAL_ATTACH,
                       .request_id = conn->next_id++};
    uint8_t header[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&req, header);
    struct iovec out = {header, sizeof header};
    int rc = ems_send_all(conn->fd, &out, 1, deadline);
    if (rc == 0 && ems_wait_readable(conn->fd, deadline) <= 0)
        rc = -ETIMEDOUT;
    if (rc < 0) {
        conn_fail(conn);
        return rc;
    }

    /* The whole 40-byte response arrives with the descriptor in one message. */
    uint8_t in[EMS_FRAME_HEADER_BYTES + 8];
    struct iovec iov = {in, sizeof in};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    ssize_t got = recvmsg(conn->fd, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    struct cmsghdr *cmsg = got > 0 ? CMSG_FIRSTHDR(&msg) : NULL;
    ems_frame_t resp;
    if (got != (ssize_t)sizeof in || !cmsg || cmsg->cmsg_type != SCM_RIGHTS ||
        ems_frame_decode(in, conn->max_payload, conn->version, conn->version, &resp) < 0 ||
        resp.status != EMS_STATUS_OK) {
        if (cmsg && cmsg->cmsg_type == SCM_RIGHTS) {
            int stray;
            memcpy(&stray, CMSG_DATA(cmsg), sizeof stray);
            close(stray);
        }
        conn_fail(conn);
        return -EPROTO;
    }
    memcpy(fd, CMSG_DATA(cmsg), sizeof *fd);
    return 0;
}

int ems_conn_local_put_many(ems_conn_t *conn, uint8_t *base, uint64_t map_size,
                            const uint8_t *keys, uint64_t n, const void *const *srcs,
                            const uint64_t *lengths, int64_t *results, uint32_t timeout_ms)
{
    int rc = check_batch(conn, n, EMS_KEY_BYTES + 8);
    if (rc < 0)
        return rc;
    if (!conn->is_local)
        return -EINVAL;
    uint64_t deadline = ems_deadline_in(timeout_ms);

    /* Step 1: reserve. */
    uint8_t head[BATCH_HEAD];
    batch_head(head, n, 0);
    uint8_t *lens = malloc(8 * n + 1);
    if (!lens)
        return -ENOMEM;
    for (uint64_t i = 0; i < n; i++)
        ems_put64(lens + 8 * i, lengths[i]);
    struct iovec parts[3] = {{head, BATCH_HEAD}, {(void *)keys, n * EMS_KEY_BYTES}, {lens, 8 * n}};
    ems_frame_t resp;
    rc = call(conn, EMS_OP_LOCAL_RESERVE, parts, 3, deadline, 16 * n, &resp);
    free(lens);
    if (rc < 0)
        return rc;

    /* Step 2: copy into the reserved slots of the shared mapping. */
    for (uint64_t i = 0; i < n; i++) {
        results[i] = (int64_t)ems_get64(conn->buf + 8 * i);
        uint64_t offset = ems_get64(conn->buf + 8 * (n + i));
        if (results[i] != 0)
            continue;
        if (offset > map_size || lengths[i] > map_size - offset) {
            conn_fail(conn);   /* the server aborts the reservation when the socket closes */
            return -EPROTO;
        }
        memcpy(base + offset, srcs[i], lengths[i]);
    }

    /* Step 3: commit. */
    struct iovec commit = {head, BATCH_HEAD};
    rc = call(conn, EMS_OP_LOCAL_COMMIT, &commit, 1, deadline, 8 * n, &resp);
    for (uint64_t i = 0; i < n && rc == 0; i++) {
        int64_t committed = (int64_t)ems_get64(conn->buf + 8 * i);
        if (results[i] == 0)
            results[i] = committed;
    }
    return rc;
}
