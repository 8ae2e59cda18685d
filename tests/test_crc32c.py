"""ems.crc32c: the CRC-32C checksum that guards blocks on networks and disks."""
import numpy as np
import pytest

import ems
from ems import errors
from ems._core import crc32c_hardware


def test_crc32c_check_value():
    assert ems.crc32c(b"123456789") == 0xE3069283


def test_crc32c_empty():
    assert ems.crc32c(b"") == 0


def test_crc32c_chains():
    data = bytes(range(256)) * 5
    whole = ems.crc32c(data)
    for cut in (0, 1, 7, 8, 9, 640, len(data)):
        assert ems.crc32c(data[cut:], ems.crc32c(data[:cut])) == whole


@pytest.mark.parametrize("size", [1, 7, 8, 63, 4096, 65535, 65536, (1 << 20) + 3])
def test_crc32c_paths_agree(size):
    """The CPU-instruction path and the table loop agree, below and above the size where
    the GIL is released."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    assert ems.crc32c(data) == ems.crc32c(data, software=True)


def test_crc32c_buffer_kinds():
    raw = bytes(range(200))
    expected = ems.crc32c(raw)
    assert ems.crc32c(bytearray(raw)) == expected
    assert ems.crc32c(memoryview(raw)) == expected
    assert ems.crc32c(np.frombuffer(raw, dtype=np.uint8)) == expected
    assert ems.crc32c(np.frombuffer(raw, dtype=np.uint32)) == expected


def test_crc32c_bit_flip_detected():
    data = bytearray(8192)
    clean = ems.crc32c(data)
    data[5000] ^= 1
    assert ems.crc32c(data) != clean


def test_crc32c_not_contiguous():
    array = np.zeros((64, 64), dtype=np.uint8)[:, ::2]
    with pytest.raises(errors.BufferNotContiguousError, match="data"):
        ems.crc32c(array)


def test_crc32c_not_a_buffer():
    with pytest.raises(TypeError, match="data"):
        ems.crc32c("text")


def test_crc32c_hardware_flag():
    assert isinstance(crc32c_hardware(), bool)
