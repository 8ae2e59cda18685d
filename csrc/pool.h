/* Pool: arena + slab allocator + index + CLOCK eviction, the single-node block store.
 *
 * One process owns a pool and is the only writer; other processes attach read-only by
 * memfd. Writes are two-phase: ems_pool_reserve allocates a slot the caller fills, then
 * ems_pool_commit publishes it (or ems_pool_abort frees it), so no reader sees a partial
 * block. Owner threads pin a block while they copy it out and eviction skips pinned
 * blocks. Attached readers do not pin: they validate each copy with the entry generation
 * and report a block that changed under them as a miss.
 *
 * Thread safety: every function may be called from any thread of the owner process.
 * Writers serialize on one mutex held for metadata updates. The only copy made under it is
 * that of an evicted block into the spill ring, when one is set. Lookups and copies take no
 * lock. Attached handles support the read calls only.
 */
#ifndef EMS_POOL_H
#define EMS_POOL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "arena.h"
#include "index.h"
#include "layout.h"
#include "slab.h"
#include "spill_ring.h"

typedef struct ems_pool_config {
    uint64_t capacity;        /* data bytes; rounded down to whole slabs */
    uint64_t slab_size;       /* 0 = default from capacity (see ems_pool_default_slab_size) */
    uint32_t max_blocks;      /* entry table size; 0 = capacity / EMS_DEFAULT_BLOCK_HINT */
    ems_page_kind_t pages;    /* EMS_PAGES_AUTO walks the fallback chain */
    const char *debug_name;   /* memfd name shown in /proc/PID/fd, may be NULL */
} ems_pool_config_t;

#define EMS_DEFAULT_BLOCK_HINT (16u << 10)
#define EMS_MIN_ENTRIES 64u
#define EMS_MAX_ENTRIES 0xfffffff0u

typedef struct ems_pool {
    ems_arena_t arena;
    ems_layout_t *layout;
    ems_index_t index;
    ems_slab_allocator_t slabs;
    ems_entry_t *entries;
    int owner;                /* 1 for the owner, 0 for an attached reader */
    /* The padding keeps the fields above, which every lookup reads, off the cache lines
     * that writers and reader counters store to (false sharing halved reader throughput
     * with a busy writer). Padding, not _Alignas, because callers may embed this struct
     * in memory aligned to less than 64 bytes. */
    uint8_t pad_readers[64];
    pthread_mutex_t lock;     /* owner only: serializes writers */
    uint8_t pad_lock[64];
    /* Counters of an attached reader, which cannot write to the shared header. */
    _Atomic uint64_t local_hits, local_misses, local_retries;
    /* Owner only: evicted blocks kept for the spill tier, in this process's heap. */
    ems_spill_ring_t spill;
} ems_pool_t;

/* A slot handed out by ems_pool_reserve and not yet committed or aborted. */
typedef struct ems_reservation {
    uint32_t entry;
    uint32_t gen;
    uint8_t *data;   /* payload destination, `length` bytes */
    uint64_t length;
    int exists;      /* 1 when the key was already stored: nothing to fill or commit */
} ems_reservation_t;

/* Default slab size for a capacity: capacity / 16 rounded down to a power of two, kept
 * within 1 MiB..32 MiB, so a pool has about 16 slabs or more to move between classes. */
uint64_t ems_pool_default_slab_size(uint64_t capacity);

/* Creates an owner pool. Returns 0, -EINVAL for a bad slab size or entry count, -ERANGE
 * when capacity cannot hold one slab, -ENOMEM when no memory could be mapped. */
int ems_pool_create(ems_pool_t *pool, const ems_pool_config_t *config);

/* Attaches read-only to the pool behind `fd`. Returns 0, -EINVAL when the file is not an
 * EMS pool, -EPROTO for an unsupported layout version, or a negative errno. */
int ems_pool_attach(ems_pool_t *pool, int fd);

/* Unmaps. The owner first marks the pool closed so attached readers see only misses. No
 * other call on this handle may run concurrently with or after it. */
void ems_pool_close(ems_pool_t *pool);

/* Turns an owner handle into a reader handle, for the child of a fork: the child shares
 * the mapping but not the parent's mutex, so it must not write. */
void ems_pool_disown(ems_pool_t *pool);

/* Largest block the pool accepts (its slab size). */
uint64_t ems_pool_max_block(const ems_pool_t *pool);

/* ---- suspension ------------------------------------------------------------------ */

