"""Measure SpillStore write and read bandwidth against fio on the same directory.

For each block size and queue depth, every repeat runs fio and EMS back to back on the same
total bytes. fio runs `--rw=write`, then `--rw=randread` on the file it wrote. EMS runs
put_many of every block, then get_many_into of every key in random order. The order
alternates between repeats so that neither side always runs first. Both sides use io_uring
and O_DIRECT. The table gives the median of the repeats. Progress goes to stderr.

    python bench/spill/run.py --dir /var/tmp/ems-spill-bench --out bench/results/spill

fio is a benchmark-only dependency: `apt-get install -y fio` on Debian or Ubuntu.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import logging
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

from ems.tiering import SpillStore

log = logging.getLogger("spill-bench")

KiB = 1 << 10
SUFFIXES = {"K": KiB, "M": KiB ** 2, "G": KiB ** 3}
OPS = ("write", "read")
# Target: EMS at this fraction of fio's bandwidth or more, for every block size and depth.
TARGET_RATIO = 0.8
# Distinct source payloads. Blocks cycle over them, so the source stays in memory.
SOURCE_BLOCKS = 64
# File systems that keep files in memory, where O_DIRECT measures copies, not a disk.
MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")


def parse_size(text: str) -> int:
    """Parse '256K', '1M', '1G' (powers of 1024) or a plain number of bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = SUFFIXES.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in SUFFIXES else text
    try:
        value = int(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}, expected e.g. 256K or 1M")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_list(parse):
    return lambda text: [parse(item) for item in text.split(",") if item.strip()]


def size_label(block: int) -> str:
    for suffix, factor in (("GiB", KiB ** 3), ("MiB", KiB ** 2), ("KiB", KiB)):
        if block >= factor and block % factor == 0:
            return f"{block // factor} {suffix}"
    return f"{block} B"


# ---- the machine and the directory -------------------------------------------------------

def file_system_of(path: str) -> dict:
    """Return the mount point, file system type and source of the mount that contains path."""
    path = os.path.realpath(path)
    best = {"mount_point": "/", "type": "unknown", "source": "unknown"}
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields, _, tail = line.partition(" - ")
            mount_point = fields.split()[4].replace("\\040", " ")
            inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best["mount_point"]):
                fstype, source = tail.split()[:2]
                best = {"mount_point": mount_point, "type": fstype, "source": source}
    return best


def block_device_info(source: str) -> dict:
    """Queue settings of the block device behind a mount source such as /dev/vda."""
    name = os.path.basename(source)
    info = {"device": source}
    for setting in ("rotational", "scheduler", "logical_block_size", "max_sectors_kb",
                    "nr_requests"):
        try:
            with open(f"/sys/block/{name}/queue/{setting}") as value:
                info[setting] = value.read().strip()
        except OSError:
            pass
    return info


def machine_info(directory: str) -> dict:
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    file_system = file_system_of(directory)
    try:
        from importlib.metadata import version
        liburing_version = version("liburing")
    except Exception as error:  # metadata missing is not fatal for a record
        liburing_version = f"unknown ({error})"
    return {"host": platform.node(), "kernel": platform.release(), "cpu": cpu_model,
            "cpus": os.cpu_count(), "memory_bytes": memory, "python": platform.python_version(),
            "liburing": liburing_version, "fio": fio_version(), "directory": directory,
            "file_system": file_system, "block_device": block_device_info(file_system["source"])}


