/* Unit tests of the transfer protocol's frame header: the wire layout, round trips, every
 * rejection decode can return, and version negotiation. */
#include <errno.h>

#include "check.h"
#include "crc32c.h"
#include "frame.h"

#define MAX_PAYLOAD (64u << 20)
#define LOW EMS_PROTO_VERSION_MIN
#define HIGH EMS_PROTO_VERSION_MAX

static ems_frame_t sample(void) {
    ems_frame_t f = {
        .version = EMS_PROTO_VERSION_MAX, .opcode = EMS_OP_GET,
        .request_id = 0x0102030405060708ull, .payload_len = 4096,
        .payload_crc = 0xDEADBEEFu, .status = 0, .flags = 0,
    };
    return f;
}

static void test_wire_layout(void) {
    ems_frame_t f = sample();
    uint8_t wire[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&f, wire);
    CHECK(memcmp(wire, "EMS1", 4) == 0);
    CHECK_EQ(wire[4], EMS_PROTO_VERSION_MAX);
    CHECK_EQ(wire[5], 0);
    CHECK_EQ(wire[6], EMS_OP_GET);
    CHECK_EQ(wire[8], 0x08);                    /* request id, little-endian */
    CHECK_EQ(wire[15], 0x01);
    CHECK_EQ(wire[16] | (wire[17] << 8), 4096);
    CHECK_EQ(wire[20], 0xEF);
    CHECK_EQ(wire[23], 0xDE);
    uint32_t header_crc = wire[28] | (wire[29] << 8) | (wire[30] << 16) |
                          ((uint32_t)wire[31] << 24);
    CHECK_EQ(header_crc, ems_crc32c(0, wire, 28));
}

static void test_round_trip(void) {
    ems_frame_t f = sample();
    f.flags = EMS_FRAME_RESPONSE;
    f.status = EMS_STATUS_TOO_LARGE;
    f.request_id = UINT64_MAX;
    uint8_t wire[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&f, wire);
    ems_frame_t back;
    memset(&back, 0xAA, sizeof back);
    CHECK_EQ(ems_frame_decode(wire, MAX_PAYLOAD, LOW, HIGH, &back), 0);
    CHECK_EQ(back.version, f.version);
    CHECK_EQ(back.opcode, f.opcode);
    CHECK(back.request_id == f.request_id);
    CHECK_EQ(back.payload_len, f.payload_len);
    CHECK_EQ(back.payload_crc, f.payload_crc);
    CHECK_EQ(back.status, f.status);
    CHECK_EQ(back.flags, f.flags);
}

static void test_every_byte_flip_rejected(void) {
    ems_frame_t f = sample();
    uint8_t wire[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&f, wire);
    for (int byte = 0; byte < EMS_FRAME_HEADER_BYTES; byte++)
        for (int bit = 0; bit < 8; bit++) {
            wire[byte] ^= (uint8_t)(1u << bit);
            ems_frame_t out = sample();
            out.opcode = 0;
            CHECK_EQ(ems_frame_decode(wire, MAX_PAYLOAD, LOW, HIGH, &out), -EPROTO);
            CHECK_EQ(out.opcode, 0);            /* untouched on failure */
            wire[byte] ^= (uint8_t)(1u << bit);
        }
    ems_frame_t out;
    CHECK_EQ(ems_frame_decode(wire, MAX_PAYLOAD, LOW, HIGH, &out), 0);
}

static int decode_of(ems_frame_t f, uint32_t max_payload) {
    uint8_t wire[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&f, wire);
    ems_frame_t out;
    return ems_frame_decode(wire, max_payload, LOW, HIGH, &out);
}

