/* Pool reads: lookups and copies for the owner (pinned) and for attached readers
 * (optimistic, validated by the entry generation), batch forms and statistics. No lock is
 * taken on any read path except ems_pool_stats in the owner. Every lookup first checks
 * pool_readable, so a closed or suspended pool reports misses. */
#include "pool.h"
#include "pool_internal.h"

#include <string.h>

static void count_hit(ems_pool_t *pool)
{
    if (pool->owner)
        EMS_COUNT(pool, hits);
    else
        atomic_fetch_add_explicit(&pool->local_hits, 1, memory_order_relaxed);
}

static void count_miss(ems_pool_t *pool)
{
    if (pool->owner)
        EMS_COUNT(pool, misses);
    else
        atomic_fetch_add_explicit(&pool->local_misses, 1, memory_order_relaxed);
}

/* Snapshot of one committed block as an optimistic reader saw it. */
typedef struct block_view {
    uint32_t id;
    uint32_t gen;
    uint32_t length;
    const uint8_t *data;
} block_view_t;

/* Fills *view from the slot word the index returned for `key`, without pinning.
 * Returns 1 when the entry looked committed and consistent, else 0. The caller must
 * confirm view->gen after using the data (view_still_valid). */
static int view_from_word(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], uint64_t word,
                          block_view_t *view)
{
    const ems_layout_t *layout = pool->layout;
    uint32_t id = EMS_SLOT_ENTRY(word) - 1;
    if (word == 0 || id >= layout->nentries)
        return 0;

    ems_entry_t *e = &pool->entries[id];
    uint32_t gen = atomic_load_explicit(&e->gen, memory_order_acquire);
    if ((uint16_t)gen != EMS_SLOT_GEN(word) || !(gen & 1u))
        return 0;
    uint32_t state = EMS_ENTRY_STATE(atomic_load_explicit(&e->flags, memory_order_relaxed));
    if (state != EMS_ENTRY_COMMITTED && state != EMS_ENTRY_DEAD)
        return 0;

    uint32_t length = EMS_LOAD(e->length);
    const uint8_t *data = ems_block_ptr(pool, EMS_LOAD(e->slab), EMS_LOAD(e->slot), length);
    if (data == NULL || memcmp(e->key, key, EMS_KEY_BYTES) != 0)
        return 0;

    view->id = id;
    view->gen = gen;
    view->length = length;
    view->data = data;
    return 1;
}

/* False once the owner closed the pool, and while it is suspended: every lookup then
 * misses. */
static int pool_readable(const ems_pool_t *pool)
{
    const ems_layout_t *layout = pool->layout;
    return !atomic_load_explicit(&layout->closed, memory_order_acquire) &&
           !atomic_load_explicit(&layout->suspended, memory_order_acquire);
}

/* Finds `key` without pinning; see view_from_word. */
static int view_find(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], block_view_t *view)
{
    uint64_t word;
    if (!pool_readable(pool) || ems_index_lookup(&pool->index, key, &word) != 1)
        return 0;
    return view_from_word(pool, key, word, view);
}

/* True when the entry kept its generation since view_find, so everything read through
 * the view in between belongs to the block that was committed under the key. */
static int view_still_valid(ems_pool_t *pool, const block_view_t *view)
{
    atomic_thread_fence(memory_order_acquire);
    return atomic_load_explicit(&pool->entries[view->id].gen, memory_order_relaxed) ==
           view->gen;
}

/* Owner path: lookup, pin, copy, unpin. */
static int64_t owner_get(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], void *dst,
                         uint64_t dst_len, uint64_t *actual)
{
    uint64_t word;
    if (!pool_readable(pool) || ems_index_lookup(&pool->index, key, &word) != 1)
        return -ENOENT;
    uint32_t id = EMS_SLOT_ENTRY(word) - 1;
    if (!ems_entry_pin(pool, id, EMS_SLOT_GEN(word)))
        return -ENOENT;

    ems_entry_t *e = &pool->entries[id];
    uint64_t length = e->length;
    int64_t rc;
    if (length != dst_len) {
        if (actual)
            *actual = length;
        rc = -EMSGSIZE;
    } else {
        memcpy(dst, ems_block_ptr(pool, e->slab, e->slot, length), length);
        if (!(atomic_load_explicit(&e->flags, memory_order_relaxed) & EMS_FLAG_REF))
            atomic_fetch_or_explicit(&e->flags, EMS_FLAG_REF, memory_order_relaxed);
        rc = (int64_t)length;
    }
    ems_entry_unpin(pool, id);
    return rc;
}

