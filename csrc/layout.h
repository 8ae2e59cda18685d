/* Layout of the shared pool mapping. Every structure here lives inside the arena and is
 * addressed by offsets from the arena base, never by pointers, so any process that maps
 * the same memfd sees the same pool.
 *
 *   [ems_layout_t header][class table][slab table][index buckets][entry table][pad][data]
 *
 * Concurrency rules, kept by pool.c:
 *   - Only the owner process writes, and within it only while holding the pool mutex,
 *     except for: entry pin counts and REF/PROTECT bits (atomic read-modify-write on
 *     ems_entry_t.flags), counters (relaxed atomic adds), and block payload copies of a
 *     RESERVED entry, which belong to the thread that reserved it.
 *   - Readers (owner threads and attached processes) never lock. They find an entry
 *     through the bucket seqlock and validate a copy with the entry generation.
 */
#ifndef EMS_LAYOUT_H
#define EMS_LAYOUT_H

#include <stdatomic.h>
#include <stdint.h>

#include "common.h"

#define EMS_LAYOUT_MAGIC 0x314c4f4f50534d45ULL /* "EMSPOOL1" little-endian */
#define EMS_LAYOUT_VERSION 2u /* 2: the suspended flag and counter */

/* ---- index ---------------------------------------------------------------------- */

#define EMS_BUCKET_SLOTS 7

/* Slot word: bits 0-31 entry id + 1 (0 means empty), bits 32-47 key tag, bits 48-63 the
 * low 16 bits of the entry generation when the slot was written. When the entry generation
 * has moved on since then, the entry was recycled (ABA) and the reader reports a miss. */
#define EMS_SLOT_ENTRY(w) ((uint32_t)((w) & 0xffffffffu))
#define EMS_SLOT_TAG(w) ((uint16_t)(((w) >> 32) & 0xffffu))
#define EMS_SLOT_GEN(w) ((uint16_t)((w) >> 48))
#define EMS_SLOT_MAKE(entry_plus_one, tag, gen16) \
    ((uint64_t)(entry_plus_one) | ((uint64_t)(tag) << 32) | ((uint64_t)(gen16) << 48))

/* One 64-byte cache line. `version` is a seqlock: odd while a writer holds the bucket. */
typedef struct ems_bucket {
    _Atomic uint64_t version;
    _Atomic uint64_t slots[EMS_BUCKET_SLOTS];
} ems_bucket_t;

/* ---- entries -------------------------------------------------------------------- */

/* Entry states, in bits 0-2 of ems_entry_t.flags. */
#define EMS_ENTRY_FREE 0u      /* on the free list; not in the index */
#define EMS_ENTRY_RESERVED 1u  /* slot allocated, payload being filled; not in the index */
#define EMS_ENTRY_COMMITTED 2u /* in the index, payload complete and immutable */
#define EMS_ENTRY_DEAD 3u      /* removed from the index, freed when the last pin drops */
#define EMS_ENTRY_FREEING 4u   /* being freed by the owner under the pool mutex */
#define EMS_STATE_MASK 7u
#define EMS_FLAG_REF 8u        /* CLOCK reference bit: set on hit, cleared by the hand */
#define EMS_FLAG_PROTECT 16u   /* priority hint: evicted only when nothing else can be */
#define EMS_FLAG_SPILLED 32u   /* already in the spill tier: eviction skips the spill ring */
#define EMS_PIN_SHIFT 16
#define EMS_PIN_ONE (1u << EMS_PIN_SHIFT)
#define EMS_PIN_MAX 0xffffu
#define EMS_ENTRY_STATE(f) ((f) & EMS_STATE_MASK)
#define EMS_ENTRY_PINS(f) ((f) >> EMS_PIN_SHIFT)

/* Metadata of one block: 52 bytes. `gen` is incremented when the entry is reserved and
 * again when it is freed. The same generation before and after a reader's copy proves
 * that key, location and payload did not change under it. */