/* Suspends (suspended != 0) or resumes the pool, for a node that must not serve (a
 * cluster that is not activated). While suspended, every read of the owner and of attached
 * readers reports a miss (get, get_many, length, exists, exists_many, match_prefix, pin),
 * and ems_pool_reserve and ems_pool_commit reject each block with -EACCES, counted in
 * suspended_drops. Blocks already stored stay as they are, so resuming serves them again.
 * Delete, protect, eviction and the spill ring keep working. Owner only: returns 0, or
 * -EPERM on an attached handle.
 * NOTE: a read that passed its check just before the flag was set may still complete. */
int ems_pool_set_suspended(ems_pool_t *pool, int suspended);

/* 1 while the pool is suspended, else 0. Owner and attached handles. */
int ems_pool_suspended(const ems_pool_t *pool);

/* ---- writes (owner only; -EPERM on an attached pool) ---------------------------- */

/* Reserves a slot for `length` bytes under `key`. When the key is already committed it
 * returns 0 with r->exists = 1 and nothing reserved. Evicts as needed. Returns 0,
 * -EINVAL (length 0), -EMSGSIZE (length > max block), -ENOSPC when every candidate block
 * is pinned or reserved, -EACCES while the pool is suspended. */
int ems_pool_reserve(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], uint64_t length,
                     ems_reservation_t *r);

/* Publishes a filled reservation. Returns 0, or 1 when another writer committed the same
 * key first (the reservation is freed and the stored block kept: an idempotent success),
 * -ENOSPC when the key's index buckets hold only pinned blocks, or -EACCES when the pool
 * was suspended since the reserve. After -ENOSPC and -EACCES the reservation is freed. */
int ems_pool_commit(ems_pool_t *pool, ems_reservation_t *r);

/* Frees an uncommitted reservation. */
void ems_pool_abort(ems_pool_t *pool, ems_reservation_t *r);

/* reserve + memcpy + commit. Returns 0 when stored, 1 when the key was already stored
 * (nothing copied), or a negative code of ems_pool_reserve / ems_pool_commit. */
int ems_pool_put(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], const void *src,
                 uint64_t length);

/* Removes `key`. A pinned block is freed when its last pin drops. Returns 0 or -ENOENT. */
int ems_pool_delete(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES]);

/* Sets or clears the PROTECT hint on each present key of keys[0..n). Returns how many
 * keys were present. */
int64_t ems_pool_protect(ems_pool_t *pool, const uint8_t *keys, uint64_t n, int protect);

/* ---- spill capture (owner only) -------------------------------------------------- */

/* Sets the spill ring to `bytes` bytes of process-local heap (0 disables capture and frees
 * the ring). While a ring is set, every block that eviction removes to make room (not one
 * removed by ems_pool_delete, not one marked with ems_pool_mark_spilled) is copied with its
 * key and length into the ring before its slot is freed. A block the ring has no room for is
 * dropped and counted in spill_dropped, and so is every held block that a smaller ring or
 * disabling discards. Held blocks move to a resized ring oldest first. Returns 0, -EPERM
 * (attached), -ENOMEM, or -EINVAL when bytes is not 0 and is smaller than the record of the
 * largest block: ems_pool_max_block + EMS_SPILL_RECORD_HEADER.
 * NOTE: eviction copies the payload while it holds the pool mutex, so with a ring set a
 * write that evicts holds the mutex for one memcpy per victim. */
int ems_pool_set_spill_ring(ems_pool_t *pool, uint64_t bytes);

/* Pops captured blocks, oldest first: up to `max_blocks` records whose payloads fit
 * together in buf_len bytes. Record i gets its key at out_keys + 32 * i, its length in
 * out_lengths[i], and its payload at buf + out_lengths[0] + ... + out_lengths[i - 1]. A
 * record that does not fit stays for the next call. Takes only the ring lock, never the
 * pool mutex; the copy out happens under that lock, so an eviction waits for it. Returns
 * the count (0 on an attached handle). */
uint64_t ems_pool_take_evicted(ems_pool_t *pool, uint8_t *out_keys, uint64_t *out_lengths,
                               uint8_t *buf, uint64_t buf_len, uint64_t max_blocks);

/* Sets the SPILLED flag on each present key of keys[0..n): the block is already in the
 * spill tier, so evicting it copies nothing into the ring. A later put of the same key
 * stores a new block without the flag. Returns how many keys were present, or -EPERM. */
/* Evicts each present, unpinned, unprotected key of keys[0..n) now, exactly as CLOCK
 * would (into the spill ring unless SPILLED), so a policy above the pool can choose
 * victims. Owner only (0 on an attached pool). Returns the payload bytes freed. */
