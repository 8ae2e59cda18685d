/* Pool lifecycle: sizing and laying out the shared mapping, creating it as the owner,
 * attaching to it as a reader, closing, suspending, and setting and draining the spill
 * ring. Reads are in pool_read.c and writes, with eviction, in pool_write.c. */
#define _GNU_SOURCE
#include "pool.h"
#include "pool_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

uint64_t ems_pool_default_slab_size(uint64_t capacity)
{
    uint64_t slab = 1u << 20;
    while (slab < (32u << 20) && slab * 2 <= capacity / 16)
        slab *= 2;
    return slab;
}

static int is_power_of_two(uint64_t x)
{
    return x != 0 && (x & (x - 1)) == 0;
}

/* Fills the sizes and offsets of a layout. Each table starts on a 64-byte line; the data
 * region starts on a 2 MiB boundary so hugepage-backed slabs are page aligned. */
static void plan_layout(ems_layout_t *plan, uint64_t slab_size, uint32_t nslabs,
                        uint32_t nentries)
{
    memset(plan, 0, sizeof *plan);
    plan->magic = EMS_LAYOUT_MAGIC;
    plan->version = EMS_LAYOUT_VERSION;
    plan->slab_size = slab_size;
    plan->nslabs = nslabs;
    plan->data_size = slab_size * nslabs;
    plan->nclasses = ems_slab_class_count(slab_size);
    plan->nentries = nentries;
    plan->nbuckets = ems_index_buckets_for(nentries);

    uint64_t off = ems_round_up(sizeof(ems_layout_t), 64);
    plan->classes_off = off;
    off = ems_round_up(off + (uint64_t)plan->nclasses * sizeof(ems_class_t), 64);
    plan->slabs_off = off;
    off = ems_round_up(off + (uint64_t)nslabs * sizeof(ems_slab_t), 64);
    plan->buckets_off = off;
    off = ems_round_up(off + (uint64_t)plan->nbuckets * sizeof(ems_bucket_t), 64);
    plan->entries_off = off;
    off += (uint64_t)nentries * sizeof(ems_entry_t);
    plan->data_off = ems_round_up(off, EMS_HUGE_PAGE_BYTES);
    plan->map_size = plan->data_off + plan->data_size;
}

static void bind_tables(ems_pool_t *pool)
{
    ems_layout_t *layout = pool->layout;
    pool->entries = EMS_LAYOUT_AT(layout, layout->entries_off, ems_entry_t);
    ems_index_init(&pool->index, EMS_LAYOUT_AT(layout, layout->buckets_off, ems_bucket_t),
                   layout->nbuckets, pool->entries);
    ems_slab_bind(&pool->slabs, layout);
}

int ems_pool_create(ems_pool_t *pool, const ems_pool_config_t *config)
{
    memset(pool, 0, sizeof *pool);
    pool->arena.fd = -1;

    /* Step 1: validate and size. */
    uint64_t slab_size = config->slab_size ? config->slab_size
                                           : ems_pool_default_slab_size(config->capacity);
    if (!is_power_of_two(slab_size) || slab_size < EMS_MIN_SLAB_SIZE ||
        slab_size > EMS_MAX_SLAB_SIZE)
        return -EINVAL;
    if (config->capacity < slab_size)
        return -ERANGE;
    uint64_t nslabs = config->capacity / slab_size;
    if (nslabs > UINT32_MAX)
        return -EINVAL;

    uint64_t nentries = config->max_blocks;
    if (nentries == 0) {
        nentries = config->capacity / EMS_DEFAULT_BLOCK_HINT;
        if (nentries < EMS_MIN_ENTRIES)
            nentries = EMS_MIN_ENTRIES;
        if (nentries > EMS_MAX_ENTRIES)
            nentries = EMS_MAX_ENTRIES;
    }
    if (nentries > EMS_MAX_ENTRIES)
        return -EINVAL;

    ems_layout_t plan;
    plan_layout(&plan, slab_size, (uint32_t)nslabs, (uint32_t)nentries);

    /* Step 2: map and prefault. A fresh memfd is zero-filled, which is the empty state
     * of the index, the entry table and the counters. */
    int rc = ems_arena_create(&pool->arena, plan.map_size, config->pages, config->debug_name);
    if (rc != 0)
        return rc;

    /* Step 3: write the header and initialize the tables. */
    pool->layout = (ems_layout_t *)pool->arena.base;
    memcpy(pool->layout, &plan, sizeof plan);
    pool->layout->map_size = pool->arena.size;
    pool->layout->page_kind = (uint32_t)pool->arena.page_kind;
    pool->layout->owner_pid = (int32_t)getpid();
    bind_tables(pool);
    ems_slab_init(&pool->slabs);

    for (uint32_t i = 0; i < plan.nentries; i++)
        pool->entries[i].slab = i + 1 < plan.nentries ? i + 2 : EMS_NIL;
    pool->layout->free_entry_head = plan.nentries ? 1 : EMS_NIL;

    pthread_mutex_init(&pool->lock, NULL);
    rc = ems_spill_ring_init(&pool->spill);
    if (rc != 0) {
        pthread_mutex_destroy(&pool->lock);
        ems_arena_close(&pool->arena);
        pool->layout = NULL;
        return rc;
    }
    pool->owner = 1;
    return 0;
}