/* Attached path: copy optimistically and keep the copy only if the generation held. */
static int64_t reader_get(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], void *dst,
                          uint64_t dst_len, uint64_t *actual)
{
    block_view_t view;
    if (!view_find(pool, key, &view))
        return -ENOENT;
    if (view.length != dst_len) {
        if (!view_still_valid(pool, &view))
            return -ENOENT;
        if (actual)
            *actual = view.length;
        return -EMSGSIZE;
    }
    memcpy(dst, view.data, view.length);
    if (!view_still_valid(pool, &view)) {
        atomic_fetch_add_explicit(&pool->local_retries, 1, memory_order_relaxed);
        return -ENOENT;
    }
    return (int64_t)view.length;
}

int64_t ems_pool_get(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], void *dst,
                     uint64_t dst_len, uint64_t *actual)
{
    int64_t rc = pool->owner ? owner_get(pool, key, dst, dst_len, actual)
                             : reader_get(pool, key, dst, dst_len, actual);
    if (rc >= 0)
        count_hit(pool);
    else if (rc == -ENOENT)
        count_miss(pool);
    return rc;
}

int64_t ems_pool_length(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES])
{
    block_view_t view;
    if (!view_find(pool, key, &view) || !view_still_valid(pool, &view))
        return -ENOENT;
    return view.length;
}

int ems_pool_exists(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES])
{
    block_view_t view;
    return view_find(pool, key, &view) && view_still_valid(pool, &view);
}

uint64_t ems_pool_match_prefix(ems_pool_t *pool, const uint8_t *keys, uint64_t n)
{
    uint64_t i = 0;
    while (i < n && ems_pool_exists(pool, keys + i * EMS_KEY_BYTES))
        i++;
    return i;
}

uint64_t ems_pool_get_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                           void *const *dsts, uint64_t *lengths, int64_t *results)
{
    uint64_t hits = 0;
    for (uint64_t i = 0; i < n; i++) {
        results[i] = ems_pool_get(pool, keys + i * EMS_KEY_BYTES, dsts[i], lengths[i],
                                  &lengths[i]);
        hits += results[i] >= 0;
    }
    return hits;
}

uint64_t ems_pool_exists_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                              uint8_t *out)
{
    /* Chunks of batched index lookups (which prefetch ahead), then the entry checks of
     * ems_pool_exists on lines the prefetch already brought in. */
    enum { CHUNK = 256 };
    uint64_t words[CHUNK];
    uint64_t present = 0;
    int readable = pool_readable(pool);
    for (uint64_t start = 0; start < n; start += CHUNK) {
        uint64_t count = n - start < CHUNK ? n - start : CHUNK;
        const uint8_t *chunk = keys + start * EMS_KEY_BYTES;
        if (!readable)
            memset(words, 0, sizeof words);
        else
            ems_index_lookup_many(&pool->index, chunk, count, words);
        for (uint64_t i = 0; i < count; i++) {
            block_view_t view;
            const uint8_t *key = chunk + i * EMS_KEY_BYTES;
            out[start + i] = (uint8_t)(view_from_word(pool, key, words[i], &view) &&
                                       view_still_valid(pool, &view));
            present += out[start + i];
        }
    }
    return present;
}

/* ---- statistics ----------------------------------------------------------------- */

#define LOAD_COUNTER(pool, field) \
    atomic_load_explicit(&(pool)->layout->counters.field, memory_order_relaxed)

