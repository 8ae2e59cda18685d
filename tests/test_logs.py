"""JSON log lines: the formatter on its own, then real `ems serve` and `ems manage serve`
processes whose every output line must parse as JSON with the required fields."""
import datetime
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

import cluster_rig as rig
import zookeeper_server
from ems import logs

EMS = [sys.executable, "-m", "ems.cli"]
REQUIRED = ("time", "level", "component", "node_id", "message")


def parse_lines(text: str) -> list[dict]:
    """Parse every line of `text` as a JSON object with the required fields."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}\n{text}") from None
        missing = [name for name in REQUIRED if name not in entry]
        assert not missing, f"line {number} lacks {missing}: {line}"
        stamp = datetime.datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == datetime.timedelta(0), entry["time"]
        entries.append(entry)
    assert entries, "no log lines"
    return entries


def test_formatter_fields_and_exception():
    formatter = logs.JsonFormatter("n1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("ems.test").makeRecord(
            "ems.test", logging.WARNING, __file__, 1, "node %s: %s", ("n2", "lost"),
            sys.exc_info(), extra={"peer": "n2", "cluster": "c1", "key": b"\x01"})
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["time"].endswith("Z")
    assert entry["level"] == "WARNING"
    assert entry["component"] == "ems.test"
    assert entry["node_id"] == "n1"
    assert entry["message"] == "node n2: lost"
    assert entry["peer"] == "n2"
    assert entry["cluster"] == "c1"
    assert entry["key"] == str(b"\x01")
    assert "RuntimeError: boom" in entry["exception"]


def test_formatter_keeps_core_fields():
    record = logging.getLogger("ems.test").makeRecord(
        "ems.test", logging.INFO, __file__, 1, "hello", (), None,
        extra={"node_id": "forged", "time": "forged", "level": "forged"})
    entry = json.loads(logs.JsonFormatter(None).format(record))
    assert entry["node_id"] is None
    assert entry["level"] == "INFO"
    assert entry["time"] != "forged"


def test_configure_rejects_bad_values():
    with pytest.raises(ValueError, match="log format 'xml'"):
        logs.configure("xml", "INFO")
    with pytest.raises(ValueError, match="log level 'LOUD'"):
        logs.configure("json", "LOUD")


def test_daemon_json_lines(zookeeper, tmp_path):
    """Two daemons join one ZooKeeper cluster. Every line of a's log is JSON: its start,
    b's join with the peer and cluster ids, and its stop."""
    run_dir = str(tmp_path)
    cluster = "logs-json"
    a, b = rig.plan(run_dir, ["a", "b"])
    extra = ("--cluster", cluster, "--log-format", "json")
    rig.start(a, run_dir, zookeeper=zookeeper.hosts, extra=extra)
    try:
        rig.start(b, run_dir, zookeeper=zookeeper.hosts, extra=extra)
        deadline = time.monotonic() + 10
        while "node b joined" not in a.log() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        codes = [rig.stop(b), rig.stop(a)]
    assert codes == [0, 0]

    entries = parse_lines(a.log())
    assert {e["node_id"] for e in entries} == {"a"}
    serving = [e for e in entries if e["message"].startswith("node a serving")]
    assert serving and serving[0]["cluster"] == cluster
    assert serving[0]["component"] == "ems.daemon"
    joins = [e for e in entries if e["message"].startswith("node b joined")]
    assert joins, a.log()
    assert joins[0]["peer"] == "b"
    assert joins[0]["cluster"] == cluster
    assert entries[-1]["message"] == "node a stopped"
    parse_lines(b.log())


def test_daemon_failure_carries_exception(tmp_path):
    """A daemon that cannot bind its port logs one JSON line with the traceback; the format
    comes from EMS_LOG_FORMAT here."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(rig.daemon_env(str(tmp_path)), EMS_LOG_FORMAT="json")
        result = subprocess.run(
            [*EMS, "serve", "--node-id", "f", "--capacity", "16M", "--pages", "small",
             "--port", str(port), "--metrics-port", "-1"],
            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    entries = parse_lines(result.stdout + result.stderr)
    failure = entries[-1]
    assert failure["level"] == "ERROR"
    assert failure["message"].startswith("node f failed")
    assert "Traceback" in failure["exception"]


def https_request(directory: str, port: int, request: bytes) -> bytes:
    """Send raw bytes over TLS to the management service; return the start of the reply."""
    context = ssl.create_default_context(cafile=os.path.join(directory, "tls.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(request)
        return tls.recv(100)


def test_manage_service_json_lines(tmp_path):
    directory = str(tmp_path / "manage")
    subprocess.run([*EMS, "manage", "init", "--dir", directory], check=True,
                   capture_output=True, timeout=60)
    port = zookeeper_server.free_port()
    log_path = tmp_path / "manage.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*EMS, "manage", "serve", "--dir", directory, "--port", str(port),
             "--metrics-port", "-1", "--log-format", "json"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "management service on" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "management service did not start"
            time.sleep(0.1)
        # A malformed request makes uvicorn log a warning, which must be JSON too; a good
        # one shows that the service still serves.
        assert https_request(directory, port, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400")
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        assert https_request(directory, port, request).startswith(b"HTTP/1.1 200")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(20)
    assert code == 0
    entries = parse_lines(log_path.read_text())
    assert {e["node_id"] for e in entries} == {None}
    assert any(e["component"] == "ems.manage" for e in entries)
    assert any(e["component"].startswith("uvicorn") for e in entries), log_path.read_text()
