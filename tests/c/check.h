/* Minimal assertion harness for the EMS C unit tests.
 *
 * CHECK and CHECK_EQ print file:line and the failed expression to stderr, and CHECK_EQ
 * also prints both values. Both then end the process with status 1 through _Exit, so a
 * failure in any thread or forked child stops the test at once with a non-zero exit.
 * The helpers below build deterministic keys and payloads from integer ids, so a test
 * can recompute the expected contents of any block from its key id alone.
 */
#ifndef EMS_TEST_CHECK_H
#define EMS_TEST_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(expr)                                                                      \
    do {                                                                                 \
        if (!(expr)) {                                                                   \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #expr);     \
            fflush(NULL);                                                                \
            _Exit(1);                                                                    \
        }                                                                                \
    } while (0)

#define CHECK_EQ(actual, expected)                                                       \
    do {                                                                                 \
        long long check_actual_ = (long long)(actual);                                   \
        long long check_expected_ = (long long)(expected);                               \
        if (check_actual_ != check_expected_) {                                          \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (got %lld, expected %lld)\n", \
                    __FILE__, __LINE__, #actual, #expected, check_actual_,               \
                    check_expected_);                                                    \
            fflush(NULL);                                                                \
            _Exit(1);                                                                    \
        }                                                                                \
    } while (0)

/* Runs one test function and reports its name, so a failure can be placed in the log. */
#define RUN_TEST(fn)                         \
    do {                                     \
        fprintf(stderr, "[ RUN  ] %s\n", #fn); \
        fn();                                \
        fprintf(stderr, "[  OK  ] %s\n", #fn); \
    } while (0)

/* SplitMix64 step: a cheap deterministic generator for keys, payloads and choices. */
static inline uint64_t test_next_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Writes the 32-byte key of integer id `id`. Different ids give keys that differ in
 * every 8-byte word, and `salt` separates key families of one test. */
static inline void test_make_key(uint8_t key[32], uint64_t id, uint64_t salt)
{
    uint64_t state = id * 0x100000001b3ULL ^ salt;
    for (int word = 0; word < 4; word++) {
        uint64_t v = test_next_random(&state);
        memcpy(key + 8 * word, &v, sizeof v);
    }
}

/* Fills `buf` with the payload of block `id`: a byte stream that depends on the id and
 * on the position, so a block copied from the wrong key or offset does not compare equal. */
static inline void test_fill_payload(uint8_t *buf, uint64_t len, uint64_t id)
{
    uint64_t state = id ^ 0x5eed5eed5eed5eedULL;
    uint64_t i = 0;
    while (i + 8 <= len) {
        uint64_t v = test_next_random(&state);
        memcpy(buf + i, &v, sizeof v);
        i += 8;
    }
    if (i < len) {
        uint64_t v = test_next_random(&state);
        memcpy(buf + i, &v, (size_t)(len - i));
    }
}

#endif
