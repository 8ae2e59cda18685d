/* Unit tests for suspending a pool (ems_pool_set_suspended): reads miss for the owner and
 * for attached readers (in this process and in a forked child), reservations and commits
 * are rejected with -EACCES and counted, and resuming serves every block stored before.
 *
 * `test_pool_gate race` runs only the multi-threaded test, in which readers and a writer
 * run while another thread keeps suspending and resuming the pool (for ThreadSanitizer).
 *
 * Block contents are a function of the key id (test_fill_payload), so every hit is
 * compared byte for byte with what was stored under that key.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "pool.h"

#define KIB ((uint64_t)1 << 10)
#define SLAB (64 * KIB)
#define NBLOCKS 16

static void pool_open(ems_pool_t *pool)
{
    ems_pool_config_t config = {
        .capacity = 32 * SLAB,
        .slab_size = SLAB,
        .max_blocks = 256,
        .pages = EMS_PAGES_SMALL,
        .debug_name = "ems-test-pool-gate",
    };
    CHECK_EQ(ems_pool_create(pool, &config), 0);
}

static void key_of(uint8_t key[EMS_KEY_BYTES], uint64_t id)
{
    test_make_key(key, id, 0x6a7e);
}

/* Few lengths, so the blocks share size classes and the pool never evicts. */
static uint64_t length_of(uint64_t id)
{
    return 1000 + (id % 4) * 700;
}

static int try_put_block(ems_pool_t *pool, uint64_t id)
{
    uint8_t key[EMS_KEY_BYTES];
    uint64_t len = length_of(id);
    uint8_t *buf = malloc(len);
    CHECK(buf != NULL);
    key_of(key, id);
    test_fill_payload(buf, len, id);
    int rc = ems_pool_put(pool, key, buf, len);
    free(buf);
    return rc;
}

/* Returns 1 on a hit with exact contents, 0 on a miss; anything else fails the test. */
static int get_block(ems_pool_t *pool, uint64_t id)
{
    uint8_t key[EMS_KEY_BYTES];
    uint64_t len = length_of(id);
    uint8_t *buf = malloc(len);
    uint8_t *expected = malloc(len);
    CHECK(buf != NULL);
    CHECK(expected != NULL);
    key_of(key, id);
    test_fill_payload(expected, len, id);
    int64_t rc = ems_pool_get(pool, key, buf, len, NULL);
    int hit = rc == (int64_t)len;
    if (hit)
        CHECK(memcmp(buf, expected, len) == 0);
    else
        CHECK_EQ(rc, -ENOENT);
    free(buf);
    free(expected);
    return hit;
}

static void keys_of(uint8_t *keys, uint64_t first, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        key_of(keys + i * EMS_KEY_BYTES, first + i);
}

/* Counts how many of blocks 0 .. NBLOCKS - 1 each read path finds, and fails unless every
 * path finds `expected` of them (0 or NBLOCKS). */
