/* Multi-threaded pool test: four owner threads put, reserve, get, delete and query
 * overlapping keys of a small pool that evicts all the time, while an attached reader
 * (a second, read-only mapping of the same memfd) copies blocks optimistically.
 *
 * Block contents are a function of the key id, so every hit is compared byte for byte
 * with the only contents that key can have: a single wrong byte fails the test. At the
 * end the pool must be quiescent: every entry free or committed with no pin left, and
 * the statistics must match the blocks that are present.
 *
 * Under ThreadSanitizer (gcc defines __SANITIZE_THREAD__) the attached reader is left
 * out. TSan tracks memory by virtual address, and the reader reads through its own
 * mapping of the memfd, so TSan cannot relate its loads to the owner's stores and the
 * reader would only add run time. The owner threads share one mapping and are checked.
 *
 * A second, smaller scenario races a copier against a filler in a two-slab pool to check
 * that eviction never takes a block that an owner thread has pinned for a copy.
 *
 * Usage: test_pool_stress [ops_per_thread] (default 20000; the pin race runs a quarter).
 */
#define _GNU_SOURCE

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "pool.h"

#if defined(__SANITIZE_THREAD__)
#define WITH_ATTACHED_READER 0
#else
#define WITH_ATTACHED_READER 1
#endif

enum {
    NWORKERS = 4,
    NKEYS = 400,
    SLAB = 64 << 10,
    NSLABS = 16,
    MAX_BLOCKS = 256,
};

typedef struct stress {
    ems_pool_t pool;
    uint8_t keys[NKEYS][EMS_KEY_BYTES];
    uint8_t *payload[NKEYS]; /* the only contents key i can have */
    uint64_t length[NKEYS];
    long ops;
    _Atomic int workers_done;
} stress_t;

typedef struct worker_result {
    uint64_t hits, misses, stored, existed, enospc, deletes, aborts;
} worker_result_t;

typedef struct worker_arg {
    stress_t *s;
    uint64_t seed;
    worker_result_t result;
} worker_arg_t;

/* Three sizes, each varied within one or two size classes. The 1 MiB pool holds only a
 * fraction of the 400 keys (50 to 90 blocks at the end of test runs), so puts evict. */
static uint64_t key_length(uint64_t id)
{
    static const uint64_t sizes[] = {1024, 4096, 30000};
    uint64_t state = id + 12345;
    uint64_t r = test_next_random(&state);
    uint64_t size = sizes[r % 3];
    return size - (r >> 8) % (size / 64);
}

/* Checks one get result against key `k`: a hit must carry the exact payload. */
static void check_get(const stress_t *s, uint32_t k, int64_t rc, const uint8_t *buf,
                      worker_result_t *r)
{
    if (rc == -ENOENT) {
        r->misses++;
        return;
    }
    CHECK_EQ(rc, s->length[k]);
    if (memcmp(buf, s->payload[k], s->length[k]) != 0) {
        uint64_t first = 0;
        while (buf[first] == s->payload[k][first]) {
            first++;
        }
        fprintf(stderr, "key %u: wrong byte at offset %llu of %llu\n", k,
                (unsigned long long)first, (unsigned long long)s->length[k]);
    }
    CHECK(memcmp(buf, s->payload[k], s->length[k]) == 0);
    r->hits++;
}

static void do_put(stress_t *s, uint32_t k, worker_result_t *r)
{
    int rc = ems_pool_put(&s->pool, s->keys[k], s->payload[k], s->length[k]);
    if (rc == 0) {
        r->stored++;
    } else if (rc == 1) {
        r->existed++;
    } else {
        CHECK_EQ(rc, -ENOSPC);
        r->enospc++;
    }
}

