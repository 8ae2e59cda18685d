/* Transfer server operations: the handshake and the batched block and directory calls.
 * Payload formats are in docs/protocol.md, and every multi-byte integer is little-endian.
 *
 * Rules kept here. Nothing is acted on before the handshake is complete. A client
 * connection works only on stored keys of its own tenant (ems_tenant_keys), and a node
 * connection only on the directory. A PUT's blocks are received straight into reserved
 * slots and committed only after the whole payload has arrived with a valid checksum. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>

#include "crc32c.h"
#include "netio.h"
#include "server_internal.h"
#include "wire.h"

#define BATCH_HEAD 8u          /* u32 n, u32 arg */
#define DISCARD_CHUNK (256u << 10)
#define COUNT(conn, field, n) \
    atomic_fetch_add_explicit(&(conn)->server->count.field, (n), memory_order_relaxed)

/* Responds with an error status and a log line; returns -1 so the caller closes. */
static int refuse(ems_srv_conn_t *conn, const ems_frame_t *req, uint16_t status,
                  const char *why)
{
    ems_srv_log(conn->server, "refused opcode %u from %s (tenant '%s'): %s; closing",
                req->opcode, conn->peer, conn->tenant, why);
    ems_srv_respond(conn, req, status, NULL, 0);
    return -1;
}

/* Responds with an error status for a request whose payload was consumed; the
 * connection stays open. */
static int reject(ems_srv_conn_t *conn, const ems_frame_t *req, uint16_t status,
                  const char *why)
{
    ems_srv_log(conn->server, "rejected opcode %u from %s (tenant '%s'): %s", req->opcode,
                conn->peer, conn->tenant, why);
    return ems_srv_respond(conn, req, status, NULL, 0) < 0 ? -1 : 0;
}

static int respond_ok(ems_srv_conn_t *conn, const ems_frame_t *req, void *a, size_t alen,
                      void *b, size_t blen)
{
    struct iovec parts[2] = {{a, alen}, {b, blen}};
    return ems_srv_respond(conn, req, EMS_STATUS_OK, parts, b ? 2 : (a ? 1 : 0)) < 0 ? -1 : 0;
}

/* Checks that conn->in contains exactly "u32 n, u32 arg, n keys, then `extra` bytes per
 * key", and converts the keys to stored keys in conn->keys (the tenant's for a client
 * connection, unchanged for a node connection). Returns 0, or -1 after rejecting. */
static int parse_batch(ems_srv_conn_t *conn, const ems_frame_t *req, size_t extra,
                       uint64_t *n, uint32_t *arg)
{
    uint64_t count = req->payload_len >= BATCH_HEAD ? ems_get32(conn->in) : 0;
    if (req->payload_len < BATCH_HEAD ||
        (uint64_t)req->payload_len != BATCH_HEAD + count * (EMS_KEY_BYTES + extra)) {
        reject(conn, req, EMS_STATUS_BAD_REQUEST, "payload length does not match the key count");
        return -1;
    }
    if (ems_srv_reserve_buf(&conn->keys, &conn->keys_cap, count * EMS_KEY_BYTES + 1) < 0) {
        reject(conn, req, EMS_STATUS_INTERNAL, "out of memory");
        return -1;
    }
    const uint8_t *keys = conn->in + BATCH_HEAD;
    if (conn->role == EMS_ROLE_CLIENT)
        ems_tenant_keys(conn->salt, keys, count, conn->keys);
    else
        memcpy(conn->keys, keys, count * EMS_KEY_BYTES);
    *n = count;
    *arg = ems_get32(conn->in + 4);
    return 0;
}

static int out_room(ems_srv_conn_t *conn, const ems_frame_t *req, size_t need)
{
    if (ems_srv_reserve_buf(&conn->out, &conn->out_cap, need + 1) < 0) {
        reject(conn, req, EMS_STATUS_INTERNAL, "out of memory");
        return -1;
    }
    return 0;
}

/* ---- handshake --------------------------------------------------------------------- */

static int valid_tenant(const uint8_t *name, size_t len)
{
    if (len == 0 || len > EMS_TENANT_MAX)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (name[i] < 0x21 || name[i] > 0x7e)
            return 0;
    return 1;
}

