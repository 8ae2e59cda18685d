/* Unit tests for the pool (csrc/pool.c, pool_read.c, pool_write.c, spill_ring.c):
 * configuration and sizing, put/get/delete, two-phase reservations, eviction, pinning,
 * protection, read-only attach (in-process and from a forked child), batches, statistics
 * and the spill ring. Single-threaded except test_spill_ring_concurrent_take, which
 * `test_pool spill` runs alone (for ThreadSanitizer); the multi-threaded stress of the
 * pool is in test_pool_stress.c.
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
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "pool.h"

#define KIB ((uint64_t)1 << 10)
#define MIB ((uint64_t)1 << 20)
#define SLAB (64 * KIB)

static void pool_open(ems_pool_t *pool, uint64_t capacity, uint64_t slab_size,
                      uint32_t max_blocks)
{
    ems_pool_config_t config = {
        .capacity = capacity,
        .slab_size = slab_size,
        .max_blocks = max_blocks,
        .pages = EMS_PAGES_SMALL,
        .debug_name = "ems-test-pool",
    };
    CHECK_EQ(ems_pool_create(pool, &config), 0);
}

static void key_of(uint8_t key[EMS_KEY_BYTES], uint64_t id)
{
    test_make_key(key, id, 0x9001);
}

/* Puts block `id` of `len` bytes and returns the result of ems_pool_put. */
static int try_put_block(ems_pool_t *pool, uint64_t id, uint64_t len)
{
    uint8_t key[EMS_KEY_BYTES];
    uint8_t *buf = malloc(len);
    CHECK(buf != NULL);
    key_of(key, id);
    test_fill_payload(buf, len, id);
    int rc = ems_pool_put(pool, key, buf, len);
    free(buf);
    return rc;
}

/* Stores block `id` of `len` bytes, which must not be stored yet. */
static void put_block(ems_pool_t *pool, uint64_t id, uint64_t len)
{
    CHECK_EQ(try_put_block(pool, id, len), 0);
}

/* Reads block `id`, expected to be `len` bytes. Returns 1 on a hit with exact contents,
 * 0 on a miss; anything else fails the test. */
static int get_block(ems_pool_t *pool, uint64_t id, uint64_t len)
{
    uint8_t key[EMS_KEY_BYTES];
    uint8_t *buf = malloc(len);
    uint8_t *expected = malloc(len);
    CHECK(buf != NULL);
    CHECK(expected != NULL);
    key_of(key, id);
    test_fill_payload(expected, len, id);
    memset(buf, 0xee, len);
    uint64_t actual = 0;
    int64_t rc = ems_pool_get(pool, key, buf, len, &actual);
    int hit = 0;
    if (rc == (int64_t)len) {
        if (memcmp(buf, expected, len) != 0) {
            fprintf(stderr, "block %llu (%llu bytes) has wrong contents\n",
                    (unsigned long long)id, (unsigned long long)len);
        }
        CHECK(memcmp(buf, expected, len) == 0);
        hit = 1;
    } else {
        CHECK_EQ(rc, -ENOENT);
    }
    free(buf);
    free(expected);
    return hit;
}

static int block_exists(ems_pool_t *pool, uint64_t id)
{
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, id);
    return ems_pool_exists(pool, key);
}

static void pool_stats(ems_pool_t *pool, ems_pool_stats_t *stats)
{
    ems_class_stats_t classes[64];
    int n = ems_pool_stats(pool, stats, classes, 64);
    CHECK(n >= 0);
    CHECK_EQ(stats->nclasses_used, n);
}

/* Block bookkeeping must agree with the allocator: per-class rows sum to the totals,
 * and used + free + wasted bytes make up the capacity. */
static void check_stats_consistent(ems_pool_t *pool)
{
    ems_pool_stats_t stats;
    ems_class_stats_t classes[256];
    int n = ems_pool_stats(pool, &stats, classes, 256);
    CHECK(n >= 0);
    CHECK(n <= 256);
    uint64_t blocks = 0, payload = 0, slabs = 0;
    for (int i = 0; i < n; i++) {
        CHECK(classes[i].slabs > 0);
        CHECK(classes[i].slot_size >= 64);
        CHECK(classes[i].blocks * classes[i].slot_size <= classes[i].slabs * stats.slab_size);
        CHECK(classes[i].payload_bytes <= classes[i].blocks * classes[i].slot_size);
        blocks += classes[i].blocks;
        payload += classes[i].payload_bytes;
        slabs += classes[i].slabs;
    }
    CHECK_EQ(blocks, stats.blocks);
    CHECK_EQ(payload, stats.bytes_used);
    CHECK_EQ(slabs + stats.free_slabs, stats.slabs);
    CHECK_EQ(stats.bytes_used + stats.bytes_free + stats.bytes_wasted, stats.capacity);
    CHECK(stats.blocks <= stats.max_blocks);
}

/* ---- configuration ----------------------------------------------------------------- */

static void test_default_slab_size(void)
{
    CHECK_EQ(ems_pool_default_slab_size(1 * MIB), 1 * MIB);
    CHECK_EQ(ems_pool_default_slab_size(16 * MIB), 1 * MIB);
    CHECK_EQ(ems_pool_default_slab_size(32 * MIB), 2 * MIB);
    CHECK_EQ(ems_pool_default_slab_size(64 * MIB), 4 * MIB);
    CHECK_EQ(ems_pool_default_slab_size(100 * MIB), 4 * MIB);
    CHECK_EQ(ems_pool_default_slab_size(512 * MIB), 32 * MIB);
    CHECK_EQ(ems_pool_default_slab_size(1024 * MIB), 32 * MIB);
    CHECK_EQ(ems_pool_default_slab_size((uint64_t)1 << 40), 32 * MIB);
}

static void test_create_sizes(void)
{
    ems_pool_t pool;
    ems_pool_stats_t stats;

    /* Capacity is rounded down to whole slabs. */
    pool_open(&pool, 16 * SLAB + 1000, SLAB, 256);
    CHECK_EQ(pool.owner, 1);
    CHECK(pool.arena.fd >= 0);
    CHECK_EQ(ems_pool_max_block(&pool), SLAB);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.capacity, 16 * SLAB);
    CHECK_EQ(stats.slab_size, SLAB);
    CHECK_EQ(stats.slabs, 16);
    CHECK_EQ(stats.free_slabs, 16);
    CHECK_EQ(stats.max_blocks, 256);
    CHECK_EQ(stats.blocks, 0);
    CHECK_EQ(stats.bytes_used, 0);
    CHECK_EQ(stats.bytes_free, 16 * SLAB);
    CHECK_EQ(stats.page_kind, EMS_PAGES_SMALL);
    CHECK(stats.metadata_bytes > 0);
    CHECK_EQ(pool.layout->magic, EMS_LAYOUT_MAGIC);
    CHECK(pool.layout->map_size <= pool.arena.size);
    check_stats_consistent(&pool);
    ems_pool_close(&pool);

    /* Defaults: slab size from capacity, one entry per 16 KiB, at least 64 entries. */
    ems_pool_config_t config = {.capacity = 8 * MIB, .pages = EMS_PAGES_SMALL};
    CHECK_EQ(ems_pool_create(&pool, &config), 0);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.slab_size, 1 * MIB);
    CHECK_EQ(stats.slabs, 8);
    CHECK_EQ(stats.max_blocks, 8 * MIB / EMS_DEFAULT_BLOCK_HINT);
    ems_pool_close(&pool);

    config = (ems_pool_config_t){.capacity = 1 * MIB, .pages = EMS_PAGES_SMALL};
    CHECK_EQ(ems_pool_create(&pool, &config), 0);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.max_blocks, EMS_MIN_ENTRIES);
    ems_pool_close(&pool);

    /* AUTO pages work and report what they got. */
    config = (ems_pool_config_t){.capacity = 2 * MIB, .slab_size = SLAB,
                                 .pages = EMS_PAGES_AUTO};
    CHECK_EQ(ems_pool_create(&pool, &config), 0);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.page_kind, pool.arena.page_kind);
    put_block(&pool, 1, 5000);
    CHECK_EQ(get_block(&pool, 1, 5000), 1);
    ems_pool_close(&pool);
}

static void test_create_rejects_bad_config(void)
{
    ems_pool_t pool;
    ems_pool_config_t config = {.capacity = 4 * MIB, .pages = EMS_PAGES_SMALL};

    config.slab_size = 96 * KIB; /* not a power of two */
    CHECK_EQ(ems_pool_create(&pool, &config), -EINVAL);
    config.slab_size = 32 * KIB; /* below EMS_MIN_SLAB_SIZE */
    CHECK_EQ(ems_pool_create(&pool, &config), -EINVAL);
    config.slab_size = (uint64_t)EMS_MAX_SLAB_SIZE * 2;
    CHECK_EQ(ems_pool_create(&pool, &config), -EINVAL);

    config.slab_size = 1 * MIB;
    config.capacity = 1 * MIB - 1; /* less than one slab */
    CHECK_EQ(ems_pool_create(&pool, &config), -ERANGE);
    config.capacity = 0;
    CHECK_EQ(ems_pool_create(&pool, &config), -ERANGE);

    config.capacity = 4 * MIB;
    config.pages = (ems_page_kind_t)42;
    CHECK_EQ(ems_pool_create(&pool, &config), -EINVAL);
}

