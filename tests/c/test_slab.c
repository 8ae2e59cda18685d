/* Unit tests for csrc/slab.c: size class arithmetic, slab assignment, slot handout and
 * return, -ENOSPC, and slabs moving between classes.
 *
 * The allocator runs on a layout built here in malloc'd memory with the same table order
 * as the pool (header, class table, slab table, data), so these tests do not depend on
 * pool.c. Every live slot carries a stamp in its first and last 8 bytes, and an ownership
 * map over the data region in 64-byte units proves that no two live slots overlap.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "slab.h"

typedef struct slab_fixture {
    uint8_t *mem;
    ems_layout_t *layout;
    ems_slab_allocator_t alloc;
    uint32_t *owner_map; /* live-slot id + 1 per 64-byte unit of the data region, 0 if free */
    uint64_t units;
} slab_fixture_t;

typedef struct live_slot {
    uint32_t slab, slot, size_class;
    uint64_t stamp;
} live_slot_t;

static void fixture_open(slab_fixture_t *f, uint64_t slab_size, uint32_t nslabs)
{
    uint32_t nclasses = ems_slab_class_count(slab_size);
    uint64_t classes_off = ems_round_up(sizeof(ems_layout_t), 64);
    uint64_t slabs_off = ems_round_up(classes_off + nclasses * sizeof(ems_class_t), 64);
    uint64_t data_off = ems_round_up(slabs_off + nslabs * sizeof(ems_slab_t), 4096);
    uint64_t total = data_off + (uint64_t)nslabs * slab_size;

    memset(f, 0, sizeof *f);
    f->mem = aligned_alloc(4096, total);
    CHECK(f->mem != NULL);
    /* The pool's arena is zero-filled, so the allocator may rely on zeroed tables. */
    memset(f->mem, 0, total);

    ems_layout_t *layout = (ems_layout_t *)f->mem;
    layout->magic = EMS_LAYOUT_MAGIC;
    layout->version = EMS_LAYOUT_VERSION;
    layout->slab_size = slab_size;
    layout->nslabs = nslabs;
    layout->nclasses = nclasses;
    layout->data_size = (uint64_t)nslabs * slab_size;
    layout->classes_off = classes_off;
    layout->slabs_off = slabs_off;
    layout->data_off = data_off;
    layout->map_size = total;
    f->layout = layout;

    ems_slab_bind(&f->alloc, layout);
    CHECK(f->alloc.layout == layout);
    CHECK(f->alloc.classes == (ems_class_t *)(f->mem + classes_off));
    CHECK(f->alloc.slabs == (ems_slab_t *)(f->mem + slabs_off));
    CHECK(f->alloc.data == f->mem + data_off);
    ems_slab_init(&f->alloc);

    f->units = layout->data_size / 64;
    f->owner_map = calloc(f->units, sizeof *f->owner_map);
    CHECK(f->owner_map != NULL);
}

static void fixture_close(slab_fixture_t *f)
{
    free(f->owner_map);
    free(f->mem);
    memset(f, 0, sizeof *f);
}

static void check_all_slabs_free(const slab_fixture_t *f)
{
    const ems_layout_t *layout = f->layout;
    CHECK_EQ(layout->free_slabs, layout->nslabs);
    for (uint32_t s = 0; s < layout->nslabs; s++) {
        CHECK_EQ(f->alloc.slabs[s].size_class, EMS_NO_CLASS);
    }
    for (uint32_t c = 0; c < layout->nclasses; c++) {
        CHECK_EQ(f->alloc.classes[c].nslabs, 0);
        CHECK_EQ(f->alloc.classes[c].partial_head, EMS_NIL);
    }
}

/* Marks a freshly allocated slot live: checks it lies inside its slab, overlaps no live
 * slot, and writes its stamp. `id` is the caller's index of the slot in its live array. */
