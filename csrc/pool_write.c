/* Pool writes: two-phase put, delete, priority and SPILLED hints, and CLOCK eviction with
 * slab moves, which copies each victim into the spill ring when one is set.
 *
 * Every function here that changes metadata holds pool->lock, so writers are serialized
 * and see a consistent allocator. Readers run concurrently without the lock. Three rules
 * keep them safe: an entry enters the index only after its payload is complete (commit),
 * it leaves the index before it is freed, and its generation is incremented before its
 * slot can be handed to another block.
 */
#include "pool.h"
#include "pool_internal.h"

#include <string.h>

/* ---- entries -------------------------------------------------------------------- */

int ems_entry_pin(ems_pool_t *pool, uint32_t id, uint16_t gen16)
{
    ems_entry_t *e = &pool->entries[id];
    uint32_t f = atomic_load_explicit(&e->flags, memory_order_relaxed);
    do {
        if (EMS_ENTRY_STATE(f) != EMS_ENTRY_COMMITTED || EMS_ENTRY_PINS(f) == EMS_PIN_MAX)
            return 0;
    } while (!atomic_compare_exchange_weak_explicit(&e->flags, &f, f + EMS_PIN_ONE,
                                                    memory_order_acquire,
                                                    memory_order_relaxed));

    /* Pinned and committed: the entry cannot be freed now. It must still be the
     * incarnation the index pointed to, not a newer block that reused the entry. */
    uint32_t gen = atomic_load_explicit(&e->gen, memory_order_acquire);
    if ((uint16_t)gen != gen16) {
        ems_entry_unpin(pool, id);
        return 0;
    }
    return 1;
}

void ems_entry_unpin(ems_pool_t *pool, uint32_t id)
{
    ems_entry_t *e = &pool->entries[id];
    uint32_t old = atomic_fetch_sub_explicit(&e->flags, EMS_PIN_ONE, memory_order_acq_rel);
    if (EMS_ENTRY_PINS(old) != 1 || EMS_ENTRY_STATE(old) != EMS_ENTRY_DEAD)
        return;

    /* Last pin of a deleted block: a DEAD entry cannot be pinned again, so this thread frees it. */
    pthread_mutex_lock(&pool->lock);
    atomic_store_explicit(&e->flags, EMS_ENTRY_FREEING, memory_order_relaxed);
    ems_block_free(pool, id);
    pthread_mutex_unlock(&pool->lock);
}

static int entry_take(ems_pool_t *pool, uint32_t *id)
{
    ems_layout_t *layout = pool->layout;
    if (layout->free_entry_head == EMS_NIL)
        return -ENOSPC;
    *id = layout->free_entry_head - 1;
    layout->free_entry_head = pool->entries[*id].slab;
    layout->used_entries++;
    return 0;
}

void ems_block_free(ems_pool_t *pool, uint32_t id)
{
    ems_layout_t *layout = pool->layout;
    ems_entry_t *e = &pool->entries[id];
    uint64_t length = e->length;
    uint32_t size_class = ems_slab_class_of(length);

    /* Invalidate optimistic readers before the slot can be rewritten: the release fence
     * orders the new generation before the free-list link stored into the payload. */
    atomic_fetch_add_explicit(&e->gen, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);

    ems_class_t *c = &pool->slabs.classes[size_class];
    c->blocks--;
    c->payload_bytes -= length;
    layout->bytes_used -= length;
    ems_slab_free(&pool->slabs, e->slab, e->slot);

    atomic_store_explicit(&e->flags, EMS_ENTRY_FREE, memory_order_relaxed);
    EMS_STORE(e->slab, layout->free_entry_head);
    layout->free_entry_head = id + 1;
    layout->used_entries--;
}

/* Evicts committed, unpinned entry `id`, first copying it into the spill ring when one is
 * set and the block is not marked SPILLED. Every eviction path (CLOCK victims, slab moves,
 * full index buckets) comes through here. Returns 1, or 0 when a reader pinned it first or
 * it is no longer committed. */
