"""Fuzz target for the transfer server's frame handling, plus the raw-frame helpers the
transfer tests share.

Each fuzz input goes to one long-lived Server in this process, on a fresh TCP connection
to 127.0.0.1 that first completes a valid handshake prefix chosen by the input's first
byte. The server has a miss handler backed by a dict (TIER_KEY's block), so GET, EXISTS,
MATCH_PREFIX and PREFETCH reach it. After each input the target checks that the server
still responds to PING on a separate connection, that a sentinel block of another tenant is
unchanged, and that the handler always got whole keys and never failed.

Run it bounded, for example:

    python tests/fuzz_frame.py -max_total_time=20 -atheris_runs=200000

Input layout: byte 0 picks the prefix (its low two bits % 3: none, HELLO, HELLO and AUTH;
bit 2 selects the node role), byte 1 picks which header fields the target repairs (see
`build_frames`), the rest is a stream of frames. Repairing checksums and lengths lets
random bytes get past the header checks into the payload parsers. The server is C code
without coverage instrumentation, so libFuzzer measures coverage of this file only. A
custom mutator therefore starts from valid frames of every opcode to reach deep paths.
"""
import hashlib
import hmac
import random
import socket
import struct
import sys

import ems
import ems._core as core

# ---- raw frames -------------------------------------------------------------------------

MAGIC = 0x31534D45
HEADER_BYTES = 32
VERSION = 1
RESPONSE = 0x0001
_HEADER = struct.Struct("<IHHQIIHH")   # bytes 0..27; header_crc follows

PING, HELLO, AUTH, GET, PUT, EXISTS, MATCH_PREFIX, DELETE = 1, 2, 3, 4, 5, 6, 7, 8
DIR_REGISTER, DIR_LOOKUP, STATS, LOCAL_ATTACH, LOCAL_RESERVE, LOCAL_COMMIT = (
    9, 10, 11, 12, 13, 14)
PROTECT, PREFETCH = 15, 16
DRAIN = 17            # version 2 only: a frame of version 1 with it is rejected
UNKNOWN_OPCODE = 18   # the first opcode past EMS_OP_LAST, which the server rejects

OK, BAD_REQUEST, UNAUTHENTICATED, UNSUPPORTED_VERSION, TOO_LARGE, BUSY, INTERNAL = range(7)

ROLE_CLIENT, ROLE_NODE = 0, 1
PROOF_CONTEXT = b"ems auth proof v1\0"   # auth.c hashes the C string with its NUL


def encode_header(opcode, payload_len, payload_crc, request_id=1, version=VERSION,
                  status=0, flags=0, magic=MAGIC):
    """Return a 32-byte frame header with a valid header checksum."""
    head = _HEADER.pack(magic, version, opcode, request_id, payload_len, payload_crc,
                        status, flags)
    return head + struct.pack("<I", ems.crc32c(head))


def encode_frame(opcode, payload=b"", request_id=1, **fields):
    """Return header + payload; `fields` override header fields (version, flags, ...)."""
    crc = ems.crc32c(payload) if payload else 0
    return encode_header(opcode, len(payload), crc, request_id, **fields) + payload


