"""Measure Mooncake store PUT and GET bandwidth over TCP on one machine, and print JSON.

Runs under the Python of the peers' virtual environment (.bench-peers), inside a network
namespace of its own that contains only the loopback interface: `peers.py` starts it with
`unshare --net`. The namespace is required because the transfer engine of
mooncake-transfer-engine-non-cuda 0.3.13.post1 binds its handshake and data listeners to
all interfaces, with no option to choose the address. The driver checks the namespace and
exits before starting anything if another interface is present.

It starts three processes: `mooncake_master`, a holder that mounts the only memory segment,
and itself as the client. The client moves keys with `put_from` and then `get_into` from
registered buffers, so each byte crosses a TCP connection between two processes.
It does not tune Mooncake: every setting not named here is the package default.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import importlib.metadata
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

LOOPBACK = "127.0.0.1"
MiB = 1 << 20
PACKAGE = "mooncake-transfer-engine-non-cuda"

# The holder's segment is sized so that the keys fill at most this share of it: the master
# starts evicting at 90 % (its -eviction_high_watermark_ratio default).
SEGMENT_FILL = 0.8
SETUP_TIMEOUT_S = 30.0

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def bring_loopback_up() -> None:
    """Set the `lo` interface of the current network namespace up (a new one starts down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def check_private_namespace() -> None:
    """Raise unless the only network interface of this process's namespace is `lo`."""
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ["lo"]:
        raise SystemExit(
            f"mooncake_driver: the network namespace has interfaces {names}, expected only "
            f"['lo']. Mooncake's listeners bind all interfaces, so run this driver under "
            f"`unshare --net` (peers.py does).")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, timeout: float) -> None:
    """Wait until something listens on 127.0.0.1:port, without connecting to it."""
    expected = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pid {process.pid} exited with {process.returncode} "
                               f"before listening on port {port}")
        with open("/proc/net/tcp") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if fields[1] == expected and fields[3] == "0A":
                    return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout:.0f} s")


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a child process and wait for it, killing it if it ignores SIGTERM."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_tail(path: str, limit: int = 2000) -> str:
    with open(path, errors="replace") as log:
        return log.read()[-limit:]


