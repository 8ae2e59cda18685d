/* Unit tests for csrc/index.c: insert, lookup, remove, duplicates, full buckets,
 * slot word contents, candidates and achievable load. Single-threaded; the concurrent
 * reader case is in test_index_stress.c.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "index.h"

typedef struct index_fixture {
    ems_index_t index;
    ems_bucket_t *buckets;
    ems_entry_t *entries;
    uint32_t nentries;
    uint8_t *live; /* 1 while entry i is in the index */
} index_fixture_t;

/* Builds an index of `nbuckets` buckets over an entry table of `nentries` entries.
 * Entry i contains the key of id i (salt `salt`). */
static void fixture_open(index_fixture_t *f, uint32_t nbuckets, uint32_t nentries, uint64_t salt)
{
    memset(f, 0, sizeof *f);
    f->buckets = aligned_alloc(64, (size_t)nbuckets * sizeof(ems_bucket_t));
    f->entries = calloc(nentries, sizeof(ems_entry_t));
    f->live = calloc(nentries, 1);
    CHECK(f->buckets != NULL);
    CHECK(f->entries != NULL);
    CHECK(f->live != NULL);
    f->nentries = nentries;
    for (uint32_t i = 0; i < nentries; i++) {
        test_make_key(f->entries[i].key, i, salt);
        atomic_store(&f->entries[i].flags, EMS_ENTRY_COMMITTED);
    }

    /* Garbage first, so the test proves that clear leaves an empty index. */
    memset(f->buckets, 0xa5, (size_t)nbuckets * sizeof(ems_bucket_t));
    ems_index_init(&f->index, f->buckets, nbuckets, f->entries);
    CHECK(f->index.buckets == f->buckets);
    CHECK_EQ(f->index.nbuckets, nbuckets);
    CHECK(f->index.entries == f->entries);
    ems_index_clear(&f->index);
    const uint8_t *bytes = (const uint8_t *)f->buckets;
    for (size_t i = 0; i < (size_t)nbuckets * sizeof(ems_bucket_t); i++) {
        CHECK_EQ(bytes[i], 0);
    }
}

static void fixture_close(index_fixture_t *f)
{
    free(f->buckets);
    free(f->entries);
    free(f->live);
    memset(f, 0, sizeof *f);
}

static int insert_id(index_fixture_t *f, uint32_t id, uint32_t gen)
{
    atomic_store(&f->entries[id].gen, gen);
    uint64_t word = 0;
    int rc = ems_index_insert(&f->index, f->entries[id].key, id, gen, &word);
    if (rc == 0) {
        f->live[id] = 1;
        CHECK_EQ(EMS_SLOT_ENTRY(word), id + 1);
        CHECK_EQ(EMS_SLOT_GEN(word), gen & 0xffffu);
    }
    return rc;
}

/* No bucket may be left write-locked (odd version) after a writer call returns. */
static void check_versions_even(const index_fixture_t *f)
{
    for (uint32_t b = 0; b < f->index.nbuckets; b++) {
        CHECK_EQ(atomic_load(&f->buckets[b].version) & 1u, 0);
    }
}

static void check_lookup_live(const index_fixture_t *f)
{
    for (uint32_t id = 0; id < f->nentries; id++) {
        uint64_t word = 0;
        int rc = ems_index_lookup(&f->index, f->entries[id].key, &word);
        if (f->live[id]) {
            CHECK_EQ(rc, 1);
            CHECK_EQ(EMS_SLOT_ENTRY(word), id + 1);
        } else {
            CHECK_EQ(rc, 0);
        }
    }
}

static void test_buckets_for_mean_load(void)
{
    const uint32_t sizes[] = {1, 6, 7, 64, 1000, 4096, 1u << 20, 0xfffffff0u};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        uint32_t nb = ems_index_buckets_for(sizes[i]);
        CHECK(nb >= 1);
        /* Mean load of at most 5.5 of the 7 slots of a bucket. */
        CHECK((uint64_t)nb * 11 >= (uint64_t)sizes[i] * 2);
    }
}