/* ---- put, get, delete -------------------------------------------------------------- */

static void test_put_get_round_trip(void)
{
    ems_pool_t pool;
    pool_open(&pool, 16 * SLAB, SLAB, 256);
    const uint64_t lengths[] = {1, 7, 63, 64, 65, 1000, 4096, 4097, 30000, SLAB - 1, SLAB};
    const uint64_t n = sizeof lengths / sizeof lengths[0];

    for (uint64_t i = 0; i < n; i++) {
        put_block(&pool, i, lengths[i]);
    }
    for (uint64_t i = 0; i < n; i++) {
        uint8_t key[EMS_KEY_BYTES];
        key_of(key, i);
        CHECK_EQ(get_block(&pool, i, lengths[i]), 1);
        CHECK_EQ(ems_pool_length(&pool, key), lengths[i]);
        CHECK_EQ(ems_pool_exists(&pool, key), 1);
    }

    uint8_t absent[EMS_KEY_BYTES];
    key_of(absent, 999);
    uint8_t buf[16];
    uint64_t actual = 12345;
    CHECK_EQ(ems_pool_get(&pool, absent, buf, sizeof buf, &actual), -ENOENT);
    CHECK_EQ(ems_pool_length(&pool, absent), -ENOENT);
    CHECK_EQ(ems_pool_exists(&pool, absent), 0);

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.blocks, n);
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        total += lengths[i];
    }
    CHECK_EQ(stats.bytes_used, total);
    CHECK_EQ(stats.puts, n);
    CHECK_EQ(stats.hits, n);
    CHECK_EQ(stats.misses, 1);
    CHECK_EQ(stats.evictions, 0);
    check_stats_consistent(&pool);
    ems_pool_close(&pool);
}

static void test_put_is_idempotent(void)
{
    ems_pool_t pool;
    pool_open(&pool, 16 * SLAB, SLAB, 256);
    put_block(&pool, 1, 3000);

    /* A second put of the key returns 1 without replacing the stored block, even with
     * other contents and another length. */
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, 1);
    uint8_t other[5000];
    memset(other, 0x42, sizeof other);
    CHECK_EQ(ems_pool_put(&pool, key, other, sizeof other), 1);
    CHECK_EQ(ems_pool_put(&pool, key, other, 3000), 1);
    CHECK_EQ(ems_pool_length(&pool, key), 3000);
    CHECK_EQ(get_block(&pool, 1, 3000), 1);

    ems_reservation_t r;
    CHECK_EQ(ems_pool_reserve(&pool, key, 100, &r), 0);
    CHECK_EQ(r.exists, 1);
    CHECK_EQ(ems_pool_commit(&pool, &r), 0);
    CHECK_EQ(get_block(&pool, 1, 3000), 1);

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.puts, 1);
    CHECK_EQ(stats.put_exists, 3);
    CHECK_EQ(stats.blocks, 1);
    CHECK_EQ(stats.bytes_used, 3000);
    ems_pool_close(&pool);
}

static void test_get_and_put_size_errors(void)
{
    ems_pool_t pool;
    pool_open(&pool, 16 * SLAB, SLAB, 256);
    put_block(&pool, 1, 1000);
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, 1);

    uint8_t buf[2000];
    memset(buf, 0x33, sizeof buf);
    uint64_t actual = 0;
    CHECK_EQ(ems_pool_get(&pool, key, buf, 999, &actual), -EMSGSIZE);
    CHECK_EQ(actual, 1000);
    actual = 0;
    CHECK_EQ(ems_pool_get(&pool, key, buf, 1001, &actual), -EMSGSIZE);
    CHECK_EQ(actual, 1000);
    /* A rejected get leaves the destination alone. */
    for (size_t i = 0; i < sizeof buf; i++) {
        CHECK_EQ(buf[i], 0x33);
    }

    uint8_t key2[EMS_KEY_BYTES];
    key_of(key2, 2);
    uint8_t *big = calloc(1, SLAB + 1);
    CHECK(big != NULL);
    CHECK_EQ(ems_pool_put(&pool, key2, big, 0), -EINVAL);
    CHECK_EQ(ems_pool_put(&pool, key2, big, SLAB + 1), -EMSGSIZE);
    CHECK_EQ(ems_pool_put(&pool, key2, big, (uint64_t)1 << 40), -EMSGSIZE);
    ems_reservation_t r;
    CHECK_EQ(ems_pool_reserve(&pool, key2, 0, &r), -EINVAL);
    CHECK_EQ(ems_pool_reserve(&pool, key2, SLAB + 1, &r), -EMSGSIZE);
    CHECK_EQ(ems_pool_exists(&pool, key2), 0);
    CHECK_EQ(ems_pool_put(&pool, key2, big, SLAB), 0);
    CHECK_EQ(ems_pool_length(&pool, key2), SLAB);
    free(big);

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.blocks, 2);
    CHECK_EQ(stats.bytes_used, 1000 + SLAB);
    ems_pool_close(&pool);
}

static void test_delete(void)
{
    ems_pool_t pool;
    pool_open(&pool, 16 * SLAB, SLAB, 256);
    put_block(&pool, 1, 5000);
    put_block(&pool, 2, 5000);
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, 1);

    CHECK_EQ(ems_pool_delete(&pool, key), 0);
    CHECK_EQ(get_block(&pool, 1, 5000), 0);
    CHECK_EQ(ems_pool_exists(&pool, key), 0);
    CHECK_EQ(ems_pool_delete(&pool, key), -ENOENT);
    CHECK_EQ(get_block(&pool, 2, 5000), 1);

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.deletes, 1);
    CHECK_EQ(stats.blocks, 1);
    CHECK_EQ(stats.bytes_used, 5000);

    /* The key can be stored again, with new contents. */
    uint8_t buf[700];
    test_fill_payload(buf, sizeof buf, 1);
    CHECK_EQ(ems_pool_put(&pool, key, buf, sizeof buf), 0);
    CHECK_EQ(get_block(&pool, 1, sizeof buf), 1);

    /* Deleting everything returns every slab. */
    CHECK_EQ(ems_pool_delete(&pool, key), 0);
    key_of(key, 2);
    CHECK_EQ(ems_pool_delete(&pool, key), 0);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.blocks, 0);
    CHECK_EQ(stats.bytes_used, 0);
    CHECK_EQ(stats.free_slabs, stats.slabs);
    ems_pool_close(&pool);
}

static void test_reserve_commit_abort(void)
{
    ems_pool_t pool;
    pool_open(&pool, 16 * SLAB, SLAB, 256);
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, 5);

    ems_reservation_t r;
    CHECK_EQ(ems_pool_reserve(&pool, key, 500, &r), 0);
    CHECK_EQ(r.exists, 0);
    CHECK(r.data != NULL);
    CHECK_EQ(r.length, 500);
    /* Not visible until committed. */
    CHECK_EQ(ems_pool_exists(&pool, key), 0);
    CHECK_EQ(get_block(&pool, 5, 500), 0);
    test_fill_payload(r.data, 500, 5);
    CHECK_EQ(ems_pool_commit(&pool, &r), 0);
    CHECK_EQ(get_block(&pool, 5, 500), 1);

    uint8_t key2[EMS_KEY_BYTES];
    key_of(key2, 6);
    CHECK_EQ(ems_pool_reserve(&pool, key2, 800, &r), 0);
    CHECK_EQ(r.exists, 0);
    memset(r.data, 0x11, 800);
    ems_pool_abort(&pool, &r);
    CHECK_EQ(ems_pool_exists(&pool, key2), 0);

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.blocks, 1);
    CHECK_EQ(stats.bytes_used, 500);
    CHECK_EQ(stats.puts, 1);

    /* Two reservations of one key: the first commit wins, the second is an idempotent
     * success that leaves the first block in place. */
    uint8_t key3[EMS_KEY_BYTES];
    key_of(key3, 7);
    ems_reservation_t a, b;
    CHECK_EQ(ems_pool_reserve(&pool, key3, 300, &a), 0);
    CHECK_EQ(ems_pool_reserve(&pool, key3, 300, &b), 0);
    CHECK_EQ(a.exists, 0);
    CHECK_EQ(b.exists, 0);
    CHECK(a.data != b.data);
    test_fill_payload(a.data, 300, 7);
    memset(b.data, 0x99, 300);
    CHECK_EQ(ems_pool_commit(&pool, &a), 0);
    CHECK_EQ(ems_pool_commit(&pool, &b), 1);
    CHECK_EQ(get_block(&pool, 7, 300), 1);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.blocks, 2);
    CHECK_EQ(stats.bytes_used, 800);
    check_stats_consistent(&pool);
    ems_pool_close(&pool);
}

/* ---- eviction ---------------------------------------------------------------------- */

/* Length of block `id` in the eviction tests: one of four sizes, each varied within a
 * few size classes. A pool keeps each slab in one class, so lengths spread over hundreds
 * of classes would leave a 16-slab pool holding about one block per slab; KV-cache
 * blocks come in a few sizes. */