static int op_hello(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    if (conn->hello_done)
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "second HELLO");
    if (req->payload_len < 8)
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "HELLO shorter than 8 bytes");
    uint16_t vmin = ems_get16(conn->in), vmax = ems_get16(conn->in + 2);
    uint16_t role = ems_get16(conn->in + 4), tlen = ems_get16(conn->in + 6);
    if (req->payload_len != 8u + tlen || !valid_tenant(conn->in + 8, tlen))
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST,
                      "tenant must be 1 to 64 printable ASCII characters");
    if (role > EMS_ROLE_NODE)
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "unknown role");
    const ems_server_config_t *cfg = &conn->server->cfg;
    uint16_t version;
    if (ems_proto_negotiate(cfg->proto_min, cfg->proto_max, vmin, vmax, &version) < 0) {
        /* The response carries this server's range, so the client can name both. */
        ems_srv_log(conn->server, "refused opcode %u from %s: client speaks versions %u-%u, "
                    "this server %u-%u; closing", req->opcode, conn->peer, vmin, vmax,
                    cfg->proto_min, cfg->proto_max);
        uint8_t range[4];
        ems_put16(range, cfg->proto_min);
        ems_put16(range + 2, cfg->proto_max);
        struct iovec part = {range, sizeof range};
        ems_srv_respond(conn, req, EMS_STATUS_UNSUPPORTED_VERSION, &part, 1);
        return -1;
    }
    COUNT(conn, hellos[version][role], 1);

    memcpy(conn->tenant, conn->in + 8, tlen);
    conn->tenant[tlen] = 0;
    ems_tenant_salt(conn->tenant, tlen, conn->salt);
    conn->role = role;
    conn->version = version;
    conn->hello_done = 1;
    conn->authed = conn->server->cfg.secret == NULL;
    if (getrandom(conn->challenge, sizeof conn->challenge, 0) != sizeof conn->challenge)
        return refuse(conn, req, EMS_STATUS_INTERNAL, "no randomness for a challenge");

    uint8_t resp[4 + EMS_CHALLENGE_BYTES];
    ems_put16(resp, version);
    ems_put16(resp + 2, conn->authed ? 0 : 1);
    memcpy(resp + 4, conn->challenge, EMS_CHALLENGE_BYTES);
    return respond_ok(conn, req, resp, sizeof resp, NULL, 0);
}

static int op_auth(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    if (!conn->hello_done || conn->authed)
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "AUTH out of order");
    const ems_server_config_t *cfg = &conn->server->cfg;
    uint8_t expect[EMS_PROOF_BYTES];
    ems_auth_proof(cfg->secret, cfg->secret_len, conn->challenge, conn->tenant,
                   strlen(conn->tenant), conn->role, expect);
    uint8_t diff = req->payload_len != EMS_PROOF_BYTES;
    for (size_t i = 0; i < EMS_PROOF_BYTES && req->payload_len == EMS_PROOF_BYTES; i++)
        diff |= expect[i] ^ conn->in[i];
    if (diff) {
        COUNT(conn, auth_failures, 1);
        return refuse(conn, req, EMS_STATUS_UNAUTHENTICATED,
                      "authentication failed: wrong cluster secret");
    }
    conn->authed = 1;
    return respond_ok(conn, req, NULL, 0, NULL, 0);
}

/* ---- blocks ------------------------------------------------------------------------ */

/* Pins the block of `key` when its length is `length`: returns the length and sets *data
 * and *pin, or returns -ENOENT, -EMSGSIZE or -EINVAL (length 0). */
static int64_t pin_block(ems_pool_t *pool, const uint8_t *key, uint64_t length,
                         const uint8_t **data, uint32_t *pin)
{
    if (length == 0)
        return -EINVAL;
    return ems_pool_pin(pool, key, length, data, pin);
}