static void slot_claim(slab_fixture_t *f, live_slot_t *live, uint32_t id)
{
    const ems_layout_t *layout = f->layout;
    uint64_t slot_size = ems_slab_class_size(live->size_class);
    CHECK(live->slab < layout->nslabs);
    CHECK_EQ(f->alloc.slabs[live->slab].size_class, live->size_class);
    CHECK((uint64_t)(live->slot + 1) * slot_size <= layout->slab_size);

    uint8_t *p = ems_slab_slot_ptr(&f->alloc, live->slab, live->slot);
    uint64_t offset = (uint64_t)(p - f->alloc.data);
    CHECK(p >= f->alloc.data);
    CHECK_EQ(offset, (uint64_t)live->slab * layout->slab_size + (uint64_t)live->slot * slot_size);
    CHECK(offset + slot_size <= layout->data_size);
    CHECK_EQ(offset % 64, 0);

    for (uint64_t u = offset / 64; u < (offset + slot_size) / 64; u++) {
        if (f->owner_map[u] != 0) {
            fprintf(stderr, "slot (%u,%u) of class %u overlaps live slot %u\n", live->slab,
                    live->slot, live->size_class, f->owner_map[u] - 1);
        }
        CHECK_EQ(f->owner_map[u], 0);
        f->owner_map[u] = id + 1;
    }
    memcpy(p, &live->stamp, 8);
    memcpy(p + slot_size - 8, &live->stamp, 8);
}

static void slot_check_stamp(const slab_fixture_t *f, const live_slot_t *live)
{
    uint64_t slot_size = ems_slab_class_size(live->size_class);
    const uint8_t *p = ems_slab_slot_ptr(&f->alloc, live->slab, live->slot);
    uint64_t head, tail;
    memcpy(&head, p, 8);
    memcpy(&tail, p + slot_size - 8, 8);
    CHECK_EQ(head, live->stamp);
    CHECK_EQ(tail, live->stamp);
}

static void slot_release(slab_fixture_t *f, const live_slot_t *live)
{
    uint64_t slot_size = ems_slab_class_size(live->size_class);
    uint8_t *p = ems_slab_slot_ptr(&f->alloc, live->slab, live->slot);
    uint64_t offset = (uint64_t)(p - f->alloc.data);
    for (uint64_t u = offset / 64; u < (offset + slot_size) / 64; u++) {
        f->owner_map[u] = 0;
    }
    ems_slab_free(&f->alloc, live->slab, live->slot);
}

/* ---- size classes ---------------------------------------------------------------- */

static void check_class_fits(uint64_t length)
{
    uint32_t c = ems_slab_class_of(length);
    uint64_t size = ems_slab_class_size(c);
    if (size < length || size - length > length / 64 + 64) {
        fprintf(stderr, "length %llu -> class %u of %llu bytes\n", (unsigned long long)length,
                c, (unsigned long long)size);
    }
    CHECK(size >= length);
    CHECK(size - length <= length / 64 + 64);
    /* The class is the smallest that fits: the one below is too small. */
    if (c > 0) {
        CHECK(ems_slab_class_size(c - 1) < length);
    }
}

static void test_class_of_small_lengths_exhaustive(void)
{
    uint32_t previous = 0;
    for (uint64_t length = 1; length <= (1u << 20); length++) {
        check_class_fits(length);
        uint32_t c = ems_slab_class_of(length);
        CHECK(c >= previous);
        previous = c;
    }
    CHECK_EQ(ems_slab_class_of(1), 0);
    CHECK_EQ(ems_slab_class_size(0), EMS_MIN_SLOT);
    CHECK_EQ(ems_slab_class_of(64), 0);
    CHECK_EQ(ems_slab_class_of(65), 1);
}

static void test_class_table_up_to_max_slab(void)
{
    uint32_t count = ems_slab_class_count(EMS_MAX_SLAB_SIZE);
    CHECK(count > 64);
    for (uint32_t c = 0; c < count; c++) {
        uint64_t size = ems_slab_class_size(c);
        CHECK_EQ(size % 64, 0);
        CHECK_EQ(ems_slab_class_of(size), c);
        if (c > 0) {
            uint64_t below = ems_slab_class_size(c - 1);
            CHECK(below < size);
            /* The worst case for class c is one byte above the class below. */
            CHECK_EQ(ems_slab_class_of(below + 1), c);
            check_class_fits(below + 1);
        }
        check_class_fits(size);
        if (size > 1) {
            check_class_fits(size - 1);
        }
    }

    /* The largest class of every allowed slab size is exactly the slab size. */
    for (uint64_t slab = EMS_MIN_SLAB_SIZE; slab <= EMS_MAX_SLAB_SIZE; slab *= 2) {
        uint32_t n = ems_slab_class_count(slab);
        CHECK_EQ(ems_slab_class_size(n - 1), slab);
        CHECK_EQ(ems_slab_class_of(slab), n - 1);
    }

    uint64_t state = 42;
    for (int i = 0; i < 200000; i++) {
        uint64_t length = 1 + test_next_random(&state) % EMS_MAX_SLAB_SIZE;
        check_class_fits(length);
    }
}

