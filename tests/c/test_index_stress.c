/* Concurrency test for csrc/index.c: one writer thread inserts and removes keys while
 * reader threads look keys up without locks.
 *
 * Three key groups are checked:
 *   - stable ids keep one key and stay in the index for the whole run, so a lookup of one
 *     must never miss: a miss would mean a reader saw a bucket mid-update;
 *   - churn ids keep one key each but are inserted and removed, so a hit must name
 *     exactly the id of the looked-up key;
 *   - recycled ids get a new key each time they are reinserted, as the pool recycles
 *     entries. The writer records which key each (id, generation) incarnation had, and
 *     a hit must name an incarnation of the looked-up key. A hit is also validated the
 *     way the pool validates one: when the entry generation matches the slot word before
 *     and after the key comparison, the entry's key must equal the looked-up key.
 * Keys that are never inserted must never hit. Only -EAGAIN (a bucket locked for
 * EMS_INDEX_MAX_RETRIES reads, possible when the writer is descheduled while it holds
 * the bucket) is tolerated, and counted.
 *
 * Under ThreadSanitizer (gcc defines __SANITIZE_THREAD__) the recycled group is left
 * out: its validation needs atomic_thread_fence, which TSan does not model and which
 * GCC 12 rejects under -fsanitize=thread -Werror (-Wtsan).
 *
 * Usage: test_index_stress [writer_ops] (default 500000).
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
#include "index.h"

#if defined(__SANITIZE_THREAD__)
#define RECYCLE_KEYS 0
#else
#define RECYCLE_KEYS 1
#endif

enum {
    NREADERS = 3,
    NSTABLE = 128, /* ids [0, STABLE_END): always present */
    NCHURN = 640,  /* ids [STABLE_END, CHURN_END): one key each, inserted and removed */
    NRECYCLE = 128, /* ids [CHURN_END, RECYCLE_END): rekeyed on every insert */
    NABSENT = 128, /* ids [RECYCLE_END, NENTRIES): keys never inserted */
    STABLE_END = NSTABLE,
    CHURN_END = STABLE_END + NCHURN,
    RECYCLE_END = CHURN_END + NRECYCLE,
    NENTRIES = RECYCLE_END + NABSENT,
    NRECYCLE_KEYS = 512, /* key family that recycled ids draw from */
    /* Sized for fewer entries than are used, so buckets fill and inserts hit -ENOSPC. */
    INDEX_SIZED_FOR = 400,
};

#define FIXED_SALT 0x57e55u
#define HISTORY_LEN 32768 /* incarnations per recycled id: odd 16-bit generations */
#define RECYCLE_SALT 0x2ec7c1eu

typedef struct stress {
    ems_index_t index;
    ems_bucket_t *buckets;
    ems_entry_t *entries;
    uint8_t (*recycle_keys)[EMS_KEY_BYTES];
    _Atomic int writer_done;
    long writer_ops;
} stress_t;

/* Key number of each incarnation of a recycled id, indexed by generation / 2. Written
 * before the insert that publishes the incarnation. */
static _Atomic int16_t history[NRECYCLE][HISTORY_LEN];

typedef struct reader_result {
    uint64_t lookups, hits, eagain, lookups_while_writing;
    uint64_t recycled_validated, recycled_stale;
} reader_result_t;

typedef struct reader_arg {
    stress_t *s;
    uint64_t seed;
    reader_result_t result;
} reader_arg_t;

typedef struct writer_state {
    uint8_t present[NENTRIES];
    int32_t key_of[NRECYCLE];       /* recycled id -> key number, -1 while out of the index */
    int32_t owner_of[NRECYCLE_KEYS]; /* key number -> recycled id, -1 when unused */
    uint64_t inserts, removes, full;
} writer_state_t;

/* Generations follow the pool's rule: odd while the entry is in the index, even while
 * it is free. */
static uint32_t gen_bump(ems_entry_t *e)
{
    return atomic_fetch_add_explicit(&e->gen, 1, memory_order_release) + 1;
}

