/* Tenant key derivation and the challenge-response proof (declared in transfer.h). */
#include <string.h>

#include "sha256.h"
#include "transfer.h"

static const char SALT_CONTEXT[] = "ems tenant salt v1";
static const char PROOF_CONTEXT[] = "ems auth proof v1";

void ems_tenant_salt(const char *tenant, size_t len, uint8_t salt[32])
{
    ems_sha256_t ctx;
    ems_sha256_init(&ctx);
    ems_sha256_update(&ctx, SALT_CONTEXT, sizeof SALT_CONTEXT);
    ems_sha256_update(&ctx, tenant, len);
    ems_sha256_final(&ctx, salt);
}

void ems_tenant_keys(const uint8_t salt[32], const uint8_t *keys, uint64_t n, uint8_t *out)
{
    /* The salt's compression state is computed once: each key then costs one block. */
    ems_sha256_t base;
    ems_sha256_init(&base);
    ems_sha256_update(&base, salt, 32);
    for (uint64_t i = 0; i < n; i++) {
        ems_sha256_t ctx = base;
        ems_sha256_update(&ctx, keys + i * EMS_KEY_BYTES, EMS_KEY_BYTES);
        ems_sha256_final(&ctx, out + i * EMS_KEY_BYTES);
    }
}

void ems_auth_proof(const uint8_t *secret, size_t secret_len,
                    const uint8_t challenge[EMS_CHALLENGE_BYTES], const char *tenant,
                    size_t tenant_len, uint16_t role, uint8_t proof[EMS_PROOF_BYTES])
{
    uint8_t fields[4] = {(uint8_t)role, (uint8_t)(role >> 8), (uint8_t)tenant_len,
                         (uint8_t)(tenant_len >> 8)};
    const void *parts[] = {PROOF_CONTEXT, challenge, fields, tenant};
    size_t lens[] = {sizeof PROOF_CONTEXT, EMS_CHALLENGE_BYTES, sizeof fields, tenant_len};
    ems_hmac_sha256(secret, secret_len, parts, lens, 4, proof);
}
