/* Transfer engine tests: a real server (server.c, server_ops.c) on 127.0.0.1 and on a
 * Unix socket, driven through the client API of transfer.h.
 *
 * Each test starts its own 64 MiB pool on 4 KiB pages and a server with a cluster secret.
 * The tests cover block round trips, the directory and its roles, authentication, tenant
 * isolation and the local socket's shared mapping. Further tests run concurrent clients,
 * stop a server under open connections, and check client deadlines against a silent peer.
 *
 * Block contents are a function of the key id (test_fill_payload), so any thread can
 * check any block it reads byte for byte.
 *
 * Usage: test_transfer [ops_per_thread] (default 50000), the requests each of the four
 * client threads of the concurrency test sends.
 */
#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "crc32c.h"
#include "frame.h"
#include "netio.h"
#include "transfer.h"
#include "wire.h"

/* Generous, because sanitizers slow every call. The deadline tests use shorter ones. */
#define CALL_TIMEOUT_MS 10000u
#define MAX_PAYLOAD (8u << 20)
#define POOL_BYTES (64u << 20)
#define NODE_ID 7u

static const uint8_t SECRET[] = "test_transfer cluster secret";
#define SECRET_LEN (sizeof SECRET - 1)

/* ---- fixture: a pool and a server --------------------------------------------------- */

typedef struct server_fixture {
    ems_pool_t pool;
    ems_server_t *server;     /* NULL once stopped */
    uint16_t port;
    char dir[64];             /* mkdtemp directory of the Unix socket */
    char unix_path[128];
} server_fixture_t;

/* Starts a server that speaks protocol versions [proto_min, proto_max] (0, 0: the
 * build's range). */
static void fixture_start_range(server_fixture_t *f, uint16_t proto_min, uint16_t proto_max)
{
    memset(f, 0, sizeof *f);
    ems_pool_config_t pool_config = {
        .capacity = POOL_BYTES, .pages = EMS_PAGES_SMALL, .debug_name = "test_transfer",
    };
    CHECK_EQ(ems_pool_create(&f->pool, &pool_config), 0);

    snprintf(f->dir, sizeof f->dir, "/tmp/ems-test-transfer-XXXXXX");
    CHECK(mkdtemp(f->dir) != NULL);
    snprintf(f->unix_path, sizeof f->unix_path, "%s/ems.sock", f->dir);

    ems_server_config_t config = {
        .pool = &f->pool,
        .host = "127.0.0.1",
        .port = 0,
        .unix_path = f->unix_path,
        .secret = SECRET,
        .secret_len = SECRET_LEN,
        .node_id = NODE_ID,
        .max_payload = MAX_PAYLOAD,
        .max_connections = 64,
        .directory_capacity = 4096,
        .idle_timeout_ms = 0,
        .io_timeout_ms = CALL_TIMEOUT_MS,
        .proto_min = proto_min,
        .proto_max = proto_max,
    };
    CHECK_EQ(ems_server_start(&config, &f->server), 0);
    f->port = ems_server_port(f->server);
    CHECK(f->port != 0);
}

static void fixture_start(server_fixture_t *f)
{
    fixture_start_range(f, 0, 0);
}

static void fixture_stop(server_fixture_t *f)
{
    if (f->server)
        ems_server_stop(f->server);
    f->server = NULL;
    ems_pool_close(&f->pool);
    CHECK_EQ(rmdir(f->dir), 0);    /* the server removed its socket file */
}

static ems_conn_config_t tcp_config(const server_fixture_t *f, const char *tenant,
                                    uint16_t role)
{
    ems_conn_config_t config = {
        .host = "127.0.0.1",
        .port = f->port,
        .secret = SECRET,
        .secret_len = SECRET_LEN,
        .tenant = tenant,
        .role = role,
        .max_payload = MAX_PAYLOAD,
        .timeout_ms = CALL_TIMEOUT_MS,
    };
    return config;
}

static ems_conn_config_t local_config(const server_fixture_t *f, const char *tenant)
{
    ems_conn_config_t config = tcp_config(f, tenant, EMS_ROLE_CLIENT);
    config.host = NULL;
    config.port = 0;
    config.unix_path = f->unix_path;
    return config;
}

static ems_conn_t *open_or_fail(const ems_conn_config_t *config)
{
    char error[160];
    ems_conn_t *conn = NULL;
    int rc = ems_conn_open(config, &conn, error, sizeof error);
    if (rc != 0)
        fprintf(stderr, "ems_conn_open failed with %d: %s\n", rc, error);
    CHECK_EQ(rc, 0);
    CHECK(conn != NULL);
    CHECK(ems_conn_alive(conn));
    return conn;
}

/* ---- blocks ------------------------------------------------------------------------- */

/* Writes keys of ids first .. first + n - 1 back to back. */
static void make_keys(uint8_t *keys, uint64_t first, uint64_t n, uint64_t salt)
{
    for (uint64_t i = 0; i < n; i++)
        test_make_key(keys + i * EMS_KEY_BYTES, first + i, salt);
}

static uint8_t *payload_of(uint64_t id, uint64_t length)
{
    uint8_t *buf = malloc(length);
    CHECK(buf != NULL);
    test_fill_payload(buf, length, id);
    return buf;
}

static uint8_t *zeroed(uint64_t length)
{
    uint8_t *buf = calloc(1, length);
    CHECK(buf != NULL);
    return buf;
}

static uint64_t count_of(const char *json, const char *field)
{
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\":", field);
    const char *at = strstr(json, pattern);
    CHECK(at != NULL);
    return strtoull(at + strlen(pattern), NULL, 10);
}

