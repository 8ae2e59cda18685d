/* Unit tests of ems_crc32c: published check values, chaining, unaligned input, and the
 * CPU-instruction path against the software loop on every length up to 1 KiB. */
#include "check.h"
#include "crc32c.h"

static void test_check_values(void) {
    /* The CRC-32C check value and the iSCSI test vectors of RFC 3720, appendix B.4. */
    CHECK_EQ(ems_crc32c(0, "123456789", 9), 0xE3069283u);
    uint8_t buf[32];
    memset(buf, 0, sizeof buf);
    CHECK_EQ(ems_crc32c(0, buf, 32), 0x8A9136AAu);
    memset(buf, 0xFF, sizeof buf);
    CHECK_EQ(ems_crc32c(0, buf, 32), 0x62A8AB43u);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)i;
    CHECK_EQ(ems_crc32c(0, buf, 32), 0x46DD794Eu);
    for (int i = 0; i < 32; i++)
        buf[i] = (uint8_t)(31 - i);
    CHECK_EQ(ems_crc32c(0, buf, 32), 0x113FDB5Cu);
    CHECK_EQ(ems_crc32c_software(0, "123456789", 9), 0xE3069283u);
    CHECK_EQ(ems_crc32c(0, buf, 0), 0u);
}

static void test_chaining(void) {
    uint8_t data[300];
    for (int i = 0; i < 300; i++)
        data[i] = (uint8_t)(i * 7 + 3);
    uint32_t whole = ems_crc32c(0, data, sizeof data);
    for (size_t cut = 0; cut <= sizeof data; cut += 13) {
        uint32_t first = ems_crc32c(0, data, cut);
        CHECK_EQ(ems_crc32c(first, data + cut, sizeof data - cut), whole);
        CHECK_EQ(ems_crc32c_software(ems_crc32c_software(0, data, cut), data + cut,
                                     sizeof data - cut), whole);
    }
}

static void test_paths_agree(void) {
    enum { SIZE = 1024 + 8 };
    uint8_t data[SIZE];
    uint64_t state = 0x9E3779B97F4A7C15u;
    for (int i = 0; i < SIZE; i++) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        data[i] = (uint8_t)state;
    }
    for (size_t offset = 0; offset < 8; offset++)          /* unaligned starts */
        for (size_t len = 0; len + offset <= SIZE && len <= 1024; len++)
            CHECK_EQ(ems_crc32c(0, data + offset, len),
                     ems_crc32c_software(0, data + offset, len));
}

static void test_long_inputs_agree(void) {
    /* Long inputs take the three-chain path: lengths around multiples of 3 KiB. */
    enum { SIZE = 64 * 1024 + 64 };
    static uint8_t data[SIZE];
    uint64_t state = 0xD1B54A32D192ED03u;
    for (int i = 0; i < SIZE; i++) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        data[i] = (uint8_t)state;
    }
    const size_t lengths[] = {3071, 3072, 3073, 3080, 6143, 6144, 6151, 9216, 30000, 65536};
    for (size_t n = 0; n < sizeof lengths / sizeof lengths[0]; n++)
        for (size_t offset = 0; offset < 3; offset++) {
            size_t len = lengths[n];
            CHECK_EQ(ems_crc32c(0, data + offset, len),
                     ems_crc32c_software(0, data + offset, len));
            CHECK_EQ(ems_crc32c(0x12345678u, data + offset, len),
                     ems_crc32c_software(0x12345678u, data + offset, len));
        }
}

static void test_one_bit_changes(void) {
    uint8_t data[4096];
    memset(data, 0x5A, sizeof data);
    uint32_t clean = ems_crc32c(0, data, sizeof data);
    for (size_t byte = 0; byte < sizeof data; byte += 97) {
        data[byte] ^= 0x10;
        CHECK(ems_crc32c(0, data, sizeof data) != clean);
        data[byte] ^= 0x10;
    }
    CHECK_EQ(ems_crc32c(0, data, sizeof data), clean);
}

int main(void) {
    test_check_values();
    test_chaining();
    test_paths_agree();
    test_long_inputs_agree();
    test_one_bit_changes();
    printf("test_crc32c: ok (CPU instruction %s)\n", ems_crc32c_hardware() ? "used" : "absent");
    return 0;
}