static uint64_t mixed_length(uint64_t id)
{
    static const uint64_t sizes[] = {512, 4096, 16384, 60000};
    uint64_t state = id * 31 + 7;
    uint64_t r = test_next_random(&state);
    uint64_t size = sizes[r % 4];
    return size - (r >> 8) % (size / 32);
}

static void test_eviction_keeps_exact_contents(void)
{
    ems_pool_t pool;
    pool_open(&pool, 16 * SLAB, SLAB, 512);
    const uint64_t n = 3000;

    for (uint64_t id = 0; id < n; id++) {
        put_block(&pool, id, mixed_length(id));
        /* One writer and no pins: the block just stored must be readable at once. */
        CHECK_EQ(get_block(&pool, id, mixed_length(id)), 1);
        if (id % 500 == 0) {
            check_stats_consistent(&pool);
        }
    }

    uint64_t present = 0, present_bytes = 0;
    for (uint64_t id = 0; id < n; id++) {
        uint8_t key[EMS_KEY_BYTES];
        key_of(key, id);
        int64_t length = ems_pool_length(&pool, key);
        int hit = get_block(&pool, id, mixed_length(id));
        CHECK_EQ(hit, block_exists(&pool, id));
        if (hit) {
            CHECK_EQ(length, mixed_length(id));
            present++;
            present_bytes += mixed_length(id);
        } else {
            CHECK_EQ(length, -ENOENT);
        }
    }

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    fprintf(stderr, "%llu of %llu blocks present, %llu evictions, %llu slab moves\n",
            (unsigned long long)present, (unsigned long long)n,
            (unsigned long long)stats.evictions, (unsigned long long)stats.slab_moves);
    CHECK_EQ(stats.blocks, present);
    CHECK_EQ(stats.bytes_used, present_bytes);
    CHECK_EQ(stats.puts, n);
    CHECK_EQ(stats.evictions, n - present);
    CHECK(stats.evictions > 0);
    CHECK(stats.bytes_used <= stats.capacity);
    CHECK(present > 16);
    check_stats_consistent(&pool);
    ems_pool_close(&pool);
}

/* A pool filled by one class must hand slabs to another class when demand shifts. */
static void test_slabs_move_between_classes(void)
{
    ems_pool_t pool;
    pool_open(&pool, 8 * SLAB, SLAB, 2048);
    for (uint64_t id = 0; id < 2000; id++) {
        put_block(&pool, id, 200);
    }
    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.free_slabs, 0);

    for (uint64_t id = 10000; id < 10016; id++) {
        put_block(&pool, id, SLAB);
        CHECK_EQ(get_block(&pool, id, SLAB), 1);
    }
    pool_stats(&pool, &stats);
    CHECK(stats.slab_moves > 0);
    /* The last slab-sized blocks are all present: each takes a whole slab. */
    for (uint64_t id = 10016 - 4; id < 10016; id++) {
        CHECK_EQ(get_block(&pool, id, SLAB), 1);
    }
    for (uint64_t id = 0; id < 2000; id++) {
        get_block(&pool, id, 200);
    }
    check_stats_consistent(&pool);
    ems_pool_close(&pool);
}

/* More puts than entries: the entry table, not the data, forces eviction. */
static void test_entry_table_pressure(void)
{
    ems_pool_t pool;
    pool_open(&pool, 16 * SLAB, SLAB, EMS_MIN_ENTRIES);
    for (uint64_t id = 0; id < 1000; id++) {
        put_block(&pool, id, 100);
        CHECK_EQ(get_block(&pool, id, 100), 1);
    }
    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.max_blocks, EMS_MIN_ENTRIES);
    CHECK(stats.blocks <= EMS_MIN_ENTRIES);
    CHECK(stats.blocks > 0);
    CHECK_EQ(stats.evictions, 1000 - stats.blocks);
    uint64_t present = 0;
    for (uint64_t id = 0; id < 1000; id++) {
        present += (uint64_t)get_block(&pool, id, 100);
    }
    CHECK_EQ(present, stats.blocks);
    ems_pool_close(&pool);
}

/* Reservations are pinned: when every slot or entry is reserved, nothing can be
 * evicted and reserve fails with -ENOSPC until one is released. */
static void test_reservations_exhaust_pool(void)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 256);
    ems_reservation_t r[4], extra;
    uint8_t key[EMS_KEY_BYTES];

    for (uint64_t i = 0; i < 4; i++) {
        key_of(key, i);
        CHECK_EQ(ems_pool_reserve(&pool, key, SLAB, &r[i]), 0);
        CHECK_EQ(r[i].exists, 0);
    }
    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    uint64_t full_before = stats.pool_full;

    key_of(key, 100);
    CHECK_EQ(ems_pool_reserve(&pool, key, SLAB, &extra), -ENOSPC);
    CHECK_EQ(ems_pool_reserve(&pool, key, 100, &extra), -ENOSPC);
    CHECK_EQ(ems_pool_put(&pool, key, r[0].data, 100), -ENOSPC);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.pool_full, full_before + 3);

    /* Releasing one reservation frees its slab. */
    ems_pool_abort(&pool, &r[0]);
    CHECK_EQ(ems_pool_reserve(&pool, key, SLAB, &extra), 0);
    test_fill_payload(extra.data, SLAB, 100);
    CHECK_EQ(ems_pool_commit(&pool, &extra), 0);
    CHECK_EQ(get_block(&pool, 100, SLAB), 1);

    /* Committed blocks are evictable again. */
    for (uint64_t i = 1; i < 4; i++) {
        test_fill_payload(r[i].data, SLAB, i);
        CHECK_EQ(ems_pool_commit(&pool, &r[i]), 0);
    }
    put_block(&pool, 200, SLAB);
    CHECK_EQ(get_block(&pool, 200, SLAB), 1);
    ems_pool_close(&pool);

    /* The same with the entry table: every entry reserved. */
    pool_open(&pool, 16 * SLAB, SLAB, EMS_MIN_ENTRIES);
    ems_reservation_t small[EMS_MIN_ENTRIES];
    for (uint64_t i = 0; i < EMS_MIN_ENTRIES; i++) {
        key_of(key, i);
        CHECK_EQ(ems_pool_reserve(&pool, key, 64, &small[i]), 0);
    }
    key_of(key, 1000);
    CHECK_EQ(ems_pool_reserve(&pool, key, 64, &extra), -ENOSPC);
    for (uint64_t i = 0; i < EMS_MIN_ENTRIES; i++) {
        ems_pool_abort(&pool, &small[i]);
    }
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.blocks, 0);
    CHECK_EQ(stats.free_slabs, stats.slabs);
    CHECK_EQ(ems_pool_reserve(&pool, key, 64, &extra), 0);
    ems_pool_abort(&pool, &extra);
    ems_pool_close(&pool);
}

static void test_protect_survives_eviction(void)
{
    ems_pool_t pool;
    /* 8 slabs of 16 slots of 4032 bytes: 128 blocks fit. */
    pool_open(&pool, 8 * SLAB, SLAB, 1024);
    const uint64_t nprotected = 16, len = 4000;
    uint8_t keys[17 * EMS_KEY_BYTES];
    for (uint64_t i = 0; i < nprotected; i++) {
        put_block(&pool, i, len);
        key_of(keys + i * EMS_KEY_BYTES, i);
    }
    key_of(keys + nprotected * EMS_KEY_BYTES, 5555); /* absent */
    CHECK_EQ(ems_pool_protect(&pool, keys, nprotected + 1, 1), (int64_t)nprotected);

    /* Unprotected blocks stored at the same time as the protected ones. */
    for (uint64_t i = 100; i < 116; i++) {
        put_block(&pool, i, len);
    }
    for (uint64_t i = 1000; i < 2000; i++) {
        put_block(&pool, i, len);
    }
    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK(stats.evictions >= 1000 + 2 * nprotected - 128);
    for (uint64_t i = 0; i < nprotected; i++) {
        CHECK_EQ(block_exists(&pool, i), 1);
    }
    for (uint64_t i = 100; i < 116; i++) {
        CHECK_EQ(block_exists(&pool, i), 0);
    }
    for (uint64_t i = 0; i < nprotected; i++) {
        CHECK_EQ(get_block(&pool, i, len), 1);
    }

    /* Unprotected, they age out like the rest. */
    CHECK_EQ(ems_pool_protect(&pool, keys, nprotected + 1, 0), (int64_t)nprotected);
    for (uint64_t i = 2000; i < 3000; i++) {
        put_block(&pool, i, len);
    }
    for (uint64_t i = 0; i < nprotected; i++) {
        CHECK_EQ(block_exists(&pool, i), 0);
    }
    ems_pool_close(&pool);
}

/* Protected blocks are still evicted when nothing else can be. */
static void test_protect_yields_when_all_protected(void)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 256);
    uint8_t keys[4 * EMS_KEY_BYTES];
    for (uint64_t i = 0; i < 4; i++) {
        put_block(&pool, i, SLAB);
        key_of(keys + i * EMS_KEY_BYTES, i);
    }
    CHECK_EQ(ems_pool_protect(&pool, keys, 4, 1), 4);
    put_block(&pool, 50, SLAB);
    CHECK_EQ(get_block(&pool, 50, SLAB), 1);
    uint64_t present = 0;
    for (uint64_t i = 0; i < 4; i++) {
        present += (uint64_t)get_block(&pool, i, SLAB);
    }
    CHECK_EQ(present, 3);
    ems_pool_close(&pool);
}