def recv_exact(sock, n):
    """Return n bytes, or fewer when the peer closed first."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class Response:
    """A decoded response frame: header fields and payload."""

    def __init__(self, header, payload):
        (self.magic, self.version, self.opcode, self.request_id, self.payload_len,
         self.payload_crc, self.status, self.flags) = _HEADER.unpack(header[:28])
        self.header_crc = struct.unpack("<I", header[28:])[0]
        self.header_valid = self.header_crc == ems.crc32c(header[:28])
        self.payload = payload

    @property
    def payload_valid(self):
        """Whether the payload is whole and matches payload_crc (0 for an empty one)."""
        if len(self.payload) != self.payload_len:
            return False
        return self.payload_crc == (ems.crc32c(self.payload) if self.payload else 0)

    def __repr__(self):
        return (f"Response(opcode={self.opcode}, status={self.status}, "
                f"request_id={self.request_id}, payload_len={self.payload_len})")


def read_response(sock):
    """Read one frame; returns a Response, or None when the peer closed before a header."""
    header = recv_exact(sock, HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        return None
    response = Response(header, b"")
    response.payload = recv_exact(sock, response.payload_len)
    return response


def hello_payload(tenant=b"t", role=ROLE_CLIENT, min_version=VERSION, max_version=VERSION,
                  tenant_len=None):
    """HELLO payload: u16 min_version, u16 max_version, u16 role, u16 tenant_len, tenant."""
    length = len(tenant) if tenant_len is None else tenant_len
    return struct.pack("<HHHH", min_version, max_version, role, length) + tenant


def auth_proof(secret, challenge, tenant, role=ROLE_CLIENT):
    """HMAC-SHA256 proof that auth.c expects for a challenge, tenant and role."""
    message = PROOF_CONTEXT + challenge + struct.pack("<HH", role, len(tenant)) + tenant
    return hmac.new(secret, message, hashlib.sha256).digest()


def batch(keys, arg=0, extra=b""):
    """Key batch payload: u32 n, u32 arg, n keys, then `extra` (lengths, data)."""
    return struct.pack("<II", len(keys), arg) + b"".join(keys) + extra


def put_payload(keys, blocks):
    lengths = b"".join(struct.pack("<Q", len(b)) for b in blocks)
    return batch(keys, extra=lengths + b"".join(blocks))


def get_payload(keys, lengths):
    return batch(keys, extra=b"".join(struct.pack("<Q", n) for n in lengths))


def connect(port, timeout=2.0):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def handshake(sock, stage, secret, tenant=b"t", role=ROLE_CLIENT):
    """Complete `stage` steps of the handshake (0 none, 1 HELLO, 2 HELLO and AUTH) and
    return the HELLO response's challenge (None at stage 0). Raises on any refusal."""
    if stage == 0:
        return None
    sock.sendall(encode_frame(HELLO, hello_payload(tenant, role), request_id=1))
    response = read_response(sock)
    if response is None or response.status != OK or len(response.payload) != 36:
        raise AssertionError(f"HELLO failed: {response!r}")
    challenge = response.payload[4:]
    if stage >= 2 and secret:
        proof = auth_proof(secret, challenge, tenant, role)
        sock.sendall(encode_frame(AUTH, proof, request_id=2))
        response = read_response(sock)
        if response is None or response.status != OK:
            raise AssertionError(f"AUTH failed: {response!r}")
    return challenge


