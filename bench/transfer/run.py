"""Run the EMS remote transfer benchmark against its peers and write JSON and a table.

For each block size and thread count it runs the peers back to back, so that they see
similar machine conditions. The peers are iperf3 over loopback (one stream per thread),
Redis SET and GET (one redis-benchmark connection per thread), Mooncake put_from and
get_into, and EMS PUT and GET through `ems_bandwidth` from ems_side.py. When that module
is missing, the peers' figures are still written. Progress goes to stderr.

    python bench/transfer/run.py --sizes 64K,256K,1M,4M --threads 1,4 \\
        --out bench/results/transfer
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402  (bench/transfer is not a package)

log = logging.getLogger("transfer")

KiB = 1 << 10
SUFFIXES = {"K": KiB, "M": KiB ** 2, "G": KiB ** 3}
OPS = ("put", "get")
PEER_NAMES = ("iperf3", "redis", "mooncake", "ems")
# Target of the benchmark: EMS at 0.8 x iperf3 or more from this block size up, and
# ahead of Redis and Mooncake at every size and thread count.
IPERF3_TARGET_RATIO = 0.8
IPERF3_TARGET_MIN_BLOCK = 1 << 20


def parse_size(text: str) -> int:
    """Parse '64K', '1M', '1G' (powers of 1024) or a plain number of bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = SUFFIXES.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in SUFFIXES else text
    try:
        value = int(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}, expected e.g. 64K or 1M")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def parse_list(parse: Callable[[str], int]) -> Callable[[str], list[int]]:
    return lambda text: [parse(item) for item in text.split(",") if item.strip()]


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def size_label(block: int) -> str:
    for suffix, factor in (("GiB", KiB ** 3), ("MiB", KiB ** 2), ("KiB", KiB)):
        if block >= factor and block % factor == 0:
            return f"{block // factor} {suffix}"
    return f"{block} B"


def load_ems_side() -> tuple[Callable | None, str | None]:
    """Import ems_side.ems_bandwidth; return it, or None and the reason it is unavailable."""
    try:
        import ems_side
    except ModuleNotFoundError as error:
        if error.name == "ems_side":
            return None, "bench/transfer/ems_side.py is missing"
        return None, f"importing ems_side failed: {error}"
    except Exception as error:  # a broken EMS side must not stop the peers' run
        return None, f"importing ems_side failed: {type(error).__name__}: {error}"
    return ems_side.ems_bandwidth, None


def tool_versions() -> dict[str, str]:
    versions = {}
    for name, command in (("iperf3", ["iperf3", "--version"]),
                          ("redis-server", ["redis-server", "--version"])):
        try:
            output = subprocess.run(command, capture_output=True, text=True, timeout=10)
            versions[name] = output.stdout.splitlines()[0] if output.stdout else "unknown"
        except (OSError, subprocess.TimeoutExpired) as error:
            versions[name] = f"unavailable: {error}"
    return versions


# ---- one configuration -------------------------------------------------------------------

def measure_peer(name: str, block: int, threads: int, args) -> dict:
    """Measure one peer for one configuration; return {'put': B/s, 'get': B/s, ...}."""
    if name == "iperf3":
        value = peers.iperf3_loopback(threads, args.seconds)
        return {"put": value, "get": value}
    if name == "redis":
        return peers.redis_run(block, threads, args.seconds)
    report = peers.mooncake_run(block, threads, args.bytes, args.seconds)
    return {"put": report.pop("put_bytes_per_s"), "get": report.pop("get_bytes_per_s"),
            "detail": report}


def measure_ems(block: int, threads: int, args, ems_bandwidth) -> tuple[dict, list[str]]:
    """Measure EMS PUT then GET separately, so that a failing GET keeps the PUT figure."""
    figures: dict[str, float | None] = {}
    errors = []
    for op in OPS:
        try:
            figures[op] = float(ems_bandwidth(op, block, threads, args.bytes))
        except Exception as error:  # a failing EMS call must not stop the peers
            figures[op] = None
            errors.append(f"{op}: {type(error).__name__}: {error}")
    return figures, errors


