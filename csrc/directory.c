#include "directory.h"

#include <stdlib.h>

int ems_directory_init(ems_directory_t *dir, uint64_t capacity)
{
    uint64_t size = 1024;
    while (size < capacity && size < (1ull << 40))
        size <<= 1;
    dir->slots = malloc(size * sizeof *dir->slots);
    if (!dir->slots)
        return -ENOMEM;
    for (uint64_t i = 0; i < size; i++)
        dir->slots[i].holder = EMS_DIR_EMPTY;
    dir->mask = size - 1;
    dir->entries = dir->registered = dir->lookups = dir->hits = dir->evictions = 0;
    dir->clock = 0;
    pthread_mutex_init(&dir->lock, NULL);
    return 0;
}

void ems_directory_free(ems_directory_t *dir)
{
    if (!dir->slots)
        return;
    pthread_mutex_destroy(&dir->lock);
    free(dir->slots);
    dir->slots = NULL;
}

static ems_dir_slot_t *find(ems_directory_t *dir, const uint8_t *key)
{
    uint64_t home = ems_key_hash(key);
    for (uint64_t p = 0; p < EMS_DIR_PROBES; p++) {
        ems_dir_slot_t *slot = &dir->slots[(home + p) & dir->mask];
        if (slot->holder != EMS_DIR_EMPTY && memcmp(slot->key, key, EMS_KEY_BYTES) == 0)
            return slot;
    }
    return NULL;
}

static void insert(ems_directory_t *dir, const uint8_t *key, uint32_t holder)
{
    ems_dir_slot_t *slot = find(dir, key);
    if (!slot) {
        /* An empty slot of the window, else the oldest one (a hint is lost). The stamp
         * comparison is by distance from the clock, so wrap-around keeps the order. */
        uint64_t home = ems_key_hash(key);
        ems_dir_slot_t *oldest = NULL;
        for (uint64_t p = 0; p < EMS_DIR_PROBES; p++) {
            ems_dir_slot_t *candidate = &dir->slots[(home + p) & dir->mask];
            if (candidate->holder == EMS_DIR_EMPTY) {
                slot = candidate;
                break;
            }
            if (!oldest || dir->clock - candidate->stamp > dir->clock - oldest->stamp)
                oldest = candidate;
        }
        if (!slot) {
            slot = oldest;
            dir->evictions++;
        } else {
            dir->entries++;
        }
        memcpy(slot->key, key, EMS_KEY_BYTES);
    }
    slot->holder = holder;
    slot->stamp = dir->clock++;
}

uint64_t ems_directory_register(ems_directory_t *dir, const uint8_t *keys, uint64_t n,
                                uint32_t holder)
{
    if (holder == EMS_DIR_EMPTY)
        return 0;
    pthread_mutex_lock(&dir->lock);
    for (uint64_t i = 0; i < n; i++)
        insert(dir, keys + i * EMS_KEY_BYTES, holder);
    dir->registered += n;
    pthread_mutex_unlock(&dir->lock);
    return n;
}

uint64_t ems_directory_forget(ems_directory_t *dir, uint32_t holder)
{
    uint64_t removed = 0;
    pthread_mutex_lock(&dir->lock);
    /* Emptying a slot may break no chain: lookups scan the whole window rather than
     * stopping at the first empty slot. */
    for (uint64_t i = 0; i <= dir->mask; i++) {
        if (dir->slots[i].holder == holder) {
            dir->slots[i].holder = EMS_DIR_EMPTY;
            removed++;
        }
    }
    dir->entries -= removed;
    pthread_mutex_unlock(&dir->lock);
    return removed;
}

uint64_t ems_directory_lookup(ems_directory_t *dir, const uint8_t *keys, uint64_t n,
                              uint32_t *holders)
{
    uint64_t found = 0;
    pthread_mutex_lock(&dir->lock);
    for (uint64_t i = 0; i < n; i++) {
        ems_dir_slot_t *slot = find(dir, keys + i * EMS_KEY_BYTES);
        holders[i] = slot ? slot->holder : EMS_DIR_EMPTY;
        found += slot != NULL;
    }
    dir->lookups += n;
    dir->hits += found;
    pthread_mutex_unlock(&dir->lock);
    return found;
}
