"""Metrics of a real daemon (`ems serve` process, loopback TCP) and of a real management
service: request latency histograms that grow with real requests, errors by kind, the
per size class series, and the management API's request, authentication and sampler
counters. Which names exist, and that the docs, alerts and dashboard use only those, is
tests/test_alerts.py's part.
"""
import os
import socket
import time

import pytest

import cluster_rig as rig
import manage_rig
import metrics_rig
from metrics_rig import sample, scrape, wait_for

import ems
import ems._core as core
from ems.errors import AuthenticationError
from ems.manage.client import ApiError
from ems.manage.metrics import ManageMetrics
from ems.manage.sampler import Sampler
from ems.manage.server import init_directory
from ems.manage.service import Service
from prometheus_client import generate_latest

LABELS = {"cluster": metrics_rig.CLUSTER, "node": "m1"}
DURATION = "ems_transfer_request_duration_seconds"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    daemon = metrics_rig.start_full_node(str(tmp_path_factory.mktemp("metrics-node")))
    yield daemon
    rig.stop(daemon)


def op_count(text: str, op: str) -> float:
    return sample(text, DURATION + "_count", op=op, **LABELS)


def buckets(text: str, op: str) -> list[tuple[str, float]]:
    """(le, cumulative count) of one operation's histogram, in exposition order."""
    rows = []
    for line in text.splitlines():
        if line.startswith(DURATION + "_bucket{") and f'op="{op}"' in line:
            head, value = line.rsplit(" ", 1)
            rows.append((head.split('le="', 1)[1].split('"', 1)[0], float(value)))
    return rows


# ---- the daemon -----------------------------------------------------------------------


def test_requests_fill_latency_histograms(node):
    before = scrape(node.metrics_port)
    keys = [os.urandom(32) for _ in range(4)]
    conn = metrics_rig.connect(node)
    try:
        assert conn.put_many(keys, [b"h" * 1000] * 4) == [0] * 4
        for _ in range(5):
            buffers = [bytearray(1000) for _ in keys]
            assert conn.get_many_into(keys, buffers) == [1000] * 4
        assert conn.exists_many(keys) == [True] * 4
        assert conn.match_prefix(keys) == 4
        conn.delete_many(keys[:1])
    finally:
        conn.close()

    # The server counts a request after its response is sent, so a scrape right after the
    # last reply may miss it.
    expected = {"GET": 5, "PUT": 1, "EXISTS": 1, "MATCH_PREFIX": 1, "DELETE": 1}
    wait_for(lambda: all(op_count(scrape(node.metrics_port), op) >= op_count(before, op) + n
                         for op, n in expected.items()), "the requests to be counted")
    after = scrape(node.metrics_port)
    for op, n in expected.items():
        assert op_count(after, op) - op_count(before, op) == n, op

    rows = buckets(after, "GET")
    bounds = [le for le, _ in rows]
    assert bounds[-1] == "+Inf"
    assert [float(le) for le in bounds[:-1]] == list(core.LATENCY_BOUNDS_S)
    counts = [count for _, count in rows]
    assert counts == sorted(counts), "buckets must be cumulative"
    assert counts[-1] == op_count(after, "GET")
    total = sample(after, DURATION + "_sum", op="GET", **LABELS)
    assert 0 < total < op_count(after, "GET"), "a loopback GET takes well under 1 s"


def test_every_opcode_has_a_histogram(node):
    text = scrape(node.metrics_port)
    assert set(core.OPCODES.values()) == set(range(1, core.OP_LAST + 1))
    for op in core.OPCODES:
        assert len(buckets(text, op)) == len(core.LATENCY_BOUNDS_S) + 1, op