/* ---- allocation ------------------------------------------------------------------ */

static void test_init_all_slabs_free(void)
{
    slab_fixture_t f;
    fixture_open(&f, EMS_MIN_SLAB_SIZE, 8);
    check_all_slabs_free(&f);
    CHECK(f.layout->free_slab_head != EMS_NIL);
    for (uint32_t c = 0; c < f.layout->nclasses; c++) {
        CHECK_EQ(f.alloc.classes[c].slot_size, ems_slab_class_size(c));
    }
    fixture_close(&f);
}

/* Fills the whole region with one class, checks the slot count and placement, then
 * returns every slot in a shuffled order. */
static void fill_and_drain_class(slab_fixture_t *f, uint32_t size_class)
{
    const ems_layout_t *layout = f->layout;
    uint64_t slot_size = ems_slab_class_size(size_class);
    uint64_t per_slab = layout->slab_size / slot_size;
    uint64_t expected = per_slab * layout->nslabs;
    live_slot_t *live = calloc(expected + 1, sizeof *live);
    CHECK(live != NULL);

    uint64_t n = 0;
    for (;;) {
        uint32_t slab = 0, slot = 0;
        int rc = ems_slab_alloc(&f->alloc, size_class, &slab, &slot);
        if (rc == -ENOSPC) {
            break;
        }
        CHECK_EQ(rc, 0);
        CHECK(n < expected);
        live[n] = (live_slot_t){slab, slot, size_class, 0xc0de000000000000ULL | n};
        slot_claim(f, &live[n], (uint32_t)n);
        n++;
    }
    CHECK_EQ(n, expected);
    CHECK_EQ(layout->free_slabs, 0);
    CHECK_EQ(f->alloc.classes[size_class].nslabs, layout->nslabs);
    for (uint32_t s = 0; s < layout->nslabs; s++) {
        CHECK_EQ(f->alloc.slabs[s].size_class, size_class);
        CHECK_EQ(f->alloc.slabs[s].nslots, per_slab);
        CHECK_EQ(f->alloc.slabs[s].used, per_slab);
    }
    for (uint64_t i = 0; i < n; i++) {
        slot_check_stamp(f, &live[i]);
    }

    /* A full pool stays full: -ENOSPC again, for this class and any other. */
    uint32_t slab = 0, slot = 0;
    CHECK_EQ(ems_slab_alloc(&f->alloc, size_class, &slab, &slot), -ENOSPC);
    uint32_t other = size_class == 0 ? 1 : 0;
    CHECK_EQ(ems_slab_alloc(&f->alloc, other, &slab, &slot), -ENOSPC);

    /* Freeing one slot of a full slab hands exactly that slot back. */
    slot_release(f, &live[n / 2]);
    CHECK_EQ(ems_slab_alloc(&f->alloc, size_class, &slab, &slot), 0);
    CHECK_EQ(slab, live[n / 2].slab);
    CHECK_EQ(slot, live[n / 2].slot);
    slot_claim(f, &live[n / 2], (uint32_t)(n / 2));

    uint64_t state = size_class + 1;
    for (uint64_t i = n; i > 1; i--) {
        uint64_t j = test_next_random(&state) % i;
        live_slot_t tmp = live[i - 1];
        live[i - 1] = live[j];
        live[j] = tmp;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint32_t used_before = f->alloc.slabs[live[i].slab].used;
        slot_release(f, &live[i]);
        if (used_before > 1) {
            CHECK_EQ(f->alloc.slabs[live[i].slab].used, used_before - 1);
            CHECK_EQ(f->alloc.slabs[live[i].slab].size_class, size_class);
        } else {
            CHECK_EQ(f->alloc.slabs[live[i].slab].size_class, EMS_NO_CLASS);
        }
    }
    check_all_slabs_free(f);
    free(live);
}

