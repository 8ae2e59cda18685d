"""Malformed and hostile input against a real transfer server on 127.0.0.1.

Every case sends raw frames over a plain socket and asserts the exact status the server
sends back, where it sends one. Then it checks that the daemon survived: the log names the
reason, and a normal client still reads the blocks stored at the start, byte for byte.
The last test runs the fuzz target in tests/fuzz_frame.py for a bounded time.
"""
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time

import pytest

import ems
import ems._core as core
from conftest import make_block, make_key
from fuzz_frame import (AUTH, BAD_REQUEST, DELETE, DIR_REGISTER, DRAIN, EXISTS, GET,
                        HEADER_BYTES,
                        HELLO, LOCAL_ATTACH, LOCAL_COMMIT, OK, PING, PREFETCH, PUT, RESPONSE,
                        ROLE_CLIENT, ROLE_NODE, STATS, TOO_LARGE, UNAUTHENTICATED,
                        UNKNOWN_OPCODE, UNSUPPORTED_VERSION, batch, connect, drain,
                        encode_frame, encode_header, get_payload, handshake, hello_payload,
                        put_payload, read_response)

SECRET = b"bad input secret"
TENANT = b"t"
MAX_PAYLOAD = 64 << 10
IO_TIMEOUT_MS = 300
CLOSE_WAIT_S = 3.0   # seconds a test waits for the server to close, well above IO_TIMEOUT_MS
SERVER_RANGE = struct.pack("<HH", core.PROTO_VERSION_MIN, core.PROTO_VERSION_MAX)
ABOVE_MAX = core.PROTO_VERSION_MAX + 1   # a version no server of this build speaks

# Every reason the server gives when it rejects a frame or drops a connection.
KNOWN_REASONS = (
    "bad magic or header checksum", "unsupported protocol version",
    "payload larger than the limit", "bad opcode, flags or status",
    "closed in the middle of a frame header", "closing idle or stalled connection",
    "did not arrive", "request before authentication",
)


class Daemon:
    """A server with a secret, and the blocks stored in it before any bad input."""

    def __init__(self):
        self.pool = ems.Pool(16 << 20)
        self.server = core.Server(self.pool, host="127.0.0.1", port=0, secret=SECRET,
                                  node_id=1, max_payload=MAX_PAYLOAD,
                                  io_timeout_ms=IO_TIMEOUT_MS)
        self.port = self.server.port
        keys = [make_key(i, "stored") for i in range(3)]
        self.blocks = {key: make_block(key, 1, size)
                       for key, size in zip(keys, (1, 4096, 60000))}
        client = self.client()
        assert client.put_many(list(self.blocks), list(self.blocks.values())) == [0, 0, 0]
        client.close()

    def client(self, tenant="t"):
        return core.Connection("127.0.0.1", self.port, secret=SECRET, tenant=tenant)

    def open(self, stage=2, role=ROLE_CLIENT, tenant=TENANT):
        """A raw socket after `stage` handshake steps (0 none, 1 HELLO, 2 HELLO and AUTH)."""
        sock = connect(self.port)
        handshake(sock, stage, SECRET, tenant, role)
        return sock

    def wait_for_log(self, reason):
        """Return the log lines taken until one contains `reason` (fails after a while)."""
        lines = []
        deadline = time.monotonic() + CLOSE_WAIT_S
        while time.monotonic() < deadline:
            lines += self.server.take_log()
            if any(reason in line for line in lines):
                return lines
            time.sleep(0.01)
        raise AssertionError(f"no log line contains {reason!r}; the log has {lines!r}")

    def stored(self, key, tenant="t"):
        client = self.client(tenant)
        try:
            return client.exists_many([key])[0]
        finally:
            client.close()

    def assert_serving(self):
        """A normal client still pings and reads every stored block unchanged."""
        client = self.client()
        try:
            client.ping()
            buffers = [bytearray(len(block)) for block in self.blocks.values()]
            results = client.get_many_into(list(self.blocks), buffers)
            assert results == [len(block) for block in self.blocks.values()]
            for buffer, block in zip(buffers, self.blocks.values()):
                assert buffer == block
        finally:
            client.close()


