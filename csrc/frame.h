/* Frame header of the EMS transfer protocol (TCP between nodes and clients).
 *
 * Every message is a 32-byte header followed by payload_len bytes of payload. The header
 * is little-endian on the wire:
 *
 *   offset size field
 *        0    4 magic        EMS_FRAME_MAGIC
 *        4    2 version      protocol version of this frame
 *        6    2 opcode       ems_opcode_t
 *        8    8 request_id   chosen by the client, echoed in the response
 *       16    4 payload_len  bytes after the header
 *       20    4 payload_crc  CRC-32C of the payload (0 for an empty payload)
 *       24    2 status       0 in requests, 0 or an ems_status_t in responses
 *       26    2 flags        EMS_FRAME_RESPONSE, other bits zero
 *       28    4 header_crc   CRC-32C of bytes 0..27
 *
 * Decoding checks the header in this order and returns the first failure, so a caller can
 * name it: magic and header_crc (-EPROTO), version (-EPROTONOSUPPORT), opcode and flags
 * (-EBADMSG), payload_len against the receiver's limit (-EMSGSIZE). The payload checksum
 * is checked by the receiver once the payload is in place.
 *
 * Versions: a build speaks EMS_PROTO_VERSION_MIN to EMS_PROTO_VERSION_MAX, and a server or
 * client may be restricted to part of that range when it starts. Version 1 is the first,
 * and version 2 adds the DRAIN opcode. The header and the HELLO payload have the same layout
 * in every version, so that two builds can always negotiate, or reject each other with a
 * clear status. */
#ifndef EMS_FRAME_H
#define EMS_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define EMS_FRAME_MAGIC 0x31534D45u   /* "EMS1" in wire byte order */
#define EMS_FRAME_HEADER_BYTES 32
#define EMS_PROTO_VERSION_MIN 1       /* oldest version this build speaks */
#define EMS_PROTO_VERSION_MAX 2       /* newest version this build speaks */
#define EMS_FRAME_RESPONSE 0x0001u

typedef enum {
    EMS_OP_PING = 1,
    EMS_OP_HELLO = 2,          /* version range and tenant; the response carries a challenge */
    EMS_OP_AUTH = 3,           /* proof of the cluster secret */
    EMS_OP_GET = 4,
    EMS_OP_PUT = 5,
    EMS_OP_EXISTS = 6,
    EMS_OP_MATCH_PREFIX = 7,
    EMS_OP_DELETE = 8,
    EMS_OP_DIR_REGISTER = 9,
    EMS_OP_DIR_LOOKUP = 10,
    EMS_OP_STATS = 11,
    EMS_OP_LOCAL_ATTACH = 12,  /* local socket only: the response carries the pool memfd */
    EMS_OP_LOCAL_RESERVE = 13, /* local socket only: reserve slots the client fills */
    EMS_OP_LOCAL_COMMIT = 14,  /* local socket only: publish the reserved slots */
    EMS_OP_PROTECT = 15,       /* set (arg 1) or clear (arg 0) the evict-last hint */
    EMS_OP_PREFETCH = 16,      /* start loading keys the pool lacks from a lower tier */
    EMS_OP_DRAIN = 17,         /* version 2: stop storing new blocks before a restart */
    EMS_OP_LAST = EMS_OP_DRAIN,
} ems_opcode_t;

typedef enum {
    EMS_STATUS_OK = 0,
    EMS_STATUS_BAD_REQUEST = 1,
    EMS_STATUS_UNAUTHENTICATED = 2,
    EMS_STATUS_UNSUPPORTED_VERSION = 3,
    EMS_STATUS_TOO_LARGE = 4,
    EMS_STATUS_BUSY = 5,
    EMS_STATUS_INTERNAL = 6,
} ems_status_t;

typedef struct {
    uint16_t version;
    uint16_t opcode;
    uint64_t request_id;
    uint32_t payload_len;
    uint32_t payload_crc;
    uint16_t status;
    uint16_t flags;
} ems_frame_t;

/* Write the 32-byte wire form of `frame` (magic and header_crc filled in). */
void ems_frame_encode(const ems_frame_t *frame, uint8_t out[EMS_FRAME_HEADER_BYTES]);

/* Parse a 32-byte header; 0 on success, else a negative errno (see above). `frame` is
 * filled only on success. max_payload is the largest payload the receiver accepts. The
 * frame's version must be in [version_min, version_max], and its opcode one that the
 * frame's version has (ems_proto_last_opcode). */
int ems_frame_decode(const uint8_t in[EMS_FRAME_HEADER_BYTES], uint32_t max_payload,
                     uint16_t version_min, uint16_t version_max, ems_frame_t *frame);

/* The highest opcode of protocol `version`: PREFETCH in version 1, DRAIN from version 2. */
uint16_t ems_proto_last_opcode(uint16_t version);

/* Pick the newest version in both this side's range [own_min, own_max] and the peer's
 * [peer_min, peer_max]. Returns 0 and sets *version, or returns -EPROTONOSUPPORT when the
 * ranges do not meet or either is reversed. */
int ems_proto_negotiate(uint16_t own_min, uint16_t own_max, uint16_t peer_min,
                        uint16_t peer_max, uint16_t *version);

#endif