static void test_rejections(void) {
    ems_frame_t f = sample();
    f.version = EMS_PROTO_VERSION_MAX + 1;
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EPROTONOSUPPORT);
    f.version = EMS_PROTO_VERSION_MIN - 1;
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EPROTONOSUPPORT);

    f = sample();
    f.opcode = 0;
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EBADMSG);
    f.opcode = EMS_OP_LAST + 1;
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EBADMSG);

    f = sample();
    f.flags = 0x8000;
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EBADMSG);
    f = sample();
    f.status = EMS_STATUS_BUSY;                 /* a request with a status */
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EBADMSG);
    f = sample();
    f.payload_len = 0;                          /* an empty payload with a checksum */
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EBADMSG);

    f = sample();
    CHECK_EQ(decode_of(f, f.payload_len), 0);
    CHECK_EQ(decode_of(f, f.payload_len - 1), -EMSGSIZE);
    f.payload_len = UINT32_MAX;
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EMSGSIZE);

    uint8_t wire[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&f, wire);
    wire[0] = 'X';                              /* wrong magic, header crc redone */
    uint32_t crc = ems_crc32c(0, wire, 28);
    for (int i = 0; i < 4; i++)
        wire[28 + i] = (uint8_t)(crc >> (8 * i));
    ems_frame_t out;
    CHECK_EQ(ems_frame_decode(wire, MAX_PAYLOAD, LOW, HIGH, &out), -EPROTO);
}

static void test_negotiate(void) {
    uint16_t version = 0;
    CHECK_EQ(ems_proto_negotiate(LOW, HIGH, LOW, HIGH, &version), 0);
    CHECK_EQ(version, HIGH);
    CHECK_EQ(ems_proto_negotiate(LOW, HIGH, 1, 60000, &version), 0);
    CHECK_EQ(version, HIGH);
    version = 77;
    CHECK_EQ(ems_proto_negotiate(LOW, HIGH, HIGH + 1, 60000, &version), -EPROTONOSUPPORT);
    CHECK_EQ(version, 77);
    CHECK_EQ(ems_proto_negotiate(LOW, HIGH, 3, 2, &version), -EPROTONOSUPPORT);
    CHECK_EQ(ems_proto_negotiate(LOW, HIGH, 0, 0, &version), -EPROTONOSUPPORT);

    /* N and N-1 agree on N-1, from either side. */
    CHECK_EQ(ems_proto_negotiate(1, 2, 1, 1, &version), 0);
    CHECK_EQ(version, 1);
    CHECK_EQ(ems_proto_negotiate(1, 1, 1, 2, &version), 0);
    CHECK_EQ(version, 1);
    /* N+1 = [2, 3] and N-1 = [1, 1] share nothing; nor does a reversed own range. */
    CHECK_EQ(ems_proto_negotiate(1, 1, 2, 3, &version), -EPROTONOSUPPORT);
    CHECK_EQ(ems_proto_negotiate(2, 3, 1, 1, &version), -EPROTONOSUPPORT);
    CHECK_EQ(ems_proto_negotiate(2, 1, 1, 2, &version), -EPROTONOSUPPORT);
}

/* Version 1 ends at PREFETCH; version 2 adds DRAIN. A frame of version 1 with opcode DRAIN
 * is rejected as a previous release rejects it, as an unknown opcode. */
static void test_opcodes_by_version(void) {
    CHECK_EQ(ems_proto_last_opcode(1), EMS_OP_PREFETCH);
    CHECK_EQ(ems_proto_last_opcode(2), EMS_OP_DRAIN);
    ems_frame_t f = sample();
    f.opcode = EMS_OP_DRAIN;
    f.version = 1;
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EBADMSG);
    f.version = 2;
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), 0);
    f.opcode = EMS_OP_DRAIN + 1;
    CHECK_EQ(decode_of(f, MAX_PAYLOAD), -EBADMSG);
}

/* The receiver's range decides which versions pass: a server restricted to [1, 1] rejects
 * a frame of version 2. */
static void test_decode_range(void) {
    ems_frame_t f = sample();
    f.version = 2;
    uint8_t wire[EMS_FRAME_HEADER_BYTES];
    ems_frame_encode(&f, wire);
    ems_frame_t out;
    CHECK_EQ(ems_frame_decode(wire, MAX_PAYLOAD, 1, 1, &out), -EPROTONOSUPPORT);
    CHECK_EQ(ems_frame_decode(wire, MAX_PAYLOAD, 2, 2, &out), 0);
    CHECK_EQ(ems_frame_decode(wire, MAX_PAYLOAD, 0, UINT16_MAX, &out), 0);
    CHECK_EQ(out.version, 2);
}

int main(void) {
    test_wire_layout();
    test_round_trip();
    test_every_byte_flip_rejected();
    test_rejections();
    test_negotiate();
    test_opcodes_by_version();
    test_decode_range();
    printf("test_frame: ok\n");
    return 0;
}