def fio_version() -> str:
    return subprocess.run(["fio", "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()


# ---- fio -----------------------------------------------------------------------------------

def fio_run(directory: str, rw: str, block: int, depth: int, total: int) -> dict:
    """Run one fio job on DIRECTORY/fio.dat; return its bandwidth and the command."""
    command = ["fio", "--name=spill", f"--filename={os.path.join(directory, 'fio.dat')}",
               "--ioengine=io_uring", "--direct=1", f"--bs={block}", f"--iodepth={depth}",
               f"--rw={rw}", f"--size={total}", "--output-format=json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fio failed with status {done.returncode}: {done.stderr.strip()}")
    job = json.loads(done.stdout)["jobs"][0]
    side = job["write" if rw == "write" else "read"]
    if side["io_bytes"] < total:
        raise RuntimeError(f"fio moved {side['io_bytes']} bytes of {total}")
    return {"bytes_per_s": float(side["bw_bytes"]), "command": " ".join(command)}


def fio_pass(directory: str, block: int, depth: int, total: int) -> dict:
    """Run fio writes, then random reads of the file they wrote, and delete the file."""
    try:
        write = fio_run(directory, "write", block, depth, total)
        read = fio_run(directory, "randread", block, depth, total)
    finally:
        try:
            os.unlink(os.path.join(directory, "fio.dat"))
        except FileNotFoundError:
            pass
    return {"write": write["bytes_per_s"], "read": read["bytes_per_s"],
            "commands": [write["command"], read["command"]]}


# ---- EMS -----------------------------------------------------------------------------------

def store_kwargs(depth: int) -> dict:
    """Keyword arguments for a SpillStore at this depth. A store from before the depth
    setting existed gets none, so that this script can also measure it."""
    if "depth" in inspect.signature(SpillStore).parameters:
        return {"depth": depth}
    return {}


def ems_pass(directory: str, block: int, depth: int, total: int, batch: int) -> dict:
    """Time put_many of total bytes of blocks, then get_many_into of every key in random
    order; return bytes per second of each.

    Write time covers the put_many calls, including the seal (fsync and rename) of each full
    segment. The final seal at close is reported apart as close_s. Read time covers the
    get_many_into calls on the same store. Every read must hit, and sampled blocks are
    compared with their source.
    """
    count = total // block
    keys = [hashlib.sha256(b"spill-bench-%d-%d" % (block, i)).digest() for i in range(count)]
    source = mmap.mmap(-1, SOURCE_BLOCKS * block)
    source.write(os.urandom(SOURCE_BLOCKS * block))
    source_view = memoryview(source)
    blocks = [source_view[(i % SOURCE_BLOCKS) * block:(i % SOURCE_BLOCKS + 1) * block]
              for i in range(count)]
    # Fault the destination in before timing, because a tier reads into memory it already uses.
    destination = mmap.mmap(-1, batch * block)
    destination.write(bytes(batch * block))
    destination_view = memoryview(destination)
    buffers = [destination_view[i * block:(i + 1) * block] for i in range(batch)]
    store_dir = os.path.join(directory, "ems")
    shutil.rmtree(store_dir, ignore_errors=True)
    try:
        store = SpillStore(store_dir, quota_bytes=2 * total + (256 << 20), io="uring",
                           **store_kwargs(depth))
        try:
            started = time.perf_counter()
            for start in range(0, count, batch):
                stored = store.put_many(keys[start:start + batch], blocks[start:start + batch])
                if not all(stored):
                    raise RuntimeError(f"put_many stored {sum(stored)} of {len(stored)} blocks")
            write_s = time.perf_counter() - started

            order = list(range(count))
            random.shuffle(order)
            started = time.perf_counter()
            for start in range(0, count, batch):
                chunk = order[start:start + batch]
                found = store.get_many_into([keys[i] for i in chunk], buffers[:len(chunk)])
                if not all(found):
                    raise RuntimeError(f"get_many_into found {sum(found)} of {len(found)} blocks")
            read_s = time.perf_counter() - started
            last = order[start:start + batch]
            for slot in (0, len(last) - 1):
                expected = blocks[last[slot]]
                if buffers[slot] != expected:
                    raise RuntimeError(f"block {last[slot]} read back differs from its source")
            stats = store.stats()
        finally:
            started = time.perf_counter()
            store.close()
            close_s = time.perf_counter() - started
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    return {"write": count * block / write_s, "read": count * block / read_s,
            "close_s": round(close_s, 3), "io_mode": stats["io_mode"],
            "direct_io": stats["direct_io"], "depth": stats.get("depth"),
            "segments": stats["segments"]}


# ---- summary and outputs -------------------------------------------------------------------

def summarize(runs: list[dict], sizes: list[int], depths: list[int]) -> list[dict]:
    """Return the median of the repeats for each block size, depth and operation, with
    EMS/fio and whether the target is met."""
    rows = []
    for block in sizes:
        for depth in depths:
            matching = [run for run in runs if (run["block"], run["depth"]) == (block, depth)]
            for op in OPS:
                fio = [run["fio"][op] for run in matching if run.get("fio")]
                ems = [run["ems"][op] for run in matching if run.get("ems")]
                if not fio or not ems:
                    continue
                ratio = statistics.median(ems) / statistics.median(fio)
                rows.append({"block": block, "depth": depth, "op": op,
                             "fio_bytes_per_s": statistics.median(fio),
                             "ems_bytes_per_s": statistics.median(ems),
                             "fio_all": fio, "ems_all": ems, "ratio": ratio,
                             "met": ratio >= TARGET_RATIO})
    return rows


def table_lines(report: dict) -> list[str]:
    lines = ["| block | depth | op | fio GB/s | EMS GB/s | EMS/fio | target 0.8x |",
             "|---|---|---|---|---|---|---|"]
    for row in report["summary"]:
        lines.append(f"| {size_label(row['block'])} | {row['depth']} | {row['op']} "
                     f"| {row['fio_bytes_per_s'] / 1e9:.2f} | {row['ems_bytes_per_s'] / 1e9:.2f} "
                     f"| {row['ratio']:.2f} | {'met' if row['met'] else 'missed'} |")
    return lines


def plot(path: str, report: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, op in zip(axes, OPS):
        rows = [row for row in report["summary"] if row["op"] == op]
        labels = [f"{size_label(row['block'])}\nQD {row['depth']}" for row in rows]
        positions = range(len(rows))
        axis.bar([p - 0.2 for p in positions], [row["fio_bytes_per_s"] / 1e9 for row in rows],
                 width=0.4, label="fio (io_uring, O_DIRECT)", color="#999999")
        axis.bar([p + 0.2 for p in positions], [row["ems_bytes_per_s"] / 1e9 for row in rows],
                 width=0.4, label="EMS SpillStore", color="#1f77b4")
        for position, row in zip(positions, rows):
            axis.annotate(f"{row['ratio']:.2f}x", (position + 0.2, row["ems_bytes_per_s"] / 1e9),
                          ha="center", va="bottom", fontsize=8)
        axis.set_xticks(list(positions), labels, fontsize=8)
        axis.set_title("write (fio --rw=write)" if op == "write" else "read (fio --rw=randread)")
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("GB/s (1e9 bytes/s), median of repeats")
    axes[0].legend(fontsize=8, loc="lower right")
    meta = report["meta"]
    figure.suptitle(f"Spill tier against fio on {meta['machine']['file_system']['type']} "
                    f"({meta['machine']['file_system']['source']}), "
                    f"{size_label(meta['bytes'])} per pass, {meta['repeats']} repeats",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(out: str, report: dict, with_plot: bool) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as results:
        json.dump(report, results, indent=1)
    with open(os.path.join(out, "table.md"), "w") as table:
        table.write("\n".join(table_lines(report)) + "\n")
    if with_plot and report["summary"]:
        plot(os.path.join(out, "plot.png"), report)


# ---- main ----------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Measure SpillStore write and read bandwidth against fio (io_uring, "
                    "O_DIRECT) on the same directory.")
    parser.add_argument("--dir", required=True,
                        help="directory on the disk to measure (not tmpfs); the run creates "
                             "and deletes fio.dat and ems/ in it")
    parser.add_argument("--sizes", type=parse_list(parse_size), default="256K,1M",
                        help="block sizes, comma-separated, K/M/G = KiB/MiB/GiB (default 256K,1M)")
    parser.add_argument("--depths", type=parse_list(positive_int), default="1,8,32",
                        help="queue depths, comma-separated (default 1,8,32)")
    parser.add_argument("--bytes", type=parse_size, default="1G",
                        help="bytes written and read per pass of each side (default 1G)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="passes of each side per configuration; the table shows the "
                             "median (default 3)")
    parser.add_argument("--batch", type=positive_int, default=256,
                        help="blocks per put_many and get_many_into call (default 256)")
    parser.add_argument("--out", required=True, help="directory for results.json, table.md "
                                                     "and plot.png")
    parser.add_argument("--no-plot", action="store_true", help="skip plot.png")
    return parser.parse_args(argv)


def check_setup(args) -> str | None:
    """Return why the run cannot start, or None."""
    if shutil.which("fio") is None:
        return ("fio is not installed. It is needed only for this benchmark: on Debian or "
                "Ubuntu run `apt-get install -y fio` as root, elsewhere install fio 3.x with "
                "the io_uring engine.")
    if args.bytes < max(args.sizes):
        return f"--bytes {args.bytes} is smaller than the largest block size {max(args.sizes)}"
    os.makedirs(args.dir, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    # The fio file and the store's segments never exist at the same time.
    need = args.bytes + (512 << 20)
    if free < need:
        return f"{args.dir} has {free} bytes free; the run needs {need}"
    return None


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("ems").setLevel(logging.WARNING)  # one open and close line per pass
    args = parse_args(argv)
    problem = check_setup(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    machine = machine_info(args.dir)
    if machine["file_system"]["type"] in MEMORY_FILE_SYSTEMS:
        log.warning("%s is on %s, which keeps files in memory: this measures copies, not a "
                    "disk", args.dir, machine["file_system"]["type"])
    report = {"meta": {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"),
                       "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                       "machine": machine, "bytes": args.bytes, "repeats": args.repeats,
                       "batch": args.batch, "sizes": args.sizes, "depths": args.depths,
                       "statistic": "median of repeats", "target_ratio": TARGET_RATIO},
              "runs": [], "summary": []}

    started = time.monotonic()
    configurations = [(block, depth) for block in args.sizes for depth in args.depths]
    for repeat in range(args.repeats):
        for index, (block, depth) in enumerate(configurations):
            order = ("fio", "ems") if (repeat + index) % 2 == 0 else ("ems", "fio")
            run = {"block": block, "depth": depth, "repeat": repeat + 1, "order": order}
            for side in order:
                if side == "fio":
                    run["fio"] = fio_pass(args.dir, block, depth, args.bytes)
                else:
                    run["ems"] = ems_pass(args.dir, block, depth, args.bytes, args.batch)
            log.info("[repeat %d] %s QD %d: fio write %.2f read %.2f, EMS write %.2f read %.2f "
                     "GB/s", repeat + 1, size_label(block), depth, run["fio"]["write"] / 1e9,
                     run["fio"]["read"] / 1e9, run["ems"]["write"] / 1e9,
                     run["ems"]["read"] / 1e9)
            report["runs"].append(run)
            report["summary"] = summarize(report["runs"], args.sizes, args.depths)
            write_outputs(args.out, report, with_plot=False)

    report["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    write_outputs(args.out, report, with_plot=not args.no_plot)
    print("\n".join(table_lines(report)))
    log.info("wrote %s in %.0f s", args.out, report["meta"]["elapsed_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
