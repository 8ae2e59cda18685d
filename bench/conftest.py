"""Shared fixtures of the EMS benchmarks and the report of a run.

Run: `python -m pytest bench --benchmark-only` from the repository root. The benchmarks are
records, not pass/fail speed tests: nothing asserts on speed. Each benchmark stores
`report.Record`s through the `record` fixture. The records go into the benchmark's
extra_info (and so into `--benchmark-json`), into the summary table printed at the end, and
into the generated section of docs/benchmarks.md. The document is rewritten only after a
complete run in which every benchmark passed, unless `--ems-report PATH` names a file.
"""
from __future__ import annotations

import os
import resource
import shlex
import subprocess
import sys
import time

import pytest

import report
from bench_common import BENCH_DIR, CORE_SOURCES, REPO_ROOT

_records_key = pytest.StashKey[list]()


class ReportPlugin:
    """Collects the records and the run state, prints the summary and writes the report."""

    def __init__(self, config):
        self.config = config
        self.records: list[report.Record] = []
        self.meter = report.CpuMeter()
        self.deselected = 0
        self.not_passed = 0
        self.written: str | None = None
        self.freshness_at_start = report.extension_freshness(REPO_ROOT)
        self.extension_mtime = report.extension_mtime()

    def extension_state(self) -> str:
        """Freshness of ems._core at the start of the run, and whether it was rebuilt
        during the run: this process keeps the library it loaded, while the C program
        builds from the csrc/ of the moment."""
        if report.extension_mtime() != self.extension_mtime:
            return (f"REBUILT DURING THE RUN (at start: {self.freshness_at_start}); "
                    "rerun the bench")
        return self.freshness_at_start

    def pytest_deselected(self, items):
        # A run with -k or -m is partial.
        self.deselected += len(items)

    def pytest_runtest_logreport(self, report):
        if report.when in ("setup", "call") and not report.passed:
            self.not_passed += 1

    def report_path(self) -> str | None:
        """Where to write the document, or None when this run must not overwrite it."""
        explicit = self.config.getoption("--ems-report")
        if explicit:
            return explicit
        if self.deselected or self.not_passed or not self.records:
            return None
        # Only a run of the whole bench directory counts as complete.
        if [os.path.abspath(a) for a in self.config.args] != [BENCH_DIR]:
            return None
        return os.path.join(REPO_ROOT, "docs", "benchmarks.md")

    def pytest_sessionfinish(self, session, exitstatus):
        path = self.report_path()
        if path is None:
            return
        run = self.meter.summary()
        run["ems._core up to date"] = self.extension_state()
        generated = report.render_generated(self.records, report.machine_info(), run,
                                            _command_line())
        report.write_document(path, generated)
        self.written = path

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.records:
            return
        terminalreporter.section("EMS benchmark summary")
        for group, title in report.GROUPS.items():
            rows = [r for r in self.records if r.group == group]
            if rows:
                terminalreporter.write_line(title)
                terminalreporter.write_line(report.render_text_table(rows))
                terminalreporter.write_line("")
        for key, value in self.meter.summary().items():
            terminalreporter.write_line(f"{key}: {value}")
        terminalreporter.write_line(f"ems._core up to date: {self.extension_state()}")
        if self.written:
            terminalreporter.write_line(f"report written to {self.written}")
        else:
            terminalreporter.write_line("report not written: partial or failing run "
                                        "(pass --ems-report PATH to write it anyway)")


def pytest_addoption(parser):
    parser.addoption(
        "--ems-report", default=None, metavar="PATH",
        help="write the benchmark report to PATH even after a partial run; by default "
             "docs/benchmarks.md is rewritten only after a complete, passing run")


def pytest_configure(config):
    plugin = ReportPlugin(config)
    config.stash[_records_key] = plugin.records
    config.pluginmanager.register(plugin, "ems-bench-report")


def _command_line() -> str:
    runner = ("python -m pytest" if sys.argv[0].endswith(("pytest", "__main__.py"))
              else sys.argv[0])
    return " ".join([runner] + [shlex.quote(a) for a in sys.argv[1:]])


# ---- fixtures ------------------------------------------------------------------------

def _cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children, at microsecond resolution
    (os.times() counts in 10 ms clock ticks, too coarse for a test of 100 ms)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@pytest.fixture
def record(request, benchmark):
    """Return a function record(Record, **details) that stores report rows. The first
    row's fields and the details go into benchmark.extra_info, and every row goes into the
    report. Each row also gets the test's CPU share: CPU seconds of this process and its
    children over wall seconds. About 1.0 for a single-threaded test means the machine
    gave it a whole core; less means other processes took some of it."""
    rows = []

    def add(row: report.Record, **details):
        request.config.stash[_records_key].append(row)
        rows.append(row)
        if len(rows) == 1:
            benchmark.extra_info.update(row.as_extra_info())
        else:
            benchmark.extra_info.setdefault("more_rows", []).append(row.as_extra_info())
        benchmark.extra_info.update(details)

    cpu_start, wall_start = _cpu_seconds(), time.perf_counter()
    yield add
    share = (_cpu_seconds() - cpu_start) / (time.perf_counter() - wall_start)
    for row in rows:
        row.cpu_share = share
    benchmark.extra_info["cpu_share"] = share


def _build_bench(directory, flags: list[str]) -> str:
    out = directory / "bench_index"
    sources = [os.path.join(BENCH_DIR, "c", "bench_index.c")]
    sources += [os.path.join(REPO_ROOT, "csrc", name) for name in CORE_SOURCES]
    command = ["gcc", *flags, "-std=c11", "-pthread", "-Wall", "-Wextra",
               "-I" + os.path.join(REPO_ROOT, "csrc"), *sources, "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"building bench_index failed:\n{' '.join(command)}\n{result.stderr}")
    return str(out)


@pytest.fixture(scope="session")
def bench_binary(tmp_path_factory):
    """Build bench/c/bench_index.c with the C core (gcc -O2 -std=c11 -pthread) and return
    the executable's path. Used by the lookup and concurrency benchmarks."""
    return _build_bench(tmp_path_factory.mktemp("bench_o2"), ["-O2"])


@pytest.fixture(scope="session")
def bench_binary_like_extension(tmp_path_factory):
    """Build bench_index with the flags setup.py compiles the core of ems._core with
    (-O3 -fno-strict-aliasing), so that the C limit of a Python batch call runs the same
    optimized core code as the call itself."""
    return _build_bench(tmp_path_factory.mktemp("bench_o3"), ["-O3", "-fno-strict-aliasing"])