static int evict_entry(ems_pool_t *pool, uint32_t id)
{
    ems_entry_t *e = &pool->entries[id];
    uint32_t f = atomic_load_explicit(&e->flags, memory_order_relaxed);
    do {
        if (EMS_ENTRY_STATE(f) != EMS_ENTRY_COMMITTED || EMS_ENTRY_PINS(f) != 0)
            return 0;
    } while (!atomic_compare_exchange_weak_explicit(
        &e->flags, &f, (f & ~(uint32_t)EMS_STATE_MASK) | EMS_ENTRY_FREEING,
        memory_order_acquire, memory_order_relaxed));

    /* FREEING cannot be pinned and the slot is freed only below, so the payload is stable.
     * The successful CAS left the flags as they were in f, SPILLED included. */
    if (pool->spill.buf != NULL && !(f & EMS_FLAG_SPILLED))
        ems_spill_ring_push(&pool->spill, e->key,
                            ems_block_ptr(pool, e->slab, e->slot, e->length), e->length);

    ems_index_remove(&pool->index, e->key, id);
    pool->slabs.classes[ems_slab_class_of(e->length)].evictions++;
    EMS_COUNT(pool, evictions);
    ems_block_free(pool, id);
    return 1;
}

/* ---- CLOCK ---------------------------------------------------------------------- */

/* Advances the CLOCK hand to an evictable entry. Passes 0 and 1 skip protected entries
 * and give referenced ones a second chance (clearing their bit); pass 2 takes any
 * unpinned committed entry, so protected blocks go last. Returns 0 or -ENOSPC when every
 * entry is free, reserved or pinned. */
static int clock_victim(ems_pool_t *pool, uint32_t *victim)
{
    ems_layout_t *layout = pool->layout;
    uint32_t n = layout->nentries;
    for (int pass = 0; pass < 3; pass++) {
        for (uint32_t step = 0; step < n; step++) {
            uint32_t id = layout->clock_hand;
            layout->clock_hand = id + 1 == n ? 0 : id + 1;

            ems_entry_t *e = &pool->entries[id];
            uint32_t f = atomic_load_explicit(&e->flags, memory_order_relaxed);
            if (EMS_ENTRY_STATE(f) != EMS_ENTRY_COMMITTED || EMS_ENTRY_PINS(f) != 0)
                continue;
            if (pass < 2) {
                if (f & EMS_FLAG_PROTECT)
                    continue;
                if (f & EMS_FLAG_REF) {
                    atomic_fetch_and_explicit(&e->flags, ~(uint32_t)EMS_FLAG_REF,
                                              memory_order_relaxed);
                    continue;
                }
            }
            *victim = id;
            return 0;
        }
    }
    return -ENOSPC;
}

/* Empties slab `slab` so another class can take it. Returns 1 when every block in it was
 * evicted (the slab is then free), 0 when a reserved, deleted-but-pinned or pinned block
 * keeps it, or a protected one does unless `take_protected`. This scans the entry table:
 * slab moves are rare, lookups stay O(1). */
static int reclaim_slab(ems_pool_t *pool, uint32_t slab, int take_protected)
{
    uint32_t n = pool->layout->nentries;
    for (uint32_t id = 0; id < n; id++) {
        uint32_t f = atomic_load_explicit(&pool->entries[id].flags, memory_order_relaxed);
        uint32_t state = EMS_ENTRY_STATE(f);
        if (state == EMS_ENTRY_FREE || pool->entries[id].slab != slab)
            continue;
        if (state != EMS_ENTRY_COMMITTED || EMS_ENTRY_PINS(f) != 0)
            return 0;
        if ((f & EMS_FLAG_PROTECT) && !take_protected)
            return 0;
    }
    for (uint32_t id = 0; id < n; id++) {
        uint32_t state = EMS_ENTRY_STATE(
            atomic_load_explicit(&pool->entries[id].flags, memory_order_relaxed));
        if (state == EMS_ENTRY_COMMITTED && pool->entries[id].slab == slab &&
            !evict_entry(pool, id))
            return 0;
    }
    EMS_COUNT(pool, slab_moves);
    return 1;
}