int ems_pool_stats(ems_pool_t *pool, ems_pool_stats_t *stats, ems_class_stats_t *classes,
                   uint32_t max_classes)
{
    ems_layout_t *layout = pool->layout;
    memset(stats, 0, sizeof *stats);
    if (pool->owner)
        pthread_mutex_lock(&pool->lock);

    stats->capacity = layout->data_size;
    stats->slab_size = layout->slab_size;
    stats->slabs = layout->nslabs;
    stats->free_slabs = layout->free_slabs;
    stats->max_blocks = layout->nentries;
    stats->blocks = layout->used_entries;
    stats->bytes_used = layout->bytes_used;
    stats->metadata_bytes = (uint64_t)layout->nbuckets * sizeof(ems_bucket_t) +
                            (uint64_t)layout->nentries * sizeof(ems_entry_t);
    stats->page_kind = layout->page_kind;

    /* Free bytes: whole free slabs plus free slots of assigned slabs. Waste: everything
     * else that holds no payload (rounding to the slot size and slab tails). */
    uint64_t free_bytes = (uint64_t)layout->free_slabs * layout->slab_size;
    uint32_t used_classes = 0;
    const ems_class_t *table = pool->slabs.classes;
    for (uint32_t c = 0; c < layout->nclasses; c++) {
        if (table[c].nslabs == 0)
            continue;
        uint64_t slots = (uint64_t)table[c].nslabs * (layout->slab_size / table[c].slot_size);
        /* An attached reader reads these tables while the owner changes them: clamp
         * instead of underflowing. */
        uint64_t blocks = table[c].blocks < slots ? table[c].blocks : slots;
        uint64_t class_free = (slots - blocks) * table[c].slot_size;
        uint64_t class_bytes = (uint64_t)table[c].nslabs * layout->slab_size;
        uint64_t class_held = table[c].payload_bytes + class_free;
        free_bytes += class_free;
        if (used_classes < max_classes) {
            ems_class_stats_t *row = &classes[used_classes];
            row->size_class = c;
            row->slot_size = table[c].slot_size;
            row->slabs = table[c].nslabs;
            row->blocks = table[c].blocks;
            row->payload_bytes = table[c].payload_bytes;
            row->wasted_bytes = class_bytes > class_held ? class_bytes - class_held : 0;
            row->evictions = table[c].evictions;
        }
        used_classes++;
    }
    stats->bytes_free = free_bytes;
    stats->bytes_wasted = stats->capacity > stats->bytes_used + free_bytes
                              ? stats->capacity - stats->bytes_used - free_bytes
                              : 0;
    stats->nclasses_used = used_classes;

    stats->hits = LOAD_COUNTER(pool, hits);
    stats->misses = LOAD_COUNTER(pool, misses);
    stats->puts = LOAD_COUNTER(pool, puts);
    stats->put_exists = LOAD_COUNTER(pool, put_exists);
    stats->evictions = LOAD_COUNTER(pool, evictions);
    stats->deletes = LOAD_COUNTER(pool, deletes);
    stats->slab_moves = LOAD_COUNTER(pool, slab_moves);
    stats->pool_full = LOAD_COUNTER(pool, pool_full);
    stats->suspended_drops = LOAD_COUNTER(pool, suspended_drops);
    stats->suspended = (uint32_t)ems_pool_suspended(pool);
    if (pool->owner) {
        pthread_mutex_lock(&pool->spill.lock);
        stats->spill_captured = pool->spill.captured;
        stats->spill_dropped = pool->spill.dropped;
        stats->spill_ring_bytes = pool->spill.size;
        stats->spill_ring_used = pool->spill.used;
        pthread_mutex_unlock(&pool->spill.lock);
        pthread_mutex_unlock(&pool->lock);
    } else {
        stats->reader_hits = atomic_load_explicit(&pool->local_hits, memory_order_relaxed);
        stats->reader_misses = atomic_load_explicit(&pool->local_misses, memory_order_relaxed);
        stats->reader_retries = atomic_load_explicit(&pool->local_retries, memory_order_relaxed);
    }
    return (int)used_classes;
}

int64_t ems_pool_pin(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], uint64_t want,
                     const uint8_t **data, uint32_t *pin)
{
    if (!pool->owner)
        return -EPERM;
    uint64_t word;
    if (!pool_readable(pool) || ems_index_lookup(&pool->index, key, &word) != 1) {
        count_miss(pool);
        return -ENOENT;
    }
    uint32_t id = EMS_SLOT_ENTRY(word) - 1;
    if (!ems_entry_pin(pool, id, EMS_SLOT_GEN(word))) {
        count_miss(pool);
        return -ENOENT;
    }
    ems_entry_t *e = &pool->entries[id];
    uint64_t length = e->length;
    if (length != want) {
        ems_entry_unpin(pool, id);
        return -EMSGSIZE;
    }
    if (!(atomic_load_explicit(&e->flags, memory_order_relaxed) & EMS_FLAG_REF))
        atomic_fetch_or_explicit(&e->flags, EMS_FLAG_REF, memory_order_relaxed);
    count_hit(pool);
    *data = ems_block_ptr(pool, e->slab, e->slot, length);
    *pin = id;
    return (int64_t)length;
}

void ems_pool_unpin(ems_pool_t *pool, uint32_t pin)
{
    ems_entry_unpin(pool, pin);
}
