/* Shared definitions for the EMS C core: error convention, key size, hashing and
 * small helpers used by the arena, slab, index and pool modules.
 *
 * Every function that can fail returns 0 (or a non-negative count) on success and a
 * negative errno-style code on failure, as listed at each declaration. Nothing in the
 * core allocates from the Python heap or calls into Python.
 */
#ifndef EMS_COMMON_H
#define EMS_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <string.h>

#define EMS_KEY_BYTES 32

/* Spin hint for seqlock retries. */
#if defined(__x86_64__) || defined(__i386__)
#define ems_cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define ems_cpu_relax() __asm__ __volatile__("yield")
#else
#define ems_cpu_relax() ((void)0)
#endif

static inline uint64_t ems_load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* 64-bit finalizer from MurmurHash3 (public domain): spreads every input bit over
 * the output, so structured keys (counters, zero padding) still spread over buckets. */
static inline uint64_t ems_mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* Hash of a 32-byte key. Keys are usually BLAKE3 digests already, but the index must not
 * degrade when a caller uses structured keys, so all four words are mixed. */
static inline uint64_t ems_key_hash(const uint8_t key[EMS_KEY_BYTES])
{
    uint64_t h = ems_load64(key) * 0x9e3779b97f4a7c15ULL;
    h = ems_mix64(h ^ ems_load64(key + 8));
    h = ems_mix64(h ^ ems_load64(key + 16));
    h = ems_mix64(h ^ ems_load64(key + 24));
    return h;
}

static inline uint64_t ems_round_up(uint64_t value, uint64_t align)
{
    return (value + align - 1) / align * align;
}

#endif
