#include "frame.h"

#include <errno.h>

#include "crc32c.h"

static void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

void ems_frame_encode(const ems_frame_t *frame, uint8_t out[EMS_FRAME_HEADER_BYTES]) {
    put32(out + 0, EMS_FRAME_MAGIC);
    put16(out + 4, frame->version);
    put16(out + 6, frame->opcode);
    put64(out + 8, frame->request_id);
    put32(out + 16, frame->payload_len);
    put32(out + 20, frame->payload_crc);
    put16(out + 24, frame->status);
    put16(out + 26, frame->flags);
    put32(out + 28, ems_crc32c(0, out, 28));
}

int ems_frame_decode(const uint8_t in[EMS_FRAME_HEADER_BYTES], uint32_t max_payload,
                     ems_frame_t *frame) {
    if (get32(in + 0) != EMS_FRAME_MAGIC || get32(in + 28) != ems_crc32c(0, in, 28))
        return -EPROTO;

    ems_frame_t f = {
        .version = get16(in + 4),
        .opcode = get16(in + 6),
        .request_id = get64(in + 8),
        .payload_len = get32(in + 16),
        .payload_crc = get32(in + 20),
        .status = get16(in + 24),
        .flags = get16(in + 26),
    };
    if (f.version < EMS_PROTO_VERSION_MIN || f.version > EMS_PROTO_VERSION_MAX)
        return -EPROTONOSUPPORT;
    if (f.opcode < EMS_OP_PING || f.opcode > EMS_OP_LAST || (f.flags & ~EMS_FRAME_RESPONSE))
        return -EBADMSG;
    if (!(f.flags & EMS_FRAME_RESPONSE) && f.status != EMS_STATUS_OK)
        return -EBADMSG;   /* only responses carry a status */
    if (f.payload_len > max_payload)
        return -EMSGSIZE;
    if (f.payload_len == 0 && f.payload_crc != 0)
        return -EBADMSG;

    *frame = f;
    return 0;
}

int ems_proto_negotiate(uint16_t peer_min, uint16_t peer_max, uint16_t *version) {
    uint16_t low = peer_min > EMS_PROTO_VERSION_MIN ? peer_min : EMS_PROTO_VERSION_MIN;
    uint16_t high = peer_max < EMS_PROTO_VERSION_MAX ? peer_max : EMS_PROTO_VERSION_MAX;
    if (peer_min > peer_max || low > high)
        return -EPROTONOSUPPORT;
    *version = high;
    return 0;
}