def measure_configuration(block: int, threads: int, order: list[str], args,
                          ems_bandwidth) -> dict:
    """Run every peer once for (block, threads) in `order`; record errors, do not raise."""
    figures: dict[str, dict | None] = {}
    errors: dict[str, str] = {}
    for name in order:
        started = time.monotonic()
        if name == "ems":
            if ems_bandwidth is None:
                continue
            figures[name], ems_errors = measure_ems(block, threads, args, ems_bandwidth)
            if ems_errors:
                errors[name] = "; ".join(ems_errors)
        else:
            try:
                figures[name] = measure_peer(name, block, threads, args)
            except Exception as error:  # one failing peer must not stop the others
                figures[name] = None
                errors[name] = f"{type(error).__name__}: {error}"
        if name in errors:
            log.error("%s %s x %d failed: %s", name, size_label(block), threads,
                      errors[name])
        if figures[name] is not None:
            log.info("  %-8s put %s GB/s  get %s GB/s  (%.1f s)", name,
                     gbps(figures[name]["put"]), gbps(figures[name]["get"]),
                     time.monotonic() - started)
    return {"block": block, "threads": threads, "order": order, "figures": figures,
            "errors": errors}


# ---- summary -----------------------------------------------------------------------------

def summarize(runs: list[dict], block: int, threads: int) -> list[dict]:
    """Median over rounds of each peer and op for one configuration, with EMS ratios."""
    rows = []
    for op in OPS:
        medians: dict[str, float | None] = {}
        for name in PEER_NAMES:
            values = [run["figures"][name][op] for run in runs
                      if run["figures"].get(name) is not None
                      and run["figures"][name][op] is not None]
            medians[name] = statistics.median(values) if values else None
        ems = medians["ems"]
        ratios = {name: (ems / medians[name] if ems is not None and medians[name] else None)
                  for name in ("iperf3", "redis", "mooncake")}
        target = None
        if None not in ratios.values():
            target = (ratios["redis"] > 1 and ratios["mooncake"] > 1
                      and (block < IPERF3_TARGET_MIN_BLOCK
                           or ratios["iperf3"] >= IPERF3_TARGET_RATIO))
        rows.append({"block": block, "threads": threads, "op": op,
                     "bytes_per_s": medians, "ems_ratio": ratios, "target_met": target})
    return rows


def summarize_all(configurations: list[tuple[int, int]], runs: list[dict]) -> list[dict]:
    """Summary rows of every configuration that has at least one run."""
    rows = []
    for block, threads in configurations:
        matching = [run for run in runs if (run["block"], run["threads"]) == (block, threads)]
        if matching:
            rows += summarize(matching, block, threads)
    return rows