@pytest.fixture(scope="module")
def daemon():
    daemon = Daemon()
    yield daemon
    daemon.pool.close()


@pytest.fixture(autouse=True)
def empty_log(daemon):
    """Drop log lines of earlier tests, so each test checks only its own."""
    daemon.server.take_log()


def send(sock, data):
    """Send, tolerating a server that closed after rejecting an earlier part."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def end_stream(sock):
    """Half-close the socket, unless the server has already closed it."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def assert_rejected(daemon, sock, data, status, reason, opcode, request_id, closes=True):
    """Send `data`, expect one response with `status`, then a close (or not)."""
    send(sock, data)
    response = read_response(sock)
    assert response is not None, f"the server closed without a response ({reason})"
    assert response.header_valid
    assert response.flags == RESPONSE
    assert response.status == status
    assert response.opcode == opcode
    assert response.request_id == request_id
    # Since protocol version 2 the server sends its range with UNSUPPORTED_VERSION.
    if status == UNSUPPORTED_VERSION:
        assert response.payload == SERVER_RANGE
    else:
        assert response.payload == b""
    _, closed = drain(sock, CLOSE_WAIT_S if closes else 0.1)
    assert closed == closes
    daemon.wait_for_log(reason)


# ---- header checks: a status response, then the connection is closed --------------------

def corrupt_header_crc(frame):
    return frame[:28] + bytes([frame[28] ^ 0xff]) + frame[29:]


HEADER_CASES = {
    "payload_len_over_limit": (encode_header(PING, MAX_PAYLOAD + 1, 1) + b"x" * 100,
                               TOO_LARGE, "payload larger than the limit"),
    "payload_len_max_u32": (encode_header(PING, 0xffffffff, 1), TOO_LARGE,
                            "payload larger than the limit"),
    "version_above_max": (encode_frame(PING, version=ABOVE_MAX), UNSUPPORTED_VERSION,
                          "unsupported protocol version"),
    "version_0": (encode_frame(PING, version=0), UNSUPPORTED_VERSION,
                  "unsupported protocol version"),
    "bad_magic": (encode_frame(PING, magic=0x31534D46), BAD_REQUEST,
                  "bad magic or header checksum"),
    "bad_header_crc": (corrupt_header_crc(encode_frame(PING)), BAD_REQUEST,
                       "bad magic or header checksum"),
    "opcode_0": (encode_frame(0), BAD_REQUEST, "bad opcode, flags or status"),
    "opcode_18": (encode_frame(UNKNOWN_OPCODE), BAD_REQUEST, "bad opcode, flags or status"),
    # Version 1 has no DRAIN: rejected as the previous release rejects an unknown opcode.
    "drain_in_version_1": (encode_frame(DRAIN, struct.pack("<I", 1)), BAD_REQUEST,
                           "bad opcode, flags or status"),
    "opcode_ffff": (encode_frame(0xffff), BAD_REQUEST, "bad opcode, flags or status"),
    "response_flag": (encode_frame(GET, flags=RESPONSE), BAD_REQUEST,
                      "bad opcode, flags or status"),
    "unknown_flag": (encode_frame(PING, flags=0x8000), BAD_REQUEST,
                     "bad opcode, flags or status"),
    "status_in_request": (encode_frame(PING, status=1), BAD_REQUEST,
                          "bad opcode, flags or status"),
    "crc_without_payload": (encode_header(PING, 0, 1234), BAD_REQUEST,
                            "bad opcode, flags or status"),
}


@pytest.mark.parametrize("stage", [0, 2], ids=["fresh", "authenticated"])
@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_header_rejected(daemon, case, stage):
    data, status, reason = HEADER_CASES[case]
    bad_frames = daemon.server.stats()["bad_frames"]
    sock = daemon.open(stage)
    try:
        # The response to a header that fails to decode has opcode PING and request id 0.
        assert_rejected(daemon, sock, data, status, reason, PING, 0)
    finally:
        sock.close()
    assert daemon.server.stats()["bad_frames"] == bad_frames + 1
    daemon.assert_serving()