/* ---- attach ------------------------------------------------------------------------ */

static void test_attach_reads(void)
{
    ems_pool_t owner, reader;
    /* 20 lengths in 20 size classes need 20 slabs, so nothing is evicted. */
    pool_open(&owner, 32 * SLAB, SLAB, 256);
    for (uint64_t id = 0; id < 20; id++) {
        put_block(&owner, id, 100 + id * 1000);
    }

    CHECK_EQ(ems_pool_attach(&reader, owner.arena.fd), 0);
    CHECK_EQ(reader.owner, 0);
    CHECK_EQ(reader.arena.writable, 0);
    CHECK_EQ(ems_pool_max_block(&reader), SLAB);
    for (uint64_t id = 0; id < 20; id++) {
        uint8_t key[EMS_KEY_BYTES];
        key_of(key, id);
        CHECK_EQ(get_block(&reader, id, 100 + id * 1000), 1);
        CHECK_EQ(ems_pool_length(&reader, key), 100 + id * 1000);
        CHECK_EQ(ems_pool_exists(&reader, key), 1);
    }
    CHECK_EQ(get_block(&reader, 500, 100), 0);

    /* Size mismatch is reported to readers too. */
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, 3);
    uint8_t buf[64];
    uint64_t actual = 0;
    CHECK_EQ(ems_pool_get(&reader, key, buf, sizeof buf, &actual), -EMSGSIZE);
    CHECK_EQ(actual, 3100);

    /* Writes after the attach are visible; deletes turn into misses. */
    put_block(&owner, 300, 7777);
    CHECK_EQ(get_block(&reader, 300, 7777), 1);
    key_of(key, 4);
    CHECK_EQ(ems_pool_delete(&owner, key), 0);
    CHECK_EQ(get_block(&reader, 4, 4100), 0);
    CHECK_EQ(ems_pool_exists(&reader, key), 0);

    /* Every write is rejected on an attached pool. */
    uint8_t data[16] = {0};
    ems_reservation_t r;
    key_of(key, 400);
    CHECK_EQ(ems_pool_put(&reader, key, data, sizeof data), -EPERM);
    CHECK_EQ(ems_pool_reserve(&reader, key, sizeof data, &r), -EPERM);
    key_of(key, 1);
    CHECK_EQ(ems_pool_delete(&reader, key), -EPERM);
    CHECK_EQ(ems_pool_protect(&reader, key, 1, 1), -EPERM);
    CHECK_EQ(get_block(&reader, 1, 1100), 1);
    CHECK_EQ(get_block(&owner, 400, sizeof data), 0);

    /* Reader statistics: the owner's figures, and the reader's own reads counted apart. */
    ems_pool_stats_t before, after, owner_stats;
    pool_stats(&reader, &before);
    pool_stats(&owner, &owner_stats);
    CHECK_EQ(before.capacity, owner_stats.capacity);
    CHECK_EQ(before.blocks, owner_stats.blocks);
    CHECK_EQ(before.bytes_used, owner_stats.bytes_used);
    CHECK_EQ(get_block(&reader, 1, 1100), 1);
    CHECK_EQ(get_block(&reader, 2, 2100), 1);
    CHECK_EQ(get_block(&reader, 777, 10), 0);
    pool_stats(&reader, &after);
    CHECK_EQ(after.reader_hits - before.reader_hits, 2);
    CHECK_EQ(after.reader_misses - before.reader_misses, 1);
    CHECK_EQ(after.hits, before.hits);
    CHECK_EQ(after.misses, before.misses);

    /* Once the owner closes, the reader's mapping stays valid and every read misses. */
    ems_pool_close(&owner);
    CHECK_EQ(get_block(&reader, 1, 1100), 0);
    key_of(key, 1);
    CHECK_EQ(ems_pool_exists(&reader, key), 0);
    CHECK_EQ(ems_pool_length(&reader, key), -ENOENT);
    ems_pool_close(&reader);
}

static void test_attach_rejects_other_files(void)
{
    ems_pool_t reader;
    CHECK_EQ(ems_pool_attach(&reader, -1), -EBADF);

    /* A zero-filled arena is not a pool. */
    ems_arena_t arena;
    CHECK_EQ(ems_arena_create(&arena, 2 * MIB, EMS_PAGES_SMALL, "ems-test-not-a-pool"), 0);
    CHECK_EQ(ems_pool_attach(&reader, arena.fd), -EINVAL);
    ems_arena_close(&arena);

    /* A file smaller than a header. */
    int fd = memfd_create("ems-test-tiny", MFD_CLOEXEC);
    CHECK(fd >= 0);
    CHECK_EQ(ftruncate(fd, 16), 0);
    CHECK_EQ(ems_pool_attach(&reader, fd), -EINVAL);
    close(fd);

    /* An unsupported layout version. */
    ems_pool_t owner;
    pool_open(&owner, 4 * SLAB, SLAB, 64);
    owner.layout->version = EMS_LAYOUT_VERSION + 1;
    CHECK_EQ(ems_pool_attach(&reader, owner.arena.fd), -EPROTO);
    owner.layout->version = EMS_LAYOUT_VERSION;

    /* A header whose offsets do not match its sizes. */
    owner.layout->data_off += 4096;
    CHECK_EQ(ems_pool_attach(&reader, owner.arena.fd), -EINVAL);
    owner.layout->data_off -= 4096;

    CHECK_EQ(ems_pool_attach(&reader, owner.arena.fd), 0);
    ems_pool_close(&reader);
    ems_pool_close(&owner);
}

/* A forked child attaches through the inherited fd and reads blocks stored before and
 * after it attached. */
static void test_attach_from_child_process(void)
{
    ems_pool_t owner;
    pool_open(&owner, 16 * SLAB, SLAB, 256);
    put_block(&owner, 1, 12345);

    int to_child[2], to_parent[2];
    CHECK_EQ(pipe(to_child), 0);
    CHECK_EQ(pipe(to_parent), 0);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        ems_pool_t reader;
        CHECK_EQ(ems_pool_attach(&reader, owner.arena.fd), 0);
        CHECK_EQ(get_block(&reader, 1, 12345), 1);
        CHECK_EQ(get_block(&reader, 2, 54321), 0);
        char c = 'r';
        CHECK_EQ(write(to_parent[1], &c, 1), 1);
        CHECK_EQ(read(to_child[0], &c, 1), 1);
        CHECK_EQ(get_block(&reader, 2, 54321), 1);
        CHECK_EQ(get_block(&reader, 1, 12345), 0);
        ems_pool_close(&reader);
        _Exit(0);
    }
    char c;
    CHECK_EQ(read(to_parent[0], &c, 1), 1);
    put_block(&owner, 2, 54321);
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, 1);
    CHECK_EQ(ems_pool_delete(&owner, key), 0);
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

/* A forked child turns its copy of the owner handle into a reader handle: reads work,
 * writes fail with -EPERM, and closing it does not close the parent's pool. */
static void test_disown_in_child_process(void)
{
    ems_pool_t owner;
    pool_open(&owner, 16 * SLAB, SLAB, 256);
    put_block(&owner, 1, 4321);

    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        ems_pool_disown(&owner);
        CHECK_EQ(owner.owner, 0);
        CHECK_EQ(get_block(&owner, 1, 4321), 1);
        CHECK_EQ(try_put_block(&owner, 2, 100), -EPERM);
        uint8_t key[EMS_KEY_BYTES];
        key_of(key, 1);
        CHECK_EQ(ems_pool_delete(&owner, key), -EPERM);
        ems_pool_close(&owner);
        _Exit(0);
    }
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);

    CHECK_EQ(get_block(&owner, 1, 4321), 1);
    put_block(&owner, 2, 100);
    CHECK_EQ(get_block(&owner, 2, 100), 1);
    ems_pool_close(&owner);
}

/* ---- batches ----------------------------------------------------------------------- */

