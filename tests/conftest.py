"""Shared fixtures and helpers for the EMS Python tests.

Every pool a test creates through `make_pool` is closed at teardown, so a failing test
does not leave its memfd mapped for the rest of the session.
"""

import hashlib

import pytest

import ems

KiB = 1 << 10
MiB = 1 << 20


def make_key(i, tag=""):
    """Return a 32-byte key derived from an integer and an optional tag."""
    return hashlib.blake2b(f"{tag}:{i}".encode(), digest_size=32).digest()


def make_block(key, version, size):
    """Return a `size`-byte payload that only (key, version, size) produces.

    Layout: key (32 bytes) | version (8 bytes, little-endian) | blake2b(key + version)
    (16 bytes) | filler repeated from a digest of key, version and size. A reader checks a
    block by rebuilding it from the key and version in its header and comparing bytes.
    """
    header = key + version.to_bytes(8, "little")
    header += hashlib.blake2b(header, digest_size=16).digest()
    seed = hashlib.blake2b(header + size.to_bytes(8, "little"), digest_size=64).digest()
    body_len = max(0, size - len(header))
    body = (seed * (body_len // len(seed) + 1))[:body_len]
    return (header + body)[:size]


def block_version(block):
    """Return the version stored in a block made by `make_block` (56 bytes or more)."""
    return int.from_bytes(block[32:40], "little")


class Device:
    """A torch.device stand-in: `type` is "cpu" or "cuda", str() gives "cuda:0"."""

    def __init__(self, kind):
        self.type = kind

    def __str__(self):
        return self.type if self.type == "cpu" else f"{self.type}:0"


class ArrayInterfaceOnly:
    """An object that exposes its memory through __array_interface__ alone."""

    def __init__(self, array):
        self.array = array
        self.__array_interface__ = array.__array_interface__


class TensorLike:
    """A torch tensor stand-in with the methods the pool reads (data_ptr and friends)."""

    def __init__(self, array, device="cpu"):
        self.array = array
        self.shape = array.shape
        self.device = Device(device)

    def data_ptr(self):
        return self.array.ctypes.data

    def is_contiguous(self):
        return self.array.flags.c_contiguous

    def numel(self):
        return self.array.size

    def element_size(self):
        return self.array.itemsize

    def stride(self):
        return tuple(n // self.array.itemsize for n in self.array.strides)


@pytest.fixture
def make_pool():
    """Factory for owner pools that are closed when the test ends."""
    pools = []

    def factory(capacity, **kwargs):
        pool = ems.Pool(capacity, **kwargs)
        pools.append(pool)
        return pool

    yield factory
    for pool in reversed(pools):
        if not pool.closed:
            pool.close()


@pytest.fixture
def pool(make_pool):
    """A 4 MiB owner pool with 256 KiB slabs on 4 KiB pages."""
    return make_pool(4 * MiB, slab_size=256 * KiB, pages="small")


# ---- vLLM connector tests ----------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny random-weight model directory (built once per session)."""
    import vllm_helpers
    return vllm_helpers.tiny_model_dir(tmp_path_factory)


@pytest.fixture
def vllm_env(monkeypatch):
    """Set the environment vLLM needs here and remove the EMS_* setting overrides."""
    import vllm_helpers
    for name, value in vllm_helpers.VLLM_ENV.items():
        monkeypatch.setenv(name, value)
    for name in vllm_helpers.EMS_ENV:
        monkeypatch.delenv(name, raising=False)


# ---- ZooKeeper (cluster membership tests) --------------------------------------------------


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory):
    """A real ZooKeeper server on 127.0.0.1, shared by the session's tests (see
    zookeeper_server.py). Skips when java or Debian's zookeeper package is missing."""
    from zookeeper_server import ZooKeeperMissing, ZooKeeperServer
    try:
        server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"))
    except ZooKeeperMissing as exc:
        pytest.skip(f"no ZooKeeper server to test with: {exc}")
    with server:
        yield server