static int op_get(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n;
    uint32_t arg;
    if (parse_batch(conn, req, 8, &n, &arg) < 0)
        return 0;
    const uint8_t *lengths = conn->in + BATCH_HEAD + n * EMS_KEY_BYTES;
    uint64_t limit = conn->server->cfg.max_payload, want = 8 * n;
    /* Each length is capped before it is added, so crafted lengths cannot wrap the sum
     * around to a small value and slip past the payload limit. */
    for (uint64_t i = 0; i < n && want <= limit; i++) {
        uint64_t length = ems_get64(lengths + 8 * i);
        want += length <= limit ? length : limit + 1;
    }
    if (want > limit)
        return reject(conn, req, EMS_STATUS_TOO_LARGE, "GET response would exceed the payload limit");
    if (out_room(conn, req, 8 * n) < 0)
        return 0;
    struct iovec *iov = malloc((size_t)(n + 2) * sizeof *iov);
    uint32_t *pins = malloc((size_t)(n ? n : 1) * sizeof *pins);
    const uint8_t **datas = malloc((size_t)(n ? n : 1) * sizeof *datas);
    if (!iov || !pins || !datas) {
        free(iov);
        free(pins);
        free(datas);
        return reject(conn, req, EMS_STATUS_INTERNAL, "out of memory");
    }

    /* Step 1: pin each hit, so its slot stays valid and unchanged until it is sent, and
     * note each key the pool does not have. */
    ems_pool_t *pool = conn->server->cfg.pool;
    uint64_t *miss = ems_srv_miss_index(conn, n);
    uint64_t hits = 0, nmiss = 0;
    for (uint64_t i = 0; i < n; i++) {
        int64_t rc = pin_block(pool, conn->keys + i * EMS_KEY_BYTES, ems_get64(lengths + 8 * i),
                               &datas[i], &pins[hits]);
        ems_put64(conn->out + 8 * i, (uint64_t)rc);
        if (rc > 0)
            hits++;
        else if (rc == -ENOENT && miss)
            miss[nmiss++] = i;
    }

    /* Step 2: one LOAD call for all the misses, then pin what it loaded. The hits stay
     * pinned during the call, so the blocks it loads cannot evict them. */
    if (nmiss > 0 && ems_srv_miss_call(conn, EMS_MISS_LOAD, conn->keys, nmiss) > 0) {
        for (uint64_t j = 0; j < nmiss; j++) {
            if (!conn->miss_found[j])
                continue;
            uint64_t i = miss[j];
            int64_t rc = pin_block(pool, conn->keys + i * EMS_KEY_BYTES,
                                   ems_get64(lengths + 8 * i), &datas[i], &pins[hits]);
            ems_put64(conn->out + 8 * i, (uint64_t)rc);
            if (rc > 0)
                hits++;
        }
    }

    /* Step 3: point an iovec at each pinned slot, in key order after the results table,
     * so the blocks go from the pool to the socket without a copy. */
    uint64_t off = 8 * n;
    int niov = 2;
    uint32_t crc = ems_crc32c(0, conn->out, 8 * n);
    for (uint64_t i = 0; i < n; i++) {
        int64_t rc = (int64_t)ems_get64(conn->out + 8 * i);
        if (rc <= 0)
            continue;
        iov[niov].iov_base = (void *)datas[i];
        iov[niov++].iov_len = (size_t)rc;
        off += (uint64_t)rc;
        crc = ems_crc32c(crc, datas[i], (size_t)rc);
    }

    ems_frame_t resp = {.version = conn->version, .opcode = req->opcode,
                        .request_id = req->request_id, .payload_len = (uint32_t)off,
                        .payload_crc = off ? crc : 0, .flags = EMS_FRAME_RESPONSE};
    uint8_t header[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&resp, header);
    iov[0] = (struct iovec){header, sizeof header};
    iov[1] = (struct iovec){conn->out, 8 * n};
    /* Counted before the send, so STATS read by a client after its reply arrived already
     * includes this request. */
    COUNT(conn, gets, n);
    COUNT(conn, get_hits, hits);
    COUNT(conn, get_misses, n - hits);
    COUNT(conn, bytes_out, sizeof header + off);
    int rc = ems_send_all(conn->fd, iov, niov, ems_deadline_in(conn->server->cfg.io_timeout_ms));
    for (uint64_t i = 0; i < hits; i++)
        ems_pool_unpin(pool, pins[i]);
    free(iov);
    free(pins);
    free(datas);

    if (rc < 0)
        ems_srv_count_io_error(conn->server, rc);
    if (rc < 0 && !atomic_load(&conn->server->stopping))
        /* The usual cause is a reader that stopped reading for io_timeout_ms. Its blocks
         * are already unpinned. */
        ems_srv_log(conn->server, "GET response of %llu bytes to %s not sent: %s; closing",
                    (unsigned long long)off, conn->peer, strerror(-rc));
    return rc < 0 ? -1 : 0;
}

/* Receives `len` payload bytes into dst (or discards them when dst is NULL), extending
 * the running checksum. */
static int recv_part(ems_srv_conn_t *conn, uint8_t *dst, uint64_t len, uint32_t *crc,
                     uint64_t deadline)
{
    while (len > 0) {
        uint64_t take = len;
        uint8_t *into = dst;
        if (!dst) {
            if (ems_srv_reserve_buf(&conn->out, &conn->out_cap, DISCARD_CHUNK) < 0)
                return -ENOMEM;
            take = len < DISCARD_CHUNK ? len : DISCARD_CHUNK;
            into = conn->out;
        }
        int rc = ems_recv_crc(conn->fd, into, take, deadline, crc);
        if (rc < 0)
            return rc;
        if (dst)
            dst += take;
        len -= take;
    }
    return 0;
}

static void abort_all(ems_pool_t *pool, ems_reservation_t *r, const int64_t *results, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (results[i] == 0)
            ems_pool_abort(pool, &r[i]);
}

/* Logs a PUT whose payload stopped arriving and returns -1, so the caller closes. */
static int put_broke_off(ems_srv_conn_t *conn, int rc)
{
    ems_srv_count_io_error(conn->server, rc);
    ems_srv_log(conn->server, "PUT from %s broke off: %s; nothing of it was stored", conn->peer,
                strerror(-rc));
    return -1;
}