# ---- request checks after decoding: the server refuses the request and closes -----------

def hello(tenant=b"x", **fields):
    return encode_frame(HELLO, hello_payload(tenant, **fields), request_id=9)


NEW_KEY = make_key(0, "never stored")

REFUSED_CASES = {
    # name: (stage, role, frame, status, reason)
    "get_before_hello": (0, ROLE_CLIENT, encode_frame(GET, get_payload([NEW_KEY], [8]), 9),
                         UNAUTHENTICATED, "request before authentication"),
    "stats_before_hello": (0, ROLE_CLIENT, encode_frame(STATS, request_id=9),
                           UNAUTHENTICATED, "request before authentication"),
    "put_before_auth": (1, ROLE_CLIENT, encode_frame(PUT, put_payload([NEW_KEY], [b"x"]), 9),
                        UNAUTHENTICATED, "request before authentication"),
    "delete_before_auth": (1, ROLE_CLIENT, encode_frame(DELETE, batch([NEW_KEY]), 9),
                           UNAUTHENTICATED, "request before authentication"),
    "prefetch_before_auth": (1, ROLE_CLIENT, encode_frame(PREFETCH, batch([NEW_KEY]), 9),
                             UNAUTHENTICATED, "request before authentication"),
    "auth_before_hello": (0, ROLE_CLIENT, encode_frame(AUTH, bytes(32), 9), BAD_REQUEST,
                          "AUTH out of order"),
    "second_auth": (2, ROLE_CLIENT, encode_frame(AUTH, bytes(32), 9), BAD_REQUEST,
                    "AUTH out of order"),
    "wrong_proof": (1, ROLE_CLIENT, encode_frame(AUTH, bytes(32), 9), UNAUTHENTICATED,
                    "wrong cluster secret"),
    "short_proof": (1, ROLE_CLIENT, encode_frame(AUTH, bytes(31), 9), UNAUTHENTICATED,
                    "wrong cluster secret"),
    "second_hello": (1, ROLE_CLIENT, hello(), BAD_REQUEST, "second HELLO"),
    "hello_after_auth": (2, ROLE_CLIENT, hello(), BAD_REQUEST, "second HELLO"),
    "tenant_65_bytes": (0, ROLE_CLIENT, hello(b"a" * 65), BAD_REQUEST,
                        "tenant must be 1 to 64 printable ASCII characters"),
    "tenant_with_space": (0, ROLE_CLIENT, hello(b"a b"), BAD_REQUEST,
                          "tenant must be 1 to 64 printable ASCII characters"),
    "tenant_with_del": (0, ROLE_CLIENT, hello(b"a\x7f"), BAD_REQUEST,
                        "tenant must be 1 to 64 printable ASCII characters"),
    "tenant_empty": (0, ROLE_CLIENT, hello(b""), BAD_REQUEST,
                     "tenant must be 1 to 64 printable ASCII characters"),
    "tenant_len_mismatch": (0, ROLE_CLIENT, hello(b"abc", tenant_len=5), BAD_REQUEST,
                            "tenant must be 1 to 64 printable ASCII characters"),
    "hello_7_bytes": (0, ROLE_CLIENT, encode_frame(HELLO, bytes(7), 9), BAD_REQUEST,
                      "HELLO shorter than 8 bytes"),
    "unknown_role": (0, ROLE_CLIENT, hello(role=2), BAD_REQUEST, "unknown role"),
    "versions_above_max": (0, ROLE_CLIENT,
                           hello(min_version=ABOVE_MAX, max_version=ABOVE_MAX + 1),
                           UNSUPPORTED_VERSION,
                           f"client speaks versions {ABOVE_MAX}-{ABOVE_MAX + 1}, this server "
                           f"{core.PROTO_VERSION_MIN}-{core.PROTO_VERSION_MAX}"),
    # A peer two versions back: version 0 stands for N-2 of version 2.
    "versions_0_to_0": (0, ROLE_CLIENT, hello(min_version=0, max_version=0),
                        UNSUPPORTED_VERSION, "client speaks versions 0-0"),
    "versions_reversed": (0, ROLE_CLIENT, hello(min_version=1, max_version=0),
                          UNSUPPORTED_VERSION, "client speaks versions 1-0"),
    "local_op_on_tcp": (2, ROLE_CLIENT, encode_frame(LOCAL_ATTACH, request_id=9), BAD_REQUEST,
                        "local operation on a TCP connection"),
    "local_commit_on_tcp": (2, ROLE_CLIENT, encode_frame(LOCAL_COMMIT, batch([]), 9),
                            BAD_REQUEST, "local operation on a TCP connection"),
    "block_op_as_node": (2, ROLE_NODE, encode_frame(GET, get_payload([NEW_KEY], [8]), 9),
                         BAD_REQUEST, "block operation on a node connection"),
    "prefetch_as_node": (2, ROLE_NODE, encode_frame(PREFETCH, batch([NEW_KEY]), 9),
                         BAD_REQUEST, "block operation on a node connection"),
    "dir_register_as_client": (2, ROLE_CLIENT, encode_frame(DIR_REGISTER, batch([NEW_KEY], 5), 9),
                               UNAUTHENTICATED, "directory registration needs the node role"),
    "put_shorter_than_head": (2, ROLE_CLIENT, encode_frame(PUT, b"\x01\0\0\0", 9), BAD_REQUEST,
                              "PUT shorter than a batch head"),
    "put_n_max_u32": (2, ROLE_CLIENT,
                      encode_frame(PUT, struct.pack("<II", 0xffffffff, 0) + NEW_KEY
                                   + struct.pack("<Q", 1) + b"x", 9),
                      BAD_REQUEST, "PUT key table exceeds the payload"),
    "put_n_one_too_many": (2, ROLE_CLIENT,
                           encode_frame(PUT, struct.pack("<II", 2, 0) + NEW_KEY
                                        + struct.pack("<Q", 1) + b"x", 9),
                           BAD_REQUEST, "PUT key table exceeds the payload"),
    "put_lengths_over_data": (2, ROLE_CLIENT,
                              encode_frame(PUT, batch([NEW_KEY], extra=struct.pack("<Q", 10)
                                                      + b"x" * 5), 9),
                              BAD_REQUEST, "PUT lengths do not add up to the payload"),
    "put_lengths_under_data": (2, ROLE_CLIENT,
                               encode_frame(PUT, batch([NEW_KEY], extra=struct.pack("<Q", 3)
                                                       + b"x" * 5), 9),
                               BAD_REQUEST, "PUT lengths do not add up to the payload"),
    # Lengths whose 64-bit sum wraps around to the data size once passed the check.
    "put_lengths_wrap_around": (2, ROLE_CLIENT,
                                encode_frame(PUT, batch([NEW_KEY, make_key(1, "never stored")],
                                                        extra=struct.pack("<QQ", 5, 2**64 - 3)
                                                        + b"x" * 2), 9),
                                BAD_REQUEST, "PUT lengths do not add up to the payload"),
}