def test_wrong_secret_counted_as_unauthenticated(node):
    before = scrape(node.metrics_port)
    with pytest.raises(AuthenticationError):
        metrics_rig.connect(node, secret="not the cluster secret")
    after = scrape(node.metrics_port)
    kind = {"kind": "unauthenticated", **LABELS}
    assert sample(after, "ems_transfer_errors_total", **kind) \
        == sample(before, "ems_transfer_errors_total", **kind) + 1
    assert sample(after, "ems_transfer_auth_failures_total", **LABELS) \
        == sample(before, "ems_transfer_auth_failures_total", **LABELS) + 1
    assert sample(after, "ems_transfer_errors_total", kind="bad_request", **LABELS) \
        == sample(before, "ems_transfer_errors_total", kind="bad_request", **LABELS)


def test_size_class_series_add_up_to_pool(node):
    text = scrape(node.metrics_port)
    classes = [line for line in text.splitlines()
               if line.startswith("ems_pool_class_blocks{")]
    sizes = [int(line.split('size_class="', 1)[1].split('"', 1)[0]) for line in classes]
    assert any(size >= metrics_rig.BLOCK_BYTES for size in sizes), sizes
    dram = {"tier": "dram", **LABELS}
    for family, pool_family in [("ems_pool_class_blocks", "ems_pool_blocks"),
                                ("ems_pool_class_used_bytes", "ems_pool_used_bytes")]:
        total = sum(sample(text, family, size_class=str(size), **dram) for size in sizes)
        assert total == sample(text, pool_family, **dram), family
    for size in sizes:
        assert sample(text, "ems_pool_class_slabs", size_class=str(size), **dram) >= 1


def test_spill_tier_and_activation_series(node):
    text = scrape(node.metrics_port)
    assert sample(text, "ems_pool_capacity_bytes", tier="disk", **LABELS) == 64 << 20
    assert sample(text, "ems_pool_free_bytes", tier="disk", **LABELS) \
        == (64 << 20) - sample(text, "ems_pool_used_bytes", tier="disk", **LABELS)
    assert sample(text, "ems_activation_state", state="active", **LABELS) == 1
    assert sample(text, "ems_activation_state", state="expired", **LABELS) == 0
    expiry = sample(text, "ems_activation_expiry_timestamp_seconds", **LABELS)
    assert abs(expiry - (time.time() + 86400)) < 600
    assert sample(text, "ems_node_protocol_version", bound="min", **LABELS) == \
        core.PROTO_VERSION_MIN
    assert sample(text, "ems_node_protocol_version", bound="max", **LABELS) == \
        core.PROTO_VERSION_MAX
    assert core.PROTO_VERSION_MAX == 2
    assert sample(text, "ems_node_info", page_kind="small", version=ems.__version__,
                  **LABELS) == 1


# ---- the transfer server in this process ----------------------------------------------


@pytest.fixture
def server():
    pool = ems.Pool(16 << 20, pages="small")
    server = core.Server(pool, io_timeout_ms=300)
    yield server
    server.stop()
    pool.close()


def wait_for_stat(server, field: str, value: int) -> None:
    wait_for(lambda: server.stats()[field] >= value, f"{field} to reach {value}")
    assert server.stats()[field] == value, field


def test_stalled_and_cut_frames_counted(server):
    # Half a header, then silence: closed after io_timeout_ms as a timeout.
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(b"EMS1" + bytes(6))
    wait_for_stat(server, "err_timeout", 1)
    stalled.close()

    # Half a header, then the peer goes away: a transport error.
    cut = socket.create_connection(("127.0.0.1", server.port))
    cut.sendall(b"EMS1" + bytes(6))
    cut.close()
    wait_for_stat(server, "err_transport", 1)

    # A whole header that fails its check: a bad frame, rejected with status BAD_REQUEST.
    garbage = socket.create_connection(("127.0.0.1", server.port))
    garbage.sendall(bytes(32))
    wait_for_stat(server, "err_bad_request", 1)
    garbage.close()

    stats = server.stats()
    assert stats["bad_frames"] == 1
    assert stats["errors"] == 1
    assert stats["err_timeout"] == 1
    assert stats["err_transport"] == 1
    # A connection that closes between frames is no error.
    quiet = socket.create_connection(("127.0.0.1", server.port))
    quiet.close()
    time.sleep(0.1)
    assert server.stats()["err_transport"] == 1
    # None of these frames decoded, so no operation was timed.
    assert all(sum(counts) == 0 for counts, _ in server.latency().values())


