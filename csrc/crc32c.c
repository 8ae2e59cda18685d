#include "crc32c.h"

#include <pthread.h>
#include <string.h>

#define POLY 0x82F63B78u

/* table[k][b]: the CRC of byte b followed by k zero bytes (slicing by 8). */
static uint32_t table[8][256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void build_table(void) {
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t crc = b;
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (POLY & (0u - (crc & 1u)));
        table[0][b] = crc;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int k = 1; k < 8; k++)
            table[k][b] = (table[k - 1][b] >> 8) ^ table[0][table[k - 1][b] & 0xFF];
}

uint32_t ems_crc32c_software(uint32_t crc, const void *data, size_t len) {
    pthread_once(&table_once, build_table);
    const uint8_t *p = data;
    crc = ~crc;

    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);   /* unaligned-safe; the tables assume little endian */
        word ^= crc;
        crc = table[7][word & 0xFF] ^ table[6][(word >> 8) & 0xFF] ^
              table[5][(word >> 16) & 0xFF] ^ table[4][(word >> 24) & 0xFF] ^
              table[3][(word >> 32) & 0xFF] ^ table[2][(word >> 40) & 0xFF] ^
              table[1][(word >> 48) & 0xFF] ^ table[0][word >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
    return ~crc;
}

#if defined(__x86_64__) && defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__

#include <nmmintrin.h>

/* The CRC instruction has a latency of about 3 cycles and a throughput of 1 per cycle, so
 * one dependent chain uses a third of it. Long inputs run three chains over adjacent lanes
 * of LANE bytes and merge them: for raw (uninverted) registers, feeding A then B from r
 * gives shift(f(r, A), |B|) ^ f(0, B), where shift feeds zero bytes and is linear in r. */
#define LANE 1024

/* shift_tables[lanes - 1]: feed lanes * LANE zero bytes, as 4 tables of one byte each. */
static uint32_t shift_tables[2][4][256];
static pthread_once_t shift_once = PTHREAD_ONCE_INIT;

static uint32_t shift_slow(uint32_t raw, size_t zeros) {
    while (zeros--)
        raw = (raw >> 8) ^ table[0][raw & 0xFF];
    return raw;
}

static void build_shift_tables(void) {
    pthread_once(&table_once, build_table);
    for (int lanes = 1; lanes <= 2; lanes++)
        for (int k = 0; k < 4; k++)
            for (uint32_t b = 0; b < 256; b++)
                shift_tables[lanes - 1][k][b] = shift_slow(b << (8 * k), (size_t)LANE * lanes);
}

static uint32_t shift(int lanes, uint32_t raw) {
    const uint32_t (*t)[256] = shift_tables[lanes - 1];
    return t[0][raw & 0xFF] ^ t[1][(raw >> 8) & 0xFF] ^ t[2][(raw >> 16) & 0xFF] ^
           t[3][raw >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_sse42(uint32_t crc, const void *data, size_t len) {
    const uint8_t *p = data;
    uint64_t c = ~crc;

    if (len >= 3 * LANE) {
        pthread_once(&shift_once, build_shift_tables);
        while (len >= 3 * LANE) {
            uint64_t c1 = 0, c2 = 0;
            for (size_t i = 0; i < LANE; i += 8) {
                uint64_t w0, w1, w2;
                memcpy(&w0, p + i, 8);
                memcpy(&w1, p + LANE + i, 8);
                memcpy(&w2, p + 2 * LANE + i, 8);
                c = _mm_crc32_u64(c, w0);
                c1 = _mm_crc32_u64(c1, w1);
                c2 = _mm_crc32_u64(c2, w2);
            }
            c = shift(2, (uint32_t)c) ^ shift(1, (uint32_t)c1) ^ (uint32_t)c2;
            p += 3 * LANE;
            len -= 3 * LANE;
        }
    }

    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = _mm_crc32_u64(c, word);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--)
        c32 = _mm_crc32_u8(c32, *p++);
    return ~c32;
}

int ems_crc32c_hardware(void) {
    return __builtin_cpu_supports("sse4.2");
}

uint32_t ems_crc32c(uint32_t crc, const void *data, size_t len) {
    if (__builtin_cpu_supports("sse4.2"))
        return crc32c_sse42(crc, data, len);
    return ems_crc32c_software(crc, data, len);
}

#else

int ems_crc32c_hardware(void) {
    return 0;
}

uint32_t ems_crc32c(uint32_t crc, const void *data, size_t len) {
    return ems_crc32c_software(crc, data, len);
}

#endif
