/* Unit tests of SHA-256 and HMAC-SHA256 (csrc/sha256.c) and of the two derivations built
 * on them in csrc/auth.c.
 *
 * Expected digests are published test vectors: NIST's SHA-256 examples ("abc", the
 * 448-bit message and one million 'a') and the HMAC-SHA256 outputs of RFC 4231 test cases
 * 1, 2, 3, 4, 6 and 7. Test case 5 is left out because it checks an output truncated to
 * 128 bits, which this API does not produce. The digests of "" and of the 896-bit message
 * come from Python's hashlib. Every value was also checked with Python's hashlib and hmac. */
#include "check.h"
#include "sha256.h"
#include "transfer.h"

/* Parses 64 hex digits into a 32-byte digest. */
static void from_hex(const char *hex, uint8_t out[EMS_SHA256_BYTES])
{
    CHECK_EQ(strlen(hex), 2 * EMS_SHA256_BYTES);
    for (int i = 0; i < EMS_SHA256_BYTES; i++) {
        unsigned byte = 0;
        CHECK_EQ(sscanf(hex + 2 * i, "%2x", &byte), 1);
        out[i] = (uint8_t)byte;
    }
}

/* Fails with both digests in hex when they differ. */
static void check_digest(const char *label, const uint8_t got[EMS_SHA256_BYTES],
                         const char *expected_hex)
{
    uint8_t expected[EMS_SHA256_BYTES];
    from_hex(expected_hex, expected);
    if (memcmp(got, expected, EMS_SHA256_BYTES) == 0)
        return;
    fprintf(stderr, "%s: digest mismatch\n  got      ", label);
    for (int i = 0; i < EMS_SHA256_BYTES; i++)
        fprintf(stderr, "%02x", got[i]);
    fprintf(stderr, "\n  expected %s\n", expected_hex);
    CHECK(memcmp(got, expected, EMS_SHA256_BYTES) == 0);
}

static const char MSG_448[] = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
static const char MSG_896[] =
    "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqr"
    "lmnopqrsmnopqrstnopqrstu";

