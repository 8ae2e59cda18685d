"""SpillStore on real files: round trips, restart, torn and corrupt records, quota, full
disk, and two writers sharing a directory. Each behaviour runs on io_uring and on posix."""
import errno
import hashlib
import logging
import os
import subprocess
import tempfile

import pytest

from ems.tiering import SpillStore
from ems.tiering import io as spill_io
from ems.tiering import segment as fmt

MiB = 1 << 20


def _uring_unavailable_reason():
    try:
        spill_io.UringBackend().close()
    except (ImportError, OSError) as error:
        return f"io_uring cannot be set up here: {error}"
    return None


_URING_SKIP = _uring_unavailable_reason()


@pytest.fixture(params=["uring", "posix"])
def io_mode(request):
    if request.param == "uring" and _URING_SKIP:
        pytest.skip(_URING_SKIP)
    return request.param


def key(i: int) -> bytes:
    return hashlib.sha256(b"spill-%d" % i).digest()


def payload(i: int, size: int) -> bytes:
    return hashlib.shake_256(b"data-%d" % i).digest(size)


def segments(directory):
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if fmt.is_published(n))


def read(store, keys, sizes, fill=0xAA):
    buffers = [bytearray([fill]) * size for size in sizes]
    return store.get_many_into(keys, buffers), buffers


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))


@pytest.mark.parametrize("size", [1, 4095, 4096, 65536, MiB + 1])
def test_round_trip_sizes(tmp_path, io_mode, size):
    with SpillStore(tmp_path, 64 * MiB, io=io_mode, segment_bytes=4 * MiB) as store:
        keys = [key(i) for i in range(3)]
        datas = [payload(i, size) for i in range(3)]
        assert store.put_many(keys, datas) == [True] * 3
        found, buffers = read(store, keys, [size] * 3)
        assert found == [True] * 3
        for buffer, data in zip(buffers, datas):
            assert bytes(buffer) == data
        assert store.stats()["io_mode"] == io_mode
        assert store.stats()["spills"] == 3


def test_many_reads_in_one_batch(tmp_path, io_mode):
    """One call with more reads and writes than the store keeps in flight (depth)."""
    depth = 8
    count = 3 * depth + 5
    keys = [key(i) for i in range(count)]
    datas = [payload(i, 100 + i) for i in range(count)]
    with SpillStore(tmp_path, 64 * MiB, io=io_mode, depth=depth) as store:
        assert all(store.put_many(keys, datas))
        found, buffers = read(store, keys[::-1], [len(d) for d in datas[::-1]])
        assert found == [True] * count
        assert [bytes(b) for b in buffers] == datas[::-1]


def test_put_existing_key_not_rewritten(tmp_path, io_mode):
    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        assert store.put_many([key(1)], [payload(1, 5000)]) == [True]
        before = store.stats()["bytes"]
        assert store.put_many([key(1)], [payload(1, 5000)]) == [True]
        assert store.stats()["bytes"] == before
        assert store.stats()["spills"] == 1
        assert store.put_many([key(2), key(2)], [payload(2, 5000)] * 2) == [True, True]
        assert store.stats()["spills"] == 2


def test_missing_key_is_miss(tmp_path, io_mode):
    with SpillStore(tmp_path, 8 * MiB, io=io_mode) as store:
        found, buffers = read(store, [key(1)], [100])
        assert found == [False]
        assert bytes(buffers[0]) == b"\xaa" * 100
        assert store.stats()["misses"] == 1


def test_restart_rebuilds_index(tmp_path, io_mode):
    keys = [key(i) for i in range(40)]
    datas = [payload(i, 1000 + 3000 * i) for i in range(40)]
    with SpillStore(tmp_path, 64 * MiB, io=io_mode, segment_bytes=MiB) as store:
        assert all(store.put_many(keys, datas))
    assert len(segments(tmp_path)) > 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(fmt.TEMP_SUFFIX)]

    with SpillStore(tmp_path, 64 * MiB, io=io_mode, segment_bytes=MiB) as store:
        assert store.exists_many(keys) == [True] * 40
        found, buffers = read(store, keys, [len(d) for d in datas])
        assert found == [True] * 40
        assert [bytes(b) for b in buffers] == datas
        assert store.stats()["blocks"] == 40