static void test_batches(void)
{
    enum { N = 8 };
    ems_pool_t pool;
    pool_open(&pool, 16 * SLAB, SLAB, 256);
    uint8_t keys[N * EMS_KEY_BYTES];
    uint8_t *srcs[N];
    uint64_t lengths[N];
    int64_t results[N];
    for (uint64_t i = 0; i < N; i++) {
        key_of(keys + i * EMS_KEY_BYTES, i);
        lengths[i] = 500 + i * 300;
        srcs[i] = malloc(lengths[i]);
        CHECK(srcs[i] != NULL);
        test_fill_payload(srcs[i], lengths[i], i);
    }
    lengths[5] = 0; /* one invalid put in the batch */
    CHECK_EQ(ems_pool_put_many(&pool, keys, N, (const void *const *)srcs, lengths, results), 1);
    for (uint64_t i = 0; i < N; i++) {
        CHECK_EQ(results[i], i == 5 ? -EINVAL : 0);
    }
    lengths[5] = 500 + 5 * 300;

    /* Repeating keys 0..3 reports them as already stored, which is not a failure. */
    CHECK_EQ(ems_pool_put_many(&pool, keys, 4, (const void *const *)srcs, lengths, results), 0);
    for (uint64_t i = 0; i < 4; i++) {
        CHECK_EQ(results[i], 1);
    }

    uint8_t present[N];
    CHECK_EQ(ems_pool_exists_many(&pool, keys, N, present), N - 1);
    for (uint64_t i = 0; i < N; i++) {
        CHECK_EQ(present[i], i != 5);
    }
    CHECK_EQ(ems_pool_match_prefix(&pool, keys, N), 5);
    CHECK_EQ(ems_pool_match_prefix(&pool, keys, 3), 3);
    CHECK_EQ(ems_pool_match_prefix(&pool, keys + 5 * EMS_KEY_BYTES, 3), 0);
    CHECK_EQ(ems_pool_match_prefix(&pool, keys, 0), 0);

    uint8_t *dsts[N];
    uint64_t dst_lengths[N];
    for (uint64_t i = 0; i < N; i++) {
        dst_lengths[i] = lengths[i];
        dsts[i] = malloc(lengths[i]);
        CHECK(dsts[i] != NULL);
    }
    dst_lengths[2] = 10; /* wrong size: reported with the stored length */
    CHECK_EQ(ems_pool_get_many(&pool, keys, N, (void *const *)dsts, dst_lengths, results), N - 2);
    for (uint64_t i = 0; i < N; i++) {
        if (i == 5) {
            CHECK_EQ(results[i], -ENOENT);
        } else if (i == 2) {
            CHECK_EQ(results[i], -EMSGSIZE);
            CHECK_EQ(dst_lengths[i], lengths[i]);
        } else {
            CHECK_EQ(results[i], lengths[i]);
            CHECK(memcmp(dsts[i], srcs[i], lengths[i]) == 0);
        }
    }
    for (uint64_t i = 0; i < N; i++) {
        free(srcs[i]);
        free(dsts[i]);
    }
    ems_pool_close(&pool);
}

static void test_stats_counters(void)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 64);
    ems_pool_stats_t s0, s1;
    pool_stats(&pool, &s0);
    CHECK_EQ(s0.hits, 0);
    CHECK_EQ(s0.misses, 0);
    CHECK_EQ(s0.puts, 0);

    put_block(&pool, 1, 1000);
    put_block(&pool, 2, 2000);
    CHECK_EQ(try_put_block(&pool, 1, 1000), 1);
    CHECK_EQ(get_block(&pool, 1, 1000), 1);
    CHECK_EQ(get_block(&pool, 3, 1000), 0);
    CHECK_EQ(get_block(&pool, 3, 1000), 0);
    uint8_t key[EMS_KEY_BYTES];
    key_of(key, 2);
    CHECK_EQ(ems_pool_delete(&pool, key), 0);
    CHECK_EQ(ems_pool_exists(&pool, key), 0);

    pool_stats(&pool, &s1);
    CHECK_EQ(s1.puts, 2);
    CHECK_EQ(s1.put_exists, 1);
    CHECK_EQ(s1.hits, 1);
    CHECK_EQ(s1.misses, 2);
    CHECK_EQ(s1.deletes, 1);
    CHECK_EQ(s1.blocks, 1);
    CHECK_EQ(s1.bytes_used, 1000);
    CHECK_EQ(s1.evictions, 0);
    CHECK_EQ(s1.pool_full, 0);

    ems_class_stats_t classes[8];
    int n = ems_pool_stats(&pool, &s1, classes, 8);
    CHECK_EQ(n, 1);
    CHECK_EQ(classes[0].size_class, ems_slab_class_of(1000));
    CHECK_EQ(classes[0].slot_size, ems_slab_class_size(ems_slab_class_of(1000)));
    CHECK_EQ(classes[0].slabs, 1);
    CHECK_EQ(classes[0].blocks, 1);
    CHECK_EQ(classes[0].payload_bytes, 1000);
    CHECK_EQ(classes[0].wasted_bytes, classes[0].slot_size - 1000 +
                                          SLAB % classes[0].slot_size);

    /* More classes than rows: the return value still counts them all. */
    put_block(&pool, 10, 100);
    put_block(&pool, 11, 10000);
    CHECK_EQ(ems_pool_stats(&pool, &s1, classes, 1), 3);
    CHECK_EQ(s1.nclasses_used, 3);
    check_stats_consistent(&pool);
    ems_pool_close(&pool);
}

/* ---- spill ring -------------------------------------------------------------------- */

/* Evictions seen by a spill test: after each put, every tracked block that is gone was
 * evicted by that put. `evicted` lists ids in eviction order, and `length` is indexed by id. */
typedef struct eviction_log {
    uint64_t *present, npresent;
    uint64_t *evicted, nevicted;
    uint64_t *length;
    uint64_t max_ids;
} eviction_log_t;

static void log_init(eviction_log_t *log, uint64_t max_ids)
{
    memset(log, 0, sizeof *log);
    log->present = calloc(max_ids, sizeof(uint64_t));
    log->evicted = calloc(max_ids, sizeof(uint64_t));
    log->length = calloc(max_ids, sizeof(uint64_t));
    CHECK(log->present != NULL);
    CHECK(log->evicted != NULL);
    CHECK(log->length != NULL);
    log->max_ids = max_ids;
}

static void log_free(eviction_log_t *log)
{
    free(log->present);
    free(log->evicted);
    free(log->length);
}

/* Drops `id` from the tracked blocks without logging an eviction (a delete). */
static void log_forget(eviction_log_t *log, uint64_t id)
{
    for (uint64_t i = 0; i < log->npresent; i++) {
        if (log->present[i] == id) {
            log->present[i] = log->present[--log->npresent];
            return;
        }
    }
    CHECK(0);
}

/* Puts block `id` and logs what the put evicted. Returns how many blocks it evicted. */
static uint64_t put_tracked(ems_pool_t *pool, eviction_log_t *log, uint64_t id, uint64_t len)
{
    CHECK(id < log->max_ids);
    put_block(pool, id, len);
    log->length[id] = len;

    uint64_t evicted = 0, i = 0;
    while (i < log->npresent) {
        uint64_t other = log->present[i];
        if (block_exists(pool, other)) {
            i++;
            continue;
        }
        log->evicted[log->nevicted++] = other;
        log->present[i] = log->present[--log->npresent];
        evicted++;
    }
    log->present[log->npresent++] = id;
    return evicted;
}

/* Checks that a record taken from the ring is block `id`, byte for byte. */
static void check_record(const eviction_log_t *log, uint64_t id, const uint8_t *key,
                         uint64_t length, const uint8_t *payload)
{
    uint8_t expected_key[EMS_KEY_BYTES];
    key_of(expected_key, id);
    CHECK(memcmp(key, expected_key, EMS_KEY_BYTES) == 0);
    CHECK_EQ(length, log->length[id]);
    uint8_t *expected = malloc(length);
    CHECK(expected != NULL);
    test_fill_payload(expected, length, id);
    CHECK(memcmp(payload, expected, length) == 0);
    free(expected);
}

/* Buffers for ems_pool_take_evicted: room for `max` keys and lengths and `bytes` of
 * payload. */
typedef struct take_buffers {
    uint8_t *keys;
    uint64_t *lengths;
    uint8_t *data;
    uint64_t max, bytes;
} take_buffers_t;

static void take_init(take_buffers_t *t, uint64_t max, uint64_t bytes)
{
    t->keys = malloc(max * EMS_KEY_BYTES);
    t->lengths = malloc(max * sizeof(uint64_t));
    t->data = malloc(bytes);
    CHECK(t->keys != NULL);
    CHECK(t->lengths != NULL);
    CHECK(t->data != NULL);
    t->max = max;
    t->bytes = bytes;
}

static void take_free(take_buffers_t *t)
{
    free(t->keys);
    free(t->lengths);
    free(t->data);
}

/* Takes every held record and checks it against log->evicted[first..], in order.
 * Returns how many it took. */
static uint64_t take_in_order(ems_pool_t *pool, const eviction_log_t *log, uint64_t first,
                              take_buffers_t *t)
{
    uint64_t n = ems_pool_take_evicted(pool, t->keys, t->lengths, t->data, t->bytes, t->max);
    uint64_t offset = 0;
    for (uint64_t i = 0; i < n; i++) {
        CHECK(first + i < log->nevicted);
        check_record(log, log->evicted[first + i], t->keys + i * EMS_KEY_BYTES, t->lengths[i],
                     t->data + offset);
        offset += t->lengths[i];
    }
    return n;
}

/* Sum of the record sizes of log->evicted[first..first + n). */
static uint64_t record_bytes_of(const eviction_log_t *log, uint64_t first, uint64_t n)
{
    uint64_t bytes = 0;
    for (uint64_t i = first; i < first + n; i++) {
        bytes += ems_spill_record_bytes(log->length[log->evicted[i]]);
    }
    return bytes;
}

/* A length in size class 63 (4033..4096 bytes, 4096-byte slots): 16 blocks per slab, so
 * each put into a full pool evicts exactly one block, while record sizes still vary. */
