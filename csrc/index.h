/* Index: a fixed-capacity hash table from 32-byte keys to entry ids, stored as 64-byte
 * buckets of 7 slot words in the shared mapping.
 *
 * Each key has two candidate buckets (two-choice hashing), so a probe touches at most two
 * cache lines and there are no chains. Readers take no lock: they read a bucket between
 * two loads of its seqlock version and retry when a writer touched it. Writers lock one
 * bucket with one compare-and-swap on the version. Writers must also be serialized with
 * each other by the caller (the pool mutex); the bucket lock only protects readers.
 * The index never resizes: a key whose two buckets are full is rejected with -ENOSPC and
 * the pool evicts a block from those buckets.
 */
#ifndef EMS_INDEX_H
#define EMS_INDEX_H

#include <stdint.h>

#include "layout.h"

typedef struct ems_index {
    ems_bucket_t *buckets;
    uint32_t nbuckets;
    ems_entry_t *entries; /* keys are compared through the entry table */
} ems_index_t;

/* Reader retries on one bucket before a lookup gives up and reports a miss, so a reader
 * never spins forever on a bucket whose writer died mid-update. */
#define EMS_INDEX_MAX_RETRIES 100000

/* Buckets for `nentries` entries: a mean load of 5.5 of 7 slots. That keeps bucket
 * overflow rare (0.04% of inserts evicted a neighbour when 1M random keys filled a
 * 1M-entry table) within 64 bytes of metadata per entry (52 + 11.6 bytes of bucket). */
uint32_t ems_index_buckets_for(uint32_t nentries);

void ems_index_init(ems_index_t *index, ems_bucket_t *buckets, uint32_t nbuckets,
                    ems_entry_t *entries);

/* Zeroes every bucket. Owner only, before the pool is published. */
void ems_index_clear(ems_index_t *index);

/* Finds `key`. Returns 1 and the slot word in *slot_word, 0 when absent, or -EAGAIN when
 * a bucket stayed write-locked for EMS_INDEX_MAX_RETRIES reads. Lock-free; any process. */
int ems_index_lookup(const ems_index_t *index, const uint8_t key[EMS_KEY_BYTES],
                     uint64_t *slot_word);

/* Looks up keys[0..n) (contiguous 32-byte keys); words[i] gets the slot word or 0 when
 * absent. Returns how many were found. The batch runs as a pipeline: buckets are
 * prefetched EMS_PREFETCH_DISTANCE keys ahead of the entries whose tags match, and those
 * the same distance ahead of the lookup, so the cache misses of several keys overlap. */
uint64_t ems_index_lookup_many(const ems_index_t *index, const uint8_t *keys, uint64_t n,
                               uint64_t *words);

/* Distance, in keys, between the prefetch stages of a batched lookup. */
#define EMS_PREFETCH_DISTANCE 6

/* Inserts `key` -> entry `entry_id` with generation `gen`. Returns 0, -EEXIST when the key
 * is present (*slot_word gets the existing slot), or -ENOSPC when both buckets are full.
 * Writer only. */
int ems_index_insert(ems_index_t *index, const uint8_t key[EMS_KEY_BYTES], uint32_t entry_id,
                     uint32_t gen, uint64_t *slot_word);

/* Removes the slot that maps `key` to `entry_id`. Returns 0 or -ENOENT. Writer only. */
int ems_index_remove(ems_index_t *index, const uint8_t key[EMS_KEY_BYTES], uint32_t entry_id);

/* Copies the entry ids held by the two candidate buckets of `key` into ids[0..13].
 * Returns how many. Writer only (used to pick an eviction victim when both are full). */
int ems_index_candidates(const ems_index_t *index, const uint8_t key[EMS_KEY_BYTES],
                         uint32_t ids[2 * EMS_BUCKET_SLOTS]);

#endif