typedef struct ems_entry {
    _Atomic uint32_t gen;
    _Atomic uint32_t flags; /* state | REF | PROTECT | SPILLED | pins << 16 */
    uint32_t slab;          /* slab index; next free entry + 1 while FREE */
    uint32_t slot;          /* slot index within the slab */
    uint32_t length;        /* payload bytes */
    uint8_t key[EMS_KEY_BYTES];
} ems_entry_t;

/* ---- slabs and size classes ----------------------------------------------------- */

#define EMS_NO_CLASS 0xffffffffu
#define EMS_NIL 0u /* list links store index + 1, so 0 is the empty link */

typedef struct ems_slab {
    uint32_t size_class;  /* EMS_NO_CLASS while the slab is free */
    uint32_t nslots;      /* slots of the class that fit in this slab */
    uint32_t used;        /* slots reserved or committed */
    uint32_t bump;        /* slots at or above this index were never handed out */
    uint32_t free_head;   /* freed slot index + 1; the link is stored in the slot payload */
    uint32_t prev, next;  /* class partial list, or free-slab list (next only); index + 1 */
    uint32_t on_list;     /* 1 while in its class partial list */
} ems_slab_t;

typedef struct ems_class {
    uint64_t slot_size;     /* bytes per slot, a multiple of 64 */
    uint32_t partial_head;  /* slabs of this class with a free slot; index + 1 */
    uint32_t nslabs;        /* slabs assigned to this class */
    uint64_t blocks;        /* committed or reserved blocks */
    uint64_t payload_bytes; /* sum of their lengths */
    uint64_t evictions;
} ems_class_t;

/* ---- header --------------------------------------------------------------------- */

typedef struct ems_counters {
    _Atomic uint64_t hits;
    _Atomic uint64_t misses;
    _Atomic uint64_t puts;       /* blocks committed */
    _Atomic uint64_t put_exists; /* puts of a key already stored (idempotent success) */
    _Atomic uint64_t evictions;
    _Atomic uint64_t deletes;
    _Atomic uint64_t slab_moves; /* slabs taken from one class for another */
    _Atomic uint64_t pool_full;  /* reservations rejected because every block was pinned */
    _Atomic uint64_t suspended_drops; /* blocks rejected by reserve or commit while suspended */
} ems_counters_t;

typedef struct ems_layout {
    uint64_t magic;
    uint32_t version;
    uint32_t page_kind;       /* ems_page_kind_t of the owner's mapping */
    uint64_t map_size;        /* total mapped bytes */
    uint64_t slab_size;       /* bytes per slab, a power of two */
    uint64_t data_size;       /* nslabs * slab_size: the pool capacity */
    uint64_t classes_off, slabs_off, buckets_off, entries_off, data_off;
    uint32_t nclasses, nslabs, nbuckets, nentries;
    int32_t owner_pid;
    _Atomic uint32_t closed;  /* set by the owner before it unmaps; readers then miss */
    /* Set and cleared by the owner (ems_pool_set_suspended). While set, every lookup of
     * the owner and of attached readers misses and every reservation is rejected; stored
     * blocks stay. It shares the cache line of `closed`, which every lookup loads anyway. */
    _Atomic uint32_t suspended;

    /* Allocator state, owner only, under the pool mutex. It starts a cache line of its
     * own: readers load the fields above on every lookup, and a writer storing into
     * their line would stall them (false sharing). */
    _Alignas(64) uint32_t free_slab_head; /* index + 1 */
    uint32_t free_entry_head; /* index + 1 */
    uint32_t free_slabs;
    uint32_t used_entries;
    uint32_t clock_hand;
    uint32_t pad0;
    uint64_t bytes_used;      /* payload bytes of live blocks */

    _Alignas(64) ems_counters_t counters; /* on a line apart from the allocator state */
} ems_layout_t;

#define EMS_LAYOUT_AT(base, off, type) ((type *)((uint8_t *)(base) + (off)))

#endif