static void test_sha256_nist_vectors(void)
{
    uint8_t digest[EMS_SHA256_BYTES];

    ems_sha256("", 0, digest);
    check_digest("SHA-256(\"\")", digest,
                 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");

    ems_sha256("abc", 3, digest);
    check_digest("SHA-256(\"abc\")", digest,
                 "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");

    /* 56 bytes: the length field no longer fits the first block, so padding adds one. */
    CHECK_EQ(strlen(MSG_448), 56);
    ems_sha256(MSG_448, strlen(MSG_448), digest);
    check_digest("SHA-256(448-bit message)", digest,
                 "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");

    CHECK_EQ(strlen(MSG_896), 112);
    ems_sha256(MSG_896, strlen(MSG_896), digest);
    check_digest("SHA-256(896-bit message)", digest,
                 "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

static void test_sha256_million_a_in_chunks(void)
{
    enum { TOTAL = 1000000 };
    static uint8_t a[4096];
    memset(a, 'a', sizeof a);

    /* Chunk sizes cycle through values that start and end at every offset of the 64-byte
     * block, including empty updates and updates longer than one block. */
    static const size_t chunks[] = {1, 63, 0, 64, 65, 7, 127, 128, 4096, 3, 1000, 55, 56};
    ems_sha256_t ctx;
    ems_sha256_init(&ctx);
    size_t fed = 0;
    for (size_t i = 0; fed < TOTAL; i++) {
        size_t take = chunks[i % (sizeof chunks / sizeof chunks[0])];
        if (take > TOTAL - fed)
            take = TOTAL - fed;
        ems_sha256_update(&ctx, a, take);
        fed += take;
    }
    CHECK(ctx.total == TOTAL);
    uint8_t digest[EMS_SHA256_BYTES];
    ems_sha256_final(&ctx, digest);
    check_digest("SHA-256(one million 'a')", digest,
                 "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

/* Hashing a message in two parts split at every position equals hashing it whole. */
static void test_sha256_split_equals_whole(void)
{
    uint8_t whole[EMS_SHA256_BYTES];
    size_t len = strlen(MSG_896);
    ems_sha256(MSG_896, len, whole);
    for (size_t split = 0; split <= len; split++) {
        ems_sha256_t ctx;
        ems_sha256_init(&ctx);
        ems_sha256_update(&ctx, MSG_896, split);
        ems_sha256_update(&ctx, MSG_896 + split, len - split);
        uint8_t parts[EMS_SHA256_BYTES];
        ems_sha256_final(&ctx, parts);
        if (memcmp(parts, whole, sizeof whole) != 0)
            fprintf(stderr, "split at byte %zu differs\n", split);
        CHECK(memcmp(parts, whole, sizeof whole) == 0);
    }
}

typedef struct hmac_case {
    const char *name;
    uint8_t key[131];
    size_t key_len;
    const char *data;      /* NULL: data_byte repeated data_len times */
    uint8_t data_byte;
    size_t data_len;
    const char *expected;
} hmac_case_t;

static void hmac_case_data(const hmac_case_t *c, uint8_t *buf)
{
    if (c->data)
        memcpy(buf, c->data, c->data_len);
    else
        memset(buf, c->data_byte, c->data_len);
}

static hmac_case_t rfc4231_case(int number)
{
    static const char LONG_KEY_DATA[] = "Test Using Larger Than Block-Size Key - Hash Key First";
    static const char LONG_BOTH_DATA[] =
        "This is a test using a larger than block-size key and a larger than block-size "
        "data. The key needs to be hashed before being used by the HMAC algorithm.";
    hmac_case_t c;
    memset(&c, 0, sizeof c);
    switch (number) {
    case 1:
        c.name = "RFC 4231 test case 1";
        memset(c.key, 0x0b, 20);
        c.key_len = 20;
        c.data = "Hi There";
        c.data_len = 8;
        c.expected = "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7";
        break;
    case 2:
        c.name = "RFC 4231 test case 2";
        memcpy(c.key, "Jefe", 4);
        c.key_len = 4;
        c.data = "what do ya want for nothing?";
        c.data_len = 28;
        c.expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        break;
    case 3:
        c.name = "RFC 4231 test case 3";
        memset(c.key, 0xaa, 20);
        c.key_len = 20;
        c.data_byte = 0xdd;
        c.data_len = 50;
        c.expected = "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe";
        break;
    case 4:
        c.name = "RFC 4231 test case 4";
        for (int i = 0; i < 25; i++)
            c.key[i] = (uint8_t)(i + 1);
        c.key_len = 25;
        c.data_byte = 0xcd;
        c.data_len = 50;
        c.expected = "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b";
        break;
    case 6:
        c.name = "RFC 4231 test case 6 (131-byte key, hashed first)";
        memset(c.key, 0xaa, 131);
        c.key_len = 131;
        c.data = LONG_KEY_DATA;
        c.data_len = sizeof LONG_KEY_DATA - 1;
        c.expected = "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54";
        break;
    case 7:
        c.name = "RFC 4231 test case 7 (131-byte key and 152-byte data)";
        memset(c.key, 0xaa, 131);
        c.key_len = 131;
        c.data = LONG_BOTH_DATA;
        c.data_len = sizeof LONG_BOTH_DATA - 1;
        c.expected = "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2";
        break;
    default:
        CHECK(!"no such RFC 4231 test case in this table");
    }
    return c;
}

static const int RFC4231_CASES[] = {1, 2, 3, 4, 6, 7};
#define NCASES (sizeof RFC4231_CASES / sizeof RFC4231_CASES[0])

static void test_hmac_rfc4231(void)
{
    for (size_t i = 0; i < NCASES; i++) {
        hmac_case_t c = rfc4231_case(RFC4231_CASES[i]);
        uint8_t data[256];
        CHECK(c.data_len <= sizeof data);
        hmac_case_data(&c, data);
        const void *parts[] = {data};
        size_t lens[] = {c.data_len};
        uint8_t mac[EMS_SHA256_BYTES];
        ems_hmac_sha256(c.key, c.key_len, parts, lens, 1, mac);
        check_digest(c.name, mac, c.expected);
    }
}

/* The message of ems_hmac_sha256 is the concatenation of its parts, wherever they split,
 * including empty parts. */
static void test_hmac_parts_equal_whole(void)
{
    for (size_t i = 0; i < NCASES; i++) {
        hmac_case_t c = rfc4231_case(RFC4231_CASES[i]);
        uint8_t data[256];
        hmac_case_data(&c, data);
        for (size_t a = 0; a <= c.data_len; a += 3) {
            size_t b = a + (c.data_len - a) / 2;
            const void *parts[] = {data, data + a, "", data + b};
            size_t lens[] = {a, b - a, 0, c.data_len - b};
            uint8_t mac[EMS_SHA256_BYTES];
            ems_hmac_sha256(c.key, c.key_len, parts, lens, 4, mac);
            check_digest(c.name, mac, c.expected);
        }
    }
}

/* ems_tenant_keys copies a context that already contains the salt, so each result is
 * checked against SHA-256(salt || key) computed from scratch. */
static void test_tenant_keys_match_definition(void)
{
    enum { NKEYS = 5 };
    uint8_t salt[32], keys[NKEYS * EMS_KEY_BYTES], stored[NKEYS * EMS_KEY_BYTES];
    ems_tenant_salt("tenant-a", 8, salt);
    for (uint64_t i = 0; i < NKEYS; i++)
        test_make_key(keys + i * EMS_KEY_BYTES, i, 0x5a17);
    ems_tenant_keys(salt, keys, NKEYS, stored);

    for (uint64_t i = 0; i < NKEYS; i++) {
        uint8_t input[64], expected[EMS_SHA256_BYTES];
        memcpy(input, salt, 32);
        memcpy(input + 32, keys + i * EMS_KEY_BYTES, EMS_KEY_BYTES);
        ems_sha256(input, sizeof input, expected);
        CHECK(memcmp(stored + i * EMS_KEY_BYTES, expected, EMS_KEY_BYTES) == 0);
    }

    uint8_t other[32];
    ems_tenant_salt("tenant-b", 8, other);
    CHECK(memcmp(salt, other, sizeof salt) != 0);
}

/* The proof is HMAC-SHA256(secret, "ems auth proof v1\0" || challenge || u16 role ||
 * u16 tenant_len || tenant), as docs/protocol.md specifies. */
static void test_auth_proof_matches_protocol(void)
{
    static const uint8_t secret[] = "cluster secret";
    uint8_t challenge[EMS_CHALLENGE_BYTES];
    for (int i = 0; i < EMS_CHALLENGE_BYTES; i++)
        challenge[i] = (uint8_t)(0xc0 + i);
    const char *tenant = "tenant-a";

    uint8_t message[18 + EMS_CHALLENGE_BYTES + 4 + 8];
    size_t len = 0;
    memcpy(message, "ems auth proof v1", 18);   /* with its NUL */
    len += 18;
    memcpy(message + len, challenge, sizeof challenge);
    len += sizeof challenge;
    message[len++] = EMS_ROLE_NODE;
    message[len++] = 0;
    message[len++] = 8;
    message[len++] = 0;
    memcpy(message + len, tenant, 8);
    len += 8;
    CHECK_EQ(len, sizeof message);

    const void *parts[] = {message};
    size_t lens[] = {len};
    uint8_t expected[EMS_PROOF_BYTES], proof[EMS_PROOF_BYTES];
    ems_hmac_sha256(secret, sizeof secret - 1, parts, lens, 1, expected);
    ems_auth_proof(secret, sizeof secret - 1, challenge, tenant, 8, EMS_ROLE_NODE, proof);
    CHECK(memcmp(proof, expected, sizeof proof) == 0);

    /* The role is bound into the proof. */
    ems_auth_proof(secret, sizeof secret - 1, challenge, tenant, 8, EMS_ROLE_CLIENT, proof);
    CHECK(memcmp(proof, expected, sizeof proof) != 0);
}

int main(void)
{
    RUN_TEST(test_sha256_nist_vectors);
    RUN_TEST(test_sha256_million_a_in_chunks);
    RUN_TEST(test_sha256_split_equals_whole);
    RUN_TEST(test_hmac_rfc4231);
    RUN_TEST(test_hmac_parts_equal_whole);
    RUN_TEST(test_tenant_keys_match_definition);
    RUN_TEST(test_auth_proof_matches_protocol);
    printf("test_sha256: ok\n");
    return 0;
}