static int op_put(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    ems_server_t *server = conn->server;
    uint64_t deadline = ems_deadline_in(server->cfg.io_timeout_ms);

    /* Step 1: the batch head, keys and lengths. A malformed head closes the connection:
     * the rest of the payload cannot be skipped safely. */
    uint8_t head[BATCH_HEAD];
    if (req->payload_len < BATCH_HEAD)
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "PUT shorter than a batch head");
    int rc = ems_recv_all(conn->fd, head, BATCH_HEAD, deadline);
    if (rc < 0)
        return put_broke_off(conn, rc);
    uint64_t n = ems_get32(head);
    uint64_t table = n * (EMS_KEY_BYTES + 8);
    if (BATCH_HEAD + table > req->payload_len)
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "PUT key table exceeds the payload");
    if (ems_srv_reserve_buf(&conn->in, &conn->in_cap, table + 1) < 0 ||
        ems_srv_reserve_buf(&conn->keys, &conn->keys_cap, n * EMS_KEY_BYTES + 1) < 0)
        return refuse(conn, req, EMS_STATUS_INTERNAL, "out of memory");
    rc = ems_recv_all(conn->fd, conn->in, table, deadline);
    if (rc < 0)
        return put_broke_off(conn, rc);
    uint32_t crc = ems_crc32c(ems_crc32c(0, head, BATCH_HEAD), conn->in, table);
    const uint8_t *lengths = conn->in + n * EMS_KEY_BYTES;
    uint64_t data = 0, max_block = ems_pool_max_block(server->cfg.pool);
    /* Capped like GET's sum, so lengths that wrap around cannot pass the check below. */
    for (uint64_t i = 0; i < n && data <= req->payload_len; i++) {
        uint64_t length = ems_get64(lengths + 8 * i);
        data += length <= req->payload_len ? length : (uint64_t)req->payload_len + 1;
    }
    if (BATCH_HEAD + table + data != req->payload_len)
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "PUT lengths do not add up to the payload");
    ems_tenant_keys(conn->salt, conn->in, n, conn->keys);

    /* Step 2: reserve every slot, then receive each block straight into its slot. */
    ems_reservation_t *r = calloc(n ? n : 1, sizeof *r);
    int64_t *results = calloc(n ? n : 1, sizeof *results);
    if (!r || !results) {
        free(r);
        free(results);
        return refuse(conn, req, EMS_STATUS_INTERNAL, "out of memory");
    }
    int draining = atomic_load(&server->draining);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t length = ems_get64(lengths + 8 * i);
        if (draining)
            results[i] = -ESHUTDOWN;
        else if (length > max_block)
            results[i] = -EMSGSIZE;
        else
            results[i] = ems_pool_reserve(server->cfg.pool, conn->keys + i * EMS_KEY_BYTES,
                                          length, &r[i]);
        if (results[i] == 0 && r[i].exists)
            results[i] = 1;
    }
    for (uint64_t i = 0; i < n && rc == 0; i++)
        rc = recv_part(conn, results[i] == 0 ? r[i].data : NULL, ems_get64(lengths + 8 * i), &crc,
                       deadline);
    COUNT(conn, bytes_in, req->payload_len);
    if (rc < 0) {
        abort_all(server->cfg.pool, r, results, n);
        free(r);
        free(results);
        return put_broke_off(conn, rc);
    }

    /* Step 3: publish only a payload that arrived intact. */
    if (crc != req->payload_crc) {
        abort_all(server->cfg.pool, r, results, n);
        free(r);
        free(results);
        return reject(conn, req, EMS_STATUS_BAD_REQUEST,
                      "PUT payload checksum mismatch; nothing of it was stored");
    }
    uint64_t stored = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (results[i] != 0)
            continue;
        results[i] = ems_pool_commit(server->cfg.pool, &r[i]);
        if (results[i] == 0)
            memmove(conn->keys + stored++ * EMS_KEY_BYTES, conn->keys + i * EMS_KEY_BYTES,
                    EMS_KEY_BYTES);
    }
    ems_srv_note_new_keys(server, conn->keys, stored);
    COUNT(conn, puts, n);
    COUNT(conn, put_stored, stored);
    for (uint64_t i = 0; i < n; i++)
        ems_put64((uint8_t *)&results[i], (uint64_t)results[i]);
    rc = respond_ok(conn, req, results, 8 * n, NULL, 0);
    free(r);
    free(results);
    return rc;
}

/* Passes the keys whose present[i] is 0 to one miss handler call in `mode`, and sets
 * present[i] = 1 for each key it reports found. Returns how many it found. */
static uint64_t ask_lower_tier(ems_srv_conn_t *conn, int mode, const uint8_t *keys, uint64_t n,
                               uint8_t *present)
{
    uint64_t *miss = ems_srv_miss_index(conn, n);
    if (!miss)
        return 0;
    uint64_t nmiss = 0;
    for (uint64_t i = 0; i < n; i++)
        if (!present[i])
            miss[nmiss++] = i;
    uint64_t found = ems_srv_miss_call(conn, mode, keys, nmiss);
    for (uint64_t j = 0; j < nmiss && found > 0; j++)
        if (conn->miss_found[j])
            present[miss[j]] = 1;
    return found;
}

/* Responds with present[n]: 1 for a key in the pool or, with a miss handler, in a lower
 * tier (one PROBE call for the keys the pool lacks). */
