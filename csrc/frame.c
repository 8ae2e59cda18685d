#include "frame.h"

#include <errno.h>

#include "crc32c.h"
#include "wire.h"

void ems_frame_encode(const ems_frame_t *frame, uint8_t out[EMS_FRAME_HEADER_BYTES]) {
    ems_put32(out + 0, EMS_FRAME_MAGIC);
    ems_put16(out + 4, frame->version);
    ems_put16(out + 6, frame->opcode);
    ems_put64(out + 8, frame->request_id);
    ems_put32(out + 16, frame->payload_len);
    ems_put32(out + 20, frame->payload_crc);
    ems_put16(out + 24, frame->status);
    ems_put16(out + 26, frame->flags);
    ems_put32(out + 28, ems_crc32c(0, out, 28));
}

int ems_frame_decode(const uint8_t in[EMS_FRAME_HEADER_BYTES], uint32_t max_payload,
                     uint16_t version_min, uint16_t version_max, ems_frame_t *frame) {
    if (ems_get32(in + 0) != EMS_FRAME_MAGIC || ems_get32(in + 28) != ems_crc32c(0, in, 28))
        return -EPROTO;

    ems_frame_t f = {
        .version = ems_get16(in + 4),
        .opcode = ems_get16(in + 6),
        .request_id = ems_get64(in + 8),
        .payload_len = ems_get32(in + 16),
        .payload_crc = ems_get32(in + 20),
        .status = ems_get16(in + 24),
        .flags = ems_get16(in + 26),
    };
    if (f.version < version_min || f.version > version_max)
        return -EPROTONOSUPPORT;
    if (f.opcode < EMS_OP_PING || f.opcode > ems_proto_last_opcode(f.version) ||
        (f.flags & ~EMS_FRAME_RESPONSE))
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

uint16_t ems_proto_last_opcode(uint16_t version) {
    return version >= 2 ? EMS_OP_DRAIN : EMS_OP_PREFETCH;
}

int ems_proto_negotiate(uint16_t own_min, uint16_t own_max, uint16_t peer_min,
                        uint16_t peer_max, uint16_t *version) {
    uint16_t low = peer_min > own_min ? peer_min : own_min;
    uint16_t high = peer_max < own_max ? peer_max : own_max;
    if (own_min > own_max || peer_min > peer_max || low > high)
        return -EPROTONOSUPPORT;
    *version = high;
    return 0;
}
