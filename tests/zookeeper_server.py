"""A real standalone ZooKeeper server for tests, from Debian's `zookeeper` package.

Each server gets its own directory (zoo.cfg, data, log) and a free port, and listens on
127.0.0.1 only: the admin server is off, no JMX remote port is configured, and a
standalone server opens no quorum or election ports. tickTime is 500 ms, so sessions can
be as short as 1 s (ZooKeeper allows 2 to 20 ticks).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
TICK_MS = 500


class ZooKeeperMissing(RuntimeError):
    """Java or Debian's zookeeper package is not installed."""


def find_classpath() -> list[str]:
    """Return the server's class path, as Debian's zkEnv.sh sets it, plus a log binding.

    zkEnv.sh of the `zookeeper` package names /usr/share/java/zookeeper.jar, whose manifest
    lists the dependency jars. slf4j-simple (from libslf4j-java, a dependency) sends the
    server log to stderr, which ZooKeeperServer writes to a file.
    """
    try:
        files = subprocess.run(["dpkg", "-L", "zookeeper"], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ZooKeeperMissing(f"Debian's zookeeper package is not installed "
                               f"(dpkg -L zookeeper failed: {exc})") from None
    env_script = next((path for path in files if path.endswith("/zkEnv.sh")), None)
    if env_script is None:
        raise ZooKeeperMissing("zkEnv.sh not found in the files of the zookeeper package")
    match = re.search(r'^CLASSPATH="?([^"\n]*)', Path(env_script).read_text(), re.MULTILINE)
    if match is None:
        raise ZooKeeperMissing(f"{env_script} sets no CLASSPATH")
    jars = [entry for entry in match.group(1).split(":") if entry.endswith(".jar")]
    missing = [jar for jar in jars if not os.path.exists(jar)]
    if not jars or missing:
        raise ZooKeeperMissing(f"{env_script} names missing jars: {missing or jars}")
    binding = "/usr/share/java/slf4j-simple.jar"
    return jars + ([binding] if os.path.exists(binding) else [])


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def four_letter_word(port: int, word: bytes, timeout: float = 1.0) -> bytes:
    """Send a ZooKeeper four-letter command (b"ruok", b"srvr") and return the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(word)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def _decode_proc_address(text: str) -> tuple[str, int]:
    """Decode "0100007F:1F90" from /proc/net/tcp{,6}: the address is written as 32-bit
    words in host byte order (little-endian here), the port in hex."""
    address_hex, port_hex = text.split(":")
    raw = bytes.fromhex(address_hex)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words), int(port_hex, 16)


class ZooKeeperServer:
    """One standalone ZooKeeper process under `directory`, on 127.0.0.1 at a free port.

    restart() keeps the port and the data directory, so sessions and znodes survive it as
    they would on a production server.
    """

    def __init__(self, directory, port: int | None = None):
        self.java = shutil.which("java")
        if self.java is None:
            raise ZooKeeperMissing("java not found on PATH")
        self.classpath = find_classpath()
        self.directory = Path(directory)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.config = self.directory / "zoo.cfg"
        self.log_path = self.directory / "zookeeper.log"

    @property
    def hosts(self) -> str:
        """The kazoo connection string, "127.0.0.1:PORT"."""
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"tickTime={TICK_MS}\n"
            f"dataDir={data}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=srvr,ruok\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it replies to `srvr` as a standalone server."""
        assert self.process is None, "server already running"
        self._write_config()
        command = [
            self.java, "-Xmx256m",
            "-Djava.net.preferIPv4Stack=true",  # a plain 127.0.0.1 socket, not ::ffff:
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp", ":".join(self.classpath), MAIN_CLASS, str(self.config),
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"ZooKeeper exited with code {code} during start; "
                                   f"log:\n{self.log_tail()}")
            try:
                if b"Mode: standalone" in four_letter_word(self.port, b"srvr"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ZooKeeper did not reply on {self.hosts} within {timeout:g} s; "
                           f"log:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same data directory."""
        self.stop()
        self.start()

    def listening_addresses(self) -> list[tuple[str, str, int]]:
        """Return (protocol, address, port) of every TCP socket the server listens on and
        every UDP socket it has bound, read from /proc."""
        assert self.process is not None, "server not running"
        inodes = set()
        fd_dir = Path(f"/proc/{self.process.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed since the listing
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])

        found = []
        for protocol in ("tcp", "tcp6", "udp", "udp6"):
            lines = Path(f"/proc/net/{protocol}").read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                # 0A is TCP_LISTEN; a UDP socket in the table is bound whatever its state.
                if inode in inodes and (protocol.startswith("udp") or state == "0A"):
                    found.append((protocol, *_decode_proc_address(local)))
        return found

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()
