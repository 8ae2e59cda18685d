/* Index: two-choice hash table with seqlock buckets (see index.h).
 *
 * Memory ordering. A writer (1) CASes the bucket version from even v to odd v+1, (2)
 * stores slot words, (3) stores v+2 with release. A reader loads the version with
 * acquire, reads slot words and entry keys, issues an acquire fence and reloads the
 * version; equal and even means it saw no partial update. Slot words are atomics, so only
 * the entry key comparison reads plain memory that a writer may change concurrently; the
 * version check discards such a read.
 */
#include "index.h"

#include <string.h>

uint32_t ems_index_buckets_for(uint32_t nentries)
{
    uint64_t n = ((uint64_t)nentries * 2 + 10) / 11;
    return n < 2 ? 2 : (uint32_t)n;
}

void ems_index_init(ems_index_t *index, ems_bucket_t *buckets, uint32_t nbuckets,
                    ems_entry_t *entries)
{
    index->buckets = buckets;
    index->nbuckets = nbuckets;
    index->entries = entries;
}

void ems_index_clear(ems_index_t *index)
{
    memset(index->buckets, 0, (size_t)index->nbuckets * sizeof(ems_bucket_t));
}

/* Two distinct candidate buckets and the tag of a key. The bucket number comes from a
 * multiply-shift of 32 hash bits, so nbuckets need not be a power of two. */
static void key_place(const ems_index_t *index, const uint8_t key[EMS_KEY_BYTES],
                      uint32_t *b1, uint32_t *b2, uint16_t *tag)
{
    uint64_t h = ems_key_hash(key);
    *b1 = (uint32_t)(((h & 0xffffffffu) * (uint64_t)index->nbuckets) >> 32);
    *b2 = (uint32_t)(((h >> 32) * (uint64_t)index->nbuckets) >> 32);
    if (*b2 == *b1)
        *b2 = *b1 + 1 == index->nbuckets ? 0 : *b1 + 1;
    *tag = (uint16_t)((h >> 24) ^ (h >> 56));
}

static int slot_matches(const ems_index_t *index, uint64_t word, uint16_t tag,
                        const uint8_t key[EMS_KEY_BYTES])
{
    uint32_t id1 = EMS_SLOT_ENTRY(word);
    if (id1 == 0 || EMS_SLOT_TAG(word) != tag)
        return 0;
    return memcmp(index->entries[id1 - 1].key, key, EMS_KEY_BYTES) == 0;
}

/* Reads one bucket consistently. Returns 1 and the slot word when found, 0 when not,
 * -EAGAIN when the bucket stayed locked. */
static int bucket_lookup(const ems_index_t *index, uint32_t b, uint16_t tag,
                         const uint8_t key[EMS_KEY_BYTES], uint64_t *slot_word)
{
    ems_bucket_t *bucket = &index->buckets[b];
    for (int attempt = 0; attempt < EMS_INDEX_MAX_RETRIES; attempt++) {
        uint64_t v1 = atomic_load_explicit(&bucket->version, memory_order_acquire);
        if (v1 & 1u) {
            ems_cpu_relax();
            continue;
        }

        uint64_t found = 0;
        for (int s = 0; s < EMS_BUCKET_SLOTS; s++) {
            uint64_t w = atomic_load_explicit(&bucket->slots[s], memory_order_relaxed);
            if (slot_matches(index, w, tag, key)) {
                found = w;
                break;
            }
        }

        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&bucket->version, memory_order_relaxed) != v1)
            continue;
        if (found) {
            *slot_word = found;
            return 1;
        }
        return 0;
    }
    return -EAGAIN;
}

int ems_index_lookup(const ems_index_t *index, const uint8_t key[EMS_KEY_BYTES],
                     uint64_t *slot_word)
{
    uint32_t b1, b2;
    uint16_t tag;
    key_place(index, key, &b1, &b2, &tag);

    int rc = bucket_lookup(index, b1, tag, key, slot_word);
    if (rc != 0)
        return rc;
    return bucket_lookup(index, b2, tag, key, slot_word);
}