/* Takes a slot of `size_class`, evicting until one is free. The victim is the block
 * CLOCK finds coldest in the whole pool: if it is of the same class its slot is reused,
 * otherwise its whole slab moves to this class. A pinned or reserved block in that slab
 * keeps the slab, and so does a protected one unless the victim itself is protected
 * (nothing unprotected is left); then only the victim goes. Each round evicts at least
 * one block, so the loop ends.
 * NOTE: a slab move evicts every block of the slab, referenced ones too, so a workload
 * that keeps alternating between many block sizes evicts more than it would with one
 * size. */
static int slot_take(ems_pool_t *pool, uint32_t size_class, uint32_t *slab, uint32_t *slot)
{
    for (;;) {
        if (ems_slab_alloc(&pool->slabs, size_class, slab, slot) == 0)
            return 0;

        uint32_t victim;
        if (clock_victim(pool, &victim) != 0)
            return -ENOSPC;
        ems_entry_t *e = &pool->entries[victim];
        int victim_protected =
            (atomic_load_explicit(&e->flags, memory_order_relaxed) & EMS_FLAG_PROTECT) != 0;
        if (ems_slab_class_of(e->length) == size_class ||
            !reclaim_slab(pool, e->slab, victim_protected))
            evict_entry(pool, victim);
    }
}

/* Takes an entry, evicting the CLOCK victim when the table is full. */
static int entry_take_evicting(ems_pool_t *pool, uint32_t *id)
{
    while (entry_take(pool, id) != 0) {
        uint32_t victim;
        if (clock_victim(pool, &victim) != 0)
            return -ENOSPC;
        evict_entry(pool, victim);
    }
    return 0;
}

/* ---- two-phase put -------------------------------------------------------------- */

static int check_length(const ems_pool_t *pool, uint64_t length)
{
    if (length == 0)
        return -EINVAL;
    if (length > pool->layout->slab_size)
        return -EMSGSIZE;
    return 0;
}

int ems_pool_reserve(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], uint64_t length,
                     ems_reservation_t *r)
{
    memset(r, 0, sizeof *r);
    if (!pool->owner)
        return -EPERM;
    int rc = check_length(pool, length);
    if (rc != 0)
        return rc;
    /* Before the lookup below, so a suspended pool does not tell whether the key is
     * stored. */
    if (ems_pool_suspended(pool)) {
        EMS_COUNT(pool, suspended_drops);
        return -EACCES;
    }

    pthread_mutex_lock(&pool->lock);

    /* Step 1: an existing key is an idempotent success with nothing to copy. */
    uint64_t word;
    if (ems_index_lookup(&pool->index, key, &word) == 1) {
        r->exists = 1;
        EMS_COUNT(pool, put_exists);
        pthread_mutex_unlock(&pool->lock);
        return 0;
    }

    /* Step 2: a slot, then an entry; either may evict. */
    uint32_t size_class = ems_slab_class_of(length);
    uint32_t slab, slot, id;
    rc = slot_take(pool, size_class, &slab, &slot);
    if (rc == 0) {
        rc = entry_take_evicting(pool, &id);
        if (rc != 0)
            ems_slab_free(&pool->slabs, slab, slot);
    }
    if (rc != 0) {
        EMS_COUNT(pool, pool_full);
        pthread_mutex_unlock(&pool->lock);
        return rc;
    }

    /* Step 3: fill the entry, then publish its new generation. It stays out of the index
     * until commit, so no reader can reach it yet. */
    ems_entry_t *e = &pool->entries[id];
    memcpy(e->key, key, EMS_KEY_BYTES);
    EMS_STORE(e->slab, slab);
    EMS_STORE(e->slot, slot);
    EMS_STORE(e->length, (uint32_t)length);
    atomic_store_explicit(&e->flags, EMS_ENTRY_RESERVED, memory_order_relaxed);
    uint32_t gen = atomic_fetch_add_explicit(&e->gen, 1, memory_order_release) + 1;

    ems_class_t *c = &pool->slabs.classes[size_class];
    c->blocks++;
    c->payload_bytes += length;
    pool->layout->bytes_used += length;
    pthread_mutex_unlock(&pool->lock);

    r->entry = id;
    r->gen = gen;
    r->data = ems_block_ptr(pool, slab, slot, length);
    r->length = length;
    return 0;
}