static uint64_t class63_length(uint64_t id)
{
    uint64_t state = id * 0x2545f4914f6cdd1dULL;
    return 4033 + test_next_random(&state) % 64;
}

static void test_spill_ring_arguments(void)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 256);
    uint64_t min_bytes = ems_pool_max_block(&pool) + EMS_SPILL_RECORD_HEADER;
    CHECK_EQ(ems_spill_record_bytes(SLAB), min_bytes);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, min_bytes - 1), -EINVAL);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, 1), -EINVAL);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, 0), 0);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, min_bytes), 0);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, min_bytes), 0);

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_ring_bytes, min_bytes);
    CHECK_EQ(stats.spill_ring_used, 0);
    CHECK_EQ(stats.spill_captured, 0);
    CHECK_EQ(stats.spill_dropped, 0);

    /* An empty ring, or no room for a record at all, gives 0 and changes nothing. */
    uint8_t keys[4 * EMS_KEY_BYTES], data[8];
    uint64_t lengths[4];
    CHECK_EQ(ems_pool_take_evicted(&pool, keys, lengths, data, sizeof data, 4), 0);
    CHECK_EQ(ems_pool_take_evicted(&pool, keys, lengths, data, sizeof data, 0), 0);

    /* An attached handle can neither set, drain nor mark. */
    ems_pool_t reader;
    CHECK_EQ(ems_pool_attach(&reader, pool.arena.fd), 0);
    CHECK_EQ(ems_pool_set_spill_ring(&reader, min_bytes), -EPERM);
    CHECK_EQ(ems_pool_set_spill_ring(&reader, 0), -EPERM);
    CHECK_EQ(ems_pool_take_evicted(&reader, keys, lengths, data, sizeof data, 4), 0);
    key_of(keys, 1);
    CHECK_EQ(ems_pool_mark_spilled(&reader, keys, 1), -EPERM);
    pool_stats(&reader, &stats);
    CHECK_EQ(stats.spill_ring_bytes, 0);
    ems_pool_close(&reader);

    CHECK_EQ(ems_pool_mark_spilled(&pool, keys, 1), 0);
    ems_pool_close(&pool);
}

/* Every evicted block reaches the ring, in eviction order and byte for byte. */
static void test_spill_ring_captures_in_order(void)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 256);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, 1 * MIB), 0);
    eviction_log_t log;
    log_init(&log, 200);
    for (uint64_t id = 0; id < 200; id++) {
        CHECK(put_tracked(&pool, &log, id, class63_length(id)) <= 1);
    }
    CHECK_EQ(log.nevicted, 200 - 64);

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.evictions, log.nevicted);
    CHECK_EQ(stats.spill_captured, log.nevicted);
    CHECK_EQ(stats.spill_dropped, 0);
    CHECK_EQ(stats.spill_ring_bytes, 1 * MIB);
    CHECK_EQ(stats.spill_ring_used, record_bytes_of(&log, 0, log.nevicted));

    /* A buffer one byte short of the oldest payload takes nothing and loses nothing. */
    take_buffers_t t;
    take_init(&t, log.nevicted + 8, log.nevicted * 4096);
    uint64_t first_length = log.length[log.evicted[0]];
    CHECK_EQ(ems_pool_take_evicted(&pool, t.keys, t.lengths, t.data, first_length - 1, 8), 0);
    CHECK_EQ(ems_pool_take_evicted(&pool, t.keys, t.lengths, t.data, t.bytes, 0), 0);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_ring_used, record_bytes_of(&log, 0, log.nevicted));

    /* Exactly the oldest payload fits: one record. */
    uint64_t saved_bytes = t.bytes;
    t.bytes = first_length;
    CHECK_EQ(take_in_order(&pool, &log, 0, &t), 1);
    t.bytes = saved_bytes;

    /* The rest in one call, the consecutive payloads filling the buffer from offset 0. */
    CHECK_EQ(take_in_order(&pool, &log, 1, &t), log.nevicted - 1);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_ring_used, 0);
    CHECK_EQ(stats.spill_captured, log.nevicted);
    CHECK_EQ(ems_pool_take_evicted(&pool, t.keys, t.lengths, t.data, t.bytes, t.max), 0);

    /* Present blocks are untouched by the capture. */
    for (uint64_t i = 0; i < log.npresent; i++) {
        uint64_t id = log.present[i];
        CHECK_EQ(get_block(&pool, id, log.length[id]), 1);
    }
    check_stats_consistent(&pool);
    take_free(&t);
    log_free(&log);
    ems_pool_close(&pool);
}

/* Deleted blocks (pinned or not) and blocks marked SPILLED are freed without a copy. A
 * later put of a spilled key stores a block that is captured again. */
static void test_spill_ring_skips_deleted_and_spilled(void)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 256);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, 2 * MIB), 0);
    eviction_log_t log;
    log_init(&log, 400);
    for (uint64_t id = 0; id < 64; id++) {
        CHECK_EQ(put_tracked(&pool, &log, id, 4000), 0);
    }

    /* Delete 0..3, and 4 while it is pinned: the last unpin frees it. */
    uint8_t key[EMS_KEY_BYTES];
    for (uint64_t id = 0; id < 4; id++) {
        key_of(key, id);
        CHECK_EQ(ems_pool_delete(&pool, key), 0);
        log_forget(&log, id);
    }
    const uint8_t *data;
    uint32_t pin;
    key_of(key, 4);
    CHECK_EQ(ems_pool_pin(&pool, key, 4000, &data, &pin), 4000);
    CHECK_EQ(ems_pool_delete(&pool, key), 0);
    ems_pool_unpin(&pool, pin);
    log_forget(&log, 4);

    /* Mark 5..9 and one absent key. */
    uint8_t marks[6 * EMS_KEY_BYTES];
    for (uint64_t i = 0; i < 5; i++) {
        key_of(marks + i * EMS_KEY_BYTES, 5 + i);
    }
    key_of(marks + 5 * EMS_KEY_BYTES, 9999);
    CHECK_EQ(ems_pool_mark_spilled(&pool, marks, 6), 5);

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.deletes, 5);
    CHECK_EQ(stats.spill_captured, 0);

    /* Evict every old block. */
    for (uint64_t id = 64; id < 200; id++) {
        CHECK(put_tracked(&pool, &log, id, 4000) <= 1);
    }
    for (uint64_t id = 0; id < 64; id++) {
        CHECK_EQ(block_exists(&pool, id), 0);
    }

    /* The ring holds the evictions in order, less the marked blocks. */
    take_buffers_t t;
    take_init(&t, 400, 400 * 4096);
    uint64_t n = ems_pool_take_evicted(&pool, t.keys, t.lengths, t.data, t.bytes, t.max);
    uint64_t next = 0, offset = 0, skipped = 0;
    for (uint64_t i = 0; i < log.nevicted; i++) {
        uint64_t id = log.evicted[i];
        CHECK(id >= 5);
        if (id <= 9) {
            skipped++;
            continue;
        }
        CHECK(next < n);
        check_record(&log, id, t.keys + next * EMS_KEY_BYTES, t.lengths[next],
                     t.data + offset);
        offset += t.lengths[next];
        next++;
    }
    CHECK_EQ(skipped, 5);
    CHECK_EQ(next, n);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.evictions, log.nevicted);
    CHECK_EQ(stats.spill_captured, log.nevicted - 5);
    CHECK_EQ(stats.spill_dropped, 0);

    /* Block 5 stored again is a new block without the mark. */
    uint64_t first = log.nevicted;
    CHECK(put_tracked(&pool, &log, 5, 4000) <= 1);
    for (uint64_t id = 200; id < 300 && block_exists(&pool, 5); id++) {
        CHECK(put_tracked(&pool, &log, id, 4000) <= 1);
    }
    CHECK_EQ(block_exists(&pool, 5), 0);
    CHECK_EQ(take_in_order(&pool, &log, first, &t), log.nevicted - first);
    CHECK_EQ(log.evicted[log.nevicted - 1], 5);
    take_free(&t);
    log_free(&log);
    ems_pool_close(&pool);
}

/* A full ring drops new blocks and counts them, while the pool and the held records stay
 * intact. Closing with records held frees them (ASan checks for the leak). */