@pytest.mark.parametrize("case", list(REFUSED_CASES))
def test_bad_request_refused(daemon, case):
    stage, role, frame, status, reason = REFUSED_CASES[case]
    opcode = struct.unpack_from("<H", frame, 6)[0]
    auth_failures = daemon.server.stats()["auth_failures"]
    sock = daemon.open(stage, role)
    try:
        assert_rejected(daemon, sock, frame, status, reason, opcode, 9)
    finally:
        sock.close()
    expected_failures = auth_failures + (reason == "wrong cluster secret")
    assert daemon.server.stats()["auth_failures"] == expected_failures
    assert not daemon.stored(NEW_KEY)
    daemon.assert_serving()


# ---- payload checks: the server rejects the request and keeps the connection ------------

def with_bad_crc(frame):
    """Return the frame with a wrong payload checksum and a valid header checksum."""
    fields = struct.unpack_from("<IHHQIIHH", frame)
    header = encode_header(fields[2], fields[4], fields[5] ^ 1, fields[3], fields[1],
                           fields[6], fields[7], fields[0])
    return header + frame[HEADER_BYTES:]


REJECTED_CASES = {
    "put_payload_crc": (with_bad_crc(encode_frame(PUT, put_payload([NEW_KEY], [b"x" * 100]), 9)),
                        BAD_REQUEST, "PUT payload checksum mismatch; nothing of it was stored"),
    "exists_payload_crc": (with_bad_crc(encode_frame(EXISTS, batch([NEW_KEY]), 9)),
                           BAD_REQUEST, "payload checksum mismatch"),
    "exists_n_over_payload": (encode_frame(EXISTS, struct.pack("<II", 1000, 0) + NEW_KEY, 9),
                              BAD_REQUEST, "payload length does not match the key count"),
    "exists_n_max_u32": (encode_frame(EXISTS, struct.pack("<II", 0xffffffff, 0) + NEW_KEY, 9),
                         BAD_REQUEST, "payload length does not match the key count"),
    "prefetch_n_over_payload": (encode_frame(PREFETCH, struct.pack("<II", 2, 0) + NEW_KEY, 9),
                                BAD_REQUEST, "payload length does not match the key count"),
    "get_missing_lengths": (encode_frame(GET, batch([NEW_KEY]), 9), BAD_REQUEST,
                            "payload length does not match the key count"),
    "delete_shorter_than_head": (encode_frame(DELETE, b"\x01\0\0", 9), BAD_REQUEST,
                                 "payload length does not match the key count"),
    "get_response_over_limit": (encode_frame(GET, get_payload([NEW_KEY], [MAX_PAYLOAD]), 9),
                                TOO_LARGE, "GET response would exceed the payload limit"),
    # Lengths whose 64-bit sum wraps around: the server once sized its response buffer
    # from the wrapped sum and then copied a real block past its end.
    "get_lengths_wrap_around": (None, TOO_LARGE, "GET response would exceed the payload limit"),
}


