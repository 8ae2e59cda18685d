"""Page kind selection: small, THP and hugetlb, and the "auto" fallback chain.

The hugetlb tests change /proc/sys/vm/nr_hugepages (and nr_overcommit_hugepages) and need
root. The fixture restores both values when the test ends.
"""

import errno
import os

import pytest

import ems
from ems import errors
from conftest import MiB, make_block, make_key

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
NR_OVERCOMMIT = "/proc/sys/vm/nr_overcommit_hugepages"
SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
CAPACITY = 8 * MiB
# The data region plus the header, index and entry table, rounded to 2 MiB pages, with room
# to spare.
PAGES_NEEDED = CAPACITY // (2 * MiB) + 8


def read_int(path):
    with open(path) as f:
        return int(f.read().strip())


def write_int(path, value):
    with open(path, "w") as f:
        f.write(f"{value}\n")


def shmem_thp_mode():
    """Return the selected shmem THP mode ("always", "never", ...) or None if unknown."""
    try:
        with open(SHMEM_THP) as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return None


def expected_fallback():
    """Return the page kind "auto" is expected to give when no hugetlb page is available."""
    mode = shmem_thp_mode()
    return "thp" if mode in ("always", "within_size", "advise", "force") else "small"


def hugepages_writable():
    if os.geteuid() != 0:
        return False
    return os.access(NR_HUGEPAGES, os.W_OK)


needs_root = pytest.mark.skipif(
    not hugepages_writable(),
    reason="needs root and a writable /proc/sys/vm/nr_hugepages",
)


@pytest.fixture
def hugepages():
    """Set the reserved 2 MiB page count; restore the old settings afterwards."""
    old_pages = read_int(NR_HUGEPAGES)
    old_overcommit = read_int(NR_OVERCOMMIT) if os.path.exists(NR_OVERCOMMIT) else None

    def reserve(count):
        if old_overcommit is not None:
            write_int(NR_OVERCOMMIT, 0)
        write_int(NR_HUGEPAGES, count)
        return read_int(NR_HUGEPAGES)

    try:
        yield reserve
    finally:
        write_int(NR_HUGEPAGES, old_pages)
        if old_overcommit is not None:
            write_int(NR_OVERCOMMIT, old_overcommit)


def roundtrip(pool):
    key = make_key(0, "pages")
    block = make_block(key, 1, 100_000)
    assert pool.put(key, block) is True
    assert pool.get(key) == block


def test_pages_small(make_pool):
    pool = make_pool(CAPACITY, slab_size=1 * MiB, pages="small")
    assert pool.page_kind == "small"
    assert pool.stats()["page_kind"] == "small"
    roundtrip(pool)


def test_pages_auto_valid(make_pool):
    pool = make_pool(CAPACITY, slab_size=1 * MiB)
    assert pool.page_kind in ("hugetlb", "thp", "small")
    roundtrip(pool)


def test_pages_attached_kind(make_pool):
    pool = make_pool(CAPACITY, slab_size=1 * MiB, pages="small")
    reader = ems.Pool.attach(pool.name)
    try:
        assert reader.page_kind == "small"
    finally:
        reader.close()


@needs_root
def test_pages_hugetlb_reserved(make_pool, hugepages):
    got = hugepages(PAGES_NEEDED)
    if got < PAGES_NEEDED:
        pytest.skip(f"kernel reserved only {got} of {PAGES_NEEDED} huge pages")
    pool = make_pool(CAPACITY, slab_size=1 * MiB, pages="hugetlb")
    assert pool.page_kind == "hugetlb"
    assert pool.stats()["page_kind"] == "hugetlb"
    roundtrip(pool)
    pool.close()
    pool = make_pool(CAPACITY, slab_size=1 * MiB, pages="auto")
    assert pool.page_kind == "hugetlb"
    roundtrip(pool)


@needs_root
def test_pages_hugetlb_attach(make_pool, hugepages):
    got = hugepages(PAGES_NEEDED)
    if got < PAGES_NEEDED:
        pytest.skip(f"kernel reserved only {got} of {PAGES_NEEDED} huge pages")
    pool = make_pool(CAPACITY, slab_size=1 * MiB, pages="hugetlb")
    key = make_key(1, "pages")
    pool.put(key, b"huge")
    reader = ems.Pool.attach(pool.name)
    try:
        assert reader.page_kind == "hugetlb"
        assert reader.get(key) == b"huge"
    finally:
        reader.close()


@needs_root
def test_pages_hugetlb_none_reserved(hugepages):
    assert hugepages(0) == 0
    with pytest.raises(errors.ArenaError) as info:
        ems.Pool(CAPACITY, slab_size=1 * MiB, pages="hugetlb")
    assert info.value.errno == errno.ENOMEM


@needs_root
def test_pages_hugetlb_too_few(hugepages):
    assert hugepages(1) == 1
    with pytest.raises(errors.ArenaError) as info:
        ems.Pool(CAPACITY, slab_size=1 * MiB, pages="hugetlb")
    assert info.value.errno == errno.ENOMEM


@needs_root
def test_pages_auto_fallback(make_pool, hugepages):
    assert hugepages(0) == 0
    pool = make_pool(CAPACITY, slab_size=1 * MiB, pages="auto")
    assert pool.page_kind == expected_fallback()
    roundtrip(pool)


def test_pages_thp(make_pool):
    if expected_fallback() == "thp":
        pool = make_pool(CAPACITY, slab_size=1 * MiB, pages="thp")
        assert pool.page_kind == "thp"
        roundtrip(pool)
    else:
        with pytest.raises(errors.ArenaError) as info:
            ems.Pool(CAPACITY, slab_size=1 * MiB, pages="thp")
        assert info.value.errno == errno.ENOMEM