def drain(sock, timeout):
    """Read until the peer closes or `timeout` seconds pass; return the bytes read and
    whether the peer closed."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(data), True
            data += chunk
    except ConnectionResetError:
        return bytes(data), True
    except socket.timeout:
        return bytes(data), False


# ---- fuzz target ------------------------------------------------------------------------

SECRET = b"fuzz secret"
TENANT = b"fuzz"
SENTINEL_TENANT = "sentinel"
SENTINEL_KEY = hashlib.sha256(b"sentinel block").digest()
SENTINEL_BLOCK = hashlib.sha256(b"sentinel data").digest() * 128   # 4 KiB
TIER_KEY = hashlib.sha256(b"tier block").digest()   # only in the lower tier at the start
TIER_BLOCK = hashlib.sha256(b"tier data").digest() * 32      # 1 KiB
MAX_PAYLOAD = 64 << 10
READ_TIMEOUT_S = 0.05

# Repair bits of byte 1.
FIX_HEADER_CRC = 0x01     # magic and header checksum made valid
FIX_PAYLOAD_CRC = 0x02    # payload checksum made valid
FIX_PAYLOAD_LEN = 0x04    # payload_len cut to the bytes that follow
FIX_VERSION = 0x08        # version 1, zero status and flags


def build_frames(repair, stream):
    """Turn the fuzzed stream into the bytes to send, repairing header fields per the
    `repair` bits. Each 32-byte chunk is a header; its payload follows it."""
    out = bytearray()
    while stream:
        header = stream[:HEADER_BYTES].ljust(HEADER_BYTES, b"\0")
        stream = stream[HEADER_BYTES:]
        (magic, version, opcode, request_id, payload_len, payload_crc, status,
         flags) = _HEADER.unpack(header[:28])
        if repair & FIX_PAYLOAD_LEN:
            payload_len = payload_len % (len(stream) + 1)
        payload = stream[:payload_len]
        stream = stream[payload_len:]
        if repair & FIX_PAYLOAD_CRC:
            payload_crc = ems.crc32c(payload) if payload else 0
        if repair & FIX_VERSION:
            version, status, flags = VERSION, 0, 0
        if repair & FIX_HEADER_CRC:
            header = encode_header(opcode, payload_len, payload_crc, request_id, version,
                                   status, flags)
        out += header + payload
    return bytes(out)


def seed_inputs():
    """Valid frame streams of every opcode at every handshake stage, for the mutator."""
    keys = [hashlib.sha256(b"fuzz key %d" % i).digest() for i in range(3)]
    blocks = [b"a" * 100, b"b" * 1000, b"c"]   # seeds stay under the 4096-byte max_len
    frames = [
        encode_frame(PING, b"12345678"),
        encode_frame(PUT, put_payload(keys, blocks)),
        encode_frame(GET, get_payload(keys, [len(b) for b in blocks])),
        encode_frame(GET, get_payload([SENTINEL_KEY], [len(SENTINEL_BLOCK)])),
        encode_frame(EXISTS, batch(keys)),
        encode_frame(MATCH_PREFIX, batch(keys)),
        encode_frame(DELETE, batch(keys[:1])),
        encode_frame(PROTECT, batch(keys, arg=1)),
        encode_frame(GET, get_payload([TIER_KEY, keys[0]], [len(TIER_BLOCK), len(blocks[0])])),
        encode_frame(EXISTS, batch([keys[2], TIER_KEY])),
        encode_frame(MATCH_PREFIX, batch([keys[0], TIER_KEY, keys[1]])),
        encode_frame(PREFETCH, batch([TIER_KEY] + keys)),
        encode_frame(DELETE, batch([TIER_KEY])),
        encode_frame(DIR_REGISTER, batch(keys, arg=7)),
        encode_frame(DIR_LOOKUP, batch(keys)),
        encode_frame(STATS),
        encode_frame(LOCAL_ATTACH),
        encode_frame(LOCAL_RESERVE, get_payload(keys[:1], [10])),
        encode_frame(LOCAL_COMMIT, batch([])),
        encode_frame(HELLO, hello_payload(b"other")),
        encode_frame(AUTH, bytes(32)),
    ]
    seeds = []
    for stage in range(3):
        for role_bit in (0, 4):
            for frame in frames:
                seeds.append(bytes([stage | role_bit, 0x0f]) + frame)
                seeds.append(bytes([stage | role_bit, 0x00]) + frame)
            seeds.append(bytes([stage | role_bit, 0x0f]) + b"".join(frames[:6]))
    return seeds


class Target:
    """The server under test, the sentinel block, the lower tier and a checker connection."""

    def __init__(self):
        self.pool = ems.Pool(64 << 20, max_blocks=1 << 18)
        self.server = core.Server(self.pool, host="127.0.0.1", port=0, secret=SECRET,
                                  node_id=1, max_payload=MAX_PAYLOAD, io_timeout_ms=200)
        self.tier = {core.tenant_keys(TENANT.decode(), [TIER_KEY]): TIER_BLOCK}
        self.bad_handler_calls = []
        self.server.set_miss_handler(self.miss_handler)
        writer = core.Connection("127.0.0.1", self.server.port, secret=SECRET,
                                 tenant=SENTINEL_TENANT)
        if writer.put_many([SENTINEL_KEY], [SENTINEL_BLOCK]) != [0]:
            raise RuntimeError("cannot store the sentinel block")
        writer.close()
        self.checker = None

    def miss_handler(self, mode, keys):
        """The lower tier: LOAD puts TIER_BLOCK into the pool, PROBE and PREFETCH only
        report it (a prefetch that completes at once), DELETE removes it."""
        if len(keys) % 32 or not keys or mode not in (core.MISS_LOAD, core.MISS_PROBE,
                                                       core.MISS_PREFETCH, core.MISS_DELETE):
            self.bad_handler_calls.append((mode, len(keys)))
        found = bytearray(len(keys) // 32)
        for i in range(len(found)):
            key = keys[32 * i:32 * i + 32]
            block = self.tier.pop(key, None) if mode == core.MISS_DELETE else self.tier.get(key)
            if block is None:
                continue
            if mode == core.MISS_LOAD:
                self.pool.put(keys[32 * i:32 * i + 32], block)
            found[i] = 1
        return bytes(found)

    def check(self):
        """Raise AssertionError unless the server responds to PING and the sentinel block is
        unchanged, both on a connection other than the fuzzed one."""
        if self.checker is None or not self.checker.alive:
            self.checker = core.Connection("127.0.0.1", self.server.port, secret=SECRET,
                                           tenant=SENTINEL_TENANT, timeout_ms=2000)
        self.checker.ping(timeout_ms=2000)
        buffer = bytearray(len(SENTINEL_BLOCK))
        results = self.checker.get_many_into([SENTINEL_KEY], [buffer], timeout_ms=2000)
        assert results == [len(SENTINEL_BLOCK)], f"sentinel GET returned {results}"
        assert buffer == SENTINEL_BLOCK, "sentinel block changed"
        assert self.bad_handler_calls == [], f"bad miss handler calls {self.bad_handler_calls}"
        failures = self.server.stats()["miss_handler_failures"]
        assert failures == 0, f"{failures} miss handler calls failed"
        self.server.take_log()   # keep the bounded log from dropping lines

    def run_one(self, data):
        """Send one fuzz input and check the invariants afterwards."""
        if len(data) < 2:
            data = data + b"\0" * (2 - len(data))
        stage, role = (data[0] & 3) % 3, ROLE_NODE if data[0] & 4 else ROLE_CLIENT
        payload = build_frames(data[1], data[2:])

        sock = connect(self.server.port)
        try:
            handshake(sock, stage, SECRET, TENANT, role)
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass   # the server closes as soon as it rejects a frame
            received, _ = drain(sock, READ_TIMEOUT_S)
        finally:
            sock.close()
        check_responses(received)
        self.check()


def check_responses(data):
    """Raise AssertionError unless `data` is a run of well-formed response frames. A last
    frame cut short by the read timeout is not checked."""
    while len(data) >= HEADER_BYTES:
        response = Response(data[:HEADER_BYTES], b"")
        assert response.magic == MAGIC, f"response without magic: {data[:HEADER_BYTES]!r}"
        assert response.header_valid, f"response header checksum wrong: {response!r}"
        assert response.flags == RESPONSE, f"response flag missing: {response!r}"
        end = HEADER_BYTES + response.payload_len
        if len(data) < end:
            return
        response.payload = data[HEADER_BYTES:end]
        assert response.payload_valid, f"response payload checksum wrong: {response!r}"
        data = data[end:]


def fuzz_main(argv):
    import atheris

    target = Target()
    seeds = seed_inputs()

    def mutate(data, max_size, seed):
        # Start from a valid frame stream often; libFuzzer's corpus stays small because
        # the C server reports no coverage.
        rng = random.Random(seed)
        if len(data) < 2 or rng.random() < 0.3:
            data = rng.choice(seeds)
            if rng.random() < 0.2:
                return data[:max_size]
        return atheris.Mutate(data, max_size)

    # instrument_func patches the functions' code in place.
    atheris.instrument_func(Target.run_one)
    atheris.instrument_func(build_frames)
    atheris.instrument_func(check_responses)
    atheris.Setup(argv, target.run_one, custom_mutator=mutate)
    atheris.Fuzz()   # never returns: libFuzzer exits the process when its bound is reached


if __name__ == "__main__":
    fuzz_main(sys.argv)