def _three_blocks(directory, io_mode, size=10000):
    keys = [key(i) for i in range(3)]
    datas = [payload(i, size) for i in range(3)]
    with SpillStore(directory, 64 * MiB, io=io_mode) as store:
        assert all(store.put_many(keys, datas))
    [path] = segments(directory)
    return path, keys, datas


@pytest.mark.parametrize("cut", [20, 6000], ids=["in_header", "in_payload"])
def test_truncated_record_is_miss(tmp_path, io_mode, cut):
    path, keys, datas = _three_blocks(tmp_path, io_mode)
    record = fmt.record_bytes(10000)
    os.truncate(path, 2 * record + cut)

    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        assert store.exists_many(keys) == [True, True, False]
        found, buffers = read(store, keys, [10000] * 3)
        assert found == [True, True, False]
        assert bytes(buffers[0]) == datas[0]
        assert bytes(buffers[1]) == datas[1]
        assert bytes(buffers[2]) == b"\xaa" * 10000


def test_garbage_after_last_record_ignored(tmp_path, io_mode):
    path, keys, datas = _three_blocks(tmp_path, io_mode)
    with open(path, "ab") as f:
        f.write(os.urandom(3 * fmt.ALIGN))

    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        found, buffers = read(store, keys, [10000] * 3)
        assert found == [True] * 3
        assert [bytes(b) for b in buffers] == datas
        assert store.stats()["blocks"] == 3


def test_torn_payload_behind_valid_header(tmp_path, io_mode):
    """A crash that wrote a whole header but only part of the payload must not validate."""
    path, keys, datas = _three_blocks(tmp_path, io_mode)
    torn_key, torn_data = key(99), payload(99, 10000)
    record = bytearray(fmt.record_bytes(len(torn_data)))
    fmt.pack_record(memoryview(record), torn_key, torn_data)
    record[fmt.HEADER_BYTES + 5000:] = bytes(len(record) - fmt.HEADER_BYTES - 5000)
    with open(path, "ab") as f:
        f.write(record)

    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        found, buffers = read(store, keys + [torn_key], [10000] * 4)
        assert found == [True, True, True, False]
        assert bytes(buffers[3]) == b"\xaa" * 10000
        assert store.stats()["checksum_failures"] == 1


def test_flipped_payload_byte_is_miss(tmp_path, io_mode):
    path, keys, datas = _three_blocks(tmp_path, io_mode)
    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        flip_byte(path, fmt.record_bytes(10000) + fmt.HEADER_BYTES + 1234)
        found, buffers = read(store, keys, [10000] * 3)
        assert found == [True, False, True]
        assert bytes(buffers[0]) == datas[0]
        assert bytes(buffers[1]) == b"\xaa" * 10000
        assert bytes(buffers[2]) == datas[2]
        stats = store.stats()
        assert stats["checksum_failures"] == 1
        assert stats["hits"] == 2
        assert stats["misses"] == 1


def test_flipped_key_byte_is_miss(tmp_path, io_mode):
    path, keys, datas = _three_blocks(tmp_path, io_mode)
    key_offset = fmt.record_bytes(10000) + 8  # magic, version and flags come first
    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        flip_byte(path, key_offset + 3)
        found, buffers = read(store, keys, [10000] * 3)
        assert found == [True, False, True]
        assert bytes(buffers[1]) == b"\xaa" * 10000
        assert store.stats()["checksum_failures"] == 1

    # After a restart the scan stops at the bad header, so later records are lost too.
    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        found, buffers = read(store, keys, [10000] * 3)
        assert found == [True, False, False]
        assert bytes(buffers[0]) == datas[0]