static void test_fill_and_drain_each_class(void)
{
    slab_fixture_t f;
    fixture_open(&f, EMS_MIN_SLAB_SIZE, 4);
    const uint64_t lengths[] = {1, 64, 100, 192, 1000, 4096, 4097, 5000, 9000,
                                EMS_MIN_SLAB_SIZE / 3, EMS_MIN_SLAB_SIZE / 2 + 1,
                                EMS_MIN_SLAB_SIZE};
    for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; i++) {
        uint32_t c = ems_slab_class_of(lengths[i]);
        CHECK(c < f.layout->nclasses);
        fill_and_drain_class(&f, c);
    }
    fixture_close(&f);
}

static void test_freed_slab_moves_to_other_class(void)
{
    slab_fixture_t f;
    fixture_open(&f, EMS_MIN_SLAB_SIZE, 4);
    uint32_t small = ems_slab_class_of(1000);
    uint32_t large = ems_slab_class_of(EMS_MIN_SLAB_SIZE);
    uint64_t per_slab = EMS_MIN_SLAB_SIZE / ems_slab_class_size(small);
    uint64_t total = per_slab * 4;
    live_slot_t *live = calloc(total, sizeof *live);
    CHECK(live != NULL);

    for (uint64_t i = 0; i < total; i++) {
        CHECK_EQ(ems_slab_alloc(&f.alloc, small, &live[i].slab, &live[i].slot), 0);
        live[i].size_class = small;
        live[i].stamp = 0xabc0000000000000ULL | i;
        slot_claim(&f, &live[i], (uint32_t)i);
    }
    uint32_t slab = 0, slot = 0;
    CHECK_EQ(ems_slab_alloc(&f.alloc, large, &slab, &slot), -ENOSPC);

    /* Free every slot of one slab except the last: still not enough for another class. */
    uint32_t victim = live[total / 2].slab;
    uint64_t last = 0;
    int found = 0;
    for (uint64_t i = 0; i < total; i++) {
        if (live[i].slab != victim) {
            continue;
        }
        if (found) {
            slot_release(&f, &live[last]);
            live[last].size_class = EMS_NO_CLASS;
        }
        last = i;
        found = 1;
    }
    CHECK(found);
    CHECK_EQ(f.alloc.slabs[victim].used, 1);
    CHECK_EQ(ems_slab_alloc(&f.alloc, large, &slab, &slot), -ENOSPC);

    slot_release(&f, &live[last]);
    live[last].size_class = EMS_NO_CLASS;
    CHECK_EQ(f.layout->free_slabs, 1);
    CHECK_EQ(f.alloc.classes[small].nslabs, 3);

    live_slot_t big = {0, 0, large, 0xb16b16b16b16ULL};
    CHECK_EQ(ems_slab_alloc(&f.alloc, large, &big.slab, &big.slot), 0);
    CHECK_EQ(big.slab, victim);
    CHECK_EQ(big.slot, 0);
    CHECK_EQ(f.alloc.classes[large].nslabs, 1);
    CHECK_EQ(f.layout->free_slabs, 0);
    slot_claim(&f, &big, (uint32_t)total);

    for (uint64_t i = 0; i < total; i++) {
        if (live[i].size_class != EMS_NO_CLASS) {
            slot_check_stamp(&f, &live[i]);
        }
    }
    slot_check_stamp(&f, &big);
    free(live);
    fixture_close(&f);
}

/* Random alloc/free over several classes. Every -ENOSPC must be justified: no free slab
 * and every slab of the class full. */