def setup_store(master: str, segment_bytes: int):
    """Create a store client on 127.0.0.1 with P2P handshake metadata (no metadata server)."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    # Arguments: local host, metadata, global segment bytes, local buffer bytes, protocol,
    # RDMA devices, master address. The local buffer only serves the copying put/get calls.
    status = store.setup(LOOPBACK, "P2PHANDSHAKE", segment_bytes, 16 * MiB, "tcp", "", master)
    if status != 0:
        raise RuntimeError(f"MooncakeDistributedStore.setup returned {status} "
                           f"(master {master}, segment {segment_bytes} bytes)")
    return store


def hold(master: str, segment_bytes: int) -> None:
    """Mount a segment, print 'ready', and keep it mounted until standard input closes."""
    store = setup_store(master, segment_bytes)
    print("ready", flush=True)
    sys.stdin.read()
    store.close()


def run_phase(store, op: str, keys: list[list[str]], buffers: list, block: int,
              seconds: float) -> dict:
    """Move each thread's keys once with put_from or get_into, stopping at `seconds`.

    Returns the bytes moved and the wall time from the common start to the last thread's end.
    """
    threads = len(keys)
    done = [0] * threads
    errors: list[str] = []
    barrier = threading.Barrier(threads + 1)

    def work(index: int) -> None:
        address = ctypes.addressof(buffers[index])
        barrier.wait()
        deadline = time.perf_counter() + seconds
        for key in keys[index]:
            if op == "put":
                status = store.put_from(key, address, block)
                failed = status != 0
            else:
                status = store.get_into(key, address, block)
                failed = status != block
            if failed:
                errors.append(f"{op} of {key} returned {status}")
                return
            done[index] += 1
            if time.perf_counter() >= deadline:
                return

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} {op} call(s) failed, first: {errors[0]}")
    return {"bytes": sum(done) * block, "seconds": elapsed, "keys_per_thread": done}


def measure(master: str, block: int, threads: int, total_bytes: int, seconds: float) -> dict:
    """Run the PUT phase then the GET phase of the same keys from this process."""
    store = setup_store(master, 0)
    try:
        per_thread = max(1, total_bytes // block // threads)
        keys = [[f"b{block}-t{t}-{i}" for i in range(per_thread)] for t in range(threads)]
        sources = [(ctypes.c_char * block).from_buffer_copy(os.urandom(block))
                   for _ in range(threads)]
        targets = [(ctypes.c_char * block)() for _ in range(threads)]
        for buffer in sources + targets:
            status = store.register_buffer(ctypes.addressof(buffer), block)
            if status != 0:
                raise RuntimeError(f"register_buffer of {block} bytes returned {status}")

        put = run_phase(store, "put", keys, sources, block, seconds)
        # GET reads only the keys that PUT wrote before its deadline.
        written = [thread_keys[:count] for thread_keys, count in zip(keys, put["keys_per_thread"])]
        get = run_phase(store, "get", written, targets, block, seconds)
        verified = all(bytes(source) == bytes(target)
                       for source, target in zip(sources, targets))
        if not verified:
            raise RuntimeError("get_into returned bytes that differ from what put_from wrote")
        return {"put": put, "get": get, "verified": verified}
    finally:
        store.close()


def drive(args: argparse.Namespace) -> dict:
    check_private_namespace()
    bring_loopback_up()
    bindir = os.path.dirname(sys.executable)
    keys = max(1, args.total_bytes // args.block // args.threads) * args.threads
    segment_bytes = -(-int(keys * args.block / SEGMENT_FILL) // MiB) * MiB + 64 * MiB

    rpc_port, metrics_port = free_port(), free_port()
    master_address = f"{LOOPBACK}:{rpc_port}"
    logs = tempfile.TemporaryDirectory(prefix="mooncake-driver-")
    master_log = os.path.join(logs.name, "master.log")
    holder_log = os.path.join(logs.name, "holder.log")
    master = holder = None
    try:
        with open(master_log, "w") as log:
            master = subprocess.Popen(
                [os.path.join(bindir, "mooncake_master"),
                 f"-rpc_address={LOOPBACK}", f"-rpc_port={rpc_port}",
                 f"-metrics_host={LOOPBACK}", f"-metrics_port={metrics_port}",
                 "-enable_http_metadata_server=false"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_listening(rpc_port, master, SETUP_TIMEOUT_S)

        with open(holder_log, "w") as log:
            holder = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "hold", "--master", master_address,
                 "--segment-bytes", str(segment_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        selector = selectors.DefaultSelector()
        selector.register(holder.stdout, selectors.EVENT_READ)
        if not selector.select(SETUP_TIMEOUT_S) or holder.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the holder did not mount its segment within "
                               f"{SETUP_TIMEOUT_S:.0f} s:\n{log_tail(holder_log)}")

        result = measure(master_address, args.block, args.threads, args.total_bytes,
                         args.seconds)
    except Exception as error:
        tails = "\n".join(f"--- {path}\n{log_tail(path)}" for path in (master_log, holder_log)
                          if os.path.exists(path))
        raise RuntimeError(f"{error}\n{tails}") from error
    finally:
        if holder is not None:
            holder.stdin.close()
            stop(holder)
        if master is not None:
            stop(master)
        logs.cleanup()

    result.update(block=args.block, threads=args.threads, segment_bytes=segment_bytes,
                  version=importlib.metadata.version(PACKAGE))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start master and holder, measure, print JSON")
    run.add_argument("--block", type=int, required=True, help="bytes per key")
    run.add_argument("--threads", type=int, required=True, help="client threads")
    run.add_argument("--total-bytes", type=int, required=True,
                     help="bytes of distinct keys written by the PUT phase at most")
    run.add_argument("--seconds", type=float, required=True,
                     help="time limit of each phase, in seconds")
    holder = sub.add_parser("hold", help="mount a segment until standard input closes")
    holder.add_argument("--master", required=True, help="master address HOST:PORT")
    holder.add_argument("--segment-bytes", type=int, required=True)
    args = parser.parse_args()

    if args.command == "hold":
        hold(args.master, args.segment_bytes)
    else:
        print(json.dumps(drive(args)), flush=True)


if __name__ == "__main__":
    main()
