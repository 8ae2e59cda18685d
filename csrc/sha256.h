/* SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), for authentication and tenant keys.
 * Small and portable rather than fast: it hashes handshakes and 64-byte key inputs. */
#ifndef EMS_SHA256_H
#define EMS_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define EMS_SHA256_BYTES 32

typedef struct ems_sha256 {
    uint32_t state[8];
    uint64_t total;      /* bytes hashed so far */
    uint8_t block[64];
    size_t fill;         /* bytes waiting in block */
} ems_sha256_t;

void ems_sha256_init(ems_sha256_t *ctx);
void ems_sha256_update(ems_sha256_t *ctx, const void *data, size_t len);
void ems_sha256_final(ems_sha256_t *ctx, uint8_t out[EMS_SHA256_BYTES]);

void ems_sha256(const void *data, size_t len, uint8_t out[EMS_SHA256_BYTES]);

/* HMAC-SHA256 of the concatenation of `nparts` message parts. */
void ems_hmac_sha256(const uint8_t *key, size_t key_len, const void *const *parts,
                     const size_t *part_lens, size_t nparts, uint8_t out[EMS_SHA256_BYTES]);

#endif
