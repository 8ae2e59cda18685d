/* Slab allocator over the pool's data region (see slab.h). Owner only, under the pool
 * mutex: nothing here is atomic. */
#include "slab.h"

#include <string.h>

uint32_t ems_slab_class_of(uint64_t length)
{
    /* Up to 4 KiB: 64-byte steps, classes 0..63. */
    if (length <= 4096)
        return (uint32_t)((length + EMS_MIN_SLOT - 1) / EMS_MIN_SLOT) - 1;

    /* Above: length lies in (2^e, 2^(e+1)]; that range is cut into 64 equal steps. */
    uint32_t e = 63u - (uint32_t)__builtin_clzll(length - 1);
    uint64_t step = 1ull << (e - 6);
    uint64_t steps = (length - (1ull << e) + step - 1) / step;
    return 64u + (e - 12u) * EMS_STEPS_PER_DOUBLING + (uint32_t)steps - 1u;
}

uint64_t ems_slab_class_size(uint32_t size_class)
{
    if (size_class < 64u)
        return (uint64_t)(size_class + 1u) * EMS_MIN_SLOT;
    uint32_t rest = size_class - 64u;
    uint32_t e = 12u + rest / EMS_STEPS_PER_DOUBLING;
    uint64_t steps = rest % EMS_STEPS_PER_DOUBLING + 1u;
    return (1ull << e) + steps * (1ull << (e - 6));
}

uint32_t ems_slab_class_count(uint64_t slab_size)
{
    return ems_slab_class_of(slab_size) + 1u;
}

void ems_slab_bind(ems_slab_allocator_t *alloc, ems_layout_t *layout)
{
    alloc->layout = layout;
    alloc->classes = EMS_LAYOUT_AT(layout, layout->classes_off, ems_class_t);
    alloc->slabs = EMS_LAYOUT_AT(layout, layout->slabs_off, ems_slab_t);
    alloc->data = EMS_LAYOUT_AT(layout, layout->data_off, uint8_t);
}

void ems_slab_init(ems_slab_allocator_t *alloc)
{
    ems_layout_t *layout = alloc->layout;

    for (uint32_t c = 0; c < layout->nclasses; c++) {
        memset(&alloc->classes[c], 0, sizeof alloc->classes[c]);
        alloc->classes[c].slot_size = ems_slab_class_size(c);
    }

    /* Every slab starts on the free list, lowest index first. */
    for (uint32_t s = 0; s < layout->nslabs; s++) {
        memset(&alloc->slabs[s], 0, sizeof alloc->slabs[s]);
        alloc->slabs[s].size_class = EMS_NO_CLASS;
        alloc->slabs[s].next = s + 1 < layout->nslabs ? s + 2 : EMS_NIL;
    }
    layout->free_slab_head = layout->nslabs ? 1 : EMS_NIL;
    layout->free_slabs = layout->nslabs;
}

static void partial_push(ems_slab_allocator_t *alloc, uint32_t slab)
{
    ems_slab_t *s = &alloc->slabs[slab];
    ems_class_t *c = &alloc->classes[s->size_class];
    s->prev = EMS_NIL;
    s->next = c->partial_head;
    if (c->partial_head != EMS_NIL)
        alloc->slabs[c->partial_head - 1].prev = slab + 1;
    c->partial_head = slab + 1;
    s->on_list = 1;
}

static void partial_remove(ems_slab_allocator_t *alloc, uint32_t slab)
{
    ems_slab_t *s = &alloc->slabs[slab];
    ems_class_t *c = &alloc->classes[s->size_class];
    if (s->prev != EMS_NIL)
        alloc->slabs[s->prev - 1].next = s->next;
    else
        c->partial_head = s->next;
    if (s->next != EMS_NIL)
        alloc->slabs[s->next - 1].prev = s->prev;
    s->prev = s->next = EMS_NIL;
    s->on_list = 0;
}

/* Takes a slab off the free list and cuts it for `size_class`. */
static int assign_free_slab(ems_slab_allocator_t *alloc, uint32_t size_class, uint32_t *slab)
{
    ems_layout_t *layout = alloc->layout;
    if (layout->free_slab_head == EMS_NIL)
        return -ENOSPC;

    uint32_t id = layout->free_slab_head - 1;
    ems_slab_t *s = &alloc->slabs[id];
    layout->free_slab_head = s->next;
    layout->free_slabs--;

    s->size_class = size_class;
    s->nslots = (uint32_t)(layout->slab_size / alloc->classes[size_class].slot_size);
    s->used = 0;
    s->bump = 0;
    s->free_head = EMS_NIL;
    alloc->classes[size_class].nslabs++;
    partial_push(alloc, id);
    *slab = id;
    return 0;
}

int ems_slab_alloc(ems_slab_allocator_t *alloc, uint32_t size_class, uint32_t *slab,
                   uint32_t *slot)
{
    ems_class_t *c = &alloc->classes[size_class];
    uint32_t id;
    if (c->partial_head != EMS_NIL) {
        id = c->partial_head - 1;
    } else {
        int rc = assign_free_slab(alloc, size_class, &id);
        if (rc != 0)
            return rc;
    }

    /* Reuse a freed slot first (its link lives in its first 4 bytes), else a new one. */
    ems_slab_t *s = &alloc->slabs[id];
    uint32_t index;
    if (s->free_head != EMS_NIL) {
        index = s->free_head - 1;
        s->free_head = 0;
        memcpy(&s->free_head, ems_slab_slot_ptr(alloc, id, index), sizeof s->free_head);
    } else {
        index = s->bump++;
    }
    s->used++;
    if (s->used == s->nslots)
        partial_remove(alloc, id);

    *slab = id;
    *slot = index;
    return 0;
}

void ems_slab_free(ems_slab_allocator_t *alloc, uint32_t slab, uint32_t slot)
{
    ems_layout_t *layout = alloc->layout;
    ems_slab_t *s = &alloc->slabs[slab];

    memcpy(ems_slab_slot_ptr(alloc, slab, slot), &s->free_head, sizeof s->free_head);
    s->free_head = slot + 1;
    s->used--;

    if (s->used == 0) {
        /* An empty slab goes back to the free list so any class can take it. */
        if (s->on_list)
            partial_remove(alloc, slab);
        alloc->classes[s->size_class].nslabs--;
        s->size_class = EMS_NO_CLASS;
        s->next = layout->free_slab_head;
        layout->free_slab_head = slab + 1;
        layout->free_slabs++;
    } else if (!s->on_list) {
        partial_push(alloc, slab);
    }
}