static void test_insert_lookup_remove(void)
{
    index_fixture_t f;
    const uint32_t n = 256;
    fixture_open(&f, ems_index_buckets_for(n), n, 1);

    for (uint32_t id = 0; id < 100; id++) {
        CHECK_EQ(insert_id(&f, id, 1000 + id), 0);
    }
    check_versions_even(&f);
    check_lookup_live(&f);

    /* Lookup returns the exact slot word the insert wrote. */
    for (uint32_t id = 0; id < 100; id++) {
        uint64_t word = 0;
        CHECK_EQ(ems_index_lookup(&f.index, f.entries[id].key, &word), 1);
        CHECK_EQ(EMS_SLOT_ENTRY(word), id + 1);
        CHECK_EQ(EMS_SLOT_GEN(word), 1000 + id);
    }

    /* A key that differs from a stored one in its last byte only is absent. */
    uint8_t near[EMS_KEY_BYTES];
    memcpy(near, f.entries[7].key, EMS_KEY_BYTES);
    near[EMS_KEY_BYTES - 1] ^= 1;
    uint64_t word = 0;
    CHECK_EQ(ems_index_lookup(&f.index, near, &word), 0);

    /* Duplicate key under another entry id: -EEXIST, reporting the stored slot. */
    uint64_t stored = 0;
    CHECK_EQ(ems_index_lookup(&f.index, f.entries[5].key, &stored), 1);
    memcpy(f.entries[150].key, f.entries[5].key, EMS_KEY_BYTES);
    word = 0;
    CHECK_EQ(ems_index_insert(&f.index, f.entries[150].key, 150, 77, &word), -EEXIST);
    CHECK_EQ(word, stored);
    /* And under the same id too. */
    CHECK_EQ(ems_index_insert(&f.index, f.entries[5].key, 5, 78, &word), -EEXIST);
    CHECK_EQ(word, stored);
    CHECK_EQ(ems_index_lookup(&f.index, f.entries[5].key, &word), 1);
    CHECK_EQ(word, stored);
    test_make_key(f.entries[150].key, 150, 1);

    /* Remove needs the entry id that the key maps to. */
    CHECK_EQ(ems_index_remove(&f.index, f.entries[5].key, 6), -ENOENT);
    CHECK_EQ(ems_index_lookup(&f.index, f.entries[5].key, &word), 1);
    CHECK_EQ(ems_index_remove(&f.index, f.entries[5].key, 5), 0);
    f.live[5] = 0;
    CHECK_EQ(ems_index_lookup(&f.index, f.entries[5].key, &word), 0);
    CHECK_EQ(ems_index_remove(&f.index, f.entries[5].key, 5), -ENOENT);
    CHECK_EQ(ems_index_remove(&f.index, f.entries[200].key, 200), -ENOENT);
    check_lookup_live(&f);

    /* The id comes back with a newer generation, as after the pool recycles an entry. */
    CHECK_EQ(insert_id(&f, 5, 2000), 0);
    CHECK_EQ(ems_index_lookup(&f.index, f.entries[5].key, &word), 1);
    CHECK_EQ(EMS_SLOT_GEN(word), 2000);

    /* Only the low 16 bits of the generation are kept. */
    CHECK_EQ(insert_id(&f, 120, 0x12345u), 0);
    CHECK_EQ(ems_index_lookup(&f.index, f.entries[120].key, &word), 1);
    CHECK_EQ(EMS_SLOT_GEN(word), 0x2345u);
    CHECK_EQ(EMS_SLOT_ENTRY(word), 121);

    /* The largest entry id fits. */
    CHECK_EQ(insert_id(&f, n - 1, 1), 0);
    CHECK_EQ(ems_index_lookup(&f.index, f.entries[n - 1].key, &word), 1);
    CHECK_EQ(EMS_SLOT_ENTRY(word), n);

    /* The tag is a function of the key: equal for repeated lookups and reinserts. */
    uint64_t before = 0, after = 0;
    CHECK_EQ(ems_index_lookup(&f.index, f.entries[9].key, &before), 1);
    CHECK_EQ(ems_index_remove(&f.index, f.entries[9].key, 9), 0);
    CHECK_EQ(insert_id(&f, 9, 1009), 0);
    CHECK_EQ(ems_index_lookup(&f.index, f.entries[9].key, &after), 1);
    CHECK_EQ(EMS_SLOT_TAG(before), EMS_SLOT_TAG(after));
    CHECK_EQ(before, after);

    check_versions_even(&f);
    check_lookup_live(&f);

    ems_index_clear(&f.index);
    memset(f.live, 0, n);
    check_lookup_live(&f);
    fixture_close(&f);
}