static void test_spill_ring_drops_when_full(void)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 256);
    /* The smallest ring: 65576 bytes hold 16 records of 4040 bytes (4000 + header). */
    uint64_t ring_bytes = ems_spill_record_bytes(SLAB);
    CHECK_EQ(ems_spill_record_bytes(4000), 4040);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, ring_bytes), 0);
    eviction_log_t log;
    log_init(&log, 300);
    for (uint64_t id = 0; id < 114; id++) {
        CHECK(put_tracked(&pool, &log, id, 4000) <= 1);
    }
    CHECK_EQ(log.nevicted, 50);

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_captured, 16);
    CHECK_EQ(stats.spill_dropped, 34);
    CHECK_EQ(stats.evictions, 50);
    CHECK_EQ(stats.spill_ring_used, 16 * 4040);
    for (uint64_t i = 0; i < log.npresent; i++) {
        uint64_t id = log.present[i];
        CHECK_EQ(get_block(&pool, id, 4000), 1);
    }
    check_stats_consistent(&pool);

    /* The 16 held records are the oldest evictions. */
    take_buffers_t t;
    take_init(&t, 64, 64 * 4096);
    CHECK_EQ(take_in_order(&pool, &log, 0, &t), 16);

    /* With room again, evictions are captured again. */
    uint64_t first = log.nevicted;
    for (uint64_t id = 114; id < 119; id++) {
        CHECK_EQ(put_tracked(&pool, &log, id, 4000), 1);
    }
    CHECK_EQ(take_in_order(&pool, &log, first, &t), 5);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_captured, 21);
    CHECK_EQ(stats.spill_dropped, 34);

    /* Fill it again and close without draining. */
    for (uint64_t id = 119; id < 139; id++) {
        CHECK_EQ(put_tracked(&pool, &log, id, 4000), 1);
    }
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_captured, 37);
    CHECK_EQ(stats.spill_dropped, 38);
    take_free(&t);
    log_free(&log);
    ems_pool_close(&pool);
}

/* Resizing moves held records oldest first and drops the newest that do not fit.
 * Disabling drops them all and stops capture. */
static void test_spill_ring_resize_moves_records(void)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 256);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, 1 * MIB), 0);
    eviction_log_t log;
    log_init(&log, 300);
    for (uint64_t id = 0; id < 104; id++) {
        put_tracked(&pool, &log, id, 4000);
    }
    CHECK_EQ(log.nevicted, 40);

    ems_pool_stats_t stats;
    CHECK_EQ(ems_pool_set_spill_ring(&pool, 2 * MIB), 0);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_ring_bytes, 2 * MIB);
    CHECK_EQ(stats.spill_ring_used, 40 * 4040);
    CHECK_EQ(stats.spill_dropped, 0);

    CHECK_EQ(ems_pool_set_spill_ring(&pool, ems_spill_record_bytes(SLAB)), 0);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_ring_used, 16 * 4040);
    CHECK_EQ(stats.spill_dropped, 24);

    take_buffers_t t;
    take_init(&t, 4, 4 * 4096);
    CHECK_EQ(take_in_order(&pool, &log, 0, &t), 4);

    /* Disabling drops the 12 still held, and evictions then copy nothing. */
    CHECK_EQ(ems_pool_set_spill_ring(&pool, 0), 0);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_ring_bytes, 0);
    CHECK_EQ(stats.spill_ring_used, 0);
    CHECK_EQ(stats.spill_dropped, 36);
    CHECK_EQ(stats.spill_captured, 40);
    CHECK_EQ(ems_pool_take_evicted(&pool, t.keys, t.lengths, t.data, t.bytes, t.max), 0);
    for (uint64_t id = 104; id < 114; id++) {
        put_tracked(&pool, &log, id, 4000);
    }
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.evictions, 50);
    CHECK_EQ(stats.spill_captured, 40);
    CHECK_EQ(stats.spill_dropped, 36);

    /* Enabled again, it captures from the next eviction on. */
    CHECK_EQ(ems_pool_set_spill_ring(&pool, 1 * MIB), 0);
    uint64_t first = log.nevicted;
    put_tracked(&pool, &log, 114, 4000);
    CHECK_EQ(take_in_order(&pool, &log, first, &t), 1);
    take_free(&t);
    log_free(&log);
    ems_pool_close(&pool);
}

/* Wrap-around at exact offsets: a ring of 17 records of 4040 bytes plus a gap of `gap`
 * bytes. A gap of 0 wraps with no padding, a gap shorter than a record header with
 * unmarked padding, and a longer gap with a wrap marker. */
static void check_wrap_gap(uint64_t gap)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 256);
    uint64_t ring_bytes = 17 * 4040 + gap;
    CHECK_EQ(ems_pool_set_spill_ring(&pool, ring_bytes), 0);
    eviction_log_t log;
    log_init(&log, 200);
    take_buffers_t t;
    take_init(&t, 32, 32 * 4096);

    /* 17 evictions fill the ring up to the gap, so the 18th (index 17) is dropped. */
    for (uint64_t id = 0; id < 64 + 18; id++) {
        put_tracked(&pool, &log, id, 4000);
    }
    CHECK_EQ(log.nevicted, 18);
    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_ring_used, 17 * 4040);
    CHECK_EQ(stats.spill_dropped, 1);

    /* Taking two frees the start. The next two records wrap to offset 0 and pad the gap,
     * which fills the ring exactly, so the one after (index 20) is dropped. */
    t.max = 2;
    CHECK_EQ(take_in_order(&pool, &log, 0, &t), 2);
    t.max = 32;
    for (uint64_t id = 64 + 18; id < 64 + 21; id++) {
        CHECK_EQ(put_tracked(&pool, &log, id, 4000), 1);
    }
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_ring_used, ring_bytes);
    CHECK_EQ(stats.spill_captured, 19);
    CHECK_EQ(stats.spill_dropped, 2);

    /* The reader skips the padding: 2..16, then 18 and 19. */
    t.max = 15;
    CHECK_EQ(take_in_order(&pool, &log, 2, &t), 15);
    t.max = 32;
    uint64_t n = ems_pool_take_evicted(&pool, t.keys, t.lengths, t.data, t.bytes, t.max);
    CHECK_EQ(n, 2);
    check_record(&log, log.evicted[18], t.keys, t.lengths[0], t.data);
    check_record(&log, log.evicted[19], t.keys + EMS_KEY_BYTES, t.lengths[1], t.data + 4000);
    pool_stats(&pool, &stats);
    CHECK_EQ(stats.spill_ring_used, 0);
    take_free(&t);
    log_free(&log);
    ems_pool_close(&pool);
}

static void test_spill_ring_wrap_gaps(void)
{
    CHECK_EQ(17 * 4040, 68680);
    CHECK(17 * 4040 >= ems_spill_record_bytes(SLAB));
    check_wrap_gap(0);
    check_wrap_gap(16);
    check_wrap_gap(EMS_SPILL_RECORD_HEADER - 1);
    check_wrap_gap(EMS_SPILL_RECORD_HEADER);
    check_wrap_gap(100);
    check_wrap_gap(4039);
}

/* Many evict and take cycles with random take sizes keep a small ring partly full, so
 * records wrap around its end (its size is not a multiple of the record alignment) and
 * some are dropped. What is taken must be a subsequence of the evictions, exact to the
 * byte, and taken + dropped must account for every eviction. */
static void test_spill_ring_wraps_across_cycles(void)
{
    ems_pool_t pool;
    pool_open(&pool, 4 * SLAB, SLAB, 256);
    uint64_t ring_bytes = ems_spill_record_bytes(SLAB) + 1234;
    CHECK_EQ(ems_pool_set_spill_ring(&pool, ring_bytes), 0);
    const uint64_t n = 3000;
    eviction_log_t log;
    log_init(&log, n);
    take_buffers_t t;
    take_init(&t, 64, 64 * 4096);

    uint64_t state = 0x5711, cursor = 0, taken = 0, passed_bytes = 0;
    for (uint64_t id = 0; id <= n; id++) {
        if (id < n)
            CHECK(put_tracked(&pool, &log, id, class63_length(id)) <= 1);

        /* Take 0 to 2 records into a buffer that fits them, or into a random smaller one.
         * Takes then fall a little behind the one eviction per put, so the ring fills up at
         * times. After the last put, drain everything. */
        uint64_t r = test_next_random(&state);
        uint64_t max = id < n ? r % 3 : t.max;
        uint64_t bytes = id < n && (r >> 8) % 3 == 0 ? (r >> 16) % (3 * 4096) : t.bytes;
        uint64_t got;
        do {
            got = ems_pool_take_evicted(&pool, t.keys, t.lengths, t.data, bytes, max);
            CHECK(got <= max);
            uint64_t offset = 0;
            for (uint64_t i = 0; i < got; i++) {
                uint8_t key[EMS_KEY_BYTES];
                while (cursor < log.nevicted) {
                    key_of(key, log.evicted[cursor]);
                    if (memcmp(key, t.keys + i * EMS_KEY_BYTES, EMS_KEY_BYTES) == 0)
                        break;
                    cursor++;
                }
                CHECK(cursor < log.nevicted);
                check_record(&log, log.evicted[cursor], t.keys + i * EMS_KEY_BYTES,
                             t.lengths[i], t.data + offset);
                offset += t.lengths[i];
                passed_bytes += ems_spill_record_bytes(t.lengths[i]);
                cursor++;
                taken++;
            }
            CHECK(offset <= bytes);
        } while (id == n && got != 0);
    }

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    fprintf(stderr, "%llu evictions, %llu taken, %llu dropped, %llu ring bytes passed\n",
            (unsigned long long)stats.evictions, (unsigned long long)taken,
            (unsigned long long)stats.spill_dropped, (unsigned long long)passed_bytes);
    CHECK_EQ(stats.evictions, log.nevicted);
    CHECK_EQ(stats.spill_captured, taken);
    CHECK_EQ(stats.spill_captured + stats.spill_dropped, stats.evictions);
    CHECK_EQ(stats.spill_ring_used, 0);
    CHECK(stats.spill_dropped > 0);
    CHECK(passed_bytes > 20 * ring_bytes);
    check_stats_consistent(&pool);
    take_free(&t);
    log_free(&log);
    ems_pool_close(&pool);
}