static void test_block_round_trip(void)
{
    enum { N = 3, SALT = 0x1001 };
    server_fixture_t f;
    fixture_start(&f);
    ems_conn_config_t config = tcp_config(&f, "alpha", EMS_ROLE_CLIENT);
    ems_conn_t *conn = open_or_fail(&config);
    CHECK_EQ(ems_conn_version(conn), EMS_PROTO_VERSION_MAX);
    CHECK_EQ(ems_conn_ping(conn, CALL_TIMEOUT_MS), 0);

    /* Keys 0..2 are stored and key 3 never is. */
    uint8_t keys[(N + 1) * EMS_KEY_BYTES];
    make_keys(keys, 0, N + 1, SALT);
    const uint64_t lengths[N] = {1, 4096, 1u << 20};
    const void *srcs[N];
    void *dsts[N];
    for (int i = 0; i < N; i++) {
        srcs[i] = payload_of(100 + i, lengths[i]);
        dsts[i] = zeroed(lengths[i]);
    }

    int64_t results[N + 1];
    CHECK_EQ(ems_conn_put_many(conn, keys, N, srcs, lengths, results, CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N; i++)
        CHECK_EQ(results[i], 0);
    CHECK_EQ(ems_conn_put_many(conn, keys, N, srcs, lengths, results, CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N; i++)
        CHECK_EQ(results[i], 1);

    CHECK_EQ(ems_conn_get_many(conn, keys, N, dsts, lengths, results, CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(results[i], lengths[i]);
        CHECK(memcmp(dsts[i], srcs[i], lengths[i]) == 0);
    }

    /* One call mixing a hit, a never-stored key and a buffer of the wrong size. */
    uint8_t mixed[3 * EMS_KEY_BYTES];
    memcpy(mixed, keys + 0 * EMS_KEY_BYTES, EMS_KEY_BYTES);
    memcpy(mixed + EMS_KEY_BYTES, keys + 3 * EMS_KEY_BYTES, EMS_KEY_BYTES);
    memcpy(mixed + 2 * EMS_KEY_BYTES, keys + 1 * EMS_KEY_BYTES, EMS_KEY_BYTES);
    const uint64_t mixed_lengths[3] = {1, 64, 4095};
    uint8_t first_byte = 0, *missing = zeroed(64), *short_buf = zeroed(4095);
    void *mixed_dsts[3] = {&first_byte, missing, short_buf};
    CHECK_EQ(ems_conn_get_many(conn, mixed, 3, mixed_dsts, mixed_lengths, results,
                               CALL_TIMEOUT_MS), 0);
    CHECK_EQ(results[0], 1);
    CHECK_EQ(first_byte, ((const uint8_t *)srcs[0])[0]);
    CHECK_EQ(results[1], -ENOENT);
    CHECK_EQ(results[2], -EMSGSIZE);

    /* The server counts a GET only after sending its response. The ping's response
     * comes after the connection's thread has finished the GET, so the counts are whole. */
    CHECK_EQ(ems_conn_ping(conn, CALL_TIMEOUT_MS), 0);
    ems_server_stats_t stats;
    ems_server_stats(f.server, &stats);
    CHECK_EQ(stats.puts, 2 * N);
    CHECK_EQ(stats.put_stored, N);
    CHECK_EQ(stats.gets, N + 3);
    CHECK_EQ(stats.get_hits, N + 1);
    CHECK_EQ(stats.get_misses, 2);
    CHECK_EQ(stats.connections_open, 1);
    CHECK_EQ(stats.auth_failures, 0);

    /* The announce queue contains the tenant's stored keys of the N committed blocks. */
    uint8_t salt[32], stored[N * EMS_KEY_BYTES], announced[16 * EMS_KEY_BYTES];
    ems_tenant_salt("alpha", 5, salt);
    ems_tenant_keys(salt, keys, N, stored);
    uint64_t dropped = 99;
    CHECK_EQ(ems_server_take_new_keys(f.server, announced, 16, &dropped), N);
    CHECK_EQ(dropped, 0);
    CHECK(memcmp(announced, stored, sizeof stored) == 0);
    CHECK_EQ(ems_server_take_new_keys(f.server, announced, 16, &dropped), 0);

    /* exists, match_prefix and delete. */
    uint8_t present[N + 1];
    CHECK_EQ(ems_conn_exists_many(conn, keys, N + 1, present, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(present[0], 1);
    CHECK_EQ(present[1], 1);
    CHECK_EQ(present[2], 1);
    CHECK_EQ(present[3], 0);

    uint64_t count = 99;
    CHECK_EQ(ems_conn_match_prefix(conn, keys, N + 1, &count, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(count, N);
    uint8_t gap[3 * EMS_KEY_BYTES];   /* keys 0, 3, 1: the prefix ends at key 3 */
    memcpy(gap, mixed, 2 * EMS_KEY_BYTES);
    memcpy(gap + 2 * EMS_KEY_BYTES, keys + EMS_KEY_BYTES, EMS_KEY_BYTES);
    CHECK_EQ(ems_conn_match_prefix(conn, gap, 3, &count, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(count, 1);

    uint8_t doomed[2 * EMS_KEY_BYTES];   /* key 1, then the never-stored key 3 */
    memcpy(doomed, keys + EMS_KEY_BYTES, EMS_KEY_BYTES);
    memcpy(doomed + EMS_KEY_BYTES, keys + 3 * EMS_KEY_BYTES, EMS_KEY_BYTES);
    CHECK_EQ(ems_conn_delete_many(conn, doomed, 2, results, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(results[0], 0);
    CHECK_EQ(results[1], -ENOENT);
    CHECK_EQ(ems_conn_exists_many(conn, keys, N, present, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(present[0], 1);
    CHECK_EQ(present[1], 0);
    CHECK_EQ(present[2], 1);
    CHECK_EQ(ems_conn_match_prefix(conn, keys, N, &count, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(count, 1);

    char json[4096];
    CHECK_EQ(ems_conn_stats(conn, json, sizeof json, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(count_of(json, "node_id"), NODE_ID);
    CHECK_EQ(count_of(json, "blocks"), N - 1);
    CHECK_EQ(count_of(json, "remote_puts"), 2 * N);

    /* Nothing above is an error the server logs. */
    char log[1024];
    size_t log_len = ems_server_take_log(f.server, log, sizeof log - 1);
    log[log_len] = 0;
    if (log_len)
        fprintf(stderr, "unexpected server log:\n%s", log);
    CHECK_EQ(log_len, 0);

    ems_conn_close(conn);
    for (int i = 0; i < N; i++) {
        free((void *)srcs[i]);
        free(dsts[i]);
    }
    free(missing);
    free(short_buf);
    fixture_stop(&f);
}

/* ---- directory ---------------------------------------------------------------------- */

static void check_holders(const uint32_t *holders, uint64_t n, uint32_t expected)
{
    for (uint64_t i = 0; i < n; i++)
        CHECK_EQ(holders[i], expected);
}

static void test_directory_roles(void)
{
    enum { N = 4, SALT = 0x2002 };
    server_fixture_t f;
    fixture_start(&f);
    ems_conn_config_t node_config = tcp_config(&f, "node-1", EMS_ROLE_NODE);
    ems_conn_config_t alpha_config = tcp_config(&f, "alpha", EMS_ROLE_CLIENT);
    ems_conn_config_t beta_config = tcp_config(&f, "beta", EMS_ROLE_CLIENT);
    ems_conn_t *node = open_or_fail(&node_config);
    ems_conn_t *alpha = open_or_fail(&alpha_config);
    ems_conn_t *beta = open_or_fail(&beta_config);

    /* Keys 0..N-1 are registered under holder 3 by their stored keys for tenant alpha,
     * and key N is not registered. */
    uint8_t keys[(N + 1) * EMS_KEY_BYTES], stored[(N + 1) * EMS_KEY_BYTES], salt[32];
    make_keys(keys, 0, N + 1, SALT);
    ems_tenant_salt("alpha", 5, salt);
    ems_tenant_keys(salt, keys, N + 1, stored);
    CHECK_EQ(ems_conn_dir_register(node, stored, N, 3, CALL_TIMEOUT_MS), 0);

    /* A client looks up its own keys: the server applies the tenant. */
    uint32_t holders[N + 1];
    CHECK_EQ(ems_conn_dir_lookup(alpha, keys, N + 1, holders, CALL_TIMEOUT_MS), 0);
    check_holders(holders, N, 3);
    CHECK_EQ(holders[N], EMS_HOLDER_NONE);

    /* Another tenant's stored keys differ, so the same raw keys are unknown. */
    CHECK_EQ(ems_conn_dir_lookup(beta, keys, N + 1, holders, CALL_TIMEOUT_MS), 0);
    check_holders(holders, N + 1, EMS_HOLDER_NONE);

    /* A node looks up stored keys as sent, and so does the daemon's direct call. */
    CHECK_EQ(ems_conn_dir_lookup(node, stored, N + 1, holders, CALL_TIMEOUT_MS), 0);
    check_holders(holders, N, 3);
    CHECK_EQ(holders[N], EMS_HOLDER_NONE);
    ems_server_dir_lookup(f.server, stored, N + 1, holders);
    check_holders(holders, N, 3);
    CHECK_EQ(holders[N], EMS_HOLDER_NONE);

    ems_server_stats_t stats;
    ems_server_stats(f.server, &stats);
    CHECK_EQ(stats.dir_entries, N);
    CHECK_EQ(stats.dir_registered, N);

    /* Forgetting holder 3 drops all of its entries. A direct registration is then
     * visible to the client. */
    CHECK_EQ(ems_server_dir_forget(f.server, 3), N);
    CHECK_EQ(ems_conn_dir_lookup(alpha, keys, N, holders, CALL_TIMEOUT_MS), 0);
    check_holders(holders, N, EMS_HOLDER_NONE);
    CHECK_EQ(ems_server_dir_register(f.server, stored + EMS_KEY_BYTES, 1, 9), 1);
    CHECK_EQ(ems_conn_dir_lookup(alpha, keys, 2, holders, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(holders[0], EMS_HOLDER_NONE);
    CHECK_EQ(holders[1], 9);

    /* Registration needs the node role, and blocks need the client role. Both refusals
     * close the connection. */
    CHECK_EQ(ems_conn_dir_register(alpha, stored, 1, 3, CALL_TIMEOUT_MS), -EACCES);
    CHECK(!ems_conn_alive(alpha));
    CHECK_EQ(ems_conn_ping(alpha, CALL_TIMEOUT_MS), -ENOTCONN);

    uint8_t byte = 42;
    const void *srcs[1] = {&byte};
    const uint64_t length = 1;
    int64_t result = 99;
    CHECK_EQ(ems_conn_put_many(node, keys, 1, srcs, &length, &result, CALL_TIMEOUT_MS),
             -EINVAL);
    CHECK(!ems_conn_alive(node));
    ems_server_dir_lookup(f.server, stored, 1, holders);
    CHECK_EQ(holders[0], EMS_HOLDER_NONE);

    char log[4096];
    size_t log_len = ems_server_take_log(f.server, log, sizeof log - 1);
    log[log_len] = 0;
    CHECK(strstr(log, "directory registration needs the node role") != NULL);
    CHECK(strstr(log, "block operation on a node connection") != NULL);

    ems_conn_close(node);
    ems_conn_close(alpha);
    ems_conn_close(beta);
    fixture_stop(&f);
}

/* ---- authentication ----------------------------------------------------------------- */

static void test_auth_rejects_bad_secret(void)
{
    server_fixture_t f;
    fixture_start(&f);
    char error[160];
    ems_conn_t *conn = NULL;

    static const uint8_t wrong[] = "not the cluster secret";
    ems_conn_config_t config = tcp_config(&f, "alpha", EMS_ROLE_CLIENT);
    config.secret = wrong;
    config.secret_len = sizeof wrong - 1;
    CHECK_EQ(ems_conn_open(&config, &conn, error, sizeof error), -EACCES);
    CHECK(conn == NULL);
    CHECK(strstr(error, "wrong cluster secret") != NULL);

    ems_server_stats_t stats;
    ems_server_stats(f.server, &stats);
    CHECK_EQ(stats.auth_failures, 1);
    CHECK_EQ(stats.err_unauthenticated, 1);   /* the refusal is an error response */
    CHECK_EQ(stats.errors, 1);
    CHECK_EQ(stats.err_bad_request, 0);
    char log[4096];
    size_t log_len = ems_server_take_log(f.server, log, sizeof log - 1);
    log[log_len] = 0;
    CHECK(strstr(log, "authentication failed") != NULL);

    /* A secret one byte short is wrong too. */
    config.secret = SECRET;
    config.secret_len = SECRET_LEN - 1;
    CHECK_EQ(ems_conn_open(&config, &conn, error, sizeof error), -EACCES);
    ems_server_stats(f.server, &stats);
    CHECK_EQ(stats.auth_failures, 2);
    CHECK_EQ(stats.err_unauthenticated, 2);

    /* Without a secret the client gives up after HELLO and sends no proof, so the server
     * counts no failure. */
    config.secret = NULL;
    config.secret_len = 0;
    CHECK_EQ(ems_conn_open(&config, &conn, error, sizeof error), -EACCES);
    CHECK(conn == NULL);
    CHECK(strstr(error, "requires the cluster secret") != NULL);
    ems_server_stats(f.server, &stats);
    CHECK_EQ(stats.auth_failures, 2);

    /* The right secret still works, for both roles. */
    config = tcp_config(&f, "alpha", EMS_ROLE_CLIENT);
    conn = open_or_fail(&config);
    CHECK_EQ(ems_conn_ping(conn, CALL_TIMEOUT_MS), 0);
    ems_conn_close(conn);
    config.role = EMS_ROLE_NODE;
    conn = open_or_fail(&config);
    CHECK_EQ(ems_conn_ping(conn, CALL_TIMEOUT_MS), 0);
    ems_conn_close(conn);

    fixture_stop(&f);
}

/* ---- tenants ------------------------------------------------------------------------ */

static void get_one(ems_conn_t *conn, const uint8_t *key, uint8_t *dst, uint64_t length,
                    int64_t *result)
{
    void *dsts[1] = {dst};
    CHECK_EQ(ems_conn_get_many(conn, key, 1, dsts, &length, result, CALL_TIMEOUT_MS), 0);
}

static void put_one(ems_conn_t *conn, const uint8_t *key, const uint8_t *src,
                    uint64_t length, int64_t *result)
{
    const void *srcs[1] = {src};
    CHECK_EQ(ems_conn_put_many(conn, key, 1, srcs, &length, result, CALL_TIMEOUT_MS), 0);
}

static void test_tenant_isolation(void)
{
    enum { LENGTH = 4096 };
    server_fixture_t f;
    fixture_start(&f);
    ems_conn_config_t config_a = tcp_config(&f, "a", EMS_ROLE_CLIENT);
    ems_conn_config_t config_b = tcp_config(&f, "b", EMS_ROLE_CLIENT);
    ems_conn_t *a = open_or_fail(&config_a);
    ems_conn_t *b = open_or_fail(&config_b);

    uint8_t key[EMS_KEY_BYTES];
    test_make_key(key, 1, 0x3003);
    uint8_t *block_a = payload_of(1, LENGTH), *block_b = payload_of(2, LENGTH);
    uint8_t *dst = zeroed(LENGTH);
    int64_t result;

    put_one(a, key, block_a, LENGTH, &result);
    CHECK_EQ(result, 0);

    /* Tenant b can neither read nor probe a's block. */
    get_one(b, key, dst, LENGTH, &result);
    CHECK_EQ(result, -ENOENT);
    uint8_t present = 9;
    CHECK_EQ(ems_conn_exists_many(b, key, 1, &present, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(present, 0);
    uint64_t count = 9;
    CHECK_EQ(ems_conn_match_prefix(b, key, 1, &count, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(count, 0);
    CHECK_EQ(ems_conn_delete_many(b, key, 1, &result, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(result, -ENOENT);

    /* The same raw key is a separate block for b: stored, not "already stored". */
    put_one(b, key, block_b, LENGTH, &result);
    CHECK_EQ(result, 0);
    get_one(a, key, dst, LENGTH, &result);
    CHECK_EQ(result, LENGTH);
    CHECK(memcmp(dst, block_a, LENGTH) == 0);
    get_one(b, key, dst, LENGTH, &result);
    CHECK_EQ(result, LENGTH);
    CHECK(memcmp(dst, block_b, LENGTH) == 0);

    /* Deleting b's block leaves a's. */
    CHECK_EQ(ems_conn_delete_many(b, key, 1, &result, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(result, 0);
    get_one(b, key, dst, LENGTH, &result);
    CHECK_EQ(result, -ENOENT);
    get_one(a, key, dst, LENGTH, &result);
    CHECK_EQ(result, LENGTH);
    CHECK(memcmp(dst, block_a, LENGTH) == 0);

    ems_conn_close(a);
    ems_conn_close(b);
    free(block_a);
    free(block_b);
    free(dst);
    fixture_stop(&f);
}

/* ---- local socket ------------------------------------------------------------------- */

static void test_local_put_visible_over_tcp(void)
{
    enum { N = 3, SALT = 0x4004 };
    server_fixture_t f;
    fixture_start(&f);
    ems_conn_config_t config = local_config(&f, "alpha");
    ems_conn_t *local = open_or_fail(&config);

    int fd = -1;
    CHECK_EQ(ems_conn_local_attach(local, &fd, CALL_TIMEOUT_MS), 0);
    CHECK(fd >= 0);
    struct stat st;
    CHECK_EQ(fstat(fd, &st), 0);
    CHECK(st.st_size >= (off_t)POOL_BYTES);
    uint64_t map_size = (uint64_t)st.st_size;
    uint8_t *base = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(base != MAP_FAILED);

    uint8_t keys[N * EMS_KEY_BYTES];
    make_keys(keys, 0, N, SALT);
    const uint64_t lengths[N] = {1, 4096, 200000};
    const void *srcs[N];
    void *dsts[N];
    for (int i = 0; i < N; i++) {
        srcs[i] = payload_of(400 + i, lengths[i]);
        dsts[i] = zeroed(lengths[i]);
    }
    int64_t results[N];
    CHECK_EQ(ems_conn_local_put_many(local, base, map_size, keys, N, srcs, lengths, results,
                                     CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N; i++)
        CHECK_EQ(results[i], 0);
    CHECK_EQ(ems_conn_local_put_many(local, base, map_size, keys, N, srcs, lengths, results,
                                     CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N; i++)
        CHECK_EQ(results[i], 1);

    /* A TCP client of the same tenant reads the blocks the local client wrote. */
    ems_conn_config_t tcp = tcp_config(&f, "alpha", EMS_ROLE_CLIENT);
    ems_conn_t *remote = open_or_fail(&tcp);
    CHECK_EQ(ems_conn_get_many(remote, keys, N, dsts, lengths, results, CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(results[i], lengths[i]);
        CHECK(memcmp(dsts[i], srcs[i], lengths[i]) == 0);
    }

    /* Local operations are refused on TCP, in the client before anything is sent. */
    int other_fd = -1;
    CHECK_EQ(ems_conn_local_attach(remote, &other_fd, CALL_TIMEOUT_MS), -EINVAL);
    CHECK_EQ(ems_conn_local_put_many(remote, base, map_size, keys, 1, srcs, lengths,
                                     results, CALL_TIMEOUT_MS), -EINVAL);
    CHECK(ems_conn_alive(remote));

    ems_server_stats_t stats;
    ems_server_stats(f.server, &stats);
    CHECK_EQ(stats.local_puts, 2 * N);

    ems_conn_close(remote);
    ems_conn_close(local);
    CHECK_EQ(munmap(base, map_size), 0);
    CHECK_EQ(close(fd), 0);
    for (int i = 0; i < N; i++) {
        free((void *)srcs[i]);
        free(dsts[i]);
    }
    fixture_stop(&f);
}

/* ---- concurrency -------------------------------------------------------------------- */

/* Four client threads, each on its own connection of one tenant, put, get, query and
 * delete overlapping keys while a monitor thread reads the server's statistics, log,
 * announce queue and directory. Stable keys are never deleted. So once any thread has
 * seen one stored, every later get of it must hit. Churn keys are deleted at random. */
enum {
    NWORKERS = 4,
    NSTABLE = 48,
    NCHURN = 16,
    NKEYS = NSTABLE + NCHURN,
    MAX_BATCH = 4,
    RACE_SALT = 0x5005,
    MONITOR_HOLDER = 1,
};

typedef struct race {
    server_fixture_t *fixture;
    uint8_t keys[NKEYS][EMS_KEY_BYTES];
    uint8_t stored[NKEYS][EMS_KEY_BYTES];   /* the tenant's stored keys */
    uint8_t *payload[NKEYS];
    uint64_t length[NKEYS];
    _Atomic int seen_stored[NSTABLE];       /* set once a thread saw the key committed */
    long ops;
    _Atomic int workers_done;
} race_t;

typedef struct worker {
    race_t *race;
    uint64_t seed;
    pthread_t thread;
    uint64_t gets, get_hits, puts, put_stored, deletes;
    uint64_t calls[EMS_OP_LAST + 1];   /* requests sent, by opcode */
} worker_t;

/* Sizes in four slab classes, varied so that lengths differ within a class. */
static uint64_t race_length(uint64_t id)
{
    static const uint64_t sizes[] = {512, 4096, 20000, 65536};
    return sizes[id % 4] - (id * 37) % 256;
}

static void check_hit(const race_t *race, uint64_t id, const uint8_t *buf, int64_t result)
{
    CHECK_EQ(result, race->length[id]);
    if (memcmp(buf, race->payload[id], race->length[id]) != 0)
        fprintf(stderr, "block of key %llu differs from its payload\n", (unsigned long long)id);
    CHECK(memcmp(buf, race->payload[id], race->length[id]) == 0);
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    race_t *race = w->race;
    ems_conn_config_t config = tcp_config(race->fixture, "shared", EMS_ROLE_CLIENT);
    ems_conn_t *conn = open_or_fail(&config);
    uint8_t *bufs[MAX_BATCH];
    for (int i = 0; i < MAX_BATCH; i++)
        bufs[i] = zeroed(65536);
    uint64_t rng = w->seed;

    for (long op = 0; op < race->ops; op++) {
        /* A batch of distinct keys: an odd stride over a power-of-two key count. */
        uint64_t r = test_next_random(&rng);
        uint64_t n = 1 + r % MAX_BATCH;
        uint64_t first = (r >> 8) % NKEYS, stride = 2 * ((r >> 16) % 8) + 1;
        uint64_t ids[MAX_BATCH], lengths[MAX_BATCH];
        uint8_t keys[MAX_BATCH * EMS_KEY_BYTES];
        int known[MAX_BATCH];
        for (uint64_t i = 0; i < n; i++) {
            ids[i] = (first + i * stride) % NKEYS;
            lengths[i] = race->length[ids[i]];
            memcpy(keys + i * EMS_KEY_BYTES, race->keys[ids[i]], EMS_KEY_BYTES);
            /* Read before the request: a key seen stored earlier must be found. */
            known[i] = ids[i] < NSTABLE && atomic_load(&race->seen_stored[ids[i]]);
        }
        int64_t results[MAX_BATCH];
        uint64_t kind = (r >> 24) % 10;

        if (kind < 3) {
            const void *srcs[MAX_BATCH];
            for (uint64_t i = 0; i < n; i++)
                srcs[i] = race->payload[ids[i]];
            CHECK_EQ(ems_conn_put_many(conn, keys, n, srcs, lengths, results, CALL_TIMEOUT_MS),
                     0);
            w->calls[EMS_OP_PUT]++;
            for (uint64_t i = 0; i < n; i++) {
                CHECK(results[i] == 0 || results[i] == 1);
                if (ids[i] < NSTABLE)
                    atomic_store(&race->seen_stored[ids[i]], 1);
                w->put_stored += results[i] == 0;
            }
            w->puts += n;
        } else if (kind < 7) {
            void *dsts[MAX_BATCH];
            for (uint64_t i = 0; i < n; i++) {
                dsts[i] = bufs[i];
                memset(bufs[i], 0, lengths[i]);
            }
            CHECK_EQ(ems_conn_get_many(conn, keys, n, dsts, lengths, results, CALL_TIMEOUT_MS),
                     0);
            w->calls[EMS_OP_GET]++;
            for (uint64_t i = 0; i < n; i++) {
                if (results[i] == -ENOENT) {
                    CHECK(!known[i]);
                    continue;
                }
                check_hit(race, ids[i], bufs[i], results[i]);
                w->get_hits++;
            }
            w->gets += n;
        } else if (kind < 8) {
            uint8_t present[MAX_BATCH];
            CHECK_EQ(ems_conn_exists_many(conn, keys, n, present, CALL_TIMEOUT_MS), 0);
            w->calls[EMS_OP_EXISTS]++;
            for (uint64_t i = 0; i < n; i++) {
                CHECK(present[i] <= 1);
                CHECK(present[i] || !known[i]);
            }
        } else if (kind < 9) {
            /* Delete the churn keys of the batch only. */
            uint8_t churn[MAX_BATCH * EMS_KEY_BYTES];
            uint64_t m = 0;
            for (uint64_t i = 0; i < n; i++)
                if (ids[i] >= NSTABLE)
                    memcpy(churn + m++ * EMS_KEY_BYTES, keys + i * EMS_KEY_BYTES, EMS_KEY_BYTES);
            if (m == 0)
                continue;
            CHECK_EQ(ems_conn_delete_many(conn, churn, m, results, CALL_TIMEOUT_MS), 0);
            w->calls[EMS_OP_DELETE]++;
            for (uint64_t i = 0; i < m; i++)
                CHECK(results[i] == 0 || results[i] == -ENOENT);
            w->deletes += m;
        } else {
            uint32_t holders[MAX_BATCH];
            CHECK_EQ(ems_conn_dir_lookup(conn, keys, n, holders, CALL_TIMEOUT_MS), 0);
            w->calls[EMS_OP_DIR_LOOKUP]++;
            for (uint64_t i = 0; i < n; i++)
                CHECK(holders[i] == EMS_HOLDER_NONE || holders[i] == MONITOR_HOLDER);
        }
    }

    ems_conn_close(conn);
    for (int i = 0; i < MAX_BATCH; i++)
        free(bufs[i]);
    atomic_fetch_add(&race->workers_done, 1);
    return NULL;
}

static int is_stored_key(const race_t *race, const uint8_t *key)
{
    for (int i = 0; i < NKEYS; i++)
        if (memcmp(race->stored[i], key, EMS_KEY_BYTES) == 0)
            return 1;
    return 0;
}

/* Acts as the daemon: polls statistics and the log, announces committed keys to the
 * directory under MONITOR_HOLDER, and checks what the directory returns. */
static void *monitor_main(void *arg)
{
    race_t *race = arg;
    ems_server_t *server = race->fixture->server;
    uint8_t announced[32 * EMS_KEY_BYTES];
    uint32_t holders[NKEYS];
    char log[4096];
    uint64_t rounds = 0;

    while (atomic_load(&race->workers_done) < NWORKERS) {
        ems_server_stats_t stats;
        ems_server_stats(server, &stats);
        CHECK(stats.get_hits <= stats.gets);
        CHECK(stats.put_stored <= stats.puts);
        CHECK(stats.connections_open <= NWORKERS);

        /* Nothing the workers do is an error the server logs. */
        size_t log_len = ems_server_take_log(server, log, sizeof log - 1);
        log[log_len] = 0;
        if (log_len)
            fprintf(stderr, "unexpected server log:\n%s", log);
        CHECK_EQ(log_len, 0);

        uint64_t dropped = 99;
        uint64_t n = ems_server_take_new_keys(server, announced, 32, &dropped);
        CHECK_EQ(dropped, 0);
        for (uint64_t i = 0; i < n; i++)
            CHECK(is_stored_key(race, announced + i * EMS_KEY_BYTES));
        CHECK_EQ(ems_server_dir_register(server, announced, n, MONITOR_HOLDER), n);
        ems_server_dir_lookup(server, announced, n, holders);
        check_holders(holders, n, MONITOR_HOLDER);

        ems_server_dir_lookup(server, &race->stored[0][0], NKEYS, holders);
        for (int i = 0; i < NKEYS; i++)
            CHECK(holders[i] == EMS_HOLDER_NONE || holders[i] == MONITOR_HOLDER);
        if (++rounds % 16 == 0)
            ems_server_dir_forget(server, MONITOR_HOLDER);

        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    return NULL;
}

static void wait_for_no_connections(ems_server_t *server)
{
    uint64_t give_up = ems_now_ms() + CALL_TIMEOUT_MS;
    for (;;) {
        ems_server_stats_t stats;
        ems_server_stats(server, &stats);
        if (stats.connections_open == 0)
            return;
        CHECK(ems_now_ms() < give_up);
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
}

static void test_concurrent_clients(long ops)
{
    server_fixture_t f;
    fixture_start(&f);
    race_t *race = calloc(1, sizeof *race);
    CHECK(race != NULL);
    race->fixture = &f;
    race->ops = ops;
    uint8_t salt[32];
    ems_tenant_salt("shared", 6, salt);
    for (int i = 0; i < NKEYS; i++) {
        test_make_key(race->keys[i], (uint64_t)i, RACE_SALT);
        race->length[i] = race_length((uint64_t)i);
        race->payload[i] = payload_of(1000 + (uint64_t)i, race->length[i]);
    }
    ems_tenant_keys(salt, &race->keys[0][0], NKEYS, &race->stored[0][0]);

    worker_t workers[NWORKERS];
    memset(workers, 0, sizeof workers);
    pthread_t monitor;
    CHECK_EQ(pthread_create(&monitor, NULL, monitor_main, race), 0);
    for (int i = 0; i < NWORKERS; i++) {
        workers[i].race = race;
        workers[i].seed = 0xabc0 + (uint64_t)i;
        CHECK_EQ(pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]), 0);
    }
    for (int i = 0; i < NWORKERS; i++)
        CHECK_EQ(pthread_join(workers[i].thread, NULL), 0);
    CHECK_EQ(pthread_join(monitor, NULL), 0);

    /* The server counted exactly the keys the clients sent and the hits they got. Its
     * GET counters move after the response is sent, so wait for every connection
     * thread to finish first. */
    wait_for_no_connections(f.server);
    uint64_t gets = 0, get_hits = 0, puts = 0, put_stored = 0;
    for (int i = 0; i < NWORKERS; i++) {
        gets += workers[i].gets;
        get_hits += workers[i].get_hits;
        puts += workers[i].puts;
        put_stored += workers[i].put_stored;
    }
    ems_server_stats_t stats;
    ems_server_stats(f.server, &stats);
    CHECK_EQ(stats.gets, gets);
    CHECK_EQ(stats.get_hits, get_hits);
    CHECK_EQ(stats.puts, puts);
    CHECK_EQ(stats.put_stored, put_stored);
    CHECK_EQ(stats.auth_failures, 0);
    CHECK_EQ(stats.bad_frames, 0);
    CHECK_EQ(stats.errors, 0);
    CHECK(get_hits > 0);
    CHECK(put_stored >= NSTABLE / 2);

    /* Each request was timed once, under its own opcode: every worker connected once
     * (HELLO, AUTH), and the histograms count exactly the calls the workers made. */
    for (uint16_t op = EMS_OP_PING; op <= EMS_OP_LAST; op++) {
        uint64_t calls = 0;
        for (int i = 0; i < NWORKERS; i++)
            calls += workers[i].calls[op];
        if (op == EMS_OP_HELLO || op == EMS_OP_AUTH)
            calls = NWORKERS;
        ems_latency_snapshot_t latency;
        CHECK_EQ(ems_server_latency(f.server, op, &latency), 0);
        uint64_t timed = 0;
        for (int b = 0; b <= EMS_LATENCY_BOUNDS; b++)
            timed += latency.counts[b];
        if (timed != calls)
            fprintf(stderr, "opcode %u: %llu requests timed, %llu sent\n", op,
                    (unsigned long long)timed, (unsigned long long)calls);
        CHECK_EQ(timed, calls);
        CHECK(calls == 0 || latency.sum_ns > 0);
    }
    ems_latency_snapshot_t none;
    CHECK_EQ(ems_server_latency(f.server, 0, &none), -EINVAL);
    CHECK_EQ(ems_server_latency(f.server, EMS_OP_LAST + 1, &none), -EINVAL);
    CHECK_EQ(none.sum_ns, 0);

    /* The "must hit" rule above holds only because nothing was evicted. */
    ems_pool_stats_t pool_stats;
    ems_pool_stats(&f.pool, &pool_stats, NULL, 0);
    CHECK_EQ(pool_stats.evictions, 0);

    for (int i = 0; i < NKEYS; i++)
        free(race->payload[i]);
    free(race);
    fixture_stop(&f);
}

/* ---- stopping a server under open connections --------------------------------------- */

typedef struct pinger {
    ems_conn_t *conn;
    _Atomic int started;
    int last_rc;
} pinger_t;

/* Pings until a call fails, as a client in the middle of its work when the server stops. */
static void *pinger_main(void *arg)
{
    pinger_t *p = arg;
    uint64_t give_up = ems_now_ms() + 3 * CALL_TIMEOUT_MS;
    int rc;
    do {
        rc = ems_conn_ping(p->conn, CALL_TIMEOUT_MS);
        atomic_store(&p->started, 1);
        CHECK(ems_now_ms() < give_up);
    } while (rc == 0);
    p->last_rc = rc;
    return NULL;
}

static void test_stop_with_open_connections(void)
{
    enum { LENGTH = 4096 };
    server_fixture_t f;
    fixture_start(&f);
    ems_conn_config_t tcp = tcp_config(&f, "alpha", EMS_ROLE_CLIENT);
    ems_conn_config_t local = local_config(&f, "alpha");
    ems_conn_t *conns[3] = {open_or_fail(&tcp), open_or_fail(&tcp), open_or_fail(&local)};
    for (int i = 0; i < 3; i++)
        CHECK_EQ(ems_conn_ping(conns[i], CALL_TIMEOUT_MS), 0);

    /* A fourth connection keeps sending requests while the server stops. */
    pinger_t pinger = {.conn = open_or_fail(&tcp)};
    pthread_t thread;
    CHECK_EQ(pthread_create(&thread, NULL, pinger_main, &pinger), 0);
    while (!atomic_load(&pinger.started)) {
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }

    uint64_t start = ems_now_ms();
    ems_server_stop(f.server);
    f.server = NULL;
    uint64_t stop_ms = ems_now_ms() - start;
    if (stop_ms >= CALL_TIMEOUT_MS)
        fprintf(stderr, "ems_server_stop took %llu ms\n", (unsigned long long)stop_ms);
    CHECK(stop_ms < CALL_TIMEOUT_MS);
    CHECK_EQ(pthread_join(thread, NULL), 0);
    CHECK(pinger.last_rc < 0);

    /* Every call fails at once with a transport error, well before its deadline. */
    uint8_t key[EMS_KEY_BYTES];
    test_make_key(key, 1, 0x6006);
    uint8_t *block = zeroed(LENGTH);
    int64_t result = 99;
    uint64_t length = LENGTH;
    void *dsts[1] = {block};
    const void *srcs[1] = {block};
    uint8_t present;
    for (int i = 0; i < 3; i++) {
        uint64_t begin = ems_now_ms();
        int rc;
        if (i == 0)
            rc = ems_conn_get_many(conns[i], key, 1, dsts, &length, &result, CALL_TIMEOUT_MS);
        else if (i == 1)
            rc = ems_conn_put_many(conns[i], key, 1, srcs, &length, &result, CALL_TIMEOUT_MS);
        else
            rc = ems_conn_exists_many(conns[i], key, 1, &present, CALL_TIMEOUT_MS);
        uint64_t took = ems_now_ms() - begin;
        if (rc >= 0 || rc == -ETIMEDOUT || took >= CALL_TIMEOUT_MS / 2)
            fprintf(stderr, "connection %d: call returned %d after %llu ms\n", i, rc,
                    (unsigned long long)took);
        CHECK(rc < 0);
        CHECK(rc != -ETIMEDOUT);
        CHECK(took < CALL_TIMEOUT_MS / 2);
        CHECK(!ems_conn_alive(conns[i]));
        CHECK_EQ(ems_conn_ping(conns[i], CALL_TIMEOUT_MS), -ENOTCONN);
    }

    /* Nothing listens any more, on either socket. */
    ems_conn_t *late = NULL;
    CHECK_EQ(ems_conn_open(&tcp, &late, NULL, 0), -ECONNREFUSED);
    CHECK_EQ(ems_conn_open(&local, &late, NULL, 0), -ENOENT);
    CHECK(late == NULL);

    for (int i = 0; i < 3; i++)
        ems_conn_close(conns[i]);
    ems_conn_close(pinger.conn);
    free(block);
    fixture_stop(&f);
}

/* ---- miss handler: a lower tier behind the pool ------------------------------------- */

/* A C lower tier: NTIER blocks by stored key of tenant "miss", contents a function of the
 * key id. LOAD puts a found block into the pool, PROBE and PREFETCH only report it. Each
 * handler ctx records its calls. A ctx is retired once ems_server_set_miss_handler has
 * replaced it, and a call that runs on a retired ctx fails the test. */
enum { NTIER = 32, TIER_SALT = 0x8008, MAX_RECORDED = 16 };

typedef struct tier {
    ems_pool_t *pool;
    uint8_t keys[NTIER][EMS_KEY_BYTES];     /* raw keys, as clients send them */
    uint8_t stored[NTIER][EMS_KEY_BYTES];   /* the tenant's stored keys */
    uint64_t length[NTIER];
    uint8_t *payload[NTIER];
} tier_t;

typedef struct tier_ctx {
    tier_t *tier;
    _Atomic int retired;
    _Atomic int active;                     /* calls running now */
    _Atomic uint64_t calls, keys, found;
    _Atomic uint64_t sleep_ms;              /* each call sleeps this long first */
    _Atomic int entered;
    const _Atomic int *stopped;             /* set once ems_server_stop returned */
    pthread_mutex_t lock;                   /* guards the last call's record */
    int last_mode;
    uint64_t last_n;
    uint8_t last_keys[MAX_RECORDED][EMS_KEY_BYTES];
} tier_ctx_t;

static uint64_t tier_length(uint64_t id)
{
    return 1000 + id * 97;
}

static void tier_init(tier_t *tier, ems_pool_t *pool)
{
    memset(tier, 0, sizeof *tier);
    tier->pool = pool;
    uint8_t salt[32];
    ems_tenant_salt("miss", 4, salt);
    for (int i = 0; i < NTIER; i++) {
        test_make_key(tier->keys[i], (uint64_t)i, TIER_SALT);
        tier->length[i] = tier_length((uint64_t)i);
        tier->payload[i] = payload_of(2000 + (uint64_t)i, tier->length[i]);
    }
    ems_tenant_keys(salt, &tier->keys[0][0], NTIER, &tier->stored[0][0]);
}

static void tier_free(tier_t *tier)
{
    for (int i = 0; i < NTIER; i++)
        free(tier->payload[i]);
}

static void tier_ctx_init(tier_ctx_t *ctx, tier_t *tier)
{
    memset(ctx, 0, sizeof *ctx);
    ctx->tier = tier;
    pthread_mutex_init(&ctx->lock, NULL);
}

static int tier_find(const tier_t *tier, const uint8_t *stored)
{
    for (int i = 0; i < NTIER; i++)
        if (memcmp(tier->stored[i], stored, EMS_KEY_BYTES) == 0)
            return i;
    return -1;
}

static void tier_handler(void *arg, int mode, const uint8_t *keys, uint64_t n, uint8_t *found)
{
    tier_ctx_t *ctx = arg;
    CHECK(!atomic_load(&ctx->retired));
    CHECK(!ctx->stopped || !atomic_load(ctx->stopped));
    CHECK(mode == EMS_MISS_LOAD || mode == EMS_MISS_PROBE || mode == EMS_MISS_PREFETCH ||
          mode == EMS_MISS_DELETE);
    CHECK(n > 0);
    atomic_fetch_add(&ctx->active, 1);
    atomic_store(&ctx->entered, 1);
    uint64_t sleep_ms = atomic_load(&ctx->sleep_ms);
    if (sleep_ms) {
        struct timespec pause = {(time_t)(sleep_ms / 1000), (long)(sleep_ms % 1000) * 1000000};
        nanosleep(&pause, NULL);
    }

    pthread_mutex_lock(&ctx->lock);
    ctx->last_mode = mode;
    ctx->last_n = n;
    memcpy(ctx->last_keys, keys, (n < MAX_RECORDED ? n : MAX_RECORDED) * EMS_KEY_BYTES);
    pthread_mutex_unlock(&ctx->lock);

    uint64_t hits = 0;
    for (uint64_t i = 0; i < n; i++) {
        CHECK_EQ(found[i], 0);   /* the server zeroes found[] before the call */
        int id = tier_find(ctx->tier, keys + i * EMS_KEY_BYTES);
        if (id < 0)
            continue;
        if (mode == EMS_MISS_LOAD) {
            int rc = ems_pool_put(ctx->tier->pool, keys + i * EMS_KEY_BYTES,
                                  ctx->tier->payload[id], ctx->tier->length[id]);
            CHECK(rc == 0 || rc == 1);
        }
        found[i] = 1;
        hits++;
    }
    atomic_fetch_add(&ctx->calls, 1);
    atomic_fetch_add(&ctx->keys, n);
    atomic_fetch_add(&ctx->found, hits);
    CHECK(!atomic_load(&ctx->retired));
    atomic_fetch_sub(&ctx->active, 1);
}

/* Fails unless the last call was in `mode` with exactly the stored keys of the tier ids
 * in `ids` (-1: the stored key of the never-stored key `absent`), in that order. */
static void check_last_call(tier_ctx_t *ctx, int mode, const int *ids, uint64_t n,
                            const uint8_t *absent_stored)
{
    pthread_mutex_lock(&ctx->lock);
    CHECK_EQ(ctx->last_mode, mode);
    CHECK_EQ(ctx->last_n, n);
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *expected = ids[i] < 0 ? absent_stored : ctx->tier->stored[ids[i]];
        CHECK(memcmp(ctx->last_keys[i], expected, EMS_KEY_BYTES) == 0);
    }
    pthread_mutex_unlock(&ctx->lock);
}

static void test_miss_handler_serves_lower_tier(void)
{
    server_fixture_t f;
    fixture_start(&f);
    tier_t tier;
    tier_init(&tier, &f.pool);
    tier_ctx_t ctx;
    tier_ctx_init(&ctx, &tier);
    ems_conn_config_t tcp = tcp_config(&f, "miss", EMS_ROLE_CLIENT);
    ems_conn_config_t local = local_config(&f, "miss");
    ems_conn_t *conns[2] = {open_or_fail(&tcp), open_or_fail(&local)};

    /* Tier key 0 is also put into the pool through the connection, and `absent` is in
     * neither. */
    uint8_t absent[EMS_KEY_BYTES], absent_stored[EMS_KEY_BYTES], salt[32];
    test_make_key(absent, 999, TIER_SALT);
    ems_tenant_salt("miss", 4, salt);
    ems_tenant_keys(salt, absent, 1, absent_stored);
    int64_t result;
    put_one(conns[0], tier.keys[0], tier.payload[0], tier.length[0], &result);
    CHECK_EQ(result, 0);

    /* Without a handler, a tier key is a miss. */
    uint8_t *buf = zeroed(tier_length(NTIER));
    get_one(conns[0], tier.keys[1], buf, tier.length[1], &result);
    CHECK_EQ(result, -ENOENT);
    ems_server_set_miss_handler(f.server, tier_handler, &ctx);

    for (int c = 0; c < 2; c++) {
        ems_conn_t *conn = conns[c];
        int base = 1 + 4 * c;   /* tier ids base .. base + 3, unused by the other pass */

        /* GET [pool key, tier key, absent key, tier key]: one LOAD call with exactly the
         * three missed keys, in request order. */
        uint8_t keys[4 * EMS_KEY_BYTES];
        memcpy(keys, tier.keys[0], EMS_KEY_BYTES);
        memcpy(keys + EMS_KEY_BYTES, tier.keys[base], EMS_KEY_BYTES);
        memcpy(keys + 2 * EMS_KEY_BYTES, absent, EMS_KEY_BYTES);
        memcpy(keys + 3 * EMS_KEY_BYTES, tier.keys[base + 1], EMS_KEY_BYTES);
        uint64_t lengths[4] = {tier.length[0], tier.length[base], 64, tier.length[base + 1]};
        void *dsts[4];
        for (int i = 0; i < 4; i++)
            dsts[i] = zeroed(lengths[i]);
        int64_t results[4];
        uint64_t calls = atomic_load(&ctx.calls);
        CHECK_EQ(ems_conn_get_many(conn, keys, 4, dsts, lengths, results, CALL_TIMEOUT_MS), 0);
        CHECK_EQ(atomic_load(&ctx.calls), calls + 1);
        check_last_call(&ctx, EMS_MISS_LOAD, (const int[]){base, -1, base + 1}, 3,
                        absent_stored);
        CHECK_EQ(results[0], tier.length[0]);
        CHECK_EQ(results[1], tier.length[base]);
        CHECK_EQ(results[2], -ENOENT);
        CHECK_EQ(results[3], tier.length[base + 1]);
        CHECK(memcmp(dsts[0], tier.payload[0], tier.length[0]) == 0);
        CHECK(memcmp(dsts[1], tier.payload[base], tier.length[base]) == 0);
        CHECK(memcmp(dsts[3], tier.payload[base + 1], tier.length[base + 1]) == 0);
        CHECK_EQ(ems_pool_exists(&f.pool, tier.stored[base]), 1);
        for (int i = 0; i < 4; i++)
            free(dsts[i]);

        /* EXISTS [absent, tier base+2]: one PROBE call, and the probe loads nothing. */
        uint8_t pair[2 * EMS_KEY_BYTES], present[2];
        memcpy(pair, absent, EMS_KEY_BYTES);
        memcpy(pair + EMS_KEY_BYTES, tier.keys[base + 2], EMS_KEY_BYTES);
        CHECK_EQ(ems_conn_exists_many(conn, pair, 2, present, CALL_TIMEOUT_MS), 0);
        CHECK_EQ(present[0], 0);
        CHECK_EQ(present[1], 1);
        check_last_call(&ctx, EMS_MISS_PROBE, (const int[]){-1, base + 2}, 2, absent_stored);
        CHECK_EQ(ems_pool_exists(&f.pool, tier.stored[base + 2]), 0);

        /* MATCH_PREFIX [pool 0, tier base+2, pool base, absent, tier base+3]: the pool
         * contains 1 leading key, the probe covers the later keys that the pool lacks,
         * and the count stops at the absent key. */
        uint8_t chain[5 * EMS_KEY_BYTES];
        memcpy(chain, tier.keys[0], EMS_KEY_BYTES);
        memcpy(chain + EMS_KEY_BYTES, tier.keys[base + 2], EMS_KEY_BYTES);
        memcpy(chain + 2 * EMS_KEY_BYTES, tier.keys[base], EMS_KEY_BYTES);
        memcpy(chain + 3 * EMS_KEY_BYTES, absent, EMS_KEY_BYTES);
        memcpy(chain + 4 * EMS_KEY_BYTES, tier.keys[base + 3], EMS_KEY_BYTES);
        uint64_t count = 99;
        CHECK_EQ(ems_conn_match_prefix(conn, chain, 5, &count, CALL_TIMEOUT_MS), 0);
        CHECK_EQ(count, 3);
        check_last_call(&ctx, EMS_MISS_PROBE, (const int[]){base + 2, -1, base + 3}, 3,
                        absent_stored);

        /* PREFETCH [pool 0, tier base+3, absent]: one call for the two the pool lacks. */
        uint8_t batch3[3 * EMS_KEY_BYTES];
        memcpy(batch3, tier.keys[0], EMS_KEY_BYTES);
        memcpy(batch3 + EMS_KEY_BYTES, tier.keys[base + 3], EMS_KEY_BYTES);
        memcpy(batch3 + 2 * EMS_KEY_BYTES, absent, EMS_KEY_BYTES);
        CHECK_EQ(ems_conn_prefetch(conn, batch3, 3, &count, CALL_TIMEOUT_MS), 0);
        CHECK_EQ(count, 2);
        check_last_call(&ctx, EMS_MISS_PREFETCH, (const int[]){base + 3, -1}, 2,
                        absent_stored);
    }

    /* 2 passes of 4 calls, 10 keys and 6 found each. */
    ems_server_stats_t stats;
    ems_server_stats(f.server, &stats);
    CHECK_EQ(stats.miss_calls, 8);
    CHECK_EQ(stats.miss_keys, 20);
    CHECK_EQ(stats.miss_found, 12);
    CHECK_EQ(atomic_load(&ctx.calls), 8);

    /* Once the handler is removed, nothing reaches it and a tier key is a miss again. */
    ems_server_set_miss_handler(f.server, NULL, NULL);
    atomic_store(&ctx.retired, 1);
    get_one(conns[1], tier.keys[20], buf, tier.length[20], &result);
    CHECK_EQ(result, -ENOENT);
    uint64_t count = 99;
    CHECK_EQ(ems_conn_prefetch(conns[1], tier.keys[0], 1, &count, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(count, 1);
    CHECK_EQ(atomic_load(&ctx.calls), 8);

    char log[1024];
    size_t log_len = ems_server_take_log(f.server, log, sizeof log - 1);
    log[log_len] = 0;
    if (log_len)
        fprintf(stderr, "unexpected server log:\n%s", log);
    CHECK_EQ(log_len, 0);

    ems_conn_close(conns[0]);
    ems_conn_close(conns[1]);
    free(buf);
    pthread_mutex_destroy(&ctx.lock);
    tier_free(&tier);
    fixture_stop(&f);
}

/* A suspended pool serves nothing over either socket. GET, EXISTS, MATCH_PREFIX, PREFETCH
 * and PROTECT find no block, and the miss handler is not called for them. DIR_LOOKUP names
 * no holder. PUT and local puts return -EACCES per key and store nothing. DELETE still
 * reaches the pool and the handler, and DIR_REGISTER the directory. After the resume the
 * blocks stored before are served again. */
static void test_suspended_pool_serves_nothing(void)
{
    enum { N = 4 };
    server_fixture_t f;
    fixture_start(&f);
    tier_t tier;
    tier_init(&tier, &f.pool);
    tier_ctx_t ctx;
    tier_ctx_init(&ctx, &tier);
    ems_conn_config_t tcp = tcp_config(&f, "miss", EMS_ROLE_CLIENT);
    ems_conn_config_t local = local_config(&f, "miss");
    ems_conn_t *remote = open_or_fail(&tcp);
    ems_conn_t *near = open_or_fail(&local);
    int fd = -1;
    CHECK_EQ(ems_conn_local_attach(near, &fd, CALL_TIMEOUT_MS), 0);
    struct stat st;
    CHECK_EQ(fstat(fd, &st), 0);
    uint64_t map_size = (uint64_t)st.st_size;
    uint8_t *base = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(base != MAP_FAILED);

    /* Tier keys 0 .. N - 1 go into the pool now; keys N .. 2N - 1 only the tier has. */
    uint8_t keys[N * EMS_KEY_BYTES], below[N * EMS_KEY_BYTES];
    uint64_t lengths[N], below_lengths[N];
    const void *srcs[N];
    void *dsts[N];
    int64_t results[N];
    for (int i = 0; i < N; i++) {
        memcpy(keys + i * EMS_KEY_BYTES, tier.keys[i], EMS_KEY_BYTES);
        memcpy(below + i * EMS_KEY_BYTES, tier.keys[N + i], EMS_KEY_BYTES);
        lengths[i] = tier.length[i];
        below_lengths[i] = tier.length[N + i];
        srcs[i] = tier.payload[i];
        dsts[i] = zeroed(tier_length(2 * N));
    }
    CHECK_EQ(ems_conn_put_many(remote, keys, N, srcs, lengths, results, CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N; i++)
        CHECK_EQ(results[i], 0);
    ems_server_set_miss_handler(f.server, tier_handler, &ctx);
    CHECK_EQ(ems_pool_set_suspended(&f.pool, 1), 0);

    ems_conn_t *conns[2] = {remote, near};
    for (int c = 0; c < 2; c++) {
        ems_conn_t *conn = conns[c];
        CHECK_EQ(ems_conn_get_many(conn, keys, N, dsts, lengths, results, CALL_TIMEOUT_MS), 0);
        for (int i = 0; i < N; i++)
            CHECK_EQ(results[i], -ENOENT);
        CHECK_EQ(ems_conn_get_many(conn, below, N, dsts, below_lengths, results,
                                   CALL_TIMEOUT_MS), 0);
        for (int i = 0; i < N; i++)
            CHECK_EQ(results[i], -ENOENT);
        uint8_t present[N];
        memset(present, 9, sizeof present);
        CHECK_EQ(ems_conn_exists_many(conn, keys, N, present, CALL_TIMEOUT_MS), 0);
        for (int i = 0; i < N; i++)
            CHECK_EQ(present[i], 0);
        CHECK_EQ(ems_conn_exists_many(conn, below, N, present, CALL_TIMEOUT_MS), 0);
        for (int i = 0; i < N; i++)
            CHECK_EQ(present[i], 0);
        uint64_t count = 99;
        CHECK_EQ(ems_conn_match_prefix(conn, keys, N, &count, CALL_TIMEOUT_MS), 0);
        CHECK_EQ(count, 0);
        CHECK_EQ(ems_conn_prefetch(conn, below, N, &count, CALL_TIMEOUT_MS), 0);
        CHECK_EQ(count, 0);
        CHECK_EQ(ems_conn_protect(conn, keys, N, 1, &count, CALL_TIMEOUT_MS), 0);
        CHECK_EQ(count, 0);
    }
    CHECK_EQ(atomic_load(&ctx.calls), 0);

    /* The directory shard names no holder, but a node may still register keys. */
    ems_conn_config_t node_config = tcp_config(&f, "node", EMS_ROLE_NODE);
    ems_conn_t *node = open_or_fail(&node_config);
    CHECK_EQ(ems_conn_dir_register(node, &tier.stored[0][0], 2, 5, CALL_TIMEOUT_MS), 0);
    uint32_t holders[2] = {0, 0};
    CHECK_EQ(ems_conn_dir_lookup(remote, keys, 2, holders, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(holders[0], EMS_HOLDER_NONE);
    CHECK_EQ(holders[1], EMS_HOLDER_NONE);

    /* Writes: -EACCES per key over TCP and over the shared mapping; nothing is stored. */
    CHECK_EQ(ems_conn_put_many(remote, below, N, srcs, lengths, results, CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N; i++)
        CHECK_EQ(results[i], -EACCES);
    CHECK_EQ(ems_conn_local_put_many(near, base, map_size, below, N, srcs, lengths, results,
                                     CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N; i++)
        CHECK_EQ(results[i], -EACCES);
    /* Only the N blocks put before the suspension were announced as new. */
    uint64_t dropped = 0;
    uint8_t new_keys[8 * EMS_KEY_BYTES];
    CHECK_EQ(ems_server_take_new_keys(f.server, new_keys, 8, &dropped), N);
    ems_pool_stats_t pool_stats;
    ems_pool_stats(&f.pool, &pool_stats, NULL, 0);
    CHECK_EQ(pool_stats.blocks, N);
    CHECK_EQ(pool_stats.suspended_drops, 2 * N);

    char json[2048];
    CHECK_EQ(ems_conn_stats(remote, json, sizeof json, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(count_of(json, "suspended"), 1);
    CHECK_EQ(count_of(json, "suspended_drops"), 2 * N);
    CHECK_EQ(count_of(json, "blocks"), N);

    /* DELETE of the last pool key reaches the pool and, once, the handler. */
    int64_t deleted;
    CHECK_EQ(ems_conn_delete_many(remote, keys + (N - 1) * EMS_KEY_BYTES, 1, &deleted,
                                  CALL_TIMEOUT_MS), 0);
    CHECK_EQ(deleted, 0);
    CHECK_EQ(atomic_load(&ctx.calls), 1);
    pthread_mutex_lock(&ctx.lock);
    CHECK_EQ(ctx.last_mode, EMS_MISS_DELETE);
    pthread_mutex_unlock(&ctx.lock);

    /* Resumed: the blocks stored before are hits with their contents, and the tier serves
     * its keys again. */
    CHECK_EQ(ems_pool_set_suspended(&f.pool, 0), 0);
    CHECK_EQ(ems_conn_get_many(near, keys, N - 1, dsts, lengths, results, CALL_TIMEOUT_MS), 0);
    for (int i = 0; i < N - 1; i++) {
        CHECK_EQ(results[i], lengths[i]);
        CHECK(memcmp(dsts[i], tier.payload[i], lengths[i]) == 0);
    }
    CHECK_EQ(ems_conn_get_many(remote, below, 1, dsts, below_lengths, results,
                               CALL_TIMEOUT_MS), 0);
    CHECK_EQ(results[0], below_lengths[0]);
    CHECK(memcmp(dsts[0], tier.payload[N], below_lengths[0]) == 0);
    CHECK_EQ(atomic_load(&ctx.calls), 2);
    CHECK_EQ(ems_conn_dir_lookup(remote, keys, 2, holders, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(holders[0], 5);
    CHECK_EQ(holders[1], 5);

    ems_server_set_miss_handler(f.server, NULL, NULL);
    ems_conn_close(node);
    CHECK_EQ(munmap(base, map_size), 0);
    close(fd);
    ems_conn_close(remote);
    ems_conn_close(near);
    for (int i = 0; i < N; i++)
        free(dsts[i]);
    pthread_mutex_destroy(&ctx.lock);
    tier_free(&tier);
    fixture_stop(&f);
}

/* Client threads read tier keys while another thread keeps replacing the handler with a
 * fresh ctx or none. Every block read must be the right one, and no call may run on a ctx
 * after ems_server_set_miss_handler replaced it. */
enum { MISS_WORKERS = 4, MISS_CTXS = 64 };

typedef struct miss_race {
    server_fixture_t *fixture;
    tier_t tier;
    tier_ctx_t ctxs[MISS_CTXS];
    long ops;
    _Atomic int workers_done;
    _Atomic uint64_t hits;
} miss_race_t;

typedef struct miss_worker {
    miss_race_t *race;
    uint64_t seed;
    int local;
    pthread_t thread;
} miss_worker_t;

static void *miss_worker_main(void *arg)
{
    miss_worker_t *w = arg;
    miss_race_t *race = w->race;
    tier_t *tier = &race->tier;
    ems_conn_config_t config = w->local ? local_config(race->fixture, "miss")
                                        : tcp_config(race->fixture, "miss", EMS_ROLE_CLIENT);
    ems_conn_t *conn = open_or_fail(&config);
    uint64_t rng = w->seed;
    uint8_t *bufs[MAX_BATCH];
    for (int i = 0; i < MAX_BATCH; i++)
        bufs[i] = zeroed(tier_length(NTIER));

    for (long op = 0; op < race->ops; op++) {
        uint64_t r = test_next_random(&rng);
        uint64_t n = 1 + r % MAX_BATCH, first = (r >> 8) % NTIER;
        uint64_t ids[MAX_BATCH], lengths[MAX_BATCH];
        uint8_t keys[MAX_BATCH * EMS_KEY_BYTES];
        for (uint64_t i = 0; i < n; i++) {
            ids[i] = (first + i * 7) % NTIER;   /* 7 is odd and NTIER a power of two */
            lengths[i] = tier->length[ids[i]];
            memcpy(keys + i * EMS_KEY_BYTES, tier->keys[ids[i]], EMS_KEY_BYTES);
        }
        uint64_t kind = (r >> 16) % 8;
        int64_t results[MAX_BATCH];
        if (kind < 4) {
            void *dsts[MAX_BATCH];
            for (uint64_t i = 0; i < n; i++)
                dsts[i] = bufs[i];
            CHECK_EQ(ems_conn_get_many(conn, keys, n, dsts, lengths, results, CALL_TIMEOUT_MS),
                     0);
            for (uint64_t i = 0; i < n; i++) {
                if (results[i] == -ENOENT)
                    continue;
                CHECK_EQ(results[i], lengths[i]);
                CHECK(memcmp(bufs[i], tier->payload[ids[i]], lengths[i]) == 0);
                atomic_fetch_add(&race->hits, 1);
            }
        } else if (kind < 5) {
            uint8_t present[MAX_BATCH];
            CHECK_EQ(ems_conn_exists_many(conn, keys, n, present, CALL_TIMEOUT_MS), 0);
            for (uint64_t i = 0; i < n; i++)
                CHECK(present[i] <= 1);
        } else if (kind < 6) {
            uint64_t count = 99;
            CHECK_EQ(ems_conn_match_prefix(conn, keys, n, &count, CALL_TIMEOUT_MS), 0);
            CHECK(count <= n);
        } else if (kind < 7) {
            uint64_t count = 99;
            CHECK_EQ(ems_conn_prefetch(conn, keys, n, &count, CALL_TIMEOUT_MS), 0);
            CHECK(count <= n);
        } else {
            /* Deleting keeps the pool from holding every tier key, so loads go on. */
            CHECK_EQ(ems_conn_delete_many(conn, keys, n, results, CALL_TIMEOUT_MS), 0);
            for (uint64_t i = 0; i < n; i++)
                CHECK(results[i] == 0 || results[i] == -ENOENT);
        }
    }

    ems_conn_close(conn);
    for (int i = 0; i < MAX_BATCH; i++)
        free(bufs[i]);
    atomic_fetch_add(&race->workers_done, 1);
    return NULL;
}

static void test_miss_handler_concurrency(long ops)
{
    server_fixture_t f;
    fixture_start(&f);
    miss_race_t *race = calloc(1, sizeof *race);
    CHECK(race != NULL);
    race->fixture = &f;
    race->ops = ops;
    tier_init(&race->tier, &f.pool);
    for (int i = 0; i < MISS_CTXS; i++)
        tier_ctx_init(&race->ctxs[i], &race->tier);

    miss_worker_t workers[MISS_WORKERS];
    memset(workers, 0, sizeof workers);
    for (int i = 0; i < MISS_WORKERS; i++) {
        workers[i].race = race;
        workers[i].seed = 0xdef0 + (uint64_t)i;
        workers[i].local = i % 2;
        CHECK_EQ(pthread_create(&workers[i].thread, NULL, miss_worker_main, &workers[i]), 0);
    }

    /* This thread replaces the handler with the next ctx in turn, or with none every
     * fourth time. Once the call returns, no call runs on the replaced ctx any more, so
     * that ctx is retired until it is installed again. */
    int current = -1;
    for (int next = 0; atomic_load(&race->workers_done) < MISS_WORKERS; next++) {
        int use = next % 4 == 3 ? -1 : next % MISS_CTXS;
        if (use < 0) {
            ems_server_set_miss_handler(f.server, NULL, NULL);
        } else {
            atomic_store(&race->ctxs[use].retired, 0);
            ems_server_set_miss_handler(f.server, tier_handler, &race->ctxs[use]);
        }
        if (current >= 0) {
            CHECK_EQ(atomic_load(&race->ctxs[current].active), 0);
            atomic_store(&race->ctxs[current].retired, 1);
        }
        current = use;
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    for (int i = 0; i < MISS_WORKERS; i++)
        CHECK_EQ(pthread_join(workers[i].thread, NULL), 0);

    uint64_t calls = 0;
    for (int i = 0; i < MISS_CTXS; i++)
        calls += atomic_load(&race->ctxs[i].calls);
    ems_server_stats_t stats;
    ems_server_stats(f.server, &stats);
    CHECK_EQ(stats.miss_calls, calls);
    CHECK(calls > 0);
    CHECK(atomic_load(&race->hits) > 0);
    CHECK_EQ(stats.errors, 0);

    ems_server_set_miss_handler(f.server, NULL, NULL);
    for (int i = 0; i < MISS_CTXS; i++)
        pthread_mutex_destroy(&race->ctxs[i].lock);
    tier_free(&race->tier);
    free(race);
    fixture_stop(&f);
}

typedef struct blocked_get {
    ems_conn_t *conn;
    const tier_t *tier;
    int rc;
} blocked_get_t;

static void *blocked_get_main(void *arg)
{
    blocked_get_t *g = arg;
    uint8_t *buf = zeroed(g->tier->length[0]);
    void *dsts[1] = {buf};
    uint64_t length = g->tier->length[0];
    int64_t result;
    g->rc = ems_conn_get_many(g->conn, g->tier->keys[0], 1, dsts, &length, &result,
                              CALL_TIMEOUT_MS);
    free(buf);
    return NULL;
}

/* ems_server_stop waits for a handler call in progress, and no call starts after it. */
static void test_stop_during_miss_handler(void)
{
    server_fixture_t f;
    fixture_start(&f);
    tier_t tier;
    tier_init(&tier, &f.pool);
    tier_ctx_t ctx;
    tier_ctx_init(&ctx, &tier);
    _Atomic int stopped = 0;
    ctx.stopped = &stopped;
    atomic_store(&ctx.sleep_ms, 300);
    ems_server_set_miss_handler(f.server, tier_handler, &ctx);

    ems_conn_config_t tcp = tcp_config(&f, "miss", EMS_ROLE_CLIENT);
    blocked_get_t get = {.conn = open_or_fail(&tcp), .tier = &tier};
    pthread_t thread;
    CHECK_EQ(pthread_create(&thread, NULL, blocked_get_main, &get), 0);
    uint64_t give_up = ems_now_ms() + CALL_TIMEOUT_MS;
    while (!atomic_load(&ctx.entered)) {
        CHECK(ems_now_ms() < give_up);
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }

    uint64_t begin = ems_now_ms();
    ems_server_stop(f.server);
    atomic_store(&stopped, 1);
    f.server = NULL;
    uint64_t took = ems_now_ms() - begin;
    CHECK(took < CALL_TIMEOUT_MS);
    CHECK_EQ(atomic_load(&ctx.active), 0);
    CHECK_EQ(atomic_load(&ctx.calls), 1);
    CHECK_EQ(pthread_join(thread, NULL), 0);
    CHECK(get.rc < 0);   /* the server closed the connection before responding */

    ems_conn_close(get.conn);
    pthread_mutex_destroy(&ctx.lock);
    tier_free(&tier);
    fixture_stop(&f);
}

/* ---- protocol versions and draining ------------------------------------------------- */

/* Opens a connection that must fail with `expect`, and returns its error sentence. */
static void open_fails(const ems_conn_config_t *config, int expect, char *error, size_t len)
{
    ems_conn_t *conn = NULL;
    CHECK_EQ(ems_conn_open(config, &conn, error, len), expect);
    CHECK(conn == NULL);
}

static void test_version_ranges(void)
{
    enum { SALT = 0x7007 };
    char error[256];
    uint32_t in_flight = 0;

    /* A server restricted to [1, 1] is a previous release: a client of [1, 2] agrees on
     * 1, cannot send DRAIN over it, and a client of [2, 2] is rejected with both ranges. */
    server_fixture_t old;
    fixture_start_range(&old, 1, 1);
    ems_conn_config_t config = tcp_config(&old, "alpha", EMS_ROLE_CLIENT);
    ems_conn_t *conn = open_or_fail(&config);
    CHECK_EQ(ems_conn_version(conn), 1);
    uint8_t key[EMS_KEY_BYTES];
    make_keys(key, 0, 1, SALT);
    const uint64_t length = 4096;
    const void *src = payload_of(700, length);
    void *dst = zeroed(length);
    int64_t result;
    CHECK_EQ(ems_conn_put_many(conn, key, 1, &src, &length, &result, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(result, 0);
    CHECK_EQ(ems_conn_get_many(conn, key, 1, &dst, &length, &result, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(result, (int64_t)length);
    CHECK(memcmp(dst, src, length) == 0);
    ems_conn_close(conn);

    ems_conn_config_t node_config = tcp_config(&old, "node-1", EMS_ROLE_NODE);
    ems_conn_t *node = open_or_fail(&node_config);
    CHECK_EQ(ems_conn_drain(node, 1, &in_flight, CALL_TIMEOUT_MS), -EPROTONOSUPPORT);
    CHECK(ems_conn_alive(node));            /* nothing was sent */
    CHECK_EQ(ems_server_draining(old.server), 0);
    ems_conn_close(node);

    config.proto_min = 2;
    config.proto_max = 2;
    open_fails(&config, -EPROTONOSUPPORT, error, sizeof error);
    CHECK(strstr(error, "this client speaks versions 2-2, the server 1-1") != NULL);
    fixture_stop(&old);

    /* The build's range agrees on the newest version with a client of the same build,
     * and on 1 with a client restricted to [1, 1]. */
    server_fixture_t f;
    fixture_start(&f);
    config = tcp_config(&f, "alpha", EMS_ROLE_CLIENT);
    conn = open_or_fail(&config);
    CHECK_EQ(ems_conn_version(conn), EMS_PROTO_VERSION_MAX);
    ems_conn_close(conn);
    config.proto_min = 1;
    config.proto_max = 1;
    conn = open_or_fail(&config);
    CHECK_EQ(ems_conn_version(conn), 1);
    CHECK_EQ(ems_conn_get_many(conn, key, 1, &dst, &length, &result, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(result, -ENOENT);
    ems_conn_close(conn);

    /* A range outside the build's is refused before connecting, on both sides. */
    config.proto_min = 0;
    config.proto_max = EMS_PROTO_VERSION_MAX + 1;
    open_fails(&config, -EINVAL, error, sizeof error);
    CHECK(strstr(error, "this build speaks") != NULL);
    server_fixture_t bad;
    memset(&bad, 0, sizeof bad);
    ems_pool_config_t pool_config = {.capacity = 4u << 20, .pages = EMS_PAGES_SMALL};
    CHECK_EQ(ems_pool_create(&bad.pool, &pool_config), 0);
    ems_server_config_t server_config = {
        .pool = &bad.pool, .host = "127.0.0.1", .max_payload = MAX_PAYLOAD,
        .max_connections = 4, .directory_capacity = 16, .io_timeout_ms = CALL_TIMEOUT_MS,
        .proto_min = 2, .proto_max = EMS_PROTO_VERSION_MAX + 1,
    };
    CHECK_EQ(ems_server_start(&server_config, &bad.server), -EINVAL);
    ems_pool_close(&bad.pool);

    /* Every handshake is counted by its agreed version and role: so far one client of
     * version 2 and one of version 1, and now a third of version 2 reads the counters. */
    config = tcp_config(&f, "alpha", EMS_ROLE_CLIENT);
    conn = open_or_fail(&config);
    char json[4096];
    CHECK_EQ(ems_conn_stats(conn, json, sizeof json, CALL_TIMEOUT_MS), 0);
    CHECK(strstr(json, "\"proto_min\":1,\"proto_max\":2,\"draining\":0,") != NULL);
    CHECK(strstr(json, "\"hellos\":{\"1\":{\"client\":1,\"node\":0},"
                       "\"2\":{\"client\":2,\"node\":0}}}") != NULL);
    ems_conn_close(conn);
    free((void *)src);
    free(dst);
    fixture_stop(&f);
}

/* DRAIN (version 2, node role) makes PUT and LOCAL_RESERVE store nothing and return
 * -ESHUTDOWN, while reads go on. Ending it stores again. */
static void test_drain(void)
{
    enum { N = 2, SALT = 0x8008 };
    server_fixture_t f;
    fixture_start(&f);
    ems_conn_config_t client_config = tcp_config(&f, "alpha", EMS_ROLE_CLIENT);
    ems_conn_config_t node_config = tcp_config(&f, "node-1", EMS_ROLE_NODE);
    ems_conn_config_t near_config = local_config(&f, "alpha");
    ems_conn_t *client = open_or_fail(&client_config);
    ems_conn_t *node = open_or_fail(&node_config);
    ems_conn_t *near = open_or_fail(&near_config);

    int fd = -1;
    CHECK_EQ(ems_conn_local_attach(near, &fd, CALL_TIMEOUT_MS), 0);
    struct stat st;
    CHECK_EQ(fstat(fd, &st), 0);
    uint64_t map_size = (uint64_t)st.st_size;
    uint8_t *base = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(base != MAP_FAILED);

    /* Key 0 is stored before draining, key 1 is offered during it. */
    uint8_t keys[N * EMS_KEY_BYTES];
    make_keys(keys, 0, N, SALT);
    const uint64_t lengths[N] = {4096, 4096};
    const void *srcs[N];
    void *dsts[N];
    for (int i = 0; i < N; i++) {
        srcs[i] = payload_of(800 + i, lengths[i]);
        dsts[i] = zeroed(lengths[i]);
    }
    int64_t results[N];
    CHECK_EQ(ems_conn_put_many(client, keys, 1, srcs, lengths, results, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(results[0], 0);

    /* A request counts as in flight until its thread is done, which may be just after its
     * response arrived, so DRAIN is repeated until the count drops to 0. */
    uint32_t in_flight = 99;
    for (int tries = 0; tries < 1000 && in_flight != 0; tries++) {
        CHECK_EQ(ems_conn_drain(node, 1, &in_flight, CALL_TIMEOUT_MS), 0);
        if (in_flight != 0)
            usleep(1000);
    }
    CHECK_EQ(in_flight, 0);
    CHECK_EQ(ems_server_draining(f.server), 1);
    CHECK_EQ(ems_conn_put_many(client, keys + EMS_KEY_BYTES, 1, srcs + 1, lengths + 1, results,
                               CALL_TIMEOUT_MS), 0);
    CHECK_EQ(results[0], -ESHUTDOWN);
    CHECK_EQ(ems_conn_local_put_many(near, base, map_size, keys + EMS_KEY_BYTES, 1, srcs + 1,
                                     lengths + 1, results, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(results[0], -ESHUTDOWN);
    CHECK_EQ(ems_conn_get_many(client, keys, N, dsts, lengths, results, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(results[0], (int64_t)lengths[0]);
    CHECK(memcmp(dsts[0], srcs[0], lengths[0]) == 0);
    CHECK_EQ(results[1], -ENOENT);
    char json[4096];
    CHECK_EQ(ems_conn_stats(client, json, sizeof json, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(count_of(json, "draining"), 1);

    /* Only the node role may drain; a client's DRAIN closes its connection. */
    CHECK_EQ(ems_conn_drain(client, 0, &in_flight, CALL_TIMEOUT_MS), -EACCES);
    CHECK(!ems_conn_alive(client));
    CHECK_EQ(ems_server_draining(f.server), 1);

    CHECK_EQ(ems_conn_drain(node, 0, &in_flight, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(ems_server_draining(f.server), 0);
    CHECK_EQ(ems_conn_local_put_many(near, base, map_size, keys + EMS_KEY_BYTES, 1, srcs + 1,
                                     lengths + 1, results, CALL_TIMEOUT_MS), 0);
    CHECK_EQ(results[0], 0);

    munmap(base, map_size);
    close(fd);
    ems_conn_close(client);
    ems_conn_close(node);
    ems_conn_close(near);
    for (int i = 0; i < N; i++) {
        free((void *)srcs[i]);
        free(dsts[i]);
    }
    fixture_stop(&f);
}

/* ---- deadlines against a silent peer ------------------------------------------------ */

#define SHORT_TIMEOUT_MS 300u
#define SLACK_MS 2000u   /* scheduling delay allowed past a deadline, under sanitizers */

/* A listener on 127.0.0.1 that accepts `connections` connections one after another and
 * never responds to a request, except to HELLO when answer_hello is set. */
typedef struct silent_peer {
    int listen_fd;
    uint16_t port;
    int answer_hello;
    int connections;
    pthread_t thread;
} silent_peer_t;

static void answer_hello(int fd)
{
    uint8_t header[EMS_FRAME_HEADER_BYTES], payload[256];
    CHECK(recv(fd, header, sizeof header, MSG_WAITALL) == (ssize_t)sizeof header);
    ems_frame_t req;
    CHECK_EQ(ems_frame_decode(header, sizeof payload, 0, UINT16_MAX, &req), 0);
    CHECK_EQ(req.opcode, EMS_OP_HELLO);
    CHECK(recv(fd, payload, req.payload_len, MSG_WAITALL) == (ssize_t)req.payload_len);

    /* Version, auth_required = 0, and an all-zero challenge. */
    uint8_t body[4 + EMS_CHALLENGE_BYTES];
    memset(body, 0, sizeof body);
    ems_put16(body, EMS_PROTO_VERSION_MAX);
    ems_frame_t resp = {
        .version = EMS_PROTO_VERSION_MAX, .opcode = EMS_OP_HELLO,
        .request_id = req.request_id, .payload_len = sizeof body,
        .payload_crc = ems_crc32c(0, body, sizeof body), .flags = EMS_FRAME_RESPONSE,
    };
    uint8_t out[EMS_FRAME_HEADER_BYTES + sizeof body];
    ems_frame_encode(&resp, out);
    memcpy(out + EMS_FRAME_HEADER_BYTES, body, sizeof body);
    CHECK(send(fd, out, sizeof out, MSG_NOSIGNAL) == (ssize_t)sizeof out);
}

static void *silent_peer_main(void *arg)
{
    silent_peer_t *peer = arg;
    for (int i = 0; i < peer->connections; i++) {
        int fd = accept(peer->listen_fd, NULL, NULL);
        CHECK(fd >= 0);
        if (peer->answer_hello)
            answer_hello(fd);
        /* Read and ignore everything until the client closes. */
        uint8_t sink[4096];
        while (recv(fd, sink, sizeof sink, 0) > 0)
            ;
        close(fd);
    }
    return NULL;
}

static void silent_peer_start(silent_peer_t *peer, int hello, int connections)
{
    memset(peer, 0, sizeof *peer);
    peer->answer_hello = hello;
    peer->connections = connections;
    peer->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(peer->listen_fd >= 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK_EQ(bind(peer->listen_fd, (struct sockaddr *)&addr, sizeof addr), 0);
    CHECK_EQ(listen(peer->listen_fd, 4), 0);
    socklen_t len = sizeof addr;
    CHECK_EQ(getsockname(peer->listen_fd, (struct sockaddr *)&addr, &len), 0);
    peer->port = ntohs(addr.sin_port);
    CHECK_EQ(pthread_create(&peer->thread, NULL, silent_peer_main, peer), 0);
}

static void silent_peer_join(silent_peer_t *peer)
{
    CHECK_EQ(pthread_join(peer->thread, NULL), 0);
    close(peer->listen_fd);
}

static ems_conn_config_t silent_config(const silent_peer_t *peer)
{
    ems_conn_config_t config = {
        .host = "127.0.0.1", .port = peer->port, .tenant = "alpha",
        .role = EMS_ROLE_CLIENT, .max_payload = MAX_PAYLOAD, .timeout_ms = SHORT_TIMEOUT_MS,
    };
    return config;
}

/* Fails unless the call timed out after its whole deadline (less 5 ms of millisecond
 * rounding) and at most SLACK_MS more. */
static void check_timed_out(const char *call_name, int rc, uint64_t took)
{
    if (rc != -ETIMEDOUT || took + 5 < SHORT_TIMEOUT_MS || took > SHORT_TIMEOUT_MS + SLACK_MS)
        fprintf(stderr, "%s returned %d after %llu ms (deadline %u ms)\n", call_name, rc,
                (unsigned long long)took, SHORT_TIMEOUT_MS);
    CHECK_EQ(rc, -ETIMEDOUT);
    CHECK(took + 5 >= SHORT_TIMEOUT_MS);
    CHECK(took <= SHORT_TIMEOUT_MS + SLACK_MS);
}

static void test_open_times_out_on_silent_peer(void)
{
    silent_peer_t peer;
    silent_peer_start(&peer, 0, 1);
    ems_conn_config_t config = silent_config(&peer);
    ems_conn_t *conn = NULL;
    char error[160];

    uint64_t begin = ems_now_ms();
    int rc = ems_conn_open(&config, &conn, error, sizeof error);
    check_timed_out("ems_conn_open", rc, ems_now_ms() - begin);
    CHECK(conn == NULL);
    CHECK(error[0] != 0);
    silent_peer_join(&peer);
}

static void test_calls_time_out_after_handshake(void)
{
    silent_peer_t peer;
    silent_peer_start(&peer, 1, 2);
    ems_conn_config_t config = silent_config(&peer);
    config.timeout_ms = CALL_TIMEOUT_MS;
    uint8_t key[EMS_KEY_BYTES];
    test_make_key(key, 1, 0x7007);

    /* First connection: a ping. */
    ems_conn_t *conn = open_or_fail(&config);
    uint64_t begin = ems_now_ms();
    int rc = ems_conn_ping(conn, SHORT_TIMEOUT_MS);
    check_timed_out("ems_conn_ping", rc, ems_now_ms() - begin);
    CHECK(!ems_conn_alive(conn));
    uint8_t present;
    CHECK_EQ(ems_conn_exists_many(conn, key, 1, &present, SHORT_TIMEOUT_MS), -ENOTCONN);
    ems_conn_close(conn);

    /* Second connection: a get, which reads its response differently. */
    conn = open_or_fail(&config);
    uint8_t block[64];
    void *dsts[1] = {block};
    uint64_t length = sizeof block;
    int64_t result = 99;
    begin = ems_now_ms();
    rc = ems_conn_get_many(conn, key, 1, dsts, &length, &result, SHORT_TIMEOUT_MS);
    check_timed_out("ems_conn_get_many", rc, ems_now_ms() - begin);
    CHECK(!ems_conn_alive(conn));
    ems_conn_close(conn);

    silent_peer_join(&peer);
}

int main(int argc, char **argv)
{
    long ops = argc > 1 ? strtol(argv[1], NULL, 10) : 50000;
    CHECK(ops > 0);

    RUN_TEST(test_block_round_trip);
    RUN_TEST(test_directory_roles);
    RUN_TEST(test_version_ranges);
    RUN_TEST(test_drain);
    RUN_TEST(test_auth_rejects_bad_secret);
    RUN_TEST(test_tenant_isolation);
    RUN_TEST(test_local_put_visible_over_tcp);
    fprintf(stderr, "[ RUN  ] test_concurrent_clients (%ld requests per thread)\n", ops);
    uint64_t begin = ems_now_ms();
    test_concurrent_clients(ops);
    fprintf(stderr, "[  OK  ] test_concurrent_clients (%llu ms)\n",
            (unsigned long long)(ems_now_ms() - begin));
    RUN_TEST(test_stop_with_open_connections);
    RUN_TEST(test_miss_handler_serves_lower_tier);
    RUN_TEST(test_suspended_pool_serves_nothing);
    long miss_ops = ops / 20 > 100 ? ops / 20 : 100;
    fprintf(stderr, "[ RUN  ] test_miss_handler_concurrency (%ld requests per thread)\n",
            miss_ops);
    begin = ems_now_ms();
    test_miss_handler_concurrency(miss_ops);
    fprintf(stderr, "[  OK  ] test_miss_handler_concurrency (%llu ms)\n",
            (unsigned long long)(ems_now_ms() - begin));
    RUN_TEST(test_stop_during_miss_handler);
    RUN_TEST(test_open_times_out_on_silent_peer);
    RUN_TEST(test_calls_time_out_after_handshake);
    printf("test_transfer: ok\n");
    return 0;
}