/* Batched lookup must agree with single lookups for every batch length, including ones
 * shorter than the prefetch distance and ones that wrap its ring several times. */
static void test_lookup_many_matches_lookup(void)
{
    index_fixture_t f;
    const uint32_t n = 300;
    fixture_open(&f, ems_index_buckets_for(n), n, 5);
    for (uint32_t id = 0; id < n; id += 2) {
        CHECK_EQ(insert_id(&f, id, 3 + id * 2), 0);
    }

    uint8_t *keys = malloc((size_t)n * EMS_KEY_BYTES);
    uint64_t *words = malloc((size_t)n * sizeof *words);
    CHECK(keys != NULL);
    CHECK(words != NULL);
    /* Keys in a shuffled order, so hits and misses interleave irregularly. */
    uint64_t state = 11;
    uint32_t order[300];
    for (uint32_t i = 0; i < n; i++) {
        order[i] = i;
    }
    for (uint32_t i = n; i > 1; i--) {
        uint32_t j = (uint32_t)(test_next_random(&state) % i);
        uint32_t tmp = order[i - 1];
        order[i - 1] = order[j];
        order[j] = tmp;
    }
    for (uint32_t i = 0; i < n; i++) {
        memcpy(keys + (size_t)i * EMS_KEY_BYTES, f.entries[order[i]].key, EMS_KEY_BYTES);
    }

    const uint32_t lengths[] = {0, 1, 2, EMS_PREFETCH_DISTANCE - 1, EMS_PREFETCH_DISTANCE,
                                2 * EMS_PREFETCH_DISTANCE + 1, 31, 32, 33, 100, 300};
    for (size_t t = 0; t < sizeof lengths / sizeof lengths[0]; t++) {
        uint32_t len = lengths[t];
        for (uint32_t i = 0; i < n; i++) {
            words[i] = 0xdeadbeefULL;
        }
        uint64_t found = ems_index_lookup_many(&f.index, keys, len, words);
        uint64_t expected_found = 0;
        for (uint32_t i = 0; i < len; i++) {
            uint64_t word = 0;
            int rc = ems_index_lookup(&f.index, keys + (size_t)i * EMS_KEY_BYTES, &word);
            if (rc == 1) {
                expected_found++;
                CHECK_EQ(words[i], word);
                CHECK_EQ(EMS_SLOT_ENTRY(words[i]), order[i] + 1);
            } else {
                CHECK_EQ(rc, 0);
                CHECK_EQ(words[i], 0);
            }
        }
        CHECK_EQ(found, expected_found);
        /* Nothing past the batch is written. */
        for (uint32_t i = len; i < n; i++) {
            CHECK_EQ(words[i], 0xdeadbeefULL);
        }
    }

    /* The batched lookups changed nothing. */
    check_lookup_live(&f);
    free(keys);
    free(words);
    fixture_close(&f);
}

static int ids_contain(const uint32_t *ids, int n, uint32_t id)
{
    for (int i = 0; i < n; i++) {
        if (ids[i] == id) {
            return 1;
        }
    }
    return 0;
}

static void test_candidates_cover_key_buckets(void)
{
    index_fixture_t f;
    const uint32_t n = 512;
    fixture_open(&f, ems_index_buckets_for(n), n, 2);
    for (uint32_t id = 0; id < 300; id++) {
        CHECK_EQ(insert_id(&f, id, 1), 0);
    }
    for (uint32_t id = 0; id < n; id++) {
        uint32_t ids[2 * EMS_BUCKET_SLOTS];
        int count = ems_index_candidates(&f.index, f.entries[id].key, ids);
        CHECK(count >= 0);
        CHECK(count <= 2 * EMS_BUCKET_SLOTS);
        for (int i = 0; i < count; i++) {
            CHECK(ids[i] < n);
            CHECK(f.live[ids[i]]);
        }
        CHECK_EQ(ids_contain(ids, count, id), f.live[id]);
    }

    CHECK_EQ(ems_index_remove(&f.index, f.entries[17].key, 17), 0);
    f.live[17] = 0;
    uint32_t ids[2 * EMS_BUCKET_SLOTS];
    int count = ems_index_candidates(&f.index, f.entries[17].key, ids);
    CHECK(!ids_contain(ids, count, 17));
    fixture_close(&f);
}