def test_quota_reclaims_oldest_segments(tmp_path, io_mode):
    quota = MiB
    size = 16000  # one 16 KiB record each
    keys = [key(i) for i in range(200)]
    with SpillStore(tmp_path, quota, io=io_mode, segment_bytes=256 * 1024) as store:
        for start in range(0, 200, 10):
            chunk = range(start, start + 10)
            assert all(store.put_many([keys[i] for i in chunk], [payload(i, size) for i in chunk]))
            assert store.stats()["bytes"] <= quota
        stats = store.stats()
        assert stats["reclaimed_segments"] > 0
        assert stats["bytes"] <= quota

        found, buffers = read(store, keys, [size] * 200)
        assert found[0] is False
        assert found[-1] is True
        assert all(found[found.index(True):])
        # Every block the quota took is counted as evicted, and no other.
        assert store.stats()["evicted_blocks"] == found.index(True)
        for i in range(found.index(True), 200):
            assert bytes(buffers[i]) == payload(i, size)
    on_disk = sum(os.path.getsize(p) for p in segments(tmp_path))
    assert on_disk <= quota


def test_block_over_quota_rejected(tmp_path, io_mode):
    with SpillStore(tmp_path, 64 * 1024, io=io_mode) as store:
        assert store.put_many([key(1), key(2)], [payload(1, 100000), payload(2, 100)]) == [False, True]
        assert store.stats()["spill_failures"] == 1
        assert read(store, [key(2)], [100])[0] == [True]


