/* Spill ring: a FIFO of evicted blocks (key, length, payload) in process-local heap memory,
 * filled by the pool's eviction path and drained by the spill tier.
 *
 * A record is never split across the end of the buffer. One that does not fit before the end
 * goes to offset 0, and the gap it leaves at the end is padding. The padding starts with a
 * header whose length is EMS_SPILL_WRAP, unless it is shorter than a header. A full ring drops
 * the new block and never overwrites an older record.
 */
#ifndef EMS_SPILL_RING_H
#define EMS_SPILL_RING_H

#include <pthread.h>
#include <stdint.h>

#include "common.h"

/* Record header: the 32-byte key, then the payload length as a uint64_t. The payload
 * follows, and the record is padded to a multiple of EMS_SPILL_ALIGN bytes. */
#define EMS_SPILL_RECORD_HEADER (EMS_KEY_BYTES + 8u)
#define EMS_SPILL_ALIGN 8u
#define EMS_SPILL_WRAP UINT64_MAX

/* Concurrency: `lock` guards every field below it. `buf` and `size` are written only with
 * both the owner's pool mutex and `lock` held, so a holder of either may read them. */
typedef struct ems_spill_ring {
    pthread_mutex_t lock;
    uint8_t *buf;       /* NULL while capture is off */
    uint64_t size;      /* bytes of buf */
    uint64_t head;      /* offset of the oldest record, valid while used > 0 */
    uint64_t tail;      /* offset the next record is written at, valid while used > 0 */
    uint64_t used;      /* bytes held: records plus end-of-buffer padding */
    uint64_t captured;  /* blocks copied in */
    uint64_t dropped;   /* blocks lost: no room, or discarded by a resize or disable */
} ems_spill_ring_t;

/* Size in bytes of the record of a `length`-byte payload. */
static inline uint64_t ems_spill_record_bytes(uint64_t length)
{
    return ems_round_up(EMS_SPILL_RECORD_HEADER + length, EMS_SPILL_ALIGN);
}

/* Initializes an empty, disabled ring. Returns 0 or a negative errno. */
int ems_spill_ring_init(ems_spill_ring_t *ring);

/* Frees the buffer and destroys the lock. Nothing may use the ring concurrently. */
void ems_spill_ring_destroy(ems_spill_ring_t *ring);

/* Replaces the buffer with one of `bytes` bytes (0 disables capture and frees it). Held
 * records move to the new buffer oldest first, and those that no longer fit are counted in
 * `dropped`. Caller holds the pool mutex and has checked that `bytes` is 0 or fits the record
 * of the largest block. Returns 0, or -ENOMEM with the ring unchanged. */
int ems_spill_ring_resize(ems_spill_ring_t *ring, uint64_t bytes);

/* Appends one record, or counts the block in `dropped` when the ring lacks room. Caller
 * holds the pool mutex and has checked that `buf` is not NULL. Copies the payload once and
 * allocates nothing. */
void ems_spill_ring_push(ems_spill_ring_t *ring, const uint8_t key[EMS_KEY_BYTES],
                         const uint8_t *payload, uint64_t length);

/* Pops up to `max_records` records, oldest first, whose payloads fit together in buf_len
 * bytes; see ems_pool_take_evicted. Takes only the ring lock. Returns the count. */
uint64_t ems_spill_ring_take(ems_spill_ring_t *ring, uint8_t *out_keys,
                             uint64_t *out_lengths, uint8_t *buf, uint64_t buf_len,
                             uint64_t max_records);

#endif