static int op_exists(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n;
    uint32_t arg;
    if (parse_batch(conn, req, 0, &n, &arg) < 0 || out_room(conn, req, n) < 0)
        return 0;
    ems_pool_exists_many(conn->server->cfg.pool, conn->keys, n, conn->out);
    ask_lower_tier(conn, EMS_MISS_PROBE, conn->keys, n, conn->out);
    return respond_ok(conn, req, conn->out, n, NULL, 0);
}

/* Responds with the count of leading keys present. When the pool holds only m < n of
 * them and a miss handler is set, the keys of keys[m..n) that the pool lacks go to one
 * PROBE call, and the count extends over each following key that is in the pool or that
 * the handler found, up to the first key in neither. */
static int op_match_prefix(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n;
    uint32_t arg;
    if (parse_batch(conn, req, 0, &n, &arg) < 0)
        return 0;
    ems_pool_t *pool = conn->server->cfg.pool;
    uint64_t m = ems_pool_match_prefix(pool, conn->keys, n);
    if (m < n && atomic_load_explicit(&conn->server->miss_installed, memory_order_relaxed)) {
        if (out_room(conn, req, n - m) < 0)
            return 0;
        const uint8_t *rest = conn->keys + m * EMS_KEY_BYTES;
        uint8_t *present = conn->out;
        ems_pool_exists_many(pool, rest, n - m, present);
        ask_lower_tier(conn, EMS_MISS_PROBE, rest, n - m, present);
        for (uint64_t i = 0; m < n && present[i]; i++)
            m++;
    }
    uint8_t count[8];
    ems_put64(count, m);
    return respond_ok(conn, req, count, sizeof count, NULL, 0);
}

/* Starts loading the keys the pool lacks: one PREFETCH call of the miss handler, which
 * returns without waiting for the loads. Responds with how many keys were in the pool
 * already or had a load started. */
static int op_prefetch(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n;
    uint32_t arg;
    if (parse_batch(conn, req, 0, &n, &arg) < 0 || out_room(conn, req, n) < 0)
        return 0;
    uint64_t count = ems_pool_exists_many(conn->server->cfg.pool, conn->keys, n, conn->out);
    count += ask_lower_tier(conn, EMS_MISS_PREFETCH, conn->keys, n, conn->out);
    uint8_t reply[8];
    ems_put64(reply, count);
    return respond_ok(conn, req, reply, sizeof reply, NULL, 0);
}

static int op_delete(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n;
    uint32_t arg;
    if (parse_batch(conn, req, 0, &n, &arg) < 0 || out_room(conn, req, 9 * n) < 0)
        return 0;
    /* The pool first, so no eviction can spill a key again after the lower tier dropped it.
     * Then every key goes to one DELETE call, and a key either level held is reported deleted. */
    uint8_t *gone = conn->out + 8 * n;
    memset(gone, 0, n);
    for (uint64_t i = 0; i < n; i++)
        ems_put64(conn->out + 8 * i,
                  (uint64_t)(int64_t)ems_pool_delete(conn->server->cfg.pool,
                                                     conn->keys + i * EMS_KEY_BYTES));
    if (ask_lower_tier(conn, EMS_MISS_DELETE, conn->keys, n, gone) > 0)
        for (uint64_t i = 0; i < n; i++)
            if (gone[i])
                ems_put64(conn->out + 8 * i, 0);
    return respond_ok(conn, req, conn->out, 8 * n, NULL, 0);
}

/* Sets (arg 1) or clears (arg 0) the PROTECT hint on the present keys, and responds with
 * how many of the keys were present (0, changing nothing, while the pool is suspended). */
static int op_protect(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n;
    uint32_t arg;
    if (parse_batch(conn, req, 0, &n, &arg) < 0)
        return 0;
    if (arg > 1)
        return reject(conn, req, EMS_STATUS_BAD_REQUEST, "PROTECT arg must be 0 or 1");
    /* The count shows which keys are stored, which a suspended pool does not reveal. */
    ems_pool_t *pool = conn->server->cfg.pool;
    uint8_t count[8];
    ems_put64(count, ems_pool_suspended(pool)
                         ? 0
                         : (uint64_t)ems_pool_protect(pool, conn->keys, n, (int)arg));
    return respond_ok(conn, req, count, sizeof count, NULL, 0);
}

/* ---- directory --------------------------------------------------------------------- */

static int op_dir_register(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n;
    uint32_t holder;
    if (parse_batch(conn, req, 0, &n, &holder) < 0)
        return 0;
    uint8_t count[8];
    ems_put64(count, ems_directory_register(&conn->server->dir, conn->keys, n, holder));
    return respond_ok(conn, req, count, sizeof count, NULL, 0);
}