@pytest.mark.parametrize("case", list(REJECTED_CASES))
def test_bad_payload_rejected(daemon, case):
    frame, status, reason = REJECTED_CASES[case]
    if frame is None:
        stored_key, block = list(daemon.blocks.items())[2]
        lengths = [len(block), 2**64 - len(block)]
        frame = encode_frame(GET, get_payload([stored_key, NEW_KEY], lengths), 9)
    opcode = struct.unpack_from("<H", frame, 6)[0]
    sock = daemon.open(2)
    try:
        assert_rejected(daemon, sock, frame, status, reason, opcode, 9, closes=False)

        # The same connection still serves requests.
        send(sock, encode_frame(PING, b"still here", 10))
        response = read_response(sock)
        assert (response.status, response.request_id, response.payload) == (OK, 10, b"still here")
    finally:
        sock.close()
    assert not daemon.stored(NEW_KEY)
    daemon.assert_serving()


# ---- truncated frames: the server closes on end of stream or after io_timeout -----------

GET_FRAME = encode_frame(GET, get_payload([NEW_KEY], [8]), 9)
PUT_FRAME = encode_frame(PUT, put_payload([NEW_KEY], [b"y" * 5000]), 9)
HELLO_FRAME = encode_frame(HELLO, hello_payload(TENANT), 9)

