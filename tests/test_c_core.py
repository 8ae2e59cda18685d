"""Build and run the C unit tests of the EMS core (tests/c/*.c) with gcc.

Each test program is compiled together with every csrc/*.c file and run once per
variant: plain, AddressSanitizer + UndefinedBehaviorSanitizer, and, for the
multi-threaded stress programs, test_pool's multi-threaded spill ring test and
test_pool_gate's suspension race and test_latency's concurrent recorders, ThreadSanitizer. A program passes when it exits 0; its output is shown on failure. The
hugetlb tests change vm.nr_hugepages and so need root; they restore the old value
afterwards.
"""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
TESTS_C = ROOT / "tests" / "c"

GCC = shutil.which("gcc")

BASE_FLAGS = [
    "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread", f"-I{CSRC}",
]
SANITIZER_FLAGS = {
    "plain": [],
    "asan": [
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=all",
    ],
    "tsan": ["-fsanitize=thread"],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1",
}

# (program, variant, arguments). The stress programs take an operation count, sized so
# that each run takes a few seconds on 2 cores. ThreadSanitizer is the slowest, at about
# 5 s for the index stress, and runs only the multi-threaded programs.
CASES = [
    ("test_arena", "plain", []),
    ("test_arena", "asan", []),
    ("test_slab", "plain", []),
    ("test_slab", "asan", []),
    ("test_index", "plain", []),
    ("test_index", "asan", []),
    ("test_index_stress", "plain", ["1000000"]),
    ("test_index_stress", "asan", ["300000"]),
    ("test_index_stress", "tsan", ["400000"]),
    ("test_pool", "plain", []),
    ("test_pool", "asan", []),
    ("test_pool", "tsan", ["spill"]),  # only the multi-threaded spill ring test
    ("test_pool_gate", "plain", []),
    ("test_pool_gate", "asan", []),
    ("test_pool_gate", "tsan", ["race"]),  # only the multi-threaded suspension test
    ("test_pool_stress", "plain", ["200000"]),
    ("test_pool_stress", "asan", ["50000"]),
    ("test_pool_stress", "tsan", ["20000"]),
    ("test_crc32c", "plain", []),
    ("test_crc32c", "asan", []),
    ("test_frame", "plain", []),
    ("test_frame", "asan", []),
    ("test_sha256", "plain", []),
    ("test_sha256", "asan", []),
    ("test_latency", "plain", []),
    ("test_latency", "asan", ["50000"]),
    ("test_latency", "tsan", ["20000"]),
    ("test_transfer", "plain", ["50000"]),
    ("test_transfer", "asan", ["20000"]),
    ("test_transfer", "tsan", ["2500"]),
]

RUN_TIMEOUT_S = 120
HUGE_PAGE_KB = 2048
HUGE_PAGES_NEEDED = 4  # test_arena maps at most 4 MiB of hugetlb memory at a time
NR_HUGEPAGES = pathlib.Path("/proc/sys/vm/nr_hugepages")


def _format_output(proc):
    return (
        f"exit status {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("c-tests")


@pytest.fixture(scope="session")
def built(build_dir):
    """Returns a function that compiles (program, variant) once and returns its path."""
    cache = {}

    def build(program, variant):
        if GCC is None:
            pytest.skip("gcc not found on PATH: the C core tests need gcc")
        if (program, variant) in cache:
            return cache[(program, variant)]
        binary = build_dir / f"{program}-{variant}"
        sources = [str(TESTS_C / f"{program}.c")] + [str(p) for p in sorted(CSRC.glob("*.c"))]
        cmd = [GCC, *BASE_FLAGS, *SANITIZER_FLAGS[variant], *sources, "-o", str(binary)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            pytest.fail(f"compiling {program} ({variant}) failed:\n{' '.join(cmd)}\n"
                        + _format_output(proc))
        cache[(program, variant)] = binary
        return binary

    return build


def _meminfo():
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0])
    return values


def _available_huge_pages():
    """Returns the free, unreserved default-size huge pages, or None when the default
    huge page size is not the 2 MiB that MFD_HUGETLB arenas use."""
    info = _meminfo()
    if info.get("Hugepagesize") != HUGE_PAGE_KB:
        return None
    return info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0)


def _expected_pages_env():
    """EMS_TEST_EXPECT_PAGES for test_arena from the host's current huge page pool."""
    available = _available_huge_pages()
    if available is None:
        return {}
    if available == 0:
        return {"EMS_TEST_EXPECT_PAGES": "no-hugetlb"}
    if available >= HUGE_PAGES_NEEDED:
        return {"EMS_TEST_EXPECT_PAGES": "hugetlb"}
    return {}


def _run(binary, args, extra_env=None):
    env = dict(os.environ)
    env.update(SANITIZER_ENV)
    env.update(extra_env or {})
    try:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True,
                              env=env, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{binary.name} timed out after {RUN_TIMEOUT_S} s\n"
                    f"--- stdout ---\n{exc.stdout}\n--- stderr ---\n{exc.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{binary.name} {' '.join(args)} failed: " + _format_output(proc))
    return proc


@pytest.mark.parametrize(
    "program,variant,args",
    CASES,
    ids=[f"{program}-{variant}" for program, variant, _ in CASES],
)
def test_c_program(built, program, variant, args):
    binary = built(program, variant)
    extra_env = _expected_pages_env() if program == "test_arena" else {}
    _run(binary, args, extra_env)


@pytest.fixture
def nr_hugepages():
    """Yields a setter for vm.nr_hugepages and restores the value found at the start.

    NOTE: the setting is host-wide, so other processes that create hugetlb mappings
    while these tests run see the changed pool.
    """
    if GCC is None:
        pytest.skip("gcc not found on PATH: the C core tests need gcc")
    if os.geteuid() != 0:
        pytest.skip("changing vm.nr_hugepages needs root")
    if _available_huge_pages() is None:
        pytest.skip("default huge page size is not 2 MiB")
    try:
        old = int(NR_HUGEPAGES.read_text())
        NR_HUGEPAGES.write_text(f"{old}\n")
    except OSError as exc:
        pytest.skip(f"vm.nr_hugepages is not writable: {exc}")

    def set_pages(count):
        NR_HUGEPAGES.write_text(f"{count}\n")
        return int(NR_HUGEPAGES.read_text())

    try:
        yield set_pages
    finally:
        NR_HUGEPAGES.write_text(f"{old}\n")
        assert int(NR_HUGEPAGES.read_text()) == old, "vm.nr_hugepages was not restored"


def test_arena_hugetlb_reserved(built, nr_hugepages):
    binary = built("test_arena", "plain")
    total = _meminfo()["HugePages_Total"]
    nr_hugepages(total + HUGE_PAGES_NEEDED)
    available = _available_huge_pages()
    if available < HUGE_PAGES_NEEDED:
        pytest.skip(f"the kernel reserved only {available} free huge pages "
                    f"of {HUGE_PAGES_NEEDED} requested")
    _run(binary, [], {"EMS_TEST_EXPECT_PAGES": "hugetlb"})


def test_arena_hugetlb_absent_falls_back(built, nr_hugepages):
    binary = built("test_arena", "plain")
    info = _meminfo()
    # Pages in use or reserved by other processes stay; only the free ones are released.
    in_use = info["HugePages_Total"] - info["HugePages_Free"] + info["HugePages_Rsvd"]
    nr_hugepages(in_use)
    if _available_huge_pages() != 0:
        pytest.skip("free huge pages remain after lowering vm.nr_hugepages")
    _run(binary, [], {"EMS_TEST_EXPECT_PAGES": "no-hugetlb"})