static int op_dir_lookup(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n;
    uint32_t arg;
    if (parse_batch(conn, req, 0, &n, &arg) < 0 || out_room(conn, req, 4 * n) < 0)
        return 0;
    /* A suspended node points no client at a block: the holders are suspended too,
     * because one activation covers the cluster. Registrations still go in, so the
     * directory is complete again after the resume. */
    uint32_t *holders = (uint32_t *)(void *)conn->out;
    if (ems_pool_suspended(conn->server->cfg.pool)) {
        for (uint64_t i = 0; i < n; i++)
            holders[i] = EMS_HOLDER_NONE;
    } else {
        ems_directory_lookup(&conn->server->dir, conn->keys, n, holders);
    }
    for (uint64_t i = 0; i < n; i++)
        ems_put32(conn->out + 4 * i, holders[i]);
    return respond_ok(conn, req, conn->out, 4 * n, NULL, 0);
}

/* ---- draining ---------------------------------------------------------------------- */

/* Payload u32: 1 starts draining, 0 ends it. Responds with u32: the requests that other
 * connections are handling at this moment, so that the caller can wait for them to end
 * before it stops the server. */
static int op_drain(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint32_t on = req->payload_len == 4 ? ems_get32(conn->in) : UINT32_MAX;
    if (on > 1)
        return reject(conn, req, EMS_STATUS_BAD_REQUEST, "DRAIN payload must be u32 0 or 1");
    ems_server_t *server = conn->server;
    if (atomic_exchange(&server->draining, (int)on) != (int)on)
        ems_srv_log(server, on ? "draining, asked by %s: PUT and LOCAL_RESERVE store nothing "
                                 "until the restart or the end of draining"
                               : "draining ended, asked by %s: storing new blocks again",
                    conn->peer);
    uint64_t active = atomic_load(&server->active);
    uint8_t reply[4];
    ems_put32(reply, active > 1 ? (uint32_t)(active - 1) : 0);   /* not this request */
    return respond_ok(conn, req, reply, sizeof reply, NULL, 0);
}

/* ---- statistics -------------------------------------------------------------------- */

/* Replaces the closing brace of the JSON object of `len` bytes in buf with the protocol
 * fields: the range served, whether the server is draining, and the handshakes agreed per
 * version and role ("hellos": {"1": {"client": n, "node": n}, ...}). Returns the new
 * length, or len when they do not fit in `cap`. */
static int append_protocol_stats(ems_server_t *server, char *buf, int len, int cap)
{
    if (len < 1 || len >= cap)
        return len;
    int at = len - 1;   /* the closing brace */
    at += snprintf(buf + at, (size_t)(cap - at), ",\"proto_min\":%u,\"proto_max\":%u,"
                   "\"draining\":%d,\"hellos\":{", server->cfg.proto_min,
                   server->cfg.proto_max, atomic_load(&server->draining));
    for (unsigned v = EMS_PROTO_VERSION_MIN; v <= EMS_PROTO_VERSION_MAX && at < cap; v++)
        at += snprintf(buf + at, (size_t)(cap - at), "%s\"%u\":{\"client\":%llu,\"node\":%llu}",
                       v > EMS_PROTO_VERSION_MIN ? "," : "", v,
                       (unsigned long long)atomic_load(&server->count.hellos[v][EMS_ROLE_CLIENT]),
                       (unsigned long long)atomic_load(&server->count.hellos[v][EMS_ROLE_NODE]));
    if (at < cap)
        at += snprintf(buf + at, (size_t)(cap - at), "}}");
    if (at >= cap) {   /* cut short: keep the object as it was */
        buf[len - 1] = '}';
        buf[len] = 0;
        return len;
    }
    return at;
}

static int op_stats(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    ems_pool_stats_t p;
    ems_server_stats_t s;
    ems_pool_stats(conn->server->cfg.pool, &p, NULL, 0);
    ems_server_stats(conn->server, &s);
    if (out_room(conn, req, 2048) < 0)
        return 0;
    int len = snprintf(
        (char *)conn->out, 2048,
        "{\"node_id\":%u,\"capacity_bytes\":%llu,\"used_bytes\":%llu,\"free_bytes\":%llu,"
        "\"blocks\":%llu,\"hits\":%llu,\"misses\":%llu,\"evictions\":%llu,\"puts\":%llu,"
        "\"page_kind\":%u,\"connections\":%llu,\"connections_open\":%llu,"
        "\"auth_failures\":%llu,\"bad_frames\":%llu,\"requests\":%llu,\"errors\":%llu,"
        "\"remote_gets\":%llu,\"remote_get_hits\":%llu,\"remote_puts\":%llu,"
        "\"bytes_in\":%llu,\"bytes_out\":%llu,\"local_puts\":%llu,"
        "\"dir_entries\":%llu,\"dir_lookups\":%llu,\"dir_hits\":%llu,"
        "\"miss_calls\":%llu,\"miss_keys\":%llu,\"miss_found\":%llu,"
        "\"miss_handler\":%d,\"suspended\":%u,\"suspended_drops\":%llu}",
        conn->server->cfg.node_id, (unsigned long long)p.capacity,
        (unsigned long long)p.bytes_used, (unsigned long long)p.bytes_free,
        (unsigned long long)p.blocks, (unsigned long long)p.hits,
        (unsigned long long)p.misses, (unsigned long long)p.evictions,
        (unsigned long long)p.puts, p.page_kind, (unsigned long long)s.connections,
        (unsigned long long)s.connections_open, (unsigned long long)s.auth_failures,
        (unsigned long long)s.bad_frames, (unsigned long long)s.requests,
        (unsigned long long)s.errors, (unsigned long long)s.gets,
        (unsigned long long)s.get_hits, (unsigned long long)s.puts,
        (unsigned long long)s.bytes_in, (unsigned long long)s.bytes_out,
        (unsigned long long)s.local_puts,
        (unsigned long long)s.dir_entries, (unsigned long long)s.dir_lookups,
        (unsigned long long)s.dir_hits, (unsigned long long)s.miss_calls,
        (unsigned long long)s.miss_keys, (unsigned long long)s.miss_found,
        atomic_load_explicit(&conn->server->miss_installed, memory_order_relaxed) ? 1 : 0,
        p.suspended, (unsigned long long)p.suspended_drops);
    len = append_protocol_stats(conn->server, (char *)conn->out, len, 2048);
    return respond_ok(conn, req, conn->out, (size_t)len, NULL, 0);
}