/* Makes room in the key's two buckets by evicting one unpinned block held there, chosen
 * as CLOCK would: unreferenced before referenced, protected last. */
static int bucket_make_room(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES])
{
    uint32_t ids[2 * EMS_BUCKET_SLOTS];
    int n = ems_index_candidates(&pool->index, key, ids);
    for (int rank = 0; rank < 3; rank++) {
        for (int i = 0; i < n; i++) {
            uint32_t f = atomic_load_explicit(&pool->entries[ids[i]].flags, memory_order_relaxed);
            int entry_rank = (f & EMS_FLAG_PROTECT) ? 2 : (f & EMS_FLAG_REF) ? 1 : 0;
            if (entry_rank == rank && evict_entry(pool, ids[i]))
                return 0;
        }
    }
    return -ENOSPC;
}

int ems_pool_commit(ems_pool_t *pool, ems_reservation_t *r)
{
    if (r->exists)
        return 0;
    if (!pool->owner)
        return -EPERM;

    pthread_mutex_lock(&pool->lock);
    ems_entry_t *e = &pool->entries[r->entry];
    if (atomic_load_explicit(&e->gen, memory_order_relaxed) != r->gen ||
        EMS_ENTRY_STATE(atomic_load_explicit(&e->flags, memory_order_relaxed)) !=
            EMS_ENTRY_RESERVED) {
        pthread_mutex_unlock(&pool->lock);
        return -EINVAL;
    }
    if (ems_pool_suspended(pool)) {
        /* Suspended since the reserve: the block is dropped, not published. */
        ems_block_free(pool, r->entry);
        EMS_COUNT(pool, suspended_drops);
        pthread_mutex_unlock(&pool->lock);
        r->data = NULL;
        return -EACCES;
    }

    /* Step 1: insert while the entry is still RESERVED. A reader that finds it now sees a
     * miss, and no one can pin it, so a failed insert can free it without racing a pin
     * (a reader may hold a stale slot word naming this entry from its previous life). */
    int rc;
    while ((rc = ems_index_insert(&pool->index, e->key, r->entry, r->gen, NULL)) == -ENOSPC) {
        if (bucket_make_room(pool, e->key) != 0)
            break;
    }

    /* Step 2: publish. The release orders the payload written by the filling thread before
     * the state that lets readers pin and copy it. */
    if (rc == 0) {
        atomic_store_explicit(&e->flags, EMS_ENTRY_COMMITTED | EMS_FLAG_REF,
                              memory_order_release);
        EMS_COUNT(pool, puts);
    } else {
        ems_block_free(pool, r->entry);
        if (rc == -EEXIST) {
            /* Another writer committed this key first: an idempotent success. */
            EMS_COUNT(pool, put_exists);
            rc = 1;
        } else {
            EMS_COUNT(pool, pool_full);
        }
    }
    pthread_mutex_unlock(&pool->lock);
    r->data = NULL;
    return rc;
}

void ems_pool_abort(ems_pool_t *pool, ems_reservation_t *r)
{
    if (r->exists || !pool->owner || r->data == NULL)
        return;
    pthread_mutex_lock(&pool->lock);
    ems_entry_t *e = &pool->entries[r->entry];
    if (atomic_load_explicit(&e->gen, memory_order_relaxed) == r->gen &&
        EMS_ENTRY_STATE(atomic_load_explicit(&e->flags, memory_order_relaxed)) ==
            EMS_ENTRY_RESERVED)
        ems_block_free(pool, r->entry);
    pthread_mutex_unlock(&pool->lock);
    r->data = NULL;
}

int ems_pool_put(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], const void *src,
                 uint64_t length)
{
    ems_reservation_t r;
    int rc = ems_pool_reserve(pool, key, length, &r);
    if (rc != 0)
        return rc;
    if (r.exists)
        return 1;
    memcpy(r.data, src, length);
    return ems_pool_commit(pool, &r);
}

uint64_t ems_pool_put_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                           const void *const *srcs, const uint64_t *lengths, int64_t *results)
{
    uint64_t failed = 0;
    for (uint64_t i = 0; i < n; i++) {
        results[i] = ems_pool_put(pool, keys + i * EMS_KEY_BYTES, srcs[i], lengths[i]);
        failed += results[i] < 0;
    }
    return failed;
}