static void writer_toggle_fixed(stress_t *s, writer_state_t *w, uint32_t id)
{
    const uint8_t *key = s->entries[id].key;
    uint64_t word = 0;
    if (w->present[id]) {
        CHECK_EQ(ems_index_remove(&s->index, key, id), 0);
        w->present[id] = 0;
        w->removes++;
        gen_bump(&s->entries[id]);
        CHECK_EQ(ems_index_lookup(&s->index, key, &word), 0);
        return;
    }
    uint32_t gen = gen_bump(&s->entries[id]);
    CHECK_EQ(gen & 1u, 1);
    int rc = ems_index_insert(&s->index, key, id, gen, &word);
    if (rc == -ENOSPC) {
        w->full++;
        gen_bump(&s->entries[id]);
        return;
    }
    CHECK_EQ(rc, 0);
    w->present[id] = 1;
    w->inserts++;
    CHECK_EQ(ems_index_lookup(&s->index, key, &word), 1);
    CHECK_EQ(EMS_SLOT_ENTRY(word), id + 1);
    CHECK_EQ(EMS_SLOT_GEN(word), gen & 0xffffu);
}

static void writer_toggle_recycled(stress_t *s, writer_state_t *w, uint32_t id,
                                   uint64_t *state)
{
    ems_entry_t *e = &s->entries[id];
    uint32_t r = id - CHURN_END;
    uint64_t word = 0;
    if (w->key_of[r] >= 0) {
        CHECK_EQ(ems_index_remove(&s->index, e->key, id), 0);
        w->owner_of[w->key_of[r]] = -1;
        w->key_of[r] = -1;
        w->removes++;
        gen_bump(e);
        return;
    }

    /* Rekey to an unused key of the family. The even generation is published before the
     * key bytes change, so a reader that loaded new bytes also loads a moved generation. */
    int32_t k;
    do {
        k = (int32_t)(test_next_random(state) % NRECYCLE_KEYS);
    } while (w->owner_of[k] >= 0);
    atomic_thread_fence(memory_order_release);
    memcpy(e->key, s->recycle_keys[k], EMS_KEY_BYTES);
    uint32_t gen = gen_bump(e);
    CHECK_EQ(gen & 1u, 1);
    /* The history must not wrap, or an old incarnation would alias a new one. */
    CHECK(gen < 2 * HISTORY_LEN);
    atomic_store_explicit(&history[r][gen >> 1], (int16_t)k, memory_order_relaxed);
    int rc = ems_index_insert(&s->index, e->key, id, gen, &word);
    if (rc == -ENOSPC) {
        w->full++;
        gen_bump(e);
        return;
    }
    CHECK_EQ(rc, 0);
    w->key_of[r] = k;
    w->owner_of[k] = (int32_t)id;
    w->inserts++;
}

static void *writer_main(void *arg)
{
    stress_t *s = arg;
    writer_state_t *w = calloc(1, sizeof *w);
    CHECK(w != NULL);
    for (int i = 0; i < NRECYCLE; i++) {
        w->key_of[i] = -1;
    }
    for (int i = 0; i < NRECYCLE_KEYS; i++) {
        w->owner_of[i] = -1;
    }
    uint64_t state = 99;
    uint32_t mutable_ids = RECYCLE_KEYS ? NCHURN + NRECYCLE : NCHURN;

    for (long op = 0; op < s->writer_ops; op++) {
        uint32_t id = STABLE_END + (uint32_t)(test_next_random(&state) % mutable_ids);
        if (id < CHURN_END) {
            writer_toggle_fixed(s, w, id);
        } else {
            writer_toggle_recycled(s, w, id, &state);
        }
    }
    atomic_store_explicit(&s->writer_done, 1, memory_order_release);
    fprintf(stderr, "writer: %llu inserts, %llu removes, %llu rejected as full\n",
            (unsigned long long)w->inserts, (unsigned long long)w->removes,
            (unsigned long long)w->full);
    CHECK(w->inserts > 0);
    CHECK(w->full > 0);
    free(w);
    return NULL;
}

static void reader_check_fixed(stress_t *s, reader_result_t *r, uint32_t id, int rc,
                               uint64_t word)
{
    if (rc == 1) {
        uint32_t found = EMS_SLOT_ENTRY(word);
        if (found != id + 1) {
            fprintf(stderr, "lookup of id %u returned entry %u\n", id, found - 1);
        }
        CHECK_EQ(found, id + 1);
        CHECK(memcmp(s->entries[found - 1].key, s->entries[id].key, EMS_KEY_BYTES) == 0);
        CHECK(id < CHURN_END);
        CHECK_EQ(EMS_SLOT_GEN(word) & 1u, 1);
        if (id < STABLE_END) {
            CHECK_EQ(EMS_SLOT_GEN(word), 1);
        }
        r->hits++;
        return;
    }
    CHECK_EQ(rc, 0);
    if (id < STABLE_END) {
        fprintf(stderr, "stable id %u missed during a concurrent write\n", id);
    }
    CHECK(id >= STABLE_END);
}

