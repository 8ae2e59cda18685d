"""Peers of the EMS remote transfer benchmark: iperf3, Redis and the Mooncake store.

Each measuring function starts its peer on a free 127.0.0.1 port, measures, stops every
process it started, and returns bytes per second (GB/s = 1e9 bytes/s). Servers bind
127.0.0.1 only, and the function raises if one of them listens on another address.
Mooncake binds all interfaces, so it runs in a network namespace that has only `lo`.
The functions tune no peer: every setting not named here is the peer's default.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MiB = 1 << 20
TRANSFER_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(TRANSFER_DIR))
PEERS_VENV = os.path.join(REPO_ROOT, ".bench-peers")
PEERS_PYTHON = os.path.join(PEERS_VENV, "bin", "python")
MOONCAKE_REQUIREMENT = "mooncake-transfer-engine-non-cuda==0.3.13.post1"
MOONCAKE_DRIVER = os.path.join(TRANSFER_DIR, "mooncake_driver.py")
START_TIMEOUT_S = 15.0

# Redis keeps this many bytes of distinct keys, so GET reads from memory larger than the
# CPU caches whatever the block size.
REDIS_KEYSPACE_BYTES = 256 * MiB


class PeerError(RuntimeError):
    """A peer could not be started or measured."""


# ---- process helpers ---------------------------------------------------------------------

def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 at the time of the call."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _listening_sockets() -> dict[int, str]:
    """Map the inode of each listening TCP socket of this namespace to its 'address:port'."""
    sockets = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        with open(table) as lines:
            for line in lines.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word of the address in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if width == 8 else socket.AF_INET6
                sockets[int(fields[9])] = f"{socket.inet_ntop(family, raw)}:{int(port, 16)}"
    return sockets


def listening_addresses(pid: int) -> list[str]:
    """Return the 'address:port' of every TCP socket that process `pid` listens on."""
    sockets = _listening_sockets()
    found = []
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inode = int(target[len("socket:["):-1])
            if inode in sockets:
                found.append(sockets[inode])
    return sorted(found)


def check_loopback_only(process: subprocess.Popen, name: str) -> list[str]:
    """Raise PeerError if `process` listens on an address outside 127.0.0.0/8 or ::1."""
    addresses = listening_addresses(process.pid)
    outside = [a for a in addresses
               if not (a.startswith("127.") or a.startswith("::1:"))]
    if outside:
        raise PeerError(f"{name} (pid {process.pid}) listens on {outside}, "
                        f"expected loopback addresses only")
    return addresses


def wait_listening(port: int, process: subprocess.Popen, name: str) -> None:
    """Wait until something listens on 127.0.0.1:port, without connecting to it.

    A probe connection would use up iperf3's single test (`-1`), so this reads /proc.
    """
    address = f"{LOOPBACK}:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(f"{name} exited with {process.returncode} before listening "
                            f"on {address}")
        # Any address counts here, so that check_loopback_only reports a wrong one.
        if any(a.endswith(f":{port}") for a in _listening_sockets().values()):
            return
        time.sleep(0.05)
    raise PeerError(f"{name} timed out: not listening on {address} after "
                    f"{START_TIMEOUT_S:.0f} s")


def start_server(name: str, command: list[str], port: int) -> tuple[subprocess.Popen, str]:
    """Start a server whose output goes to a temporary log, wait for its port, check it."""
    log_file = tempfile.NamedTemporaryFile("w", prefix=f"{name}-", suffix=".log",
                                           delete=False)
    with log_file:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    log.debug("started %s pid %d on %s:%d", name, process.pid, LOOPBACK, port)
    try:
        wait_listening(port, process, name)
        addresses = check_loopback_only(process, name)
    except PeerError as error:
        stop(process, name)
        with open(log_file.name, errors="replace") as output:
            tail = output.read()[-2000:]
        os.unlink(log_file.name)
        raise PeerError(f"{error}\n--- {name} output:\n{tail}") from error
    log.debug("%s pid %d listens on %s", name, process.pid, addresses)
    return process, log_file.name


def stop(process: subprocess.Popen, name: str, timeout: float = 10.0) -> None:
    """Terminate a child process and wait for it, killing it if it ignores SIGTERM."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s pid %d ignored SIGTERM for %.0f s, killing it",
                        name, process.pid, timeout)
            process.kill()
            process.wait()
    log.debug("stopped %s pid %d (exit status %s)", name, process.pid, process.returncode)


