"""On-disk format of spill segments: file names, record headers and record validation.

A segment is a file of records, each starting on a 4096-byte boundary so that O_DIRECT can
read and write it. A record is a fixed header followed by the payload and zero padding up to
the next boundary. A record is valid only if its magic, header CRC, key and payload CRC all
match. A torn record therefore never validates, because a header alone cannot vouch for a
payload the crash cut short. This module does no I/O.
"""
import os
import secrets
import socket
import struct
import time
from typing import NamedTuple

from ems import KEY_BYTES, crc32c

# Offsets and lengths of O_DIRECT I/O must be multiples of the device's logical block size;
# 4096 covers the 512-byte and 4096-byte devices in use.
ALIGN = 4096

MAGIC = b"EMSR"
VERSION = 1

# magic, version, flags, key, payload length in bytes, payload CRC-32C, header CRC-32C.
# The header CRC covers every field before it.
_HEADER = struct.Struct("<4sHH32sQII")
HEADER_BYTES = _HEADER.size
_HEADER_CRC_SPAN = HEADER_BYTES - 4

# Source of the zero padding after a payload (less than ALIGN bytes).
_ZEROS = bytes(ALIGN)

SUFFIX = ".seg"
TEMP_SUFFIX = ".seg.tmp"

assert KEY_BYTES == 32, "the record header stores 32-byte keys"


class Header(NamedTuple):
    """A record header that passed its magic, version and header CRC checks."""

    key: bytes
    length: int
    payload_crc: int


def align_up(size: int) -> int:
    """Round size up to a multiple of ALIGN."""
    return (size + ALIGN - 1) // ALIGN * ALIGN


def record_bytes(length: int) -> int:
    """Return the bytes a record with a payload of length bytes occupies in a segment."""
    return align_up(HEADER_BYTES + length)


def pack_record(view: memoryview, key: bytes, data) -> None:
    """Write one record (header, payload and zero padding) into view.

    view must be exactly record_bytes(len(data)) long. It may hold an earlier record, because
    every byte of it is overwritten.
    """
    payload = memoryview(data).cast("B")
    head = bytearray(_HEADER.pack(MAGIC, VERSION, 0, key, payload.nbytes, crc32c(payload), 0))
    struct.pack_into("<I", head, _HEADER_CRC_SPAN, crc32c(memoryview(head)[:_HEADER_CRC_SPAN]))
    end = HEADER_BYTES + payload.nbytes
    view[:HEADER_BYTES] = head
    view[HEADER_BYTES:end] = payload
    view[end:] = _ZEROS[:len(view) - end]


def parse_header(view: memoryview) -> Header | None:
    """Return the header at the start of view, or None if it is not a valid header."""
    if len(view) < HEADER_BYTES:
        return None
    magic, version, _flags, key, length, payload_crc, header_crc = _HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        return None
    if crc32c(view[:_HEADER_CRC_SPAN]) != header_crc:
        return None
    return Header(key, length, payload_crc)


def check_record(view: memoryview, key: bytes, length: int) -> memoryview | None:
    """Return the payload of the record in view if it is valid and stores key with length
    bytes, else None.

    view contains the whole record as read from disk. It is short if the file was cut.
    """
    header = parse_header(view)
    if header is None or header.key != key or header.length != length:
        return None
    if len(view) < HEADER_BYTES + length:
        return None
    payload = view[HEADER_BYTES:HEADER_BYTES + length]
    if crc32c(payload) != header.payload_crc:
        return None
    return payload


def host_tag() -> str:
    """Return the hostname with dots and dashes made underscores, so file names split on "-"."""
    return socket.gethostname().replace(".", "_").replace("-", "_") or "host"


def new_writer_id() -> str:
    """Return a writer id unique across hosts and processes: hostname, pid and 48 random bits."""
    return f"{host_tag()}-{os.getpid()}-{secrets.token_hex(6)}"


def segment_name(writer_id: str, sequence: int) -> str:
    """Return the published file name of a segment.

    The name starts with the creation time in nanoseconds, so sorting names orders segments
    oldest first across writers. The writer id and sequence make the name unique.
    """
    return f"{time.time_ns():020d}-{writer_id}-{sequence:08d}{SUFFIX}"


def temp_name(name: str) -> str:
    """Return the name a segment is written under before it is published."""
    return name[: -len(SUFFIX)] + TEMP_SUFFIX


def is_published(name: str) -> bool:
    return name.endswith(SUFFIX) and not name.startswith(".")


def temp_owner(name: str) -> tuple[str, int] | None:
    """Return (hostname, pid) of the writer of a temporary segment name, or None if the name
    is not one."""
    if not name.endswith(TEMP_SUFFIX):
        return None
    parts = name[: -len(TEMP_SUFFIX)].split("-")
    if len(parts) != 5 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])