TRUNCATED_CASES = {
    # name: (stage, bytes sent, log text when the client closes, log text when it stalls)
    "header": (2, GET_FRAME[:10], "closed in the middle of a frame header",
               "closing idle or stalled connection"),
    "header_31_bytes": (0, GET_FRAME[:31], "closed in the middle of a frame header",
                        "closing idle or stalled connection"),
    "get_payload": (2, GET_FRAME[:HEADER_BYTES + 20],
                    "payload of opcode 4 from 127.0.0.1:{port} did not arrive: "
                    "Connection reset by peer",
                    "payload of opcode 4 from 127.0.0.1:{port} did not arrive: "
                    "Connection timed out"),
    "hello_payload": (0, HELLO_FRAME[:HEADER_BYTES + 3],
                      "payload of opcode 2 from 127.0.0.1:{port} did not arrive: "
                      "Connection reset by peer",
                      "payload of opcode 2 from 127.0.0.1:{port} did not arrive: "
                      "Connection timed out"),
    "put_batch_head": (2, PUT_FRAME[:HEADER_BYTES + 4],
                       "PUT from 127.0.0.1:{port} broke off: Connection reset by peer",
                       "PUT from 127.0.0.1:{port} broke off: Connection timed out"),
    "put_key_table": (2, PUT_FRAME[:HEADER_BYTES + 20],
                      "PUT from 127.0.0.1:{port} broke off: Connection reset by peer",
                      "PUT from 127.0.0.1:{port} broke off: Connection timed out"),
    "put_block_data": (2, PUT_FRAME[:HEADER_BYTES + 1000],
                       "PUT from 127.0.0.1:{port} broke off: Connection reset by peer",
                       "PUT from 127.0.0.1:{port} broke off: Connection timed out"),
}


@pytest.mark.parametrize("ending", ["close", "stall"])
@pytest.mark.parametrize("case", list(TRUNCATED_CASES))
def test_truncated_frame_closed(daemon, case, ending):
    stage, data, on_close, on_stall = TRUNCATED_CASES[case]
    sock = daemon.open(stage)
    client_port = sock.getsockname()[1]
    try:
        sock.sendall(data)
        started = time.monotonic()
        if ending == "close":
            sock.shutdown(socket.SHUT_WR)
        received, closed = drain(sock, CLOSE_WAIT_S)
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert received == b""
    assert closed
    if ending == "stall":
        # The server waits io_timeout for the rest of the frame, then gives up.
        assert IO_TIMEOUT_MS / 1000 * 0.8 <= elapsed < IO_TIMEOUT_MS / 1000 + 1.5
    reason = on_close if ending == "close" else on_stall
    daemon.wait_for_log(reason.format(port=client_port))
    assert not daemon.stored(NEW_KEY)
    daemon.assert_serving()


# ---- random garbage ---------------------------------------------------------------------

def test_random_garbage_rejected(daemon):
    rng = random.Random(20240611)
    bad_frames = daemon.server.stats()["bad_frames"]
    headers_sent = 0
    for i in range(300):
        data = rng.randbytes(rng.randint(1, 600))
        stage = i % 3
        sock = daemon.open(stage)
        try:
            send(sock, data)
            end_stream(sock)
            response = read_response(sock)
            _, closed = drain(sock, CLOSE_WAIT_S)
        finally:
            sock.close()

        # Random bytes fail the magic check as soon as a whole header has arrived;
        # fewer bytes end the stream inside the header.
        if len(data) >= HEADER_BYTES:
            headers_sent += 1
            assert response is not None, f"no response to garbage #{i} ({len(data)} bytes)"
            assert response.status == BAD_REQUEST
            reason = "bad magic or header checksum"
        else:
            assert response is None
            reason = "closed in the middle of a frame header"
        assert closed
        lines = daemon.wait_for_log(reason)
        assert all(any(known in line for known in KNOWN_REASONS) for line in lines), lines
        daemon.assert_serving()
    assert daemon.server.stats()["bad_frames"] == bad_frames + headers_sent


# ---- fuzzing ----------------------------------------------------------------------------

def test_fuzz_target_runs_clean(tmp_path):
    """The atheris target in fuzz_frame.py runs for a bounded time without a finding."""
    target = os.path.join(os.path.dirname(__file__), "fuzz_frame.py")
    command = [sys.executable, target, "-max_total_time=20", "-atheris_runs=1000000",
               f"-artifact_prefix={tmp_path}/", "-seed=1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert os.listdir(tmp_path) == [], "the fuzzer wrote crash artifacts"
    done = re.search(r"Done (\d+)", output)
    assert done, output[-4000:]
    assert int(done.group(1)) >= 1000, output[-4000:]
