/* Spill ring: append on eviction, pop in FIFO order for the spill tier, resize by moving
 * the held records. Every record lies whole in [0, size). After a wrap, the bytes between
 * the last record and the end of the buffer are padding, counted in `used` until the reader
 * skips them. The static helpers take no lock, and the exported functions take `lock`.
 */
#include "spill_ring.h"

#include <stdlib.h>
#include <string.h>

/* ---- records (no locking) ------------------------------------------------------- */

/* Finds room for a record of `need` bytes. Returns 1 and sets *at (its offset) and *pad
 * (padding to skip at the end first, 0 when none), or 0 when the ring lacks room. */
static int ring_place(const ems_spill_ring_t *ring, uint64_t need, uint64_t *at, uint64_t *pad)
{
    *pad = 0;
    if (ring->used == 0) {
        *at = 0;
        return need <= ring->size;
    }
    /* Free bytes run from tail to head, through the end when tail is past head. When tail
     * equals head the ring is full (used > 0 here) and the second branch finds no room. */
    if (ring->tail > ring->head) {
        if (ring->size - ring->tail >= need) {
            *at = ring->tail;
            return 1;
        }
        if (ring->head >= need) {
            *at = 0;
            *pad = ring->size - ring->tail;
            return 1;
        }
        return 0;
    }
    if (ring->head - ring->tail >= need) {
        *at = ring->tail;
        return 1;
    }
    return 0;
}

/* Appends one record. Returns 1, or 0 when the ring lacks room (nothing changes then). */
static int ring_append(ems_spill_ring_t *ring, const uint8_t key[EMS_KEY_BYTES],
                       const uint8_t *payload, uint64_t length)
{
    uint64_t need = ems_spill_record_bytes(length), at, pad;
    if (!ring_place(ring, need, &at, &pad))
        return 0;

    /* Step 1: an empty ring restarts at offset 0, and a wrap pads out the end of the buffer.
     * A gap too short for a header needs no marker, because the reader skips such gaps. */
    if (ring->used == 0)
        ring->head = 0;
    if (pad != 0) {
        if (pad >= EMS_SPILL_RECORD_HEADER) {
            uint64_t wrap = EMS_SPILL_WRAP;
            memcpy(ring->buf + ring->tail + EMS_KEY_BYTES, &wrap, sizeof wrap);
        }
        ring->used += pad;
    }

    /* Step 2: header, then the payload. */
    uint8_t *record = ring->buf + at;
    memcpy(record, key, EMS_KEY_BYTES);
    memcpy(record + EMS_KEY_BYTES, &length, sizeof length);
    memcpy(record + EMS_SPILL_RECORD_HEADER, payload, length);

    ring->tail = at + need == ring->size ? 0 : at + need;
    ring->used += need;
    return 1;
}

/* Returns the oldest record (its offset through *at, its payload length through *length),
 * skipping end-of-buffer padding first. Returns 0 when the ring is empty. */
static int ring_peek(ems_spill_ring_t *ring, uint64_t *at, uint64_t *length)
{
    if (ring->used == 0)
        return 0;

    /* A record never starts where fewer than a header's bytes remain, and a longer gap
     * starts with a wrap marker, so either one is padding before the record at offset 0. */
    uint64_t gap = ring->size - ring->head;
    uint64_t stored = EMS_SPILL_WRAP;
    if (gap >= EMS_SPILL_RECORD_HEADER)
        memcpy(&stored, ring->buf + ring->head + EMS_KEY_BYTES, sizeof stored);
    if (stored == EMS_SPILL_WRAP) {
        ring->used -= gap;
        ring->head = 0;
        memcpy(&stored, ring->buf + EMS_KEY_BYTES, sizeof stored);
    }
    *at = ring->head;
    *length = stored;
    return 1;
}

/* Removes the record ring_peek returned. */
static void ring_advance(ems_spill_ring_t *ring, uint64_t length)
{
    uint64_t need = ems_spill_record_bytes(length);
    ring->head += need;
    if (ring->head == ring->size)
        ring->head = 0;
    ring->used -= need;
    if (ring->used == 0)
        ring->head = ring->tail = 0;
}

/* ---- exported ------------------------------------------------------------------- */

int ems_spill_ring_init(ems_spill_ring_t *ring)
{
    memset(ring, 0, sizeof *ring);
    return -pthread_mutex_init(&ring->lock, NULL);
}

void ems_spill_ring_destroy(ems_spill_ring_t *ring)
{
    free(ring->buf);
    ring->buf = NULL;
    pthread_mutex_destroy(&ring->lock);
}

int ems_spill_ring_resize(ems_spill_ring_t *ring, uint64_t bytes)
{
    if (bytes == ring->size)
        return 0;
    if (bytes > SIZE_MAX)
        return -ENOMEM;
    ems_spill_ring_t next = {.size = bytes};
    if (bytes != 0) {
        next.buf = malloc((size_t)bytes);
        if (next.buf == NULL)
            return -ENOMEM;
    }

    /* Move the held records oldest first. With no new buffer (bytes 0) every record is
     * dropped; with a smaller one, the newest that no longer fit are. */
    pthread_mutex_lock(&ring->lock);
    uint64_t at, length;
    while (ring_peek(ring, &at, &length)) {
        const uint8_t *record = ring->buf + at;
        if (next.buf == NULL ||
            !ring_append(&next, record, record + EMS_SPILL_RECORD_HEADER, length))
            ring->dropped++;
        ring_advance(ring, length);
    }

    free(ring->buf);
    ring->buf = next.buf;
    ring->size = next.size;
    ring->head = next.head;
    ring->tail = next.tail;
    ring->used = next.used;
    pthread_mutex_unlock(&ring->lock);
    return 0;
}

void ems_spill_ring_push(ems_spill_ring_t *ring, const uint8_t key[EMS_KEY_BYTES],
                         const uint8_t *payload, uint64_t length)
{
    pthread_mutex_lock(&ring->lock);
    if (ring_append(ring, key, payload, length))
        ring->captured++;
    else
        ring->dropped++;
    pthread_mutex_unlock(&ring->lock);
}

uint64_t ems_spill_ring_take(ems_spill_ring_t *ring, uint8_t *out_keys,
                             uint64_t *out_lengths, uint8_t *buf, uint64_t buf_len,
                             uint64_t max_records)
{
    uint64_t count = 0, offset = 0, at, length;
    pthread_mutex_lock(&ring->lock);
    while (count < max_records && ring_peek(ring, &at, &length)) {
        /* A record that does not fit stays in the ring for a later call. */
        if (length > buf_len - offset)
            break;
        const uint8_t *record = ring->buf + at;
        memcpy(out_keys + count * EMS_KEY_BYTES, record, EMS_KEY_BYTES);
        out_lengths[count] = length;
        memcpy(buf + offset, record + EMS_SPILL_RECORD_HEADER, length);
        offset += length;
        count++;
        ring_advance(ring, length);
    }
    pthread_mutex_unlock(&ring->lock);
    return count;
}