static void check_every_read(ems_pool_t *pool, uint64_t expected)
{
    uint8_t keys[NBLOCKS * EMS_KEY_BYTES];
    keys_of(keys, 0, NBLOCKS);

    uint64_t gets = 0, lengths = 0, exists = 0;
    for (uint64_t id = 0; id < NBLOCKS; id++) {
        gets += (uint64_t)get_block(pool, id);
        lengths += ems_pool_length(pool, keys + id * EMS_KEY_BYTES) == (int64_t)length_of(id);
        exists += (uint64_t)ems_pool_exists(pool, keys + id * EMS_KEY_BYTES);
    }
    CHECK_EQ(gets, expected);
    CHECK_EQ(lengths, expected);
    CHECK_EQ(exists, expected);

    uint8_t present[NBLOCKS];
    CHECK_EQ(ems_pool_exists_many(pool, keys, NBLOCKS, present), expected);
    CHECK_EQ(ems_pool_match_prefix(pool, keys, NBLOCKS), expected);

    void *dsts[NBLOCKS];
    uint64_t sizes[NBLOCKS];
    int64_t results[NBLOCKS];
    for (uint64_t i = 0; i < NBLOCKS; i++) {
        sizes[i] = length_of(i);
        dsts[i] = malloc(sizes[i]);
        CHECK(dsts[i] != NULL);
    }
    CHECK_EQ(ems_pool_get_many(pool, keys, NBLOCKS, dsts, sizes, results), expected);
    for (uint64_t i = 0; i < NBLOCKS; i++)
        free(dsts[i]);

    /* Pinning is the owner's zero-copy read (the transfer server's GET). */
    if (pool->owner) {
        uint64_t pinned = 0;
        for (uint64_t id = 0; id < NBLOCKS; id++) {
            const uint8_t *data = NULL;
            uint32_t pin = 0;
            int64_t rc = ems_pool_pin(pool, keys + id * EMS_KEY_BYTES, length_of(id), &data,
                                      &pin);
            if (rc >= 0) {
                ems_pool_unpin(pool, pin);
                pinned++;
            } else {
                CHECK_EQ(rc, -ENOENT);
            }
        }
        CHECK_EQ(pinned, expected);
    }
}

static ems_pool_stats_t stats_of(ems_pool_t *pool)
{
    ems_pool_stats_t stats;
    CHECK(ems_pool_stats(pool, &stats, NULL, 0) >= 0);
    return stats;
}

/* ---- tests -------------------------------------------------------------------------- */

static void test_reads_miss_while_suspended(void)
{
    ems_pool_t pool;
    pool_open(&pool);
    for (uint64_t id = 0; id < NBLOCKS; id++)
        CHECK_EQ(try_put_block(&pool, id), 0);
    CHECK_EQ(ems_pool_suspended(&pool), 0);
    check_every_read(&pool, NBLOCKS);

    CHECK_EQ(ems_pool_set_suspended(&pool, 1), 0);
    CHECK_EQ(ems_pool_suspended(&pool), 1);
    ems_pool_stats_t before = stats_of(&pool);
    check_every_read(&pool, 0);
    ems_pool_stats_t during = stats_of(&pool);
    CHECK_EQ(during.suspended, 1);
    CHECK_EQ(during.hits, before.hits);
    /* One miss per get and per get_many key, and one per pin. */
    CHECK_EQ(during.misses - before.misses, 3 * NBLOCKS);
    /* The blocks are still there. */
    CHECK_EQ(during.blocks, NBLOCKS);
    CHECK_EQ(during.bytes_used, before.bytes_used);

    CHECK_EQ(ems_pool_set_suspended(&pool, 0), 0);
    CHECK_EQ(ems_pool_suspended(&pool), 0);
    check_every_read(&pool, NBLOCKS);
    CHECK_EQ(stats_of(&pool).suspended, 0);
    ems_pool_close(&pool);
}