# ---- the management service -----------------------------------------------------------


@pytest.fixture
def manage(tmp_path):
    service = manage_rig.start(str(tmp_path / "manage"))
    yield service
    service.stop()


def test_manage_requests_and_auth_failures(manage):
    manage.admin.call("GET", "/v1/account")
    manage.admin.call("GET", "/v1/account")
    forger = manage.client(manage.admin.key_id, "wrong-secret")
    stranger = manage.client("EK" + "Z" * 18, "secret")
    malformed = manage.client("AKIDUNKNOWN0000", "secret")
    for client in (forger, stranger, malformed):
        with pytest.raises(ApiError, match="HTTP 401"):
            client.call("GET", "/v1/account")
    status, _ = manage.admin.raw("GET", "/v1/account", sign=False)
    assert status == 401
    status, _ = manage.admin.raw("GET", "/v1/no-such-route")
    assert status == 404

    text = scrape(manage.server.metrics.port)
    assert sample(text, "ems_manage_requests_total", action="account.get", status="200") == 2
    assert sample(text, "ems_manage_requests_total", action="account.get", status="401") == 4
    assert sample(text, "ems_manage_requests_total", action="unmatched", status="404") == 1
    assert sample(text, "ems_manage_request_duration_seconds_count", action="account.get",
                  status="200") == 2
    assert sample(text, "ems_manage_request_duration_seconds_sum", action="account.get",
                  status="200") > 0
    failures = {reason: sample(text, "ems_manage_auth_failures_total", reason=reason)
                for reason in ("bad_signature", "unknown_key", "missing_header", "stale",
                               "replayed", "malformed_header")}
    assert failures == {"bad_signature": 1, "unknown_key": 1, "missing_header": 1,
                        "stale": 0, "replayed": 0, "malformed_header": 1}


class FlakyProbe:
    """Probe that fails its first call and counts 3 nodes afterwards."""

    def __init__(self):
        self.calls = 0

    def count(self, cluster: dict) -> int:
        self.calls += 1
        if self.calls == 1:
            raise OSError("ZooKeeper unreachable")
        return 3

    def close(self) -> None:
        pass


def test_sampler_counters_exposed(tmp_path):
    directory = str(tmp_path / "manage")
    init_directory(directory, ["127.0.0.1"])
    service = Service(directory, clock=lambda: 1_800_000_000)
    try:
        account, _, _ = service.create_account("acme", "0.50")
        service.create_cluster(account.id, "prod", "127.0.0.1:21810")
        sampler = Sampler(service, FlakyProbe())
        metrics = ManageMetrics(service, sampler)
        sampler.sample_at(1_800_000_300)   # the probe fails
        sampler.sample_at(1_800_000_300)   # retried: recorded
        sampler.sample_at(1_800_000_300)   # already recorded: not probed

        text = generate_latest(metrics.registry).decode()
        assert sample(text, "ems_manage_sampler_samples_total") == 1
        assert sample(text, "ems_manage_sampler_failures_total", kind="probe") == 1
        assert sample(text, "ems_manage_sampler_failures_total", kind="pass") == 0
        assert sample(text, "ems_manage_sampler_passes_total") == 0
        assert sample(text, "ems_manage_cluster_nodes", account=account.id) == 3
    finally:
        service.close()


def test_sampler_counts_failed_passes(tmp_path):
    directory = str(tmp_path / "manage")
    init_directory(directory, ["127.0.0.1"])
    service = Service(directory)
    sampler = Sampler(service, FlakyProbe())

    def broken_step():
        raise RuntimeError("database locked")

    sampler.step = broken_step
    try:
        sampler.start()
        wait_for(lambda: sampler.passes >= 1, "a sampler pass")
    finally:
        sampler.stop()
        service.close()
    assert sampler.pass_failures == sampler.passes >= 1
