/* Slab allocator: the data region is cut into slabs of one power-of-two size; a slab is
 * assigned to one size class on demand and cut into equal slots. Free slots are kept in
 * a per-slab list threaded through the slot payloads, and slabs with a free slot are kept
 * in a per-class list, so allocation and free are O(1). A slab whose last slot is freed
 * goes back to the free-slab list, where any class can take it.
 *
 * Size classes step by 1/64 of each power of two (64-byte steps up to 4 KiB), so a block
 * wastes at most 1/64 of its size to rounding. The allocator does not evict: when
 * ems_slab_alloc returns -ENOSPC, the pool evicts and retries. Owner only, under the pool
 * mutex.
 */
#ifndef EMS_SLAB_H
#define EMS_SLAB_H

#include <stdint.h>

#include "layout.h"

#define EMS_MIN_SLOT 64u
#define EMS_STEPS_PER_DOUBLING 64u
#define EMS_MIN_SLAB_SIZE (64u << 10)
#define EMS_MAX_SLAB_SIZE (1u << 30)

typedef struct ems_slab_allocator {
    ems_layout_t *layout;
    ems_class_t *classes;
    ems_slab_t *slabs;
    uint8_t *data; /* start of the data region */
} ems_slab_allocator_t;

/* Number of size classes for slabs of `slab_size` bytes (the largest class is slab_size). */
uint32_t ems_slab_class_count(uint64_t slab_size);

/* Size class of a block of `length` bytes (1..slab_size). */
uint32_t ems_slab_class_of(uint64_t length);

/* Slot size of class `size_class`. */
uint64_t ems_slab_class_size(uint32_t size_class);

void ems_slab_bind(ems_slab_allocator_t *alloc, ems_layout_t *layout);

/* Sets up class and slab tables with every slab free. Owner only, before publishing. */
void ems_slab_init(ems_slab_allocator_t *alloc);

/* Takes a slot of `size_class`. Returns 0 with *slab and *slot set, or -ENOSPC when the
 * class has no free slot and no slab is free. */
int ems_slab_alloc(ems_slab_allocator_t *alloc, uint32_t size_class, uint32_t *slab,
                   uint32_t *slot);

/* Returns a slot to its slab; an empty slab returns to the free-slab list. */
void ems_slab_free(ems_slab_allocator_t *alloc, uint32_t slab, uint32_t slot);

/* Address of a slot's payload. */
static inline uint8_t *ems_slab_slot_ptr(const ems_slab_allocator_t *alloc, uint32_t slab,
                                         uint32_t slot)
{
    const ems_slab_t *s = &alloc->slabs[slab];
    return alloc->data + (uint64_t)slab * alloc->layout->slab_size +
           (uint64_t)slot * alloc->classes[s->size_class].slot_size;
}

#endif
