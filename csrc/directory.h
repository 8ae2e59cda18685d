/* Directory shard: stored key -> holder node id, for the keys this node owns by
 * rendezvous hashing.
 *
 * A fixed-size open-addressing table under one mutex (directory calls are batched, so
 * the lock is taken once per batch). It is a hint, not a record: a full probe window
 * replaces its oldest-inserted entry, a lost holder's entries are forgotten, and a reader
 * that follows an entry to a holder that no longer has the block gets a miss. */
#ifndef EMS_DIRECTORY_H
#define EMS_DIRECTORY_H

#include <pthread.h>
#include <stdint.h>

#include "common.h"

#define EMS_DIR_PROBES 16

typedef struct ems_dir_slot {
    uint8_t key[EMS_KEY_BYTES];
    uint32_t holder;    /* EMS_DIR_EMPTY when unused */
    uint32_t stamp;     /* insertion counter, to replace the oldest slot of a full window */
} ems_dir_slot_t;

#define EMS_DIR_EMPTY 0xffffffffu

typedef struct ems_directory {
    ems_dir_slot_t *slots;
    uint64_t mask;      /* slot count - 1 (a power of two) */
    uint64_t entries, registered, lookups, hits, evictions;
    uint32_t clock;
    pthread_mutex_t lock;
} ems_directory_t;

/* Room for at least `capacity` entries (rounded up to a power of two, at least 1024).
 * Returns 0 or -ENOMEM. */
int ems_directory_init(ems_directory_t *dir, uint64_t capacity);
void ems_directory_free(ems_directory_t *dir);

/* Records holder for each key (replacing an older holder). Returns n. */
uint64_t ems_directory_register(ems_directory_t *dir, const uint8_t *keys, uint64_t n,
                                uint32_t holder);

/* Removes every entry of `holder`. Returns how many. */
uint64_t ems_directory_forget(ems_directory_t *dir, uint32_t holder);

/* holders[i] = holder of key i, or EMS_DIR_EMPTY. Returns the number found. */
uint64_t ems_directory_lookup(ems_directory_t *dir, const uint8_t *keys, uint64_t n,
                              uint32_t *holders);

#endif
