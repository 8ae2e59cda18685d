/* Transfer server's miss handler: installing it, and calling it for the keys a request
 * did not find in the pool, so that a lower tier can serve them.
 *
 * Invariant: a handler is called only by a connection thread, never with a server or pool
 * lock held, and never after ems_server_set_miss_handler has returned from replacing it.
 * While the pool is suspended it is called for DELETE only.
 * The operations that use it (GET, EXISTS, MATCH_PREFIX, PREFETCH) are in server_ops.c. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "server_internal.h"

#define COUNT(server, field, n) \
    atomic_fetch_add_explicit(&(server)->count.field, (n), memory_order_relaxed)

void ems_server_set_miss_handler(ems_server_t *server, ems_miss_fn fn, void *ctx)
{
    pthread_mutex_lock(&server->miss_set_lock);
    pthread_mutex_lock(&server->miss_lock);

    /* Calls that start from now on use the new handler and count in the new generation.
     * Setters are serialized and each waits for its old generation to drain, so the new
     * generation starts with no calls. */
    unsigned old = server->miss_gen;
    server->miss_fn = fn;
    server->miss_ctx = fn ? ctx : NULL;
    server->miss_gen = old ^ 1u;
    atomic_store(&server->miss_installed, fn != NULL);

    while (server->miss_active[old] > 0)
        pthread_cond_wait(&server->miss_idle, &server->miss_lock);
    pthread_mutex_unlock(&server->miss_lock);
    pthread_mutex_unlock(&server->miss_set_lock);
}

/* Grows conn->miss_index to at least n entries. Returns 0 or -ENOMEM. */
static int grow_index(ems_srv_conn_t *conn, uint64_t n)
{
    if (n <= conn->miss_index_cap)
        return 0;
    size_t size = conn->miss_index_cap ? conn->miss_index_cap : 512;
    while (size < n)
        size *= 2;
    uint64_t *grown = realloc(conn->miss_index, size * sizeof *grown);
    if (!grown)
        return -ENOMEM;
    conn->miss_index = grown;
    conn->miss_index_cap = size;
    return 0;
}

uint64_t *ems_srv_miss_index(ems_srv_conn_t *conn, uint64_t n)
{
    if (!atomic_load_explicit(&conn->server->miss_installed, memory_order_relaxed))
        return NULL;
    if (grow_index(conn, n + 1) < 0 ||
        ems_srv_reserve_buf(&conn->miss_keys, &conn->miss_keys_cap,
                            n * EMS_KEY_BYTES + 1) < 0 ||
        ems_srv_reserve_buf(&conn->miss_found, &conn->miss_found_cap, n + 1) < 0) {
        ems_srv_log(conn->server,
                    "out of memory for the missed keys of a request from %s; "
                    "served it from the pool alone", conn->peer);
        return NULL;
    }
    return conn->miss_index;
}

uint64_t ems_srv_miss_call(ems_srv_conn_t *conn, int mode, const uint8_t *keys,
                           uint64_t nmiss)
{
    ems_server_t *server = conn->server;
    uint8_t *found = conn->miss_found;
    memset(found, 0, nmiss);
    if (nmiss == 0 || atomic_load(&server->stopping))
        return 0;
    /* A suspended pool serves nothing, and neither does the tier below it. A DELETE still
     * goes through, so that a key the pool deleted cannot come back from the tier. */
    if (mode != EMS_MISS_DELETE && ems_pool_suspended(server->cfg.pool))
        return 0;
    for (uint64_t j = 0; j < nmiss; j++)
        memcpy(conn->miss_keys + j * EMS_KEY_BYTES,
               keys + conn->miss_index[j] * EMS_KEY_BYTES, EMS_KEY_BYTES);

    /* Step 1: take the current handler and count this call in its generation. */
    pthread_mutex_lock(&server->miss_lock);
    ems_miss_fn fn = server->miss_fn;
    void *ctx = server->miss_ctx;
    unsigned gen = server->miss_gen;
    if (fn)
        server->miss_active[gen]++;
    pthread_mutex_unlock(&server->miss_lock);
    if (!fn)
        return 0;

    /* Step 2: call it with no lock held. */
    fn(ctx, mode, conn->miss_keys, nmiss, found);

    /* Step 3: let a setter waiting for this generation go on. */
    pthread_mutex_lock(&server->miss_lock);
    if (--server->miss_active[gen] == 0)
        pthread_cond_broadcast(&server->miss_idle);
    pthread_mutex_unlock(&server->miss_lock);

    uint64_t hits = 0;
    for (uint64_t j = 0; j < nmiss; j++) {
        found[j] = found[j] != 0;
        hits += found[j];
    }
    COUNT(server, miss_calls, 1);
    COUNT(server, miss_keys, nmiss);
    COUNT(server, miss_found, hits);
    return hits;
}

void ems_srv_miss_free(ems_srv_conn_t *conn)
{
    free(conn->miss_index);
    free(conn->miss_keys);
    free(conn->miss_found);
}