/* Many keys into a small index: inserts fail with -ENOSPC exactly when both candidate
 * buckets are full, and a rejected insert changes nothing. */
static void test_full_buckets_reject_insert(void)
{
    index_fixture_t f;
    const uint32_t n = 2000;
    const uint32_t nbuckets = ems_index_buckets_for(64);
    fixture_open(&f, nbuckets, n, 3);

    uint32_t inserted = 0, rejected = 0, first_rejected = UINT32_MAX;
    for (uint32_t id = 0; id < n; id++) {
        int rc = insert_id(&f, id, id);
        if (rc == 0) {
            inserted++;
            continue;
        }
        CHECK_EQ(rc, -ENOSPC);
        rejected++;
        if (first_rejected == UINT32_MAX) {
            first_rejected = id;
        }
        uint32_t ids[2 * EMS_BUCKET_SLOTS];
        int count = ems_index_candidates(&f.index, f.entries[id].key, ids);
        CHECK_EQ(count, 2 * EMS_BUCKET_SLOTS);
        for (int i = 0; i < count; i++) {
            CHECK(f.live[ids[i]]);
            for (int j = 0; j < i; j++) {
                CHECK(ids[i] != ids[j]);
            }
        }
        uint64_t word = 0;
        CHECK_EQ(ems_index_lookup(&f.index, f.entries[id].key, &word), 0);
    }
    fprintf(stderr, "%u buckets: %u inserted, %u rejected\n", nbuckets, inserted, rejected);
    CHECK_EQ(inserted, nbuckets * EMS_BUCKET_SLOTS);
    CHECK_EQ(inserted + rejected, n);
    check_versions_even(&f);
    check_lookup_live(&f);

    /* Removing one key from a rejected key's buckets makes room for it. */
    uint32_t ids[2 * EMS_BUCKET_SLOTS];
    CHECK_EQ(ems_index_candidates(&f.index, f.entries[first_rejected].key, ids),
             2 * EMS_BUCKET_SLOTS);
    uint32_t victim = ids[3];
    CHECK_EQ(ems_index_remove(&f.index, f.entries[victim].key, victim), 0);
    f.live[victim] = 0;
    CHECK_EQ(insert_id(&f, first_rejected, 5), 0);
    check_lookup_live(&f);
    fixture_close(&f);
}

/* Two-choice hashing must fill a sized index far beyond what one bucket per key would.
 * With one bucket per key, the Poisson tail puts the first overflow of 2731 7-slot
 * buckets near 25% load (an estimate), so the 50% bound below fails for that mistake.
 * Two choices must also store at least 90% of the entries the index was sized for. */
static void test_load_reached_before_overflow(void)
{
    index_fixture_t f;
    const uint32_t n = 1u << 14;
    const uint32_t nbuckets = ems_index_buckets_for(n);
    fixture_open(&f, nbuckets, n, 4);

    uint32_t inserted = 0, first_failure = 0;
    for (uint32_t id = 0; id < n; id++) {
        int rc = insert_id(&f, id, 1);
        if (rc == 0) {
            inserted++;
        } else {
            CHECK_EQ(rc, -ENOSPC);
            if (first_failure == 0) {
                first_failure = inserted;
            }
        }
    }
    fprintf(stderr, "%u entries, %u buckets: first -ENOSPC after %u, %u inserted in total\n", n,
            nbuckets, first_failure, inserted);
    CHECK(first_failure == 0 || (uint64_t)first_failure * 2 >= (uint64_t)nbuckets * EMS_BUCKET_SLOTS);
    CHECK((uint64_t)inserted * 10 >= (uint64_t)n * 9);
    check_lookup_live(&f);
    fixture_close(&f);
}

int main(void)
{
    RUN_TEST(test_buckets_for_mean_load);
    RUN_TEST(test_insert_lookup_remove);
    RUN_TEST(test_lookup_many_matches_lookup);
    RUN_TEST(test_candidates_cover_key_buckets);
    RUN_TEST(test_full_buckets_reject_insert);
    RUN_TEST(test_load_reached_before_overflow);
    fprintf(stderr, "test_index: all passed\n");
    return 0;
}