/* Mixed block sizes make slabs move between classes, and the blocks a move evicts are
 * captured too. The ring is drained after every put, and each drain must return
 * exactly the blocks that put evicted (a slab move evicts them in entry order). */
static void test_spill_ring_captures_slab_moves(void)
{
    ems_pool_t pool;
    pool_open(&pool, 16 * SLAB, SLAB, 512);
    CHECK_EQ(ems_pool_set_spill_ring(&pool, 4 * SLAB), 0);
    const uint64_t n = 1200;
    eviction_log_t log;
    log_init(&log, n);
    take_buffers_t t;
    take_init(&t, 512, 4 * SLAB);
    uint8_t *seen = calloc(n, 1);
    CHECK(seen != NULL);

    for (uint64_t id = 0; id < n; id++) {
        uint64_t first = log.nevicted;
        uint64_t evicted = put_tracked(&pool, &log, id, mixed_length(id));
        uint64_t got = ems_pool_take_evicted(&pool, t.keys, t.lengths, t.data, t.bytes, t.max);
        CHECK_EQ(got, evicted);

        /* Each record is one of this put's evictions, each taken once. */
        uint64_t offset = 0;
        for (uint64_t i = 0; i < got; i++) {
            uint64_t match = UINT64_MAX;
            for (uint64_t j = first; j < log.nevicted; j++) {
                uint8_t key[EMS_KEY_BYTES];
                key_of(key, log.evicted[j]);
                if (memcmp(key, t.keys + i * EMS_KEY_BYTES, EMS_KEY_BYTES) == 0)
                    match = log.evicted[j];
            }
            CHECK(match != UINT64_MAX);
            CHECK_EQ(seen[match], 0);
            seen[match] = 1;
            check_record(&log, match, t.keys + i * EMS_KEY_BYTES, t.lengths[i],
                         t.data + offset);
            offset += t.lengths[i];
        }
    }

    ems_pool_stats_t stats;
    pool_stats(&pool, &stats);
    fprintf(stderr, "%llu evictions, %llu slab moves\n", (unsigned long long)stats.evictions,
            (unsigned long long)stats.slab_moves);
    CHECK(stats.slab_moves > 0);
    CHECK_EQ(stats.evictions, log.nevicted);
    CHECK_EQ(stats.spill_captured, log.nevicted);
    CHECK_EQ(stats.spill_dropped, 0);
    check_stats_consistent(&pool);
    free(seen);
    take_free(&t);
    log_free(&log);
    ems_pool_close(&pool);
}

/* One thread puts into a pool that evicts on every put while another drains the ring
 * (and reads the statistics, which take the pool mutex, then the ring lock). Keys carry
 * their id in the first 8 bytes, so the taker can check each record without a lookup.
 * Under TSan this checks the locking between eviction and take. */
enum { RACE_BLOCKS = 3000, RACE_TAKE = 16 };

typedef struct spill_race {
    ems_pool_t pool;
    _Atomic int writer_done;
    uint64_t taken;
} spill_race_t;

static void race_key(uint8_t key[EMS_KEY_BYTES], uint64_t id)
{
    memset(key, 0x5a, EMS_KEY_BYTES);
    memcpy(key, &id, sizeof id);
}

static void *race_writer(void *arg)
{
    spill_race_t *race = arg;
    uint8_t key[EMS_KEY_BYTES], buf[4096];
    for (uint64_t id = 0; id < RACE_BLOCKS; id++) {
        uint64_t len = class63_length(id);
        race_key(key, id);
        test_fill_payload(buf, len, id);
        CHECK_EQ(ems_pool_put(&race->pool, key, buf, len), 0);
    }
    atomic_store_explicit(&race->writer_done, 1, memory_order_release);
    return NULL;
}

static void *race_taker(void *arg)
{
    spill_race_t *race = arg;
    uint8_t *seen = calloc(RACE_BLOCKS, 1);
    uint8_t keys[RACE_TAKE * EMS_KEY_BYTES], expected_key[EMS_KEY_BYTES], expected[4096];
    uint64_t lengths[RACE_TAKE];
    uint8_t *data = malloc(RACE_TAKE * 4096);
    CHECK(seen != NULL);
    CHECK(data != NULL);

    for (uint64_t round = 0;; round++) {
        int done = atomic_load_explicit(&race->writer_done, memory_order_acquire);
        uint64_t got = ems_pool_take_evicted(&race->pool, keys, lengths, data,
                                             RACE_TAKE * 4096, RACE_TAKE);
        uint64_t offset = 0;
        for (uint64_t i = 0; i < got; i++) {
            uint64_t id;
            memcpy(&id, keys + i * EMS_KEY_BYTES, sizeof id);
            CHECK(id < RACE_BLOCKS);
            race_key(expected_key, id);
            CHECK(memcmp(keys + i * EMS_KEY_BYTES, expected_key, EMS_KEY_BYTES) == 0);
            CHECK_EQ(seen[id], 0);
            seen[id] = 1;
            CHECK_EQ(lengths[i], class63_length(id));
            test_fill_payload(expected, lengths[i], id);
            CHECK(memcmp(data + offset, expected, lengths[i]) == 0);
            offset += lengths[i];
        }
        race->taken += got;
        if (round % 64 == 0) {
            ems_pool_stats_t stats;
            CHECK(ems_pool_stats(&race->pool, &stats, NULL, 0) >= 0);
            CHECK(stats.spill_captured >= race->taken);
        }
        if (done && got == 0)
            break;
    }
    free(seen);
    free(data);
    return NULL;
}

static void test_spill_ring_concurrent_take(void)
{
    spill_race_t race = {.taken = 0};
    atomic_init(&race.writer_done, 0);
    pool_open(&race.pool, 4 * SLAB, SLAB, 256);
    CHECK_EQ(ems_pool_set_spill_ring(&race.pool, 1 * MIB), 0);

    pthread_t writer, taker;
    CHECK_EQ(pthread_create(&taker, NULL, race_taker, &race), 0);
    CHECK_EQ(pthread_create(&writer, NULL, race_writer, &race), 0);
    CHECK_EQ(pthread_join(writer, NULL), 0);
    CHECK_EQ(pthread_join(taker, NULL), 0);

    ems_pool_stats_t stats;
    pool_stats(&race.pool, &stats);
    fprintf(stderr, "%llu evictions, %llu taken, %llu dropped\n",
            (unsigned long long)stats.evictions, (unsigned long long)race.taken,
            (unsigned long long)stats.spill_dropped);
    CHECK_EQ(stats.evictions, RACE_BLOCKS - 64);
    CHECK_EQ(stats.spill_captured, race.taken);
    CHECK_EQ(stats.spill_captured + stats.spill_dropped, stats.evictions);
    CHECK_EQ(stats.spill_ring_used, 0);
    check_stats_consistent(&race.pool);
    ems_pool_close(&race.pool);
}

int main(int argc, char **argv)
{
    /* `test_pool spill` runs only the multi-threaded spill test, for ThreadSanitizer. */
    if (argc > 1 && strcmp(argv[1], "spill") == 0) {
        RUN_TEST(test_spill_ring_concurrent_take);
        fprintf(stderr, "test_pool spill: all passed\n");
        return 0;
    }
    RUN_TEST(test_default_slab_size);
    RUN_TEST(test_create_sizes);
    RUN_TEST(test_create_rejects_bad_config);
    RUN_TEST(test_put_get_round_trip);
    RUN_TEST(test_put_is_idempotent);
    RUN_TEST(test_get_and_put_size_errors);
    RUN_TEST(test_delete);
    RUN_TEST(test_reserve_commit_abort);
    RUN_TEST(test_eviction_keeps_exact_contents);
    RUN_TEST(test_slabs_move_between_classes);
    RUN_TEST(test_entry_table_pressure);
    RUN_TEST(test_reservations_exhaust_pool);
    RUN_TEST(test_protect_survives_eviction);
    RUN_TEST(test_protect_yields_when_all_protected);
    RUN_TEST(test_attach_reads);
    RUN_TEST(test_attach_rejects_other_files);
    RUN_TEST(test_attach_from_child_process);
    RUN_TEST(test_disown_in_child_process);
    RUN_TEST(test_batches);
    RUN_TEST(test_stats_counters);
    RUN_TEST(test_spill_ring_arguments);
    RUN_TEST(test_spill_ring_captures_in_order);
    RUN_TEST(test_spill_ring_skips_deleted_and_spilled);
    RUN_TEST(test_spill_ring_drops_when_full);
    RUN_TEST(test_spill_ring_resize_moves_records);
    RUN_TEST(test_spill_ring_wrap_gaps);
    RUN_TEST(test_spill_ring_wraps_across_cycles);
    RUN_TEST(test_spill_ring_captures_slab_moves);
    RUN_TEST(test_spill_ring_concurrent_take);
    fprintf(stderr, "test_pool: all passed\n");
    return 0;
}