/* Two-phase put, filled in two halves; one reservation in four is aborted instead. */
static void do_reserve(stress_t *s, uint32_t k, uint64_t pick, worker_result_t *r)
{
    ems_reservation_t res;
    int rc = ems_pool_reserve(&s->pool, s->keys[k], s->length[k], &res);
    if (rc == -ENOSPC) {
        r->enospc++;
        return;
    }
    CHECK_EQ(rc, 0);
    if (res.exists) {
        r->existed++;
        CHECK_EQ(ems_pool_commit(&s->pool, &res), 0);
        return;
    }
    CHECK_EQ(res.length, s->length[k]);
    uint64_t half = res.length / 2;
    if (pick % 4 == 0) {
        memset(res.data, 0xdd, half);
        ems_pool_abort(&s->pool, &res);
        r->aborts++;
        return;
    }
    memcpy(res.data, s->payload[k], half);
    memcpy(res.data + half, s->payload[k] + half, res.length - half);
    rc = ems_pool_commit(&s->pool, &res);
    if (rc == -ENOSPC) {
        r->enospc++;
        return;
    }
    if (rc == 1) {
        /* Another thread committed this key between our reserve and commit. */
        r->existed++;
        return;
    }
    CHECK_EQ(rc, 0);
    r->stored++;
}

static void do_batch_get(stress_t *s, uint64_t *state, uint8_t *bufs[3], worker_result_t *r)
{
    uint8_t keys[3 * EMS_KEY_BYTES];
    uint32_t ids[3];
    uint64_t lengths[3];
    int64_t results[3];
    for (int i = 0; i < 3; i++) {
        ids[i] = (uint32_t)(test_next_random(state) % NKEYS);
        memcpy(keys + i * EMS_KEY_BYTES, s->keys[ids[i]], EMS_KEY_BYTES);
        lengths[i] = s->length[ids[i]];
    }
    uint64_t hits = ems_pool_get_many(&s->pool, keys, 3, (void *const *)bufs, lengths, results);
    uint64_t counted = 0;
    for (int i = 0; i < 3; i++) {
        check_get(s, ids[i], results[i], bufs[i], r);
        counted += results[i] >= 0;
    }
    CHECK_EQ(hits, counted);
}

static void *worker_main(void *arg)
{
    worker_arg_t *a = arg;
    stress_t *s = a->s;
    worker_result_t *r = &a->result;
    uint64_t state = a->seed;
    uint8_t *bufs[3];
    for (int i = 0; i < 3; i++) {
        bufs[i] = malloc(SLAB);
        CHECK(bufs[i] != NULL);
    }

    for (long op = 0; op < s->ops; op++) {
        uint64_t pick = test_next_random(&state);
        /* Half of the traffic goes to 40 hot keys, so threads collide on the same keys. */
        uint32_t k = (uint32_t)((pick >> 16) % (pick & 1 ? 40 : NKEYS));
        uint32_t kind = (uint32_t)((pick >> 8) % 100);
        if (kind < 40) {
            int64_t rc = ems_pool_get(&s->pool, s->keys[k], bufs[0], s->length[k], NULL);
            check_get(s, k, rc, bufs[0], r);
        } else if (kind < 62) {
            do_put(s, k, r);
        } else if (kind < 77) {
            do_reserve(s, k, pick >> 32, r);
        } else if (kind < 84) {
            int rc = ems_pool_delete(&s->pool, s->keys[k]);
            if (rc == 0) {
                r->deletes++;
            } else {
                CHECK_EQ(rc, -ENOENT);
            }
        } else if (kind < 88) {
            uint64_t actual = 0;
            int64_t rc = ems_pool_get(&s->pool, s->keys[k], bufs[0], s->length[k] + 1, &actual);
            if (rc != -ENOENT) {
                CHECK_EQ(rc, -EMSGSIZE);
                CHECK_EQ(actual, s->length[k]);
            }
        } else if (kind < 92) {
            int64_t len = ems_pool_length(&s->pool, s->keys[k]);
            if (len != -ENOENT) {
                CHECK_EQ(len, s->length[k]);
            }
        } else if (kind < 97) {
            do_batch_get(s, &state, bufs, r);
        } else if (kind < 99) {
            int64_t n = ems_pool_protect(&s->pool, s->keys[k], 1, (int)(pick >> 40) & 1);
            CHECK(n == 0 || n == 1);
        } else {
            ems_pool_stats_t stats;
            ems_pool_stats(&s->pool, &stats, NULL, 0);
            CHECK(stats.blocks <= MAX_BLOCKS);
            CHECK(stats.bytes_used <= stats.capacity);
            CHECK_EQ(stats.bytes_used + stats.bytes_free + stats.bytes_wasted, stats.capacity);
        }
    }
    for (int i = 0; i < 3; i++) {
        free(bufs[i]);
    }
    return NULL;
}