/* ---- local socket ------------------------------------------------------------------ */

static int op_local_attach(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    ems_pool_t *pool = conn->server->cfg.pool;
    uint8_t size[8];
    ems_put64(size, pool->arena.size);
    uint32_t crc = ems_crc32c(0, size, sizeof size);
    ems_frame_t resp = {.version = conn->version, .opcode = req->opcode,
                        .request_id = req->request_id, .payload_len = sizeof size,
                        .payload_crc = crc, .flags = EMS_FRAME_RESPONSE};
    uint8_t header[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&resp, header);

    /* Header, payload and the memfd in one sendmsg, so the fd arrives with the frame. */
    struct iovec iov[2] = {{header, sizeof header}, {size, sizeof size}};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &pool->arena.fd, sizeof(int));
    ssize_t sent = sendmsg(conn->fd, &msg, MSG_NOSIGNAL);
    if (sent == (ssize_t)(sizeof header + sizeof size))
        return 0;
    /* A short send leaves the frame cut, so the connection cannot go on. */
    ems_srv_count_io_error(conn->server, sent < 0 ? -errno : -EPIPE);
    return -1;
}

static void drop_pending(ems_srv_conn_t *conn)
{
    for (uint64_t i = 0; i < conn->npending; i++)
        if (conn->pending[i].data && !conn->pending[i].exists)
            ems_pool_abort(conn->server->cfg.pool, &conn->pending[i]);
    free(conn->pending);
    free(conn->pending_keys);
    free(conn->pending_rc);
    conn->pending = NULL;
    conn->pending_keys = NULL;
    conn->pending_rc = NULL;
    conn->npending = 0;
}

static int op_local_reserve(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n;
    uint32_t arg;
    drop_pending(conn);
    if (parse_batch(conn, req, 8, &n, &arg) < 0 || out_room(conn, req, 16 * n) < 0)
        return 0;
    conn->pending = calloc(n ? n : 1, sizeof *conn->pending);
    conn->pending_keys = malloc(n ? n * EMS_KEY_BYTES : 1);
    conn->pending_rc = calloc(n ? n : 1, sizeof *conn->pending_rc);
    if (!conn->pending || !conn->pending_keys || !conn->pending_rc) {
        drop_pending(conn);
        return reject(conn, req, EMS_STATUS_INTERNAL, "out of memory");
    }
    memcpy(conn->pending_keys, conn->keys, n * EMS_KEY_BYTES);
    conn->npending = n;

    /* Reply: results[n] then the data offset of each slot from the arena base. */
    ems_pool_t *pool = conn->server->cfg.pool;
    const uint8_t *lengths = conn->in + BATCH_HEAD + n * EMS_KEY_BYTES;
    int draining = atomic_load(&conn->server->draining);
    for (uint64_t i = 0; i < n; i++) {
        ems_reservation_t *r = &conn->pending[i];
        int64_t rc = draining ? -ESHUTDOWN
                              : ems_pool_reserve(pool, conn->keys + i * EMS_KEY_BYTES,
                                                 ems_get64(lengths + 8 * i), r);
        if (rc == 0 && r->exists)
            rc = 1;
        if (rc != 0)
            r->data = NULL;
        conn->pending_rc[i] = rc;
        ems_put64(conn->out + 8 * i, (uint64_t)rc);
        ems_put64(conn->out + 8 * (n + i), r->data ? (uint64_t)(r->data - pool->arena.base) : 0);
    }
    return respond_ok(conn, req, conn->out, 16 * n, NULL, 0);
}

