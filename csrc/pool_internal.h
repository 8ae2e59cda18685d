/* Helpers shared by pool.c, pool_write.c and pool_read.c; not part of the public API. */
#ifndef EMS_POOL_INTERNAL_H
#define EMS_POOL_INTERNAL_H

#include "pool.h"

#define EMS_COUNT(pool, field) \
    atomic_fetch_add_explicit(&(pool)->layout->counters.field, 1, memory_order_relaxed)

/* Relaxed loads and stores of the plain entry fields that readers of other processes
 * read while the owner may rewrite them. The generation check decides whether what they
 * read is usable; relaxed atomics only keep each load whole. */
#define EMS_LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)
#define EMS_STORE(field, value) __atomic_store_n(&(field), (value), __ATOMIC_RELAXED)

/* Payload address of a block, derived from its length (which fixes the size class) so
 * that a reader never depends on slab metadata the owner may be reassigning. Returns
 * NULL when the fields are out of range, which only a racing reader can observe. */
static inline uint8_t *ems_block_ptr(const ems_pool_t *pool, uint32_t slab, uint32_t slot,
                                     uint64_t length)
{
    const ems_layout_t *layout = pool->layout;
    if (slab >= layout->nslabs || length == 0 || length > layout->slab_size)
        return NULL;
    uint64_t slot_size = ems_slab_class_size(ems_slab_class_of(length));
    if (((uint64_t)slot + 1) * slot_size > layout->slab_size)
        return NULL;
    return (uint8_t *)layout + layout->data_off + (uint64_t)slab * layout->slab_size +
           (uint64_t)slot * slot_size;
}

/* Pins entry `id` if it is still the committed incarnation the slot word named (low 16
 * bits of its generation). A pinned block is neither evicted nor freed. Returns 1 when
 * pinned. */
int ems_entry_pin(ems_pool_t *pool, uint32_t id, uint16_t gen16);

/* Drops a pin; the last pin of a deleted block frees it. */
void ems_entry_unpin(ems_pool_t *pool, uint32_t id);

/* Frees a block that is out of the index and that no one can pin any more (state
 * RESERVED, DEAD or FREEING with no pins). Caller holds the pool mutex. */
void ems_block_free(ems_pool_t *pool, uint32_t id);

#endif