static void test_random_churn_many_classes(void)
{
    enum { MAX_LIVE = 8192, OPS = 60000 };
    slab_fixture_t f;
    fixture_open(&f, EMS_MIN_SLAB_SIZE, 16);
    const uint32_t classes[] = {
        ems_slab_class_of(64),    ems_slab_class_of(300),   ems_slab_class_of(2048),
        ems_slab_class_of(7000),  ems_slab_class_of(20000), ems_slab_class_of(EMS_MIN_SLAB_SIZE),
    };
    const uint32_t nclasses = sizeof classes / sizeof classes[0];
    live_slot_t *live = calloc(MAX_LIVE, sizeof *live);
    CHECK(live != NULL);
    uint32_t nlive = 0, max_live = 0;
    uint64_t state = 7, stamp = 1, enospc = 0, allocs = 0;

    for (int op = 0; op < OPS; op++) {
        uint64_t r = test_next_random(&state);
        int do_alloc = nlive == 0 || (nlive < MAX_LIVE && r % 100 < 60);
        if (do_alloc) {
            /* Mostly small blocks, so hundreds of slots are live at once. */
            static const uint32_t percent_below[] = {40, 65, 80, 90, 97, 100};
            uint32_t pick = (uint32_t)((r >> 8) % 100);
            uint32_t which = 0;
            while (pick >= percent_below[which]) {
                which++;
            }
            uint32_t c = classes[which];
            live_slot_t s = {0, 0, c, stamp++};
            int rc = ems_slab_alloc(&f.alloc, c, &s.slab, &s.slot);
            if (rc == -ENOSPC) {
                enospc++;
                CHECK_EQ(f.layout->free_slabs, 0);
                CHECK_EQ(f.alloc.classes[c].partial_head, EMS_NIL);
                for (uint32_t b = 0; b < f.layout->nslabs; b++) {
                    if (f.alloc.slabs[b].size_class == c) {
                        CHECK_EQ(f.alloc.slabs[b].used, f.alloc.slabs[b].nslots);
                    }
                }
                continue;
            }
            CHECK_EQ(rc, 0);
            allocs++;
            /* The owner map stores ids by position, so claim at the end of the array. */
            live[nlive] = s;
            slot_claim(&f, &live[nlive], nlive);
            nlive++;
            max_live = nlive > max_live ? nlive : max_live;
        } else {
            uint32_t i = (uint32_t)((r >> 8) % nlive);
            slot_check_stamp(&f, &live[i]);
            slot_release(&f, &live[i]);
            nlive--;
            if (i != nlive) {
                /* Move the last live slot into the hole and renumber its owner map. */
                live_slot_t moved = live[nlive];
                uint64_t size = ems_slab_class_size(moved.size_class);
                uint64_t off = (uint64_t)(ems_slab_slot_ptr(&f.alloc, moved.slab, moved.slot) -
                                          f.alloc.data);
                for (uint64_t u = off / 64; u < (off + size) / 64; u++) {
                    CHECK_EQ(f.owner_map[u], nlive + 1);
                    f.owner_map[u] = i + 1;
                }
                live[i] = moved;
            }
        }
    }
    fprintf(stderr, "churn: %llu allocations, %llu rejected with -ENOSPC, %u live, max %u\n",
            (unsigned long long)allocs, (unsigned long long)enospc, nlive, max_live);
    CHECK(enospc > 0);
    CHECK(allocs > OPS / 4);
    CHECK(max_live > 500);

    uint64_t used_slabs = 0;
    for (uint32_t i = 0; i < nclasses; i++) {
        used_slabs += f.alloc.classes[classes[i]].nslabs;
    }
    CHECK_EQ(used_slabs + f.layout->free_slabs, f.layout->nslabs);

    for (uint32_t i = 0; i < nlive; i++) {
        slot_check_stamp(&f, &live[i]);
    }
    for (uint32_t i = 0; i < nlive; i++) {
        slot_release(&f, &live[i]);
    }
    check_all_slabs_free(&f);
    free(live);
    fixture_close(&f);
}

int main(void)
{
    RUN_TEST(test_class_of_small_lengths_exhaustive);
    RUN_TEST(test_class_table_up_to_max_slab);
    RUN_TEST(test_init_all_slabs_free);
    RUN_TEST(test_fill_and_drain_each_class);
    RUN_TEST(test_freed_slab_moves_to_other_class);
    RUN_TEST(test_random_churn_many_classes);
    fprintf(stderr, "test_slab: all passed\n");
    return 0;
}
