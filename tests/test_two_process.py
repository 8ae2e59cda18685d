"""A writer process overwrites and evicts blocks while reader processes attach and verify.

The writer owns a small pool and keeps replacing the same keys (delete, then put a new
version) so that blocks are evicted and their slots reused. Each reader attaches read-only
(by pool name, or through the writer's /proc fd path) and reads in a loop for a few
seconds. Every block carries its key and version, and its bytes are rebuilt from those, so
a reader can tell that an accepted block is exactly one the writer stored for that key.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import ems

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
READ_SECONDS = 4.0
NKEYS = 128

COMMON = textwrap.dedent(
    f"""
    import json, os, random, sys, time
    sys.path.insert(0, {TESTS_DIR!r})
    import ems
    from conftest import make_block, make_key, block_version

    NKEYS = {NKEYS}
    KEYS = [make_key(i, "two-process") for i in range(NKEYS)]

    def size_for(k, version):
        return 2000 + (k * 7919 + version * 104729) % 14000
    """
)

WRITER = COMMON + textwrap.dedent(
    """
    stop_path = sys.argv[1]
    # 1 MiB holds about a hundred of these blocks and max_blocks defaults to 64, so
    # 128 keys keep the pool evicting.
    pool = ems.Pool(1 << 20, slab_size=64 << 10, pages="small")
    print(json.dumps({"name": pool.name, "fd": pool.fd, "pid": os.getpid()}), flush=True)
    versions = [0] * NKEYS
    for k, key in enumerate(KEYS):
        versions[k] = 1
        pool.put(key, make_block(key, 1, size_for(k, 1)))
    rng = random.Random(1)
    overwrites = 0
    deadline = time.monotonic() + 60
    while not os.path.exists(stop_path) and time.monotonic() < deadline:
        for _ in range(256):
            k = rng.randrange(NKEYS)
            version = versions[k] + 1
            pool.delete(KEYS[k])
            versions[k] = version
            pool.put(KEYS[k], make_block(KEYS[k], version, size_for(k, version)))
            overwrites += 1
    stats = pool.stats()
    stats.pop("classes")
    print(json.dumps({"overwrites": overwrites, "versions": versions, "stats": stats}),
          flush=True)
    pool.close()
    """
)

READER = COMMON + textwrap.dedent(
    """
    mode, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if mode == "fd":
        fd = os.open(target, os.O_RDONLY)
        pool = ems.Pool.attach(fd)
        os.close(fd)
    else:
        pool = ems.Pool.attach(target)
    assert pool.is_owner is False
    print("attached", flush=True)
    counts = dict(hits=0, misses=0, wrong=0, stale=0, resized=0, batch_hits=0)
    wrong_examples = []
    newest = [0] * NKEYS
    rng = random.Random(os.getpid())

    def verify(k, block):
        key = KEYS[k]
        if len(block) < 56 or block[:32] != key:
            return None
        version = block_version(block)
        if block != make_block(key, version, size_for(k, version)):
            return None
        return version

    def accept(k, block):
        version = verify(k, block)
        if version is None:
            counts["wrong"] += 1
            if len(wrong_examples) < 5:
                wrong_examples.append([k, len(block), block[:48].hex()])
            return
        if version < newest[k]:
            counts["stale"] += 1
        newest[k] = max(newest[k], version)

    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        step += 1
        k = rng.randrange(NKEYS)
        if step % 3 == 0:
            block = pool.get(KEYS[k])
        elif step % 3 == 1:
            length = pool.length(KEYS[k])
            block = None
            if length is not None:
                buf = bytearray(length)
                try:
                    if pool.get_into(KEYS[k], buf):
                        block = bytes(buf)
                except ems.errors.BufferSizeError:
                    counts["resized"] += 1
                    continue
        else:
            # A batch of two keys into a list of buffers sized by length().
            ks = [k, rng.randrange(NKEYS)]
            lengths = [pool.length(KEYS[j]) for j in ks]
            if None in lengths:
                counts["misses"] += 1
                continue
            bufs = [bytearray(n) for n in lengths]
            try:
                hits = pool.get_many_into([KEYS[j] for j in ks], bufs)
            except ems.errors.BufferSizeError:
                counts["resized"] += 1
                continue
            for j, buf, hit in zip(ks[1:], bufs[1:], hits[1:]):
                if hit:
                    counts["batch_hits"] += 1
                    accept(j, bytes(buf))
            block = bytes(bufs[0]) if hits[0] else None
            counts["batch_hits"] += hits[0]
        if block is None:
            counts["misses"] += 1
            continue
        counts["hits"] += 1
        accept(k, block)
    stats = pool.stats()
    pool.close()
    print(json.dumps({"counts": counts, "newest": newest, "wrong": wrong_examples,
                      "reader_retries": stats["reader_retries"]}), flush=True)
    """
)


def _run_readers(readers):
    results = []
    for proc in readers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.fixture
def writer(tmp_path):
    """Start the writer and yield (its first message, the stop file path, the process)."""
    stop = tmp_path / "stop"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        pytest.fail(f"writer exited before it created the pool: {proc.stderr.read()}")
    try:
        yield json.loads(line), stop, proc
    finally:
        stop.touch()
        if proc.poll() is None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_two_process_readers(writer):
    info, stop, proc = writer
    fd_path = f"/proc/{info['pid']}/fd/{info['fd']}"
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, mode, target, str(READ_SECONDS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for mode, target in [("name", info["name"]), ("path", fd_path), ("fd", fd_path)]
    ]
    results = _run_readers(readers)
    stop.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    final = json.loads(out.strip().splitlines()[-1])

    assert final["overwrites"] > 1000, final["stats"]
    assert final["stats"]["evictions"] > 0, final["stats"]
    for result in results:
        counts = result["counts"]
        assert counts["wrong"] == 0, result["wrong"]
        assert counts["stale"] == 0, counts
        assert counts["hits"] > 100, counts
        assert counts["misses"] > 0, counts
        assert counts["batch_hits"] > 0, counts
        for k, version in enumerate(result["newest"]):
            assert version <= final["versions"][k]


def test_two_process_owner_exit(writer):
    info, stop, proc = writer
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, "name", info["name"], "2.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = reader.stdout.readline()
    assert line == "attached\n", reader.stderr.read()
    stop.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = _run_readers([reader])[0]
    assert result["counts"]["wrong"] == 0, result["wrong"]
    assert result["counts"]["misses"] > 0
    with pytest.raises(ems.errors.AttachError):
        ems.Pool.attach(info["name"])
