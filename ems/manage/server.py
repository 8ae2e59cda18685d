"""`ems manage init` and `ems manage serve`: create a service directory, then run the
management service over HTTPS with its sampler and a Prometheus endpoint."""
from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import threading

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ems.manage import sealing, tokens
from ems.manage.app import create_app
from ems.manage.audit import AuditLog
from ems.manage.metrics import ManageMetrics, MetricsEndpoint
from ems.manage.sampler import Sampler, ZooKeeperProbe
from ems.manage.service import Service

log = logging.getLogger("ems.manage")

DEFAULT_PORT = 7443
DEFAULT_METRICS_PORT = 7702
ADMIN_CONFIG = "admin.json"
TLS_DAYS = 365


def init_directory(directory: str, hostnames: list[str], port: int = DEFAULT_PORT) -> dict:
    """Create the service directory: keys, a self-signed certificate, the database and the
    admin account. Returns the admin's CLI configuration (also written to admin.json).
    Raises FileExistsError for a directory that already contains a service."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(directory, "state.db")):
        raise FileExistsError(f"{directory} already contains a management service (state.db); "
                              f"choose an empty directory")
    sealing.new_master_key(os.path.join(directory, "master.key"))
    key = tokens.new_private_key()
    tokens.save_private_key(key, os.path.join(directory, "signing.key"))
    with open(os.path.join(directory, "signing.pub"), "wb") as f:
        f.write(tokens.public_pem(key))
    write_self_signed(directory, hostnames)
    service = Service(directory)
    try:
        account, key_id, secret = service.create_account("admin", "0", admin=True)
    finally:
        service.close()
    host = hostnames[0]
    config = {"url": f"https://{host}:{port}", "access_key_id": key_id,
              "secret_access_key": secret, "ca_file": os.path.join(os.path.abspath(directory),
                                                                   "tls.crt")}
    fd = os.open(os.path.join(directory, ADMIN_CONFIG), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return dict(config, account=account.id)


def write_self_signed(directory: str, hostnames: list[str]) -> None:
    """Write a P-256 key and a self-signed certificate for `hostnames` (names or IP
    addresses), for development. Clients trust it by naming tls.crt as their CA file."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=TLS_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    fd = os.open(os.path.join(directory, "tls.key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(os.path.join(directory, "tls.crt"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


class ManageServer:
    """The service, its sampler and its metrics endpoint. start() returns once HTTPS
    accepts connections; stop() ends all three."""

    def __init__(self, directory: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 metrics_host: str = "127.0.0.1", metrics_port: int | None = DEFAULT_METRICS_PORT,
                 clock=None, probe=None, sample: bool = True):
        for name in ("state.db", "master.key", "signing.key"):
            if not os.path.exists(os.path.join(directory, name)):
                raise FileNotFoundError(f"{directory} has no {name}: run `ems manage init "
                                        f"--dir {directory}` first")
        self.service = Service(directory, **({"clock": clock} if clock else {}))
        self.audit = AuditLog(os.path.join(directory, "audit.log"))
        self.service.probe = probe or ZooKeeperProbe()
        self.sampler = Sampler(self.service, self.service.probe) if sample else None
        self.instruments = ManageMetrics(self.service, self.sampler)
        self.app = create_app(self.service, self.audit, self.instruments)
        self.config = uvicorn.Config(
            # log_config=None: uvicorn's loggers propagate to the root handler that
            # ems.logs set up, so its lines take the service's text or JSON format.
            self.app, host=host, port=port, log_level="warning", access_log=False,
            log_config=None,
            ssl_certfile=tls_cert or os.path.join(directory, "tls.crt"),
            ssl_keyfile=tls_key or os.path.join(directory, "tls.key"))
        self.server = uvicorn.Server(self.config)
        self.metrics = None
        if metrics_port is not None:
            self.metrics = MetricsEndpoint(self.instruments, metrics_host, metrics_port)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def start(self, timeout: float = 20.0) -> None:
        self._thread = threading.Thread(target=self.server.run, name="ems-manage-http",
                                        daemon=True)
        self._thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self.server.started:
            if not self._thread.is_alive() or waited > timeout:
                raise RuntimeError(f"management service did not start on "
                                   f"{self.config.host}:{self.config.port}")
            deadline.wait(0.05)
            waited += 0.05
        if self.sampler is not None:
            self.sampler.start()

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.sampler is not None:
            self.sampler.stop()
        else:
            self.service.probe.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.audit.close()
        self.service.close()