/* Payload: u32 n, u32 0, with n the count of the pending LOCAL_RESERVE. */
static int op_local_commit(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint64_t n = req->payload_len == BATCH_HEAD ? ems_get32(conn->in) : UINT64_MAX;
    if (n != conn->npending) {
        drop_pending(conn);
        return reject(conn, req, EMS_STATUS_BAD_REQUEST,
                      "LOCAL_COMMIT does not match the pending reservation");
    }
    if (out_room(conn, req, 8 * n) < 0)
        return 0;
    uint64_t stored = 0;
    for (uint64_t i = 0; i < n; i++) {
        ems_reservation_t *r = &conn->pending[i];
        int64_t rc = conn->pending_rc[i];   /* 1 (stored before) or the reserve error */
        if (r->data) {
            rc = ems_pool_commit(conn->server->cfg.pool, r);
            r->data = NULL;
            if (rc == 0)
                memmove(conn->pending_keys + stored++ * EMS_KEY_BYTES,
                        conn->pending_keys + i * EMS_KEY_BYTES, EMS_KEY_BYTES);
        }
        ems_put64(conn->out + 8 * i, (uint64_t)rc);
    }
    ems_srv_note_new_keys(conn->server, conn->pending_keys, stored);
    drop_pending(conn);
    COUNT(conn, local_puts, n);
    return respond_ok(conn, req, conn->out, 8 * n, NULL, 0);
}

/* ---- dispatch ---------------------------------------------------------------------- */

int ems_srv_dispatch(ems_srv_conn_t *conn, const ems_frame_t *req)
{
    uint16_t op = req->opcode;
    int local_op = op >= EMS_OP_LOCAL_ATTACH && op <= EMS_OP_LOCAL_COMMIT;

    /* Permission checks come before the payload is read: a refused frame's payload is
     * never buffered, and the connection is closed. */
    if (op != EMS_OP_PING && op != EMS_OP_HELLO && op != EMS_OP_AUTH && !conn->authed)
        return refuse(conn, req, EMS_STATUS_UNAUTHENTICATED, "request before authentication");
    if (local_op && !conn->is_local)
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "local operation on a TCP connection");
    int node_op = op == EMS_OP_DIR_REGISTER || op == EMS_OP_DRAIN;
    int client_op = op == EMS_OP_GET || op == EMS_OP_PUT || op == EMS_OP_EXISTS ||
                    op == EMS_OP_MATCH_PREFIX || op == EMS_OP_DELETE || op == EMS_OP_PROTECT ||
                    op == EMS_OP_PREFETCH || local_op;
    if (node_op && conn->role != EMS_ROLE_NODE)
        return refuse(conn, req, EMS_STATUS_UNAUTHENTICATED,
                      op == EMS_OP_DRAIN ? "DRAIN needs the node role"
                                         : "directory registration needs the node role");
    if (client_op && conn->role != EMS_ROLE_CLIENT)
        return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "block operation on a node connection");

    if (op == EMS_OP_PUT)
        return op_put(conn, req);
    int rc = ems_srv_read_payload(conn, req);
    if (rc == -EBADMSG)
        return reject(conn, req, EMS_STATUS_BAD_REQUEST, "payload checksum mismatch");
    if (rc < 0) {
        if (rc != -ENOMEM)
            ems_srv_count_io_error(conn->server, rc);
        ems_srv_log(conn->server, "payload of opcode %u from %s did not arrive: %s; closing",
                    op, conn->peer, strerror(-rc));
        return -1;
    }

    switch (op) {
    case EMS_OP_PING: {
        struct iovec echo = {conn->in, req->payload_len};
        return ems_srv_respond(conn, req, EMS_STATUS_OK, &echo, req->payload_len ? 1 : 0) < 0 ? -1 : 0;
    }
    case EMS_OP_HELLO: return op_hello(conn, req);
    case EMS_OP_AUTH: return op_auth(conn, req);
    case EMS_OP_GET: return op_get(conn, req);
    case EMS_OP_EXISTS: return op_exists(conn, req);
    case EMS_OP_MATCH_PREFIX: return op_match_prefix(conn, req);
    case EMS_OP_DELETE: return op_delete(conn, req);
    case EMS_OP_PROTECT: return op_protect(conn, req);
    case EMS_OP_PREFETCH: return op_prefetch(conn, req);
    case EMS_OP_DIR_REGISTER: return op_dir_register(conn, req);
    case EMS_OP_DIR_LOOKUP: return op_dir_lookup(conn, req);
    case EMS_OP_STATS: return op_stats(conn, req);
    case EMS_OP_DRAIN: return op_drain(conn, req);
    case EMS_OP_LOCAL_ATTACH: return op_local_attach(conn, req);
    case EMS_OP_LOCAL_RESERVE: return op_local_reserve(conn, req);
    case EMS_OP_LOCAL_COMMIT: return op_local_commit(conn, req);
    default: return refuse(conn, req, EMS_STATUS_BAD_REQUEST, "unknown opcode");
    }
}