class _FullDiskBackend(spill_io._Queue):
    """Wraps a backend so that write requests after the first `allowed` fail with ENOSPC."""

    def __init__(self, inner, allowed):
        self.inner, self.allowed = inner, allowed
        self.mode, self.depth = inner.mode, inner.depth
        self.failed = []  # (tag, OSError) of rejected writes, returned by the next complete()

    @property
    def in_flight(self):
        return self.inner.in_flight + len(self.failed)

    def submit(self, op, fd, offset, view, tag):
        if op == spill_io.WRITE:
            if self.allowed == 0:
                self.failed.append((tag, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
                return
            self.allowed -= 1
        self.inner.submit(op, fd, offset, view, tag)

    def complete(self):
        failed, self.failed = self.failed, []
        return failed + (self.inner.complete() if self.inner.in_flight else [])

    def close(self):
        self.inner.close()


def _check_spilling_stops(store, caplog, size, batches):
    """Put batches until the disk is full; check that spilling stops and reads go on."""
    stored = []
    for b in range(batches):
        keys = [key(b * 4 + j) for j in range(4)]
        results = store.put_many(keys, [payload(b * 4 + j, size) for j in range(4)])
        stored += [k for k, ok in zip(keys, results) if ok]
        if not all(results):
            break
    stats = store.stats()
    assert stats["enospc"] == 1
    assert stats["spilling"] is False
    assert stored

    assert store.put_many([key(10_000)], [payload(0, size)]) == [False]
    assert store.stats()["enospc"] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "full" in r.message]
    assert len(warnings) == 1

    found, buffers = read(store, stored, [size] * len(stored))
    assert all(found)
    for k, buffer in zip(stored, buffers):
        i = next(i for i in range(10_000) if key(i) == k)
        assert bytes(buffer) == payload(i, size)


def test_enospc_simulated_stops_spilling(tmp_path, io_mode, caplog):
    caplog.set_level(logging.WARNING, logger="ems.tiering")
    with SpillStore(tmp_path, 64 * MiB, io=io_mode, segment_bytes=MiB) as store:
        store._backend = _FullDiskBackend(store._backend, allowed=3)
        _check_spilling_stops(store, caplog, 20000, batches=10)


@pytest.fixture
def small_tmpfs():
    """A 2 MiB tmpfs, mounted for the test and unmounted after it (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the simulated ENOSPC test covers this")
    mount_point = tempfile.mkdtemp(prefix="ems-spill-tmpfs-")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mount_point],
                          capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(mount_point)
        pytest.skip(f"mount -t tmpfs failed: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", mount_point], check=True)
    os.rmdir(mount_point)


def test_enospc_on_full_tmpfs(small_tmpfs, io_mode, caplog):
    caplog.set_level(logging.WARNING, logger="ems.tiering")
    with SpillStore(small_tmpfs, 64 * MiB, io=io_mode, segment_bytes=512 * 1024) as store:
        _check_spilling_stops(store, caplog, 65536, batches=40)


def test_two_writers_share_directory(tmp_path, io_mode):
    a = SpillStore(tmp_path, 64 * MiB, io=io_mode)
    b = SpillStore(tmp_path, 64 * MiB, io=io_mode)
    assert a.writer_id != b.writer_id
    keys_a = [key(i) for i in range(5)]
    keys_b = [key(i) for i in range(5, 10)]
    assert all(a.put_many(keys_a, [payload(i, 5000) for i in range(5)]))
    assert all(b.put_many(keys_b, [payload(i, 5000) for i in range(5, 10)]))

    # Unpublished segments stay private to their writer.
    b.refresh()
    assert b.exists_many(keys_a) == [False] * 5

    a.close()
    b.refresh()
    found, buffers = read(b, keys_a, [5000] * 5)
    assert found == [True] * 5
    assert [bytes(x) for x in buffers] == [payload(i, 5000) for i in range(5)]
    b.close()

    assert len(segments(tmp_path)) == 2
    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as c:
        found, buffers = read(c, keys_a + keys_b, [5000] * 10)
        assert found == [True] * 10
        assert [bytes(x) for x in buffers] == [payload(i, 5000) for i in range(10)]


def test_segment_deleted_under_reader(tmp_path, io_mode):
    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as writer:
        writer.put_many([key(0)], [payload(0, 5000)])
    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as writer:
        writer.put_many([key(1)], [payload(1, 5000)])
    first, second = segments(tmp_path)

    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as reader:
        os.unlink(first)
        found, buffers = read(reader, [key(0), key(1)], [5000, 5000])
        assert found == [False, True]
        assert bytes(buffers[1]) == payload(1, 5000)
        assert reader.exists_many([key(0)]) == [False]

        os.unlink(second)
        reader.refresh()
        assert reader.exists_many([key(1)]) == [False]
        assert reader.stats()["segments"] == 0


def test_auto_falls_back_to_posix(tmp_path, monkeypatch, caplog):
    def no_uring(*args, **kwargs):
        raise OSError(errno.EPERM, "io_uring_setup blocked by seccomp")

    monkeypatch.setattr(spill_io, "UringBackend", no_uring)
    monkeypatch.setattr(spill_io, "_fallback_logged", False)
    caplog.set_level(logging.WARNING, logger="ems.tiering")
    with SpillStore(tmp_path, 8 * MiB, io="auto") as store:
        stats = store.stats()
        assert stats["io_mode"] == "posix"
        assert "seccomp" in stats["io_fallback"]
        assert store.put_many([key(1)], [payload(1, 300)]) == [True]
        assert read(store, [key(1)], [300])[0] == [True]
    assert len([r for r in caplog.records if "io_uring is unavailable" in r.message]) == 1

    with pytest.raises(OSError, match="io_uring is unavailable"):
        SpillStore(tmp_path, 8 * MiB, io="uring")

    with SpillStore(tmp_path, 8 * MiB, io="auto") as second:
        assert second.stats()["io_mode"] == "posix"
    assert len([r for r in caplog.records if "io_uring is unavailable" in r.message]) == 1


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="io mode"):
        SpillStore(tmp_path, MiB, io="aio")
    with SpillStore(tmp_path, MiB, io="posix") as store:
        with pytest.raises(ValueError, match="32 bytes"):
            store.put_many([b"short"], [b"x"])
        store.put_many([key(1)], [payload(1, 100)])
        with pytest.raises(ValueError, match="has 10 bytes but the block has 100"):
            store.get_many_into([key(1)], [bytearray(10)])
        with pytest.raises(ValueError, match="writable"):
            store.get_many_into([key(1)], [bytes(100)])


def test_dead_writer_temp_removed(tmp_path):
    # A pid above the kernel's pid_max (4194304 at most) cannot belong to a live process.
    stale = f"{0:020d}-{fmt.host_tag()}-4194399-abcdef012345-00000000{fmt.TEMP_SUFFIX}"
    (tmp_path / stale).write_bytes(b"\0" * 4096)
    with SpillStore(tmp_path, MiB, io="posix"):
        pass
    assert not (tmp_path / stale).exists()


def test_threads_share_store(tmp_path, io_mode):
    import threading

    errors = []

    def worker(base):
        try:
            keys = [key(base + i) for i in range(50)]
            datas = [payload(base + i, 3000 + i) for i in range(50)]
            for start in range(0, 50, 5):
                assert all(store.put_many(keys[start:start + 5], datas[start:start + 5]))
                found, buffers = read(store, keys[:start + 5], [len(d) for d in datas[:start + 5]])
                assert all(found)
                assert [bytes(b) for b in buffers] == datas[:start + 5]
        except Exception as error:  # collected so the main thread reports it
            errors.append(error)

    with SpillStore(tmp_path, 64 * MiB, io=io_mode, segment_bytes=256 * 1024) as store:
        threads = [threading.Thread(target=worker, args=(1000 * t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert store.stats()["blocks"] == 200


# ---- batched writes ----------------------------------------------------------------------


class _SpyBackend(spill_io._Queue):
    """Wraps a backend and records the most requests it had in flight at once, per op."""

    def __init__(self, inner):
        self.inner, self.mode, self.depth = inner, inner.mode, inner.depth
        self.max_in_flight = {spill_io.READ: 0, spill_io.WRITE: 0}

    @property
    def in_flight(self):
        return self.inner.in_flight

    def submit(self, op, fd, offset, view, tag):
        self.inner.submit(op, fd, offset, view, tag)
        self.max_in_flight[op] = max(self.max_in_flight[op], self.inner.in_flight)

    def complete(self):
        return self.inner.complete()

    def close(self):
        self.inner.close()


def test_writes_in_flight_bounded_by_depth(tmp_path, io_mode):
    depth = 4
    count = 40
    keys = [key(i) for i in range(count)]
    datas = [payload(i, 30000 + i) for i in range(count)]
    with SpillStore(tmp_path, 64 * MiB, io=io_mode, depth=depth) as store:
        spy = store._backend = _SpyBackend(store._backend)
        assert store.put_many(keys, datas) == [True] * count
        found, buffers = read(store, keys, [len(d) for d in datas])
        assert found == [True] * count
        assert [bytes(b) for b in buffers] == datas
        assert store.stats()["depth"] == (depth if io_mode == "uring" else 1)
    if io_mode == "uring":
        assert spy.max_in_flight[spill_io.WRITE] == depth
        assert spy.max_in_flight[spill_io.READ] == depth
    else:
        assert spy.max_in_flight[spill_io.WRITE] == 1

    # Writes may finish in any order, but the published file contains the records back to
    # back and nothing of the size reserved ahead of them.
    [path] = segments(tmp_path)
    assert os.path.getsize(path) == sum(fmt.record_bytes(len(d)) for d in datas)
    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        found, buffers = read(store, keys, [len(d) for d in datas])
        assert found == [True] * count
        assert [bytes(b) for b in buffers] == datas


def test_uring_reuses_iovecs(tmp_path):
    """liburing's Iovec pins its buffer for good, so repeated calls must reuse them."""
    if _URING_SKIP:
        pytest.skip(_URING_SKIP)
    keys = [key(i) for i in range(200)]
    datas = [payload(i, 20000) for i in range(200)]
    with SpillStore(tmp_path, 64 * MiB, io="uring", depth=4) as store:
        assert all(store.put_many(keys[:10], datas[:10]))
        assert all(read(store, keys[:10], [20000] * 10)[0])
        after_first = len(store._backend._iovecs)
        for start in range(10, 200, 10):
            assert all(store.put_many(keys[start:start + 10], datas[start:start + 10]))
            assert all(read(store, keys[:start + 10], [20000] * (start + 10))[0])
        assert len(store._backend._iovecs) == after_first


class _FailingWriteBackend(_FullDiskBackend):
    """Fails the write request number `fail_at` (0-based, counted over the store's life)."""

    def __init__(self, inner, fail_at, error_number=errno.EIO):
        super().__init__(inner, allowed=-1)
        self.fail_at, self.error_number, self.writes = fail_at, error_number, 0

    def submit(self, op, fd, offset, view, tag):
        if op == spill_io.WRITE:
            self.writes += 1
            if self.writes - 1 == self.fail_at:
                error = OSError(self.error_number, os.strerror(self.error_number))
                self.failed.append((tag, error))
                return
        self.inner.submit(op, fd, offset, view, tag)


def test_failed_write_mid_batch_keeps_prefix(tmp_path, io_mode, caplog):
    caplog.set_level(logging.WARNING, logger="ems.tiering")
    keys = [key(i) for i in range(12)]
    datas = [payload(i, 20000) for i in range(12)]
    with SpillStore(tmp_path, 64 * MiB, io=io_mode, depth=8) as store:
        store._backend = _FailingWriteBackend(store._backend, fail_at=5)
        results = store.put_many(keys[:10], datas[:10])
        # Records after the failed one may be on the file, but none is indexed.
        assert results == [True] * 5 + [False] * 5
        stats = store.stats()
        assert stats["io_errors"] == 1
        assert stats["spill_failures"] == 5
        assert stats["spilling"] is True
        assert store.exists_many(keys[:10]) == [True] * 5 + [False] * 5
        assert len([r for r in caplog.records if "spill write failed" in r.message]) == 1

        # The next write goes where the failed one was and overwrites what followed it.
        assert store.put_many(keys[5:12], datas[5:12]) == [True] * 7
        found, buffers = read(store, keys, [20000] * 12)
        assert found == [True] * 12
        assert [bytes(b) for b in buffers] == datas

    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        assert store.stats()["blocks"] == 12
        found, buffers = read(store, keys, [20000] * 12)
        assert found == [True] * 12
        assert [bytes(b) for b in buffers] == datas


def test_records_after_hole_not_indexed(tmp_path, io_mode):
    """Writes in flight finish in any order, so a crash can leave a later record on the file
    behind one that never landed. The scan stops at the hole and later records are lost."""
    path, keys, datas = _three_blocks(tmp_path, io_mode)
    record = fmt.record_bytes(10000)
    with open(path, "r+b") as f:
        f.seek(record)
        f.write(bytes(record))

    with SpillStore(tmp_path, 64 * MiB, io=io_mode) as store:
        assert store.exists_many(keys) == [True, False, False]
        found, buffers = read(store, keys, [10000] * 3)
        assert found == [True, False, False]
        assert bytes(buffers[0]) == datas[0]
        assert bytes(buffers[2]) == b"\xaa" * 10000


def test_direct_io_refused_logged_once(tmp_path, io_mode, monkeypatch, caplog):
    """A file system that rejects O_DIRECT with EINVAL gets buffered I/O and one warning."""
    real_open = os.open

    def open_without_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_without_direct)
    caplog.set_level(logging.WARNING, logger="ems.tiering")
    keys = [key(i) for i in range(30)]
    datas = [payload(i, 50000) for i in range(30)]
    with SpillStore(tmp_path, 64 * MiB, io=io_mode, segment_bytes=256 * 1024) as store:
        assert all(store.put_many(keys, datas))
        found, buffers = read(store, keys, [50000] * 30)
        assert found == [True] * 30
        assert [bytes(b) for b in buffers] == datas
        stats = store.stats()
        assert stats["direct_io"] is False
        assert stats["io_mode"] == io_mode
    assert len(segments(tmp_path)) > 1
    warnings = [r for r in caplog.records if "O_DIRECT is not supported" in r.message]
    assert len(warnings) == 1