#if WITH_ATTACHED_READER
typedef struct reader_arg {
    stress_t *s;
    uint64_t hits, misses, copies_discarded;
} reader_arg_t;

static void *attached_reader_main(void *arg)
{
    reader_arg_t *a = arg;
    stress_t *s = a->s;
    ems_pool_t reader;
    CHECK_EQ(ems_pool_attach(&reader, s->pool.arena.fd), 0);
    uint8_t *buf = malloc(SLAB);
    CHECK(buf != NULL);
    uint64_t state = 4242;
    worker_result_t r;
    memset(&r, 0, sizeof r);

    for (;;) {
        int done = atomic_load_explicit(&s->workers_done, memory_order_acquire);
        for (int i = 0; i < 256; i++) {
            uint64_t pick = test_next_random(&state);
            uint32_t k = (uint32_t)((pick >> 16) % (pick & 1 ? 40 : NKEYS));
            memset(buf, 0, s->length[k]);
            int64_t rc = ems_pool_get(&reader, s->keys[k], buf, s->length[k], NULL);
            check_get(s, k, rc, buf, &r);
        }
        if (done) {
            break;
        }
    }
    ems_pool_stats_t stats;
    ems_pool_stats(&reader, &stats, NULL, 0);
    /* A reader's statistics count its own hits and misses separately. */
    CHECK_EQ(stats.reader_hits, r.hits);
    CHECK_EQ(stats.reader_misses, r.misses);
    a->hits = r.hits;
    a->misses = r.misses;
    a->copies_discarded = stats.reader_retries;
    free(buf);
    ems_pool_close(&reader);
    return NULL;
}
#endif

/* ---- pinned copies ------------------------------------------------------------------ */

/* A two-slab pool where every block fills a slab: the copier thread reads one hot block
 * (a 64 KiB copy, a long window) while the filler thread stores new slab-sized blocks,
 * each of which must evict something. Filler blocks are protected, so the hot block is
 * the preferred victim whenever it is not pinned. The block being copied is pinned, so
 * eviction must take another one. If eviction took the pinned block, the filler would
 * overwrite the slot during the copy and the copier would read foreign bytes. */
typedef struct pin_race {
    ems_pool_t pool;
    uint8_t *hot;       /* payload of the hot key */
    uint8_t *filler[8]; /* payloads of filler keys, by key number % 8 */
    long rounds;
    _Atomic int copier_done;
    uint64_t hits, misses, restores, fills;
} pin_race_t;

static void pin_race_key(uint8_t key[EMS_KEY_BYTES], uint64_t n)
{
    test_make_key(key, n, 0x919);
}

static void *pin_copier_main(void *arg)
{
    pin_race_t *p = arg;
    uint8_t hot_key[EMS_KEY_BYTES];
    pin_race_key(hot_key, 0);
    uint8_t *buf = malloc(SLAB);
    CHECK(buf != NULL);
    for (long i = 0; i < p->rounds; i++) {
        int rc = ems_pool_put(&p->pool, hot_key, p->hot, SLAB);
        CHECK(rc == 0 || rc == 1 || rc == -ENOSPC);
        p->restores += rc == 0;
        int64_t got = ems_pool_get(&p->pool, hot_key, buf, SLAB, NULL);
        if (got == -ENOENT) {
            p->misses++;
            continue;
        }
        CHECK_EQ(got, SLAB);
        if (memcmp(buf, p->hot, SLAB) != 0) {
            fprintf(stderr, "hot block changed during a pinned copy\n");
        }
        CHECK(memcmp(buf, p->hot, SLAB) == 0);
        p->hits++;
    }
    atomic_store_explicit(&p->copier_done, 1, memory_order_release);
    free(buf);
    return NULL;
}

static void *pin_filler_main(void *arg)
{
    pin_race_t *p = arg;
    uint8_t key[EMS_KEY_BYTES];
    for (uint64_t n = 1; !atomic_load_explicit(&p->copier_done, memory_order_acquire); n++) {
        pin_race_key(key, n);
        int rc = ems_pool_put(&p->pool, key, p->filler[n % 8], SLAB);
        CHECK(rc == 0 || rc == -ENOSPC);
        p->fills += rc == 0;
        /* Protected filler blocks leave the hot block as the preferred victim. */
        CHECK(ems_pool_protect(&p->pool, key, 1, 1) >= 0);
    }
    return NULL;
}