uint64_t ems_pool_evict_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n);

int64_t ems_pool_mark_spilled(ems_pool_t *pool, const uint8_t *keys, uint64_t n);

/* ---- reads (owner and attached) ------------------------------------------------- */

/* Length of the block under `key`, or -ENOENT. */
int64_t ems_pool_length(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES]);

/* Copies the block under `key` into dst, which must be exactly the block length.
 * Returns the length, -ENOENT on a miss (including a block that changed during an
 * attached reader's copy), or -EMSGSIZE when dst_len differs (*actual gets the length). */
int64_t ems_pool_get(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], void *dst,
                     uint64_t dst_len, uint64_t *actual);

/* Owner only: pins the block under `key` for a zero-copy send. When its length is `want`,
 * returns that length and points *data at the payload, which stays valid and unchanged
 * until ems_pool_unpin(pool, *pin). Otherwise returns -ENOENT, -EMSGSIZE (another length)
 * or -EPERM (attached handle). A pinned block is never evicted, so pins must be short. */
int64_t ems_pool_pin(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES], uint64_t want,
                     const uint8_t **data, uint32_t *pin);
void ems_pool_unpin(ems_pool_t *pool, uint32_t pin);

/* 1 when `key` is stored, else 0. Counts no hit or miss. */
int ems_pool_exists(ems_pool_t *pool, const uint8_t key[EMS_KEY_BYTES]);

/* Number of leading keys of keys[0..n) that are stored, stopping at the first absent one. */
uint64_t ems_pool_match_prefix(ems_pool_t *pool, const uint8_t *keys, uint64_t n);

/* ---- batches: keys are n contiguous 32-byte keys, results[i] per key ------------ */

/* results[i] = the return of ems_pool_put for key i. Returns how many failed (< 0). */
uint64_t ems_pool_put_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                           const void *const *srcs, const uint64_t *lengths, int64_t *results);

/* results[i] = block length, -ENOENT, or -EMSGSIZE (then lengths[i] is overwritten with
 * the stored length). Returns the number of hits. */
uint64_t ems_pool_get_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                           void *const *dsts, uint64_t *lengths, int64_t *results);

/* out[i] = 1 when key i is stored. Returns how many are. */
uint64_t ems_pool_exists_many(ems_pool_t *pool, const uint8_t *keys, uint64_t n,
                              uint8_t *out);

/* Copies up to `max` keys of committed blocks into out, scanning the entry table from
 * *cursor (start at 0) and advancing it; the scan is over when *cursor reaches max_blocks.
 * Owner only (0 on an attached pool). Takes the pool mutex for the call, so callers walk
 * a large pool in chunks. Blocks committed or evicted during a walk may be missed or
 * listed. */
uint64_t ems_pool_keys(ems_pool_t *pool, uint64_t *cursor, uint8_t *out, uint64_t max);

/* ---- statistics ----------------------------------------------------------------- */

typedef struct ems_class_stats {
    uint32_t size_class;
    uint64_t slot_size, slabs, blocks, payload_bytes, wasted_bytes, evictions;
} ems_class_stats_t;

typedef struct ems_pool_stats {
    uint64_t capacity, slab_size, slabs, free_slabs, max_blocks, blocks;
    uint64_t bytes_used, bytes_free, bytes_wasted, metadata_bytes;
    uint64_t hits, misses, puts, put_exists, evictions, deletes, slab_moves, pool_full;
    uint64_t suspended_drops;   /* blocks rejected while suspended */
    uint32_t suspended;         /* 1 while suspended */
    uint64_t reader_hits, reader_misses, reader_retries; /* this attached handle's own */
    /* Owner only (0 when attached): blocks copied into the spill ring, evicted blocks lost
     * (no room, or discarded by a resize or disable), ring size and bytes held now. */
    uint64_t spill_captured, spill_dropped, spill_ring_bytes, spill_ring_used;
    uint32_t page_kind, nclasses_used;
} ems_pool_stats_t;

/* Fills *stats and up to `max_classes` per-class rows (classes with a slab). Returns the
 * number of classes with a slab, which may exceed max_classes. Owner: exact under the
 * mutex. Attached: a racy snapshot of the owner's pool-wide figures (hits and misses are
 * the owner's), plus this handle's own reads in reader_hits, reader_misses and
 * reader_retries. */
int ems_pool_stats(ems_pool_t *pool, ems_pool_stats_t *stats, ems_class_stats_t *classes,
                   uint32_t max_classes);

#endif