static void reader_check_recycled(stress_t *s, reader_result_t *r, uint32_t k, int rc,
                                  uint64_t word)
{
    if (rc == 0) {
        return;
    }
    CHECK_EQ(rc, 1);
    r->hits++;
    uint32_t found = EMS_SLOT_ENTRY(word);
    CHECK(found > CHURN_END);
    CHECK(found <= RECYCLE_END);
    CHECK_EQ(EMS_SLOT_GEN(word) & 1u, 1);
    int16_t recorded = atomic_load_explicit(
        &history[found - 1 - CHURN_END][EMS_SLOT_GEN(word) >> 1], memory_order_relaxed);
    if (recorded != (int16_t)k) {
        fprintf(stderr, "key %u found entry %u generation %u, an incarnation of key %d\n", k,
                found - 1, EMS_SLOT_GEN(word), recorded);
    }
    CHECK_EQ(recorded, k);

    const uint8_t *key = s->recycle_keys[k];
    ems_entry_t *e = &s->entries[found - 1];

    uint32_t gen_before = atomic_load_explicit(&e->gen, memory_order_acquire);
    if (!(gen_before & 1u) || (uint16_t)gen_before != EMS_SLOT_GEN(word)) {
        r->recycled_stale++;
        return;
    }
    int same = memcmp(e->key, key, EMS_KEY_BYTES) == 0;
    atomic_thread_fence(memory_order_acquire);
    uint32_t gen_after = atomic_load_explicit(&e->gen, memory_order_relaxed);
    if (gen_after != gen_before) {
        r->recycled_stale++;
        return;
    }
    if (!same) {
        fprintf(stderr, "entry %u at generation %u holds another key than the one looked up\n",
                found - 1, gen_before);
    }
    CHECK(same);
    r->recycled_validated++;
}

/* Batched lookup of fixed-key ids. A batch reports -EAGAIN as a miss, so only its hits
 * are checked: each must name the id of its key. */
static void reader_batch_lookup(stress_t *s, reader_result_t *r, uint64_t *state)
{
    enum { BATCH = 16 };
    uint8_t keys[BATCH * EMS_KEY_BYTES];
    uint32_t ids[BATCH];
    uint64_t words[BATCH];
    for (int i = 0; i < BATCH; i++) {
        do {
            ids[i] = (uint32_t)(test_next_random(state) % NENTRIES);
        } while (ids[i] >= CHURN_END && ids[i] < RECYCLE_END);
        memcpy(keys + i * EMS_KEY_BYTES, s->entries[ids[i]].key, EMS_KEY_BYTES);
    }
    uint64_t found = ems_index_lookup_many(&s->index, keys, BATCH, words);
    uint64_t counted = 0;
    for (int i = 0; i < BATCH; i++) {
        if (words[i] == 0) {
            continue;
        }
        counted++;
        CHECK_EQ(EMS_SLOT_ENTRY(words[i]), ids[i] + 1);
        CHECK(ids[i] < CHURN_END);
    }
    CHECK_EQ(found, counted);
    r->lookups += BATCH;
    r->hits += counted;
}