static void test_writes_rejected_while_suspended(void)
{
    ems_pool_t pool;
    pool_open(&pool);
    CHECK_EQ(try_put_block(&pool, 0), 0);
    CHECK_EQ(ems_pool_set_suspended(&pool, 1), 0);
    ems_pool_stats_t before = stats_of(&pool);

    /* A new key and a stored key get the same result, so a put cannot probe the pool. */
    CHECK_EQ(try_put_block(&pool, 1), -EACCES);
    CHECK_EQ(try_put_block(&pool, 0), -EACCES);
    uint8_t key[EMS_KEY_BYTES];
    ems_reservation_t r;
    key_of(key, 2);
    CHECK_EQ(ems_pool_reserve(&pool, key, 100, &r), -EACCES);
    CHECK(r.data == NULL);
    CHECK_EQ(r.exists, 0);

    /* Argument errors are still reported as such. */
    CHECK_EQ(ems_pool_reserve(&pool, key, 0, &r), -EINVAL);
    CHECK_EQ(ems_pool_reserve(&pool, key, SLAB + 1, &r), -EMSGSIZE);

    uint8_t keys[4 * EMS_KEY_BYTES];
    keys_of(keys, 10, 4);
    uint8_t data[64] = {1};
    const void *srcs[4] = {data, data, data, data};
    uint64_t lengths[4] = {64, 64, 64, 64};
    int64_t results[4];
    CHECK_EQ(ems_pool_put_many(&pool, keys, 4, srcs, lengths, results), 4);
    for (int i = 0; i < 4; i++)
        CHECK_EQ(results[i], -EACCES);

    ems_pool_stats_t after = stats_of(&pool);
    CHECK_EQ(after.suspended_drops - before.suspended_drops, 7);
    CHECK_EQ(after.puts, before.puts);
    CHECK_EQ(after.put_exists, before.put_exists);
    CHECK_EQ(after.blocks, 1);
    CHECK_EQ(after.bytes_used, before.bytes_used);

    /* After resuming, the rejected keys were never stored and can be put now. */
    CHECK_EQ(ems_pool_set_suspended(&pool, 0), 0);
    CHECK_EQ(get_block(&pool, 1), 0);
    CHECK_EQ(get_block(&pool, 0), 1);
    CHECK_EQ(try_put_block(&pool, 1), 0);
    CHECK_EQ(try_put_block(&pool, 0), 1);
    CHECK_EQ(get_block(&pool, 1), 1);
    CHECK_EQ(stats_of(&pool).suspended_drops, 7);
    ems_pool_close(&pool);
}

/* A reservation made before the suspension is dropped at commit, and its slot freed. */
static void test_commit_after_suspend_drops_block(void)
{
    ems_pool_t pool;
    pool_open(&pool);
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, 5);
    ems_reservation_t r;
    CHECK_EQ(ems_pool_reserve(&pool, key, length_of(5), &r), 0);
    CHECK(r.data != NULL);
    test_fill_payload(r.data, length_of(5), 5);
    CHECK_EQ(stats_of(&pool).blocks, 1);

    CHECK_EQ(ems_pool_set_suspended(&pool, 1), 0);
    CHECK_EQ(ems_pool_commit(&pool, &r), -EACCES);
    CHECK(r.data == NULL);
    ems_pool_abort(&pool, &r);   /* does nothing after a failed commit */
    ems_pool_stats_t stats = stats_of(&pool);
    CHECK_EQ(stats.blocks, 0);
    CHECK_EQ(stats.bytes_used, 0);
    CHECK_EQ(stats.suspended_drops, 1);
    CHECK_EQ(stats.puts, 0);

    CHECK_EQ(ems_pool_set_suspended(&pool, 0), 0);
    CHECK_EQ(get_block(&pool, 5), 0);
    CHECK_EQ(try_put_block(&pool, 5), 0);
    CHECK_EQ(get_block(&pool, 5), 1);
    ems_pool_close(&pool);
}

/* Delete is not a read: it keeps working, so a suspended node can still drop blocks on
 * request. */
static void test_delete_works_while_suspended(void)
{
    ems_pool_t pool;
    pool_open(&pool);
    CHECK_EQ(try_put_block(&pool, 1), 0);
    CHECK_EQ(try_put_block(&pool, 2), 0);
    CHECK_EQ(ems_pool_set_suspended(&pool, 1), 0);
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, 1);
    CHECK_EQ(ems_pool_delete(&pool, key), 0);
    CHECK_EQ(ems_pool_delete(&pool, key), -ENOENT);
    CHECK_EQ(stats_of(&pool).blocks, 1);
    CHECK_EQ(ems_pool_set_suspended(&pool, 0), 0);
    CHECK_EQ(get_block(&pool, 1), 0);
    CHECK_EQ(get_block(&pool, 2), 1);
    ems_pool_close(&pool);
}