static void test_pinned_block_not_overwritten(long rounds)
{
    pin_race_t *p = calloc(1, sizeof *p);
    CHECK(p != NULL);
    p->rounds = rounds;
    p->hot = malloc(SLAB);
    CHECK(p->hot != NULL);
    test_fill_payload(p->hot, SLAB, 0);
    for (int i = 0; i < 8; i++) {
        p->filler[i] = malloc(SLAB);
        CHECK(p->filler[i] != NULL);
        memset(p->filler[i], 0xf0 + i, SLAB);
    }
    ems_pool_config_t config = {
        .capacity = 2 * SLAB,
        .slab_size = SLAB,
        .max_blocks = 64,
        .pages = EMS_PAGES_SMALL,
        .debug_name = "ems-test-pin-race",
    };
    CHECK_EQ(ems_pool_create(&p->pool, &config), 0);

    pthread_t copier, filler;
    CHECK_EQ(pthread_create(&copier, NULL, pin_copier_main, p), 0);
    CHECK_EQ(pthread_create(&filler, NULL, pin_filler_main, p), 0);
    CHECK_EQ(pthread_join(copier, NULL), 0);
    CHECK_EQ(pthread_join(filler, NULL), 0);
    fprintf(stderr,
            "pinned copies: %llu hits, %llu misses, hot block stored %llu times, "
            "%llu filler blocks stored\n",
            (unsigned long long)p->hits, (unsigned long long)p->misses,
            (unsigned long long)p->restores, (unsigned long long)p->fills);
    /* Every filler block evicted one block, and the hot block was the only unprotected
     * one, so each fill during a copy had to skip a pinned preferred victim. */
    CHECK(p->hits > 0);
    CHECK(p->fills > 0);

    ems_pool_close(&p->pool);
    free(p->hot);
    for (int i = 0; i < 8; i++) {
        free(p->filler[i]);
    }
    free(p);
}

/* ---- mixed traffic ---------------------------------------------------------------- */

/* After the threads stop: every entry is free or committed with no pin, each stored key
 * reads back exactly, and the statistics match what is present. */
static void check_quiescent(stress_t *s)
{
    ems_pool_t *pool = &s->pool;
    uint32_t committed = 0;
    for (uint32_t id = 0; id < pool->layout->nentries; id++) {
        uint32_t flags = atomic_load(&pool->entries[id].flags);
        uint32_t state = EMS_ENTRY_STATE(flags);
        if (EMS_ENTRY_PINS(flags) != 0 ||
            (state != EMS_ENTRY_FREE && state != EMS_ENTRY_COMMITTED)) {
            fprintf(stderr, "entry %u left in state %u with %u pins\n", id, state,
                    EMS_ENTRY_PINS(flags));
        }
        CHECK_EQ(EMS_ENTRY_PINS(flags), 0);
        CHECK(state == EMS_ENTRY_FREE || state == EMS_ENTRY_COMMITTED);
        committed += state == EMS_ENTRY_COMMITTED;
    }

    uint8_t *buf = malloc(SLAB);
    CHECK(buf != NULL);
    worker_result_t r;
    memset(&r, 0, sizeof r);
    uint64_t present = 0, bytes = 0;
    for (uint32_t k = 0; k < NKEYS; k++) {
        int64_t rc = ems_pool_get(pool, s->keys[k], buf, s->length[k], NULL);
        check_get(s, k, rc, buf, &r);
        CHECK_EQ(ems_pool_exists(pool, s->keys[k]), rc >= 0);
        if (rc >= 0) {
            present++;
            bytes += s->length[k];
        }
    }
    free(buf);

    ems_pool_stats_t stats;
    ems_class_stats_t classes[64];
    int n = ems_pool_stats(pool, &stats, classes, 64);
    CHECK(n >= 0);
    CHECK(n <= 64);
    CHECK_EQ(stats.blocks, present);
    CHECK_EQ(committed, present);
    CHECK_EQ(stats.bytes_used, bytes);
    uint64_t class_blocks = 0, class_slabs = 0;
    for (int i = 0; i < n; i++) {
        class_blocks += classes[i].blocks;
        class_slabs += classes[i].slabs;
    }
    CHECK_EQ(class_blocks, present);
    CHECK_EQ(class_slabs + stats.free_slabs, stats.slabs);
    for (uint32_t b = 0; b < pool->layout->nbuckets; b++) {
        CHECK_EQ(atomic_load(&pool->index.buckets[b].version) & 1u, 0);
    }
    fprintf(stderr, "end: %llu blocks present, %llu evictions, %llu slab moves, %llu pool_full\n",
            (unsigned long long)present, (unsigned long long)stats.evictions,
            (unsigned long long)stats.slab_moves, (unsigned long long)stats.pool_full);
}