static void *reader_main(void *arg)
{
    reader_arg_t *a = arg;
    stress_t *s = a->s;
    uint64_t state = a->seed;
    reader_result_t *r = &a->result;

    for (;;) {
        int done = atomic_load_explicit(&s->writer_done, memory_order_acquire);
        for (int i = 0; i < 64; i++) {
            uint64_t pick = test_next_random(&state);
            int recycled = RECYCLE_KEYS && pick % 4 == 0;
            const uint8_t *key;
            uint32_t id = 0;
            if (recycled) {
                id = (uint32_t)((pick >> 8) % NRECYCLE_KEYS);
                key = s->recycle_keys[id];
            } else {
                do {
                    id = (uint32_t)((pick >> 8) % NENTRIES);
                    pick = test_next_random(&state);
                } while (id >= CHURN_END && id < RECYCLE_END);
                key = s->entries[id].key;
            }

            uint64_t word = 0;
            int rc = ems_index_lookup(&s->index, key, &word);
            r->lookups++;
            if (!done) {
                r->lookups_while_writing++;
            }
            if (rc == -EAGAIN) {
                r->eagain++;
                continue;
            }
            if (recycled) {
                reader_check_recycled(s, r, id, rc, word);
            } else {
                reader_check_fixed(s, r, id, rc, word);
            }
        }
        reader_batch_lookup(s, r, &state);
        if (done) {
            break;
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    stress_t s;
    memset(&s, 0, sizeof s);
    s.writer_ops = argc > 1 ? atol(argv[1]) : 500000;
    CHECK(s.writer_ops > 0);

    uint32_t nbuckets = ems_index_buckets_for(INDEX_SIZED_FOR);
    s.buckets = aligned_alloc(64, (size_t)nbuckets * sizeof(ems_bucket_t));
    s.entries = calloc(NENTRIES, sizeof(ems_entry_t));
    s.recycle_keys = calloc(NRECYCLE_KEYS, EMS_KEY_BYTES);
    CHECK(s.buckets != NULL);
    CHECK(s.entries != NULL);
    CHECK(s.recycle_keys != NULL);
    for (uint32_t id = 0; id < NENTRIES; id++) {
        test_make_key(s.entries[id].key, id, FIXED_SALT);
        atomic_store(&s.entries[id].flags, EMS_ENTRY_COMMITTED);
    }
    for (uint32_t k = 0; k < NRECYCLE_KEYS; k++) {
        test_make_key(s.recycle_keys[k], k, RECYCLE_SALT);
    }
    ems_index_init(&s.index, s.buckets, nbuckets, s.entries);
    ems_index_clear(&s.index);
    for (uint32_t id = 0; id < STABLE_END; id++) {
        atomic_store(&s.entries[id].gen, 1);
        CHECK_EQ(ems_index_insert(&s.index, s.entries[id].key, id, 1, NULL), 0);
    }

    reader_arg_t readers[NREADERS];
    pthread_t reader_threads[NREADERS], writer_thread;
    for (int i = 0; i < NREADERS; i++) {
        memset(&readers[i], 0, sizeof readers[i]);
        readers[i].s = &s;
        readers[i].seed = 1000 + (uint64_t)i;
        CHECK_EQ(pthread_create(&reader_threads[i], NULL, reader_main, &readers[i]), 0);
    }
    CHECK_EQ(pthread_create(&writer_thread, NULL, writer_main, &s), 0);
    CHECK_EQ(pthread_join(writer_thread, NULL), 0);

    reader_result_t total;
    memset(&total, 0, sizeof total);
    for (int i = 0; i < NREADERS; i++) {
        CHECK_EQ(pthread_join(reader_threads[i], NULL), 0);
        total.lookups += readers[i].result.lookups;
        total.lookups_while_writing += readers[i].result.lookups_while_writing;
        total.hits += readers[i].result.hits;
        total.eagain += readers[i].result.eagain;
        total.recycled_validated += readers[i].result.recycled_validated;
        total.recycled_stale += readers[i].result.recycled_stale;
    }
    fprintf(stderr,
            "readers: %llu lookups (%llu while the writer ran), %llu hits, %llu -EAGAIN, "
            "recycled hits: %llu validated, %llu stale\n",
            (unsigned long long)total.lookups, (unsigned long long)total.lookups_while_writing,
            (unsigned long long)total.hits, (unsigned long long)total.eagain,
            (unsigned long long)total.recycled_validated,
            (unsigned long long)total.recycled_stale);
    /* The readers must really have overlapped the writer for the test to mean anything. */
    CHECK(total.lookups_while_writing > 0);
    CHECK(total.hits > 0);
    if (RECYCLE_KEYS) {
        CHECK(total.recycled_validated > 0);
    }

    for (uint32_t b = 0; b < nbuckets; b++) {
        CHECK_EQ(atomic_load(&s.buckets[b].version) & 1u, 0);
    }
    for (uint32_t id = 0; id < STABLE_END; id++) {
        uint64_t word = 0;
        CHECK_EQ(ems_index_lookup(&s.index, s.entries[id].key, &word), 1);
    }
    free(s.buckets);
    free(s.entries);
    free(s.recycle_keys);
    fprintf(stderr, "test_index_stress: all passed\n");
    return 0;
}