static void test_attached_reader_misses(void)
{
    ems_pool_t owner, reader;
    pool_open(&owner);
    for (uint64_t id = 0; id < NBLOCKS; id++)
        CHECK_EQ(try_put_block(&owner, id), 0);
    CHECK_EQ(ems_pool_attach(&reader, owner.arena.fd), 0);
    check_every_read(&reader, NBLOCKS);

    /* Only the owner may suspend; a reader sees the owner's flag. */
    CHECK_EQ(ems_pool_set_suspended(&reader, 1), -EPERM);
    CHECK_EQ(ems_pool_suspended(&reader), 0);
    CHECK_EQ(ems_pool_set_suspended(&owner, 1), 0);
    CHECK_EQ(ems_pool_suspended(&reader), 1);

    ems_pool_stats_t before = stats_of(&reader);
    check_every_read(&reader, 0);
    ems_pool_stats_t after = stats_of(&reader);
    CHECK_EQ(after.suspended, 1);
    CHECK_EQ(after.reader_hits, before.reader_hits);
    CHECK_EQ(after.reader_misses - before.reader_misses, 2 * NBLOCKS);

    CHECK_EQ(ems_pool_set_suspended(&owner, 0), 0);
    check_every_read(&reader, NBLOCKS);
    ems_pool_close(&reader);
    ems_pool_close(&owner);
}

/* A reader in another process reads the flag through the shared mapping. */
static void test_child_process_reader_misses(void)
{
    ems_pool_t owner;
    pool_open(&owner);
    for (uint64_t id = 0; id < NBLOCKS; id++)
        CHECK_EQ(try_put_block(&owner, id), 0);
    CHECK_EQ(ems_pool_set_suspended(&owner, 1), 0);

    int to_child[2], to_parent[2];
    CHECK_EQ(pipe(to_child), 0);
    CHECK_EQ(pipe(to_parent), 0);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        ems_pool_t reader;
        CHECK_EQ(ems_pool_attach(&reader, owner.arena.fd), 0);
        check_every_read(&reader, 0);
        char c = 'r';
        CHECK_EQ(write(to_parent[1], &c, 1), 1);
        CHECK_EQ(read(to_child[0], &c, 1), 1);
        check_every_read(&reader, NBLOCKS);
        ems_pool_close(&reader);
        _Exit(0);
    }
    char c;
    CHECK_EQ(read(to_parent[0], &c, 1), 1);
    CHECK_EQ(ems_pool_set_suspended(&owner, 0), 0);
    CHECK_EQ(write(to_child[1], &c, 1), 1);
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
    close(to_child[0]);
    close(to_child[1]);
    close(to_parent[0]);
    close(to_parent[1]);
    ems_pool_close(&owner);
}

/* ---- concurrency -------------------------------------------------------------------- */

/* The suspension flips every RACE_HOLD_US for RACE_TOGGLES times. */
enum { RACE_TOGGLES = 400, RACE_HOLD_US = 100, RACE_READERS = 2 };

typedef struct gate_race {
    ems_pool_t pool;
    ems_pool_t reader;          /* attached handle, used by reader thread 1 */
    _Atomic int done;
    _Atomic uint64_t hits, misses, stored, rejected;
} gate_race_t;

typedef struct race_reader {
    gate_race_t *race;
    ems_pool_t *pool;
} race_reader_t;

/* Reads blocks 0 .. NBLOCKS - 1 until the toggler is done. Every hit must be exact. */
static void *race_read(void *arg)
{
    race_reader_t *r = arg;
    uint64_t id = 0, hits = 0, misses = 0;
    while (!atomic_load(&r->race->done)) {
        if (get_block(r->pool, id % NBLOCKS))
            hits++;
        else
            misses++;
        id++;
    }
    atomic_fetch_add(&r->race->hits, hits);
    atomic_fetch_add(&r->race->misses, misses);
    return NULL;
}