def test_direct_io_reported(tmp_path, io_mode):
    with SpillStore(tmp_path, 8 * MiB, io=io_mode) as store:
        store.put_many([key(1)], [payload(1, 5000)])
        stats = store.stats()
        assert stats["io_mode"] == io_mode
        assert isinstance(stats["direct_io"], bool)


# ---- delete and compaction ---------------------------------------------------------------

RECORD = 16384  # bytes of one record below
SIZE = RECORD - fmt.HEADER_BYTES  # a payload that fills one record exactly
PER_SEGMENT = 16  # records per segment with segment_bytes = 256 KiB


def _fill(store, count):
    """Put count blocks; return keys and payloads. Segments fill in key order."""
    keys = [key(i) for i in range(count)]
    datas = [payload(i, SIZE) for i in range(count)]
    assert all(store.put_many(keys, datas))
    return keys, datas


def _check_blocks(store, keys, datas):
    found, buffers = read(store, keys, [SIZE] * len(keys))
    assert found == [True] * len(keys)
    for buffer, data in zip(buffers, datas):
        assert bytes(buffer) == data


def _compacting_store(directory, io_mode, **kwargs):
    return SpillStore(directory, 64 * MiB, io=io_mode, segment_bytes=PER_SEGMENT * RECORD,
                      **kwargs)


