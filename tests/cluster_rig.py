"""Start and stop real `ems serve` daemons as separate processes on 127.0.0.1.

Each daemon gets its own TCP port, metrics port and Unix socket in the test's run
directory, and logs to <run_dir>/<node_id>.log. Shared by the cluster, fault and vLLM
cluster-mode tests.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

SECRET = "test-cluster-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonProcess:
    node_id: str
    port: int
    metrics_port: int
    socket_path: str
    log_path: str
    process: subprocess.Popen | None = None

    @property
    def peer(self) -> str:
        return f"{self.node_id}=127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def plan(run_dir: str, names: list[str]) -> list[DaemonProcess]:
    """Ports and paths for daemons `names`; start them with start()."""
    return [DaemonProcess(name, free_port(), free_port(), os.path.join(run_dir, f"{name}.sock"),
                          os.path.join(run_dir, f"{name}.log")) for name in names]


def daemon_env(run_dir: str, secret: str | None = SECRET) -> dict:
    env = dict(os.environ, EMS_RUN_DIR=run_dir)
    env.pop("EMS_SECRET", None)
    env.pop("EMS_SECRET_FILE", None)
    if secret is not None:
        env["EMS_SECRET"] = secret
    return env


def serve_args(daemon: DaemonProcess, *, peers: str | None = None,
               zookeeper: str | None = None, capacity: str = "128M",
               extra: tuple = ()) -> list[str]:
    """The command line of `ems serve` for the daemon."""
    args = [sys.executable, "-m", "ems.cli", "serve", "--node-id", daemon.node_id,
            "--capacity", capacity, "--pages", "small", "--port", str(daemon.port),
            "--metrics-port", str(daemon.metrics_port), "--socket", daemon.socket_path,
            *extra]
    if peers:
        args += ["--peers", peers]
    if zookeeper:
        args += ["--zookeeper", zookeeper]
    return args


def start(daemon: DaemonProcess, run_dir: str, *, peers: str | None = None,
          zookeeper: str | None = None, capacity: str = "128M", secret: str | None = SECRET,
          extra: tuple = (), timeout: float = 20.0, env: dict | None = None) -> DaemonProcess:
    """Start the daemon and wait until it logs that it serves (after it joined the
    membership) and its socket and TCP port accept connections. `env` adds environment
    variables, such as EMS_PROTO_MAX=1 for a daemon of the previous protocol version."""
    args = serve_args(daemon, peers=peers, zookeeper=zookeeper, capacity=capacity,
                      extra=extra)
    # The log is shared by restarts of the same node, so wait for one more "serving" line.
    serving = f"node {daemon.node_id} serving"
    started_before = daemon.log().count(serving) if os.path.exists(daemon.log_path) else 0
    log = open(daemon.log_path, "a")
    daemon.process = subprocess.Popen(args, env={**daemon_env(run_dir, secret), **(env or {})},
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"daemon {daemon.node_id} exited with {daemon.process.returncode}:"
                               f"\n{daemon.log()}")
        # A socket file left by a killed daemon and a port bound before the membership
        # check are no proof of a started daemon: the "serving" line is.
        if daemon.log().count(serving) > started_before and \
                os.path.exists(daemon.socket_path) and _port_open(daemon.port):
            return daemon
        time.sleep(0.05)
    stop(daemon)
    raise RuntimeError(f"daemon {daemon.node_id} did not start in {timeout} s:\n{daemon.log()}")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def stop(daemon: DaemonProcess, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Send `sig` (SIGTERM: clean stop; SIGKILL: crash) and wait; returns the exit code."""
    process = daemon.process
    if process is None or process.poll() is not None:
        return process.returncode if process else None
    process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