int main(int argc, char **argv)
{
    long ops = argc > 1 ? atol(argv[1]) : 20000;
    CHECK(ops > 0);
    test_pinned_block_not_overwritten(ops / 4);

    stress_t *s = calloc(1, sizeof *s);
    CHECK(s != NULL);
    s->ops = ops;
    for (uint32_t k = 0; k < NKEYS; k++) {
        test_make_key(s->keys[k], k, 0x5ee5);
        s->length[k] = key_length(k);
        s->payload[k] = malloc(s->length[k]);
        CHECK(s->payload[k] != NULL);
        test_fill_payload(s->payload[k], s->length[k], k);
    }
    ems_pool_config_t config = {
        .capacity = (uint64_t)NSLABS * SLAB,
        .slab_size = SLAB,
        .max_blocks = MAX_BLOCKS,
        .pages = EMS_PAGES_SMALL,
        .debug_name = "ems-test-pool-stress",
    };
    CHECK_EQ(ems_pool_create(&s->pool, &config), 0);

    worker_arg_t workers[NWORKERS];
    pthread_t threads[NWORKERS];
    for (int i = 0; i < NWORKERS; i++) {
        memset(&workers[i], 0, sizeof workers[i]);
        workers[i].s = s;
        workers[i].seed = 77 + (uint64_t)i;
        CHECK_EQ(pthread_create(&threads[i], NULL, worker_main, &workers[i]), 0);
    }
#if WITH_ATTACHED_READER
    reader_arg_t reader;
    memset(&reader, 0, sizeof reader);
    reader.s = s;
    pthread_t reader_thread;
    CHECK_EQ(pthread_create(&reader_thread, NULL, attached_reader_main, &reader), 0);
#endif

    worker_result_t total;
    memset(&total, 0, sizeof total);
    for (int i = 0; i < NWORKERS; i++) {
        CHECK_EQ(pthread_join(threads[i], NULL), 0);
        total.hits += workers[i].result.hits;
        total.misses += workers[i].result.misses;
        total.stored += workers[i].result.stored;
        total.existed += workers[i].result.existed;
        total.enospc += workers[i].result.enospc;
        total.deletes += workers[i].result.deletes;
        total.aborts += workers[i].result.aborts;
    }
    atomic_store_explicit(&s->workers_done, 1, memory_order_release);
#if WITH_ATTACHED_READER
    CHECK_EQ(pthread_join(reader_thread, NULL), 0);
    fprintf(stderr, "attached reader: %llu hits, %llu misses, %llu copies discarded\n",
            (unsigned long long)reader.hits, (unsigned long long)reader.misses,
            (unsigned long long)reader.copies_discarded);
    CHECK(reader.hits > 0);
#endif
    fprintf(stderr,
            "owner threads: %llu hits, %llu misses, %llu stored, %llu already stored, "
            "%llu -ENOSPC, %llu deletes, %llu aborts\n",
            (unsigned long long)total.hits, (unsigned long long)total.misses,
            (unsigned long long)total.stored, (unsigned long long)total.existed,
            (unsigned long long)total.enospc, (unsigned long long)total.deletes,
            (unsigned long long)total.aborts);
    CHECK(total.hits > 0);
    CHECK(total.stored > 0);
    CHECK(total.existed > 0);
    CHECK(total.deletes > 0);

    ems_pool_stats_t stats;
    ems_pool_stats(&s->pool, &stats, NULL, 0);
    CHECK_EQ(stats.deletes, total.deletes);
    CHECK(stats.evictions > 0);

    check_quiescent(s);
    ems_pool_close(&s->pool);
    for (uint32_t k = 0; k < NKEYS; k++) {
        free(s->payload[k]);
    }
    free(s);
    fprintf(stderr, "test_pool_stress: all passed\n");
    return 0;
}