def test_delete_many(tmp_path, io_mode):
    with _compacting_store(tmp_path, io_mode) as store:
        keys, datas = _fill(store, 4)
        assert store.delete_many([keys[1], key(99), keys[1]]) == [True, False, False]
        assert store.exists_many(keys) == [True, False, True, True]
        found, buffers = read(store, keys, [SIZE] * 4)
        assert found == [True, False, True, True]
        assert bytes(buffers[1]) == b"\xaa" * SIZE
        stats = store.stats()
        assert stats["deleted_blocks"] == 1
        assert stats["dead_bytes"] == RECORD
        # A deleted key can be stored again.
        assert store.put_many([keys[1]], [datas[1]]) == [True]
        _check_blocks(store, keys, datas)


def test_compaction_keeps_live_blocks(tmp_path, io_mode):
    with _compacting_store(tmp_path, io_mode) as store:
        keys, datas = _fill(store, 3 * PER_SEGMENT + 4)  # 3 published segments + active
        oldest = segments(tmp_path)[0]
        before = store.stats()["bytes"]

        # Just under half of the oldest segment dead: nothing moves.
        dead = list(range(0, PER_SEGMENT, 2))[:PER_SEGMENT // 2 - 1]
        store.delete_many([keys[i] for i in dead])
        assert store.stats()["compacted_segments"] == 0
        assert os.path.exists(oldest)

        # Half dead: its live records move to a new segment and the file goes.
        dead.append(PER_SEGMENT - 2)
        assert store.delete_many([keys[PER_SEGMENT - 2]]) == [True]
        stats = store.stats()
        assert stats["compacted_segments"] == 1
        assert stats["compacted_blocks"] == PER_SEGMENT // 2
        assert not os.path.exists(oldest)
        assert stats["bytes"] == before - len(dead) * RECORD
        assert stats["dead_bytes"] == 0
        assert stats["spills"] == 3 * PER_SEGMENT + 4

        live = [i for i in range(len(keys)) if i not in dead]
        _check_blocks(store, [keys[i] for i in live], [datas[i] for i in live])
        assert store.exists_many([keys[i] for i in dead]) == [False] * len(dead)

    on_disk = sum(os.path.getsize(p) for p in segments(tmp_path))
    assert on_disk == (len(keys) - len(dead)) * RECORD
    with _compacting_store(tmp_path, io_mode) as store:
        assert store.stats()["blocks"] == len(live)
        _check_blocks(store, [keys[i] for i in live], [datas[i] for i in live])
        assert store.exists_many([keys[i] for i in dead]) == [False] * len(dead)


def test_compaction_of_fully_dead_segment(tmp_path, io_mode):
    with _compacting_store(tmp_path, io_mode) as store:
        keys, datas = _fill(store, 2 * PER_SEGMENT)
        oldest = segments(tmp_path)[0]
        store.delete_many(keys[:PER_SEGMENT])
        stats = store.stats()
        assert not os.path.exists(oldest)
        assert stats["compacted_segments"] == 1
        assert stats["compacted_blocks"] == 0
        assert stats["dead_bytes"] == 0
        _check_blocks(store, keys[PER_SEGMENT:], datas[PER_SEGMENT:])


def test_compaction_threshold_setting(tmp_path, io_mode):
    with _compacting_store(tmp_path, io_mode, compact_dead_fraction=0.25) as store:
        keys, datas = _fill(store, 2 * PER_SEGMENT)
        store.delete_many(keys[:PER_SEGMENT // 4 - 1])
        assert store.stats()["compacted_segments"] == 0
        store.delete_many([keys[PER_SEGMENT // 4 - 1]])
        assert store.stats()["compacted_segments"] == 1
        _check_blocks(store, keys[PER_SEGMENT // 4:], datas[PER_SEGMENT // 4:])


def test_compaction_skipped_without_quota_room(tmp_path, io_mode):
    quota = 2 * PER_SEGMENT * RECORD + 4 * RECORD
    with SpillStore(tmp_path, quota, io=io_mode, segment_bytes=PER_SEGMENT * RECORD) as store:
        keys, datas = _fill(store, 2 * PER_SEGMENT + 2)
        # 10 live records of the oldest segment would not fit next to the others.
        store.delete_many(keys[:PER_SEGMENT - 10])
        assert store.stats()["compacted_segments"] == 0
        _check_blocks(store, keys[PER_SEGMENT - 10:], datas[PER_SEGMENT - 10:])
        assert store.stats()["bytes"] <= quota


def test_compaction_only_own_segments(tmp_path, io_mode):
    with _compacting_store(tmp_path, io_mode) as writer:
        keys, datas = _fill(writer, PER_SEGMENT)
    [theirs] = segments(tmp_path)
    with _compacting_store(tmp_path, io_mode) as store:
        store.delete_many(keys)
        assert store.compact() == 0
        assert os.path.exists(theirs)
        assert store.stats()["dead_bytes"] == PER_SEGMENT * RECORD


class _Crash(BaseException):
    """Raised where the process would die. It derives from BaseException, so no store code
    catches it."""


def test_crash_before_compacted_segment_published(tmp_path, io_mode, monkeypatch):
    store = _compacting_store(tmp_path, io_mode)
    keys, datas = _fill(store, 2 * PER_SEGMENT + 1)  # 2 published segments + 1 unpublished
    oldest = segments(tmp_path)[0]
    real_rename = os.rename

    def crash_on_publish(source, destination):
        if source.endswith(fmt.TEMP_SUFFIX):
            raise _Crash
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", crash_on_publish)
    with pytest.raises(_Crash):
        store.delete_many(keys[:PER_SEGMENT // 2])
    monkeypatch.setattr(os, "rename", real_rename)

    # The live records were written to a temporary segment that never got published, and
    # the old segment is intact. Deletes are not on disk, so the deleted blocks come back.
    temps = [n for n in os.listdir(tmp_path) if n.endswith(fmt.TEMP_SUFFIX)]
    assert len(temps) == 1
    assert os.path.exists(oldest)
    with _compacting_store(tmp_path, io_mode) as survivor:
        assert survivor.stats()["blocks"] == 2 * PER_SEGMENT
        _check_blocks(survivor, keys[:2 * PER_SEGMENT], datas[:2 * PER_SEGMENT])
    store._backend.close()


def test_crash_after_compacted_segment_published(tmp_path, io_mode, monkeypatch):
    store = _compacting_store(tmp_path, io_mode)
    keys, datas = _fill(store, 2 * PER_SEGMENT + 1)
    oldest = segments(tmp_path)[0]
    real_unlink = os.unlink

    def crash_on_delete(path, *args, **kwargs):
        if path == oldest:
            raise _Crash
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", crash_on_delete)
    with pytest.raises(_Crash):
        store.delete_many(keys[:PER_SEGMENT // 2])
    monkeypatch.setattr(os, "unlink", real_unlink)

    # The copy is published and the old file is still there: live keys are in both, and
    # the index keeps the newer copy.
    assert os.path.exists(oldest)
    assert len(segments(tmp_path)) == 3
    with _compacting_store(tmp_path, io_mode) as survivor:
        assert survivor.stats()["blocks"] == 2 * PER_SEGMENT + 1
        _check_blocks(survivor, keys, datas)
        assert survivor.stats()["dead_bytes"] == (PER_SEGMENT // 2) * RECORD
    store._backend.close()


def test_invalid_store_settings(tmp_path):
    with pytest.raises(ValueError, match="depth"):
        SpillStore(tmp_path, MiB, io="posix", depth=0)
    with pytest.raises(ValueError, match="depth"):
        SpillStore(tmp_path, MiB, io="posix", depth=spill_io.MAX_DEPTH + 1)
    with pytest.raises(ValueError, match="compact_dead_fraction"):
        SpillStore(tmp_path, MiB, io="posix", compact_dead_fraction=0)
    with pytest.raises(ValueError, match="compact_dead_fraction"):
        SpillStore(tmp_path, MiB, io="posix", compact_dead_fraction=1.5)