/* Prefetches the entries that buckets b1 and b2 hold under `tag`. A racy peek is fine: a
 * stale slot word only prefetches the wrong line. */
static void prefetch_tagged(const ems_index_t *index, uint32_t b1, uint32_t b2, uint16_t tag)
{
    uint32_t buckets[2] = {b1, b2};
    for (int i = 0; i < 2; i++) {
        for (int s = 0; s < EMS_BUCKET_SLOTS; s++) {
            uint64_t w = atomic_load_explicit(&index->buckets[buckets[i]].slots[s],
                                              memory_order_relaxed);
            if (w != 0 && EMS_SLOT_TAG(w) == tag) {
                /* 52-byte entries straddle cache lines: fetch both ends of the key. */
                const ems_entry_t *e = &index->entries[EMS_SLOT_ENTRY(w) - 1];
                __builtin_prefetch(e->key, 0, 3);
                __builtin_prefetch(e->key + EMS_KEY_BYTES - 1, 0, 3);
            }
        }
    }
}

uint64_t ems_index_lookup_many(const ems_index_t *index, const uint8_t *keys, uint64_t n,
                               uint64_t *words)
{
    /* Each key is hashed once into a ring that the three stages share. */
    enum { D = EMS_PREFETCH_DISTANCE, RING = 32 }; /* a power of two above 2 * D */
    _Static_assert(2 * EMS_PREFETCH_DISTANCE < 32, "prefetch ring too small");
    struct { uint32_t b1, b2; uint16_t tag; } ring[RING];
    uint64_t found = 0;

    for (uint64_t i = 0; i < n + 2 * D; i++) {
        if (i < n) {
            uint32_t r = (uint32_t)(i & (RING - 1));
            key_place(index, keys + i * EMS_KEY_BYTES, &ring[r].b1, &ring[r].b2, &ring[r].tag);
            __builtin_prefetch(&index->buckets[ring[r].b1], 0, 3);
            __builtin_prefetch(&index->buckets[ring[r].b2], 0, 3);
        }
        if (i >= D && i - D < n) {
            uint32_t r = (uint32_t)((i - D) & (RING - 1));
            prefetch_tagged(index, ring[r].b1, ring[r].b2, ring[r].tag);
        }
        if (i >= 2 * D) {
            uint64_t k = i - 2 * D;
            uint32_t r = (uint32_t)(k & (RING - 1));
            const uint8_t *key = keys + k * EMS_KEY_BYTES;
            int rc = bucket_lookup(index, ring[r].b1, ring[r].tag, key, &words[k]);
            if (rc == 0)
                rc = bucket_lookup(index, ring[r].b2, ring[r].tag, key, &words[k]);
            if (rc == 1)
                found++;
            else
                words[k] = 0;
        }
    }
    return found;
}

/* Write lock: one CAS from an even version to the next odd one. Writers are serialized
 * by the caller, so the CAS succeeds on its first try in practice. */
static uint64_t bucket_lock(ems_bucket_t *bucket)
{
    for (;;) {
        uint64_t v = atomic_load_explicit(&bucket->version, memory_order_relaxed);
        if (!(v & 1u) && atomic_compare_exchange_weak_explicit(
                             &bucket->version, &v, v + 1, memory_order_acq_rel,
                             memory_order_relaxed)) {
            /* Keeps the slot stores that follow from becoming visible before the odd
             * version on weakly ordered CPUs. */
            atomic_thread_fence(memory_order_release);
            return v;
        }
        ems_cpu_relax();
    }
}

static void bucket_unlock(ems_bucket_t *bucket, uint64_t locked_from)
{
    atomic_store_explicit(&bucket->version, locked_from + 2, memory_order_release);
}