def gbps(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_table(path: str, report: dict) -> None:
    meta = report["meta"]
    lines = [
        "# EMS remote transfer against its peers",
        "",
        f"Run {meta['started']} on {meta['machine']}, {meta['cpus']} CPUs; "
        f"{meta['seconds']:g} s per measurement, {meta['rounds']} round(s), median shown. "
        f"GB/s = 1e9 bytes/s. iperf3 uses one stream per thread, Redis one redis-benchmark "
        f"connection per thread. Versions: "
        f"{'; '.join(f'{name} {version}' for name, version in meta['versions'].items())}.",
        "",
        "| block | threads | op | iperf3 | Redis | Mooncake | EMS | EMS/iperf3 | EMS/Redis "
        "| EMS/Mooncake | target met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        figures, ratios = row["bytes_per_s"], row["ems_ratio"]
        met = {True: "yes", False: "no", None: "n/a"}[row["target_met"]]
        lines.append(
            f"| {size_label(row['block'])} | {row['threads']} | {row['op']} "
            f"| {gbps(figures['iperf3'])} | {gbps(figures['redis'])} "
            f"| {gbps(figures['mooncake'])} | {gbps(figures['ems'])} "
            f"| {ratio(ratios['iperf3'])} | {ratio(ratios['redis'])} "
            f"| {ratio(ratios['mooncake'])} | {met} |")
    if not meta["ems_available"]:
        lines += ["", f"EMS side not available: {meta['ems_unavailable_reason']}."]
    failures = [(run["block"], run["threads"], name, message)
                for run in report["runs"] for name, message in run["errors"].items()]
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- {name}, {size_label(block)} x {threads}: {message.splitlines()[0]}"
                  for block, threads, name, message in failures]
    with open(path, "w") as table:
        table.write("\n".join(lines) + "\n")


def write_outputs(out: str, report: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as results:
        json.dump(report, results, indent=1)
    write_table(os.path.join(out, "table.md"), report)


# ---- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure EMS remote GET/PUT bandwidth against iperf3, Redis and "
                    "Mooncake on 127.0.0.1.")
    parser.add_argument("--sizes", type=parse_list(parse_size), default="64K,256K,1M,4M",
                        help="block sizes, comma-separated, K/M/G = KiB/MiB/GiB "
                             "(default 64K,256K,1M,4M)")
    parser.add_argument("--threads", type=parse_list(positive_int), default="1,4",
                        help="client thread counts, comma-separated (default 1,4)")
    parser.add_argument("--seconds", type=float, default=2.5,
                        help="duration of each measurement in seconds (default 2.5)")
    parser.add_argument("--bytes", type=parse_size, default="1G",
                        help="bytes of distinct keys per Mooncake and EMS phase (default 1G)")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="passes over the grid; the table shows the median (default 1)")
    parser.add_argument("--out", required=True,
                        help="directory for results.json and table.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)

    ems_bandwidth, unavailable_reason = load_ems_side()
    if ems_bandwidth is None:
        print(f"EMS side not available: {unavailable_reason}", file=sys.stderr)
    configurations = [(block, threads) for block in args.sizes for threads in args.threads]
    report = {
        "meta": {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"),
                 "machine": f"{platform.node()} {platform.system()} {platform.release()}",
                 "cpus": os.cpu_count(), "seconds": args.seconds, "bytes": args.bytes,
                 "rounds": args.rounds, "sizes": args.sizes, "threads": args.threads,
                 "ems_available": ems_bandwidth is not None,
                 "ems_unavailable_reason": unavailable_reason, "versions": tool_versions()},
        "runs": [], "summary": []}

    started = time.monotonic()
    total = len(configurations) * args.rounds
    for round_index in range(args.rounds):
        for index, (block, threads) in enumerate(configurations):
            # Rotate the order so that no peer always runs first after a pause.
            shift = (index + round_index) % len(PEER_NAMES)
            order = list(PEER_NAMES[shift:] + PEER_NAMES[:shift])
            step = round_index * len(configurations) + index + 1
            log.info("[%d/%d] %s x %d thread(s), round %d", step, total, size_label(block),
                     threads, round_index + 1)
            run = measure_configuration(block, threads, order, args, ems_bandwidth)
            run["round"] = round_index + 1
            report["runs"].append(run)
            report["summary"] = summarize_all(configurations, report["runs"])
            write_outputs(args.out, report)

    versions = report["meta"]["versions"]
    for run in report["runs"]:
        mooncake = run["figures"].get("mooncake")
        if mooncake is not None:
            versions["mooncake"] = mooncake["detail"]["version"]
    report["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    write_outputs(args.out, report)
    log.info("wrote %s and %s in %.0f s", os.path.join(args.out, "results.json"),
             os.path.join(args.out, "table.md"), report["meta"]["elapsed_s"])
    failed = any(run["errors"] for run in report["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