int ems_pool_attach(ems_pool_t *pool, int fd)
{
    memset(pool, 0, sizeof *pool);
    pool->arena.fd = -1;

    int rc = ems_arena_attach(&pool->arena, fd);
    if (rc != 0)
        return rc;

    /* Trust nothing in a file handed to us: check the header against a layout planned
     * from its own sizes before following any offset. */
    const ems_layout_t *layout = (const ems_layout_t *)pool->arena.base;
    rc = -EINVAL;
    if (pool->arena.size < sizeof(ems_layout_t) || layout->magic != EMS_LAYOUT_MAGIC)
        goto fail;
    if (layout->version != EMS_LAYOUT_VERSION) {
        rc = -EPROTO;
        goto fail;
    }
    if (!is_power_of_two(layout->slab_size) || layout->slab_size < EMS_MIN_SLAB_SIZE ||
        layout->slab_size > EMS_MAX_SLAB_SIZE)
        goto fail;

    ems_layout_t plan;
    plan_layout(&plan, layout->slab_size, layout->nslabs, layout->nentries);
    if (plan.data_off != layout->data_off || plan.entries_off != layout->entries_off ||
        plan.buckets_off != layout->buckets_off || plan.slabs_off != layout->slabs_off ||
        plan.classes_off != layout->classes_off || plan.map_size > pool->arena.size)
        goto fail;

    pool->layout = (ems_layout_t *)pool->arena.base;
    pool->arena.page_kind = (ems_page_kind_t)layout->page_kind;
    bind_tables(pool);
    pool->owner = 0;
    return 0;

fail:
    ems_arena_close(&pool->arena);
    return rc;
}

void ems_pool_close(ems_pool_t *pool)
{
    if (!pool->layout)
        return;
    if (pool->owner) {
        atomic_store_explicit(&pool->layout->closed, 1, memory_order_release);
        pthread_mutex_destroy(&pool->lock);
        ems_spill_ring_destroy(&pool->spill);
    } else {
        /* A forked child's copy of the owner's ring (NULL when attached). Its lock may have
         * been held by another thread at the fork, so only the buffer is freed. */
        free(pool->spill.buf);
        pool->spill.buf = NULL;
    }
    ems_arena_close(&pool->arena);
    pool->layout = NULL;
    pool->entries = NULL;
}

void ems_pool_disown(ems_pool_t *pool)
{
    pool->owner = 0;
}

uint64_t ems_pool_max_block(const ems_pool_t *pool)
{
    return pool->layout->slab_size;
}

int ems_pool_set_suspended(ems_pool_t *pool, int suspended)
{
    if (!pool->owner)
        return -EPERM;
    atomic_store_explicit(&pool->layout->suspended, suspended ? 1u : 0u, memory_order_release);
    return 0;
}

int ems_pool_suspended(const ems_pool_t *pool)
{
    return (int)atomic_load_explicit(&pool->layout->suspended, memory_order_acquire);
}

int ems_pool_set_spill_ring(ems_pool_t *pool, uint64_t bytes)
{
    if (!pool->owner)
        return -EPERM;
    if (bytes != 0 && bytes < ems_spill_record_bytes(pool->layout->slab_size))
        return -EINVAL;

    /* The pool mutex keeps evictions out while the buffer changes, and the ring lock, taken
     * inside, keeps ems_pool_take_evicted out. */
    pthread_mutex_lock(&pool->lock);
    int rc = ems_spill_ring_resize(&pool->spill, bytes);
    pthread_mutex_unlock(&pool->lock);
    return rc;
}

uint64_t ems_pool_take_evicted(ems_pool_t *pool, uint8_t *out_keys, uint64_t *out_lengths,
                               uint8_t *buf, uint64_t buf_len, uint64_t max_blocks)
{
    if (!pool->owner)
        return 0;
    return ems_spill_ring_take(&pool->spill, out_keys, out_lengths, buf, buf_len, max_blocks);
}

uint64_t ems_pool_keys(ems_pool_t *pool, uint64_t *cursor, uint8_t *out, uint64_t max)
{
    if (!pool->owner)
        return 0;
    uint64_t n = 0, i = *cursor;
    pthread_mutex_lock(&pool->lock);
    for (; i < pool->layout->nentries && n < max; i++) {
        const ems_entry_t *e = &pool->entries[i];
        if (EMS_ENTRY_STATE(atomic_load_explicit(&e->flags, memory_order_relaxed)) ==
            EMS_ENTRY_COMMITTED)
            memcpy(out + n++ * EMS_KEY_BYTES, e->key, EMS_KEY_BYTES);
    }
    pthread_mutex_unlock(&pool->lock);
    *cursor = i;
    return n;
}