def run_client(command: list[str], timeout: float) -> str:
    """Run a client program to completion and return its standard output."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                check=False)
    except subprocess.TimeoutExpired as error:
        raise PeerError(f"{command[0]} timed out after {timeout:.0f} s") from error
    if result.returncode != 0:
        raise PeerError(f"{' '.join(command)} exited with {result.returncode}:\n"
                        f"{result.stderr[-2000:]}{result.stdout[-2000:]}")
    return result.stdout


# ---- iperf3 ------------------------------------------------------------------------------

def iperf3_loopback(streams: int, seconds: float) -> float:
    """Measure TCP bandwidth over loopback with `streams` parallel iperf3 streams.

    iperf3 3.12 truncates `-t` to whole seconds, so `seconds` is rounded up.
    """
    duration = max(1, math.ceil(seconds))
    port = free_port()
    server, server_log = start_server(
        "iperf3 server", ["iperf3", "-s", "-B", LOOPBACK, "-p", str(port), "-1"], port)
    try:
        output = run_client(["iperf3", "-c", LOOPBACK, "-p", str(port), "-P", str(streams),
                             "-t", str(duration), "-J"], timeout=duration + 30)
    finally:
        stop(server, "iperf3 server")
        os.unlink(server_log)
    report = json.loads(output)
    if "error" in report:
        raise PeerError(f"iperf3 client reported: {report['error']}")
    return report["end"]["sum_received"]["bits_per_second"] / 8


# ---- Redis -------------------------------------------------------------------------------

def _redis_cli(port: int, *command: str) -> str:
    return run_client(["redis-cli", "-h", LOOPBACK, "-p", str(port), *command], timeout=30)


def _redis_info(port: int, section: str) -> dict[str, str]:
    info = {}
    for line in _redis_cli(port, "INFO", section).splitlines():
        if ":" in line:
            key, value = line.strip().split(":", 1)
            info[key] = value
    return info


def _redis_benchmark(port: int, test: str, block: int, clients: int, requests: int,
                     keyspace: int) -> float:
    """Run one redis-benchmark test over `keyspace` random keys and return requests/s."""
    output = run_client(
        ["redis-benchmark", "-h", LOOPBACK, "-p", str(port), "-t", test, "-d", str(block),
         "-c", str(clients), "-n", str(requests), "-r", str(keyspace), "--csv"],
        timeout=120)
    for row in csv.reader(io.StringIO(output)):
        if row and row[0] == test.upper():
            return float(row[1])
    raise PeerError(f"redis-benchmark printed no {test.upper()} row:\n{output[-2000:]}")


def redis_run(block: int, clients: int, seconds: float) -> dict:
    """Measure Redis SET then GET bandwidth with `clients` redis-benchmark connections.

    SET first fills a keyspace of REDIS_KEYSPACE_BYTES, so that GET finds the keys it
    requests. The request counts are sized from a first SET run to last about `seconds`.
    GET bandwidth counts hits only (INFO keyspace_hits over the GET run).
    """
    keyspace = max(16, REDIS_KEYSPACE_BYTES // block)
    # jemalloc rounds a large value up by as much as a quarter, so allow twice the data.
    maxmemory = 2 * keyspace * block + 128 * MiB
    port = free_port()
    server, server_log = start_server(
        "redis-server",
        ["redis-server", "--bind", LOOPBACK, "--port", str(port), "--save", "",
         "--appendonly", "no", "--protected-mode", "yes", "--maxmemory", str(maxmemory),
         "--maxmemory-policy", "noeviction", "--daemonize", "no"],
        port)
    try:
        # Step 1: fill the keyspace; 4 draws per key leave about 2 % of the keys unset.
        fill_rps = _redis_benchmark(port, "set", block, clients, 4 * keyspace, keyspace)

        # Step 2: the measured SET run, sized from the fill rate.
        set_requests = max(10 * clients, int(fill_rps * seconds))
        set_rps = _redis_benchmark(port, "set", block, clients, set_requests, keyspace)
        dbsize = int(_redis_cli(port, "DBSIZE").strip())
        if dbsize == 0:
            raise PeerError("redis-server contains no key after the SET runs (DBSIZE 0)")

        # Step 3: a short GET run to size the measured one, then the measured GET run.
        probe_rps = _redis_benchmark(port, "get", block, clients,
                                     max(10 * clients, int(set_rps * 0.3)), keyspace)
        before = _redis_info(port, "stats")
        get_requests = max(10 * clients, int(probe_rps * seconds))
        get_rps = _redis_benchmark(port, "get", block, clients, get_requests, keyspace)
        after = _redis_info(port, "stats")
        hits = int(after["keyspace_hits"]) - int(before["keyspace_hits"])
        misses = int(after["keyspace_misses"]) - int(before["keyspace_misses"])
        used_memory = int(_redis_info(port, "memory")["used_memory"])
    finally:
        stop(server, "redis-server")
        os.unlink(server_log)

    hit_ratio = hits / (hits + misses) if hits + misses else 0.0
    if hit_ratio == 0.0:
        raise PeerError(f"redis GET run had no hits ({misses} misses, DBSIZE {dbsize})")
    return {"put": set_rps * block, "get": get_rps * block * hit_ratio,
            "set_requests": set_requests, "get_requests": get_requests,
            "keyspace": keyspace, "dbsize": dbsize, "get_hit_ratio": hit_ratio,
            "used_memory": used_memory}


def redis_bandwidth(op: str, block: int, clients: int, seconds: float) -> float:
    """Return Redis 'put' (SET) or 'get' (GET) bandwidth; see redis_run."""
    if op not in ("get", "put"):
        raise ValueError(f"op must be 'get' or 'put', got {op!r}")
    return redis_run(block, clients, seconds)[op]


# ---- Mooncake ----------------------------------------------------------------------------

@functools.cache
def ensure_peers_venv() -> str:
    """Create .bench-peers with the Mooncake package if missing; return its Python.

    Raises PeerError when the package cannot be imported, with the missing system library.
    """
    if not os.path.exists(PEERS_PYTHON):
        log.info("creating %s with %s", PEERS_VENV, MOONCAKE_REQUIREMENT)
        subprocess.run([sys.executable, "-m", "venv", PEERS_VENV], check=True)
        subprocess.run([PEERS_PYTHON, "-m", "pip", "install", "-q", MOONCAKE_REQUIREMENT],
                       check=True)
    probe = subprocess.run([PEERS_PYTHON, "-c", "import mooncake.store"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        hint = ""
        if "libibverbs" in probe.stderr:
            hint = " Install the Debian package libibverbs1 (apt-get install libibverbs1)."
        raise PeerError(f"{PEERS_PYTHON} cannot import mooncake.store:"
                        f" {probe.stderr.strip().splitlines()[-1]}.{hint}")
    return PEERS_PYTHON


def _private_network_prefix() -> list[str]:
    """Return the command prefix that runs a program in a new network namespace."""
    if os.geteuid() == 0:
        return ["unshare", "--net"]
    return ["unshare", "--net", "--map-root-user"]


def mooncake_run(block: int, threads: int, total_bytes: int, seconds: float = 2.5) -> dict:
    """Measure Mooncake store put_from then get_into bandwidth with `threads` threads.

    The master, the holder of the segment and the client run in a network namespace of
    their own (see mooncake_driver.py). Each phase moves at most `total_bytes` of distinct
    keys and stops after `seconds`.
    """
    python = ensure_peers_venv()
    command = _private_network_prefix() + [
        python, MOONCAKE_DRIVER, "run", "--block", str(block), "--threads", str(threads),
        "--total-bytes", str(total_bytes), "--seconds", f"{seconds:g}"]
    # The driver's processes share its process group, so killing the group ends them all.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    timeout = 90 + 4 * seconds
    try:
        output, errors = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as error:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise PeerError(f"mooncake driver timed out after {timeout:.0f} s") from error
    if process.returncode != 0:
        raise PeerError(f"mooncake driver exited with {process.returncode}:\n"
                        f"{errors[-3000:]}")
    report = json.loads(output.strip().splitlines()[-1])
    report["put_bytes_per_s"] = report["put"]["bytes"] / report["put"]["seconds"]
    report["get_bytes_per_s"] = report["get"]["bytes"] / report["get"]["seconds"]
    return report


def mooncake_bandwidth(op: str, block: int, threads: int, total_bytes: int,
                       seconds: float = 2.5) -> float:
    """Return Mooncake 'put' (put_from) or 'get' (get_into) bandwidth; see mooncake_run."""
    if op not in ("get", "put"):
        raise ValueError(f"op must be 'get' or 'put', got {op!r}")
    return mooncake_run(block, threads, total_bytes, seconds)[f"{op}_bytes_per_s"]