/* ---- delete and hints ----------------------------------------------------------- */

int ems_pool_delete(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES])
{
    if (!pool->owner)
        return -EPERM;

    pthread_mutex_lock(&pool->lock);
    uint64_t word;
    if (ems_index_lookup(&pool->index, key, &word) != 1) {
        pthread_mutex_unlock(&pool->lock);
        return -ENOENT;
    }
    uint32_t id = EMS_SLOT_ENTRY(word) - 1;
    ems_entry_t *e = &pool->entries[id];

    /* COMMITTED -> DEAD in one CAS that also reads the pin count: with pins, the last
     * unpin frees the block. Without pins, it cannot be pinned any more and is freed now. */
    uint32_t f = atomic_load_explicit(&e->flags, memory_order_relaxed);
    do {
        if (EMS_ENTRY_STATE(f) != EMS_ENTRY_COMMITTED) {
            pthread_mutex_unlock(&pool->lock);
            return -ENOENT;
        }
    } while (!atomic_compare_exchange_weak_explicit(
        &e->flags, &f, (f & ~(uint32_t)EMS_STATE_MASK) | EMS_ENTRY_DEAD,
        memory_order_acq_rel, memory_order_relaxed));

    ems_index_remove(&pool->index, key, id);
    if (EMS_ENTRY_PINS(f) == 0) {
        atomic_store_explicit(&e->flags, EMS_ENTRY_FREEING, memory_order_relaxed);
        ems_block_free(pool, id);
    }
    EMS_COUNT(pool, deletes);
    pthread_mutex_unlock(&pool->lock);
    return 0;
}

int64_t ems_pool_protect(ems_pool_t *pool, const uint8_t *keys, uint64_t n, int protect)
{
    if (!pool->owner)
        return -EPERM;

    int64_t present = 0;
    pthread_mutex_lock(&pool->lock);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t word;
        if (ems_index_lookup(&pool->index, keys + i * EMS_KEY_BYTES, &word) != 1)
            continue;
        ems_entry_t *e = &pool->entries[EMS_SLOT_ENTRY(word) - 1];
        if (protect)
            atomic_fetch_or_explicit(&e->flags, EMS_FLAG_PROTECT, memory_order_relaxed);
        else
            atomic_fetch_and_explicit(&e->flags, ~(uint32_t)EMS_FLAG_PROTECT,
                                      memory_order_relaxed);
        present++;
    }
    pthread_mutex_unlock(&pool->lock);
    return present;
}

uint64_t ems_pool_evict_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n)
{
    if (!pool->owner)
        return 0;

    uint64_t freed = 0;
    pthread_mutex_lock(&pool->lock);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t word;
        if (ems_index_lookup(&pool->index, keys + i * EMS_KEY_BYTES, &word) != 1)
            continue;
        uint32_t id = EMS_SLOT_ENTRY(word) - 1;
        ems_entry_t *e = &pool->entries[id];
        if (atomic_load_explicit(&e->flags, memory_order_relaxed) & EMS_FLAG_PROTECT)
            continue;
        uint64_t length = e->length;
        if (evict_entry(pool, id))
            freed += length;
    }
    pthread_mutex_unlock(&pool->lock);
    return freed;
}

int64_t ems_pool_mark_spilled(ems_pool_t *pool, const uint8_t *keys, uint64_t n)
{
    if (!pool->owner)
        return -EPERM;

    /* Under the mutex, so the flag lands only on the block the index holds now, never on
     * an entry that an eviction is freeing or that a new block reuses. */
    int64_t present = 0;
    pthread_mutex_lock(&pool->lock);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t word;
        if (ems_index_lookup(&pool->index, keys + i * EMS_KEY_BYTES, &word) != 1)
            continue;
        ems_entry_t *e = &pool->entries[EMS_SLOT_ENTRY(word) - 1];
        atomic_fetch_or_explicit(&e->flags, EMS_FLAG_SPILLED, memory_order_relaxed);
        present++;
    }
    pthread_mutex_unlock(&pool->lock);
    return present;
}