/* Puts and deletes blocks of ids 1000 .. 1015 until the toggler is done. Each put is
 * stored or rejected, never both, and a stored block is deleted again (a delete works
 * while suspended), so the pool never fills and never evicts blocks 0 .. NBLOCKS - 1. */
static void *race_write(void *arg)
{
    gate_race_t *race = arg;
    for (uint64_t i = 0; !atomic_load(&race->done); i++) {
        uint64_t id = 1000 + i % 16;
        int rc = try_put_block(&race->pool, id);
        CHECK(rc == 0 || rc == -EACCES);
        atomic_fetch_add(rc == 0 ? &race->stored : &race->rejected, 1);
        if (rc == 0) {
            uint8_t key[EMS_KEY_BYTES];
            key_of(key, id);
            CHECK_EQ(ems_pool_delete(&race->pool, key), 0);
        }
    }
    return NULL;
}

static void test_suspend_races_reads_and_writes(void)
{
    gate_race_t race;
    memset(&race, 0, sizeof race);
    pool_open(&race.pool);
    for (uint64_t id = 0; id < NBLOCKS; id++)
        CHECK_EQ(try_put_block(&race.pool, id), 0);
    CHECK_EQ(ems_pool_attach(&race.reader, race.pool.arena.fd), 0);

    race_reader_t readers[RACE_READERS] = {{&race, &race.pool}, {&race, &race.reader}};
    pthread_t threads[RACE_READERS + 1];
    for (int i = 0; i < RACE_READERS; i++)
        CHECK_EQ(pthread_create(&threads[i], NULL, race_read, &readers[i]), 0);
    CHECK_EQ(pthread_create(&threads[RACE_READERS], NULL, race_write, &race), 0);
    for (int i = 0; i < RACE_TOGGLES; i++) {
        CHECK_EQ(ems_pool_set_suspended(&race.pool, (i & 1) == 0), 0);
        usleep(RACE_HOLD_US);
    }
    CHECK_EQ(ems_pool_set_suspended(&race.pool, 0), 0);
    atomic_store(&race.done, 1);
    for (int i = 0; i <= RACE_READERS; i++)
        CHECK_EQ(pthread_join(threads[i], NULL), 0);

    /* Every rejected write was counted, every stored one committed, and every block
     * stored before is still served. */
    ems_pool_stats_t stats = stats_of(&race.pool);
    fprintf(stderr, "%llu hits, %llu misses, %llu stored, %llu rejected\n",
            (unsigned long long)race.hits, (unsigned long long)race.misses,
            (unsigned long long)race.stored, (unsigned long long)race.rejected);
    CHECK_EQ(stats.suspended_drops, race.rejected);
    CHECK_EQ(stats.puts, NBLOCKS + race.stored);
    for (uint64_t id = 0; id < NBLOCKS; id++)
        CHECK_EQ(get_block(&race.reader, id), 1);
    ems_pool_close(&race.reader);
    ems_pool_close(&race.pool);
}

int main(int argc, char **argv)
{
    /* `test_pool_gate race` runs only the multi-threaded test, for ThreadSanitizer. */
    if (argc > 1 && strcmp(argv[1], "race") == 0) {
        RUN_TEST(test_suspend_races_reads_and_writes);
        fprintf(stderr, "test_pool_gate race: all passed\n");
        return 0;
    }
    RUN_TEST(test_reads_miss_while_suspended);
    RUN_TEST(test_writes_rejected_while_suspended);
    RUN_TEST(test_commit_after_suspend_drops_block);
    RUN_TEST(test_delete_works_while_suspended);
    RUN_TEST(test_attached_reader_misses);
    RUN_TEST(test_child_process_reader_misses);
    RUN_TEST(test_suspend_races_reads_and_writes);
    fprintf(stderr, "test_pool_gate: all passed\n");
    return 0;
}