/* Writer-side scan: no seqlock needed because writers are serialized. */
static int bucket_find(const ems_index_t *index, uint32_t b, uint16_t tag,
                       const uint8_t key[EMS_KEY_BYTES], int *free_slot, uint64_t *word)
{
    ems_bucket_t *bucket = &index->buckets[b];
    int found = -1;
    *free_slot = -1;
    for (int s = 0; s < EMS_BUCKET_SLOTS; s++) {
        uint64_t w = atomic_load_explicit(&bucket->slots[s], memory_order_relaxed);
        if (w == 0) {
            if (*free_slot < 0)
                *free_slot = s;
        } else if (found < 0 && slot_matches(index, w, tag, key)) {
            found = s;
            *word = w;
        }
    }
    return found;
}

static uint32_t bucket_fill(const ems_index_t *index, uint32_t b)
{
    uint32_t n = 0;
    for (int s = 0; s < EMS_BUCKET_SLOTS; s++)
        n += atomic_load_explicit(&index->buckets[b].slots[s], memory_order_relaxed) != 0;
    return n;
}

int ems_index_insert(ems_index_t *index, const uint8_t key[EMS_KEY_BYTES], uint32_t entry_id,
                     uint32_t gen, uint64_t *slot_word)
{
    uint32_t b1, b2;
    uint16_t tag;
    key_place(index, key, &b1, &b2, &tag);

    /* Step 1: the key must not be in either bucket. */
    int free1, free2;
    uint64_t existing = 0;
    if (bucket_find(index, b1, tag, key, &free1, &existing) >= 0 ||
        bucket_find(index, b2, tag, key, &free2, &existing) >= 0) {
        if (slot_word)
            *slot_word = existing;
        return -EEXIST;
    }
    if (free1 < 0 && free2 < 0)
        return -ENOSPC;

    /* Step 2: put it in the emptier bucket, which keeps both short on average. */
    uint32_t b = b1;
    int s = free1;
    if (free1 < 0 || (free2 >= 0 && bucket_fill(index, b2) < bucket_fill(index, b1))) {
        b = b2;
        s = free2;
    }
    uint64_t word = EMS_SLOT_MAKE(entry_id + 1u, tag, gen & 0xffffu);
    ems_bucket_t *bucket = &index->buckets[b];
    uint64_t v = bucket_lock(bucket);
    atomic_store_explicit(&bucket->slots[s], word, memory_order_relaxed);
    bucket_unlock(bucket, v);
    if (slot_word)
        *slot_word = word;
    return 0;
}

int ems_index_remove(ems_index_t *index, const uint8_t key[EMS_KEY_BYTES], uint32_t entry_id)
{
    uint32_t b1, b2;
    uint16_t tag;
    key_place(index, key, &b1, &b2, &tag);

    uint32_t buckets[2] = {b1, b2};
    for (int i = 0; i < 2; i++) {
        ems_bucket_t *bucket = &index->buckets[buckets[i]];
        for (int s = 0; s < EMS_BUCKET_SLOTS; s++) {
            uint64_t w = atomic_load_explicit(&bucket->slots[s], memory_order_relaxed);
            if (EMS_SLOT_ENTRY(w) != entry_id + 1u || EMS_SLOT_TAG(w) != tag)
                continue;
            uint64_t v = bucket_lock(bucket);
            atomic_store_explicit(&bucket->slots[s], 0, memory_order_relaxed);
            bucket_unlock(bucket, v);
            return 0;
        }
    }
    return -ENOENT;
}

int ems_index_candidates(const ems_index_t *index, const uint8_t key[EMS_KEY_BYTES],
                         uint32_t ids[2 * EMS_BUCKET_SLOTS])
{
    uint32_t b1, b2;
    uint16_t tag;
    key_place(index, key, &b1, &b2, &tag);

    int n = 0;
    uint32_t buckets[2] = {b1, b2};
    for (int i = 0; i < 2; i++) {
        for (int s = 0; s < EMS_BUCKET_SLOTS; s++) {
            uint64_t w = atomic_load_explicit(&index->buckets[buckets[i]].slots[s],
                                              memory_order_relaxed);
            if (w != 0)
                ids[n++] = EMS_SLOT_ENTRY(w) - 1u;
        }
    }
    return n;
}
