"""Prometheus metrics of a node daemon, served over HTTP on /metrics, with /healthz and
/activation (the activation gate's decision as JSON).

Values are read from the pool, the transfer server and the spill tier at scrape time, so
nothing on the data path updates a Python object. The C server times each request into
fixed buckets with relaxed atomics (csrc/latency.h), and a scrape turns them into
histograms. Every series has `cluster` and `node` labels, and every ems_pool_* series
also has a `tier` label. docs/operations.md lists each metric, and a test checks that the
list matches what a daemon exposes.
"""
from __future__ import annotations

import itertools
import json
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)
from prometheus_client.utils import floatToGoString

import ems
from ems import _core
from ems.manage.activation import NOT_ENFORCED, STATES

BASE_LABELS = ["cluster", "node"]

# Pool metrics with a DRAM and a disk sample: (name, kind, help, DRAM field of Pool.stats(),
# function of SpillTier.stats() that returns the disk sample).
_TIER_SPLIT = [
    ("ems_pool_capacity_bytes", "gauge", "Bytes the tier can hold: the DRAM pool's data "
     "region, or the spill directory's quota", "capacity_bytes",
     lambda tier: tier["store"]["quota_bytes"]),
    ("ems_pool_used_bytes", "gauge", "Bytes the tier holds: payload bytes of stored blocks "
     "in DRAM, segment file bytes on disk", "bytes_used", lambda tier: tier["store"]["bytes"]),
    ("ems_pool_free_bytes", "gauge", "Bytes the tier can take before it evicts: free slabs "
     "and free slots in DRAM, the quota less the used bytes on disk", "bytes_free",
     lambda tier: max(0, tier["store"]["quota_bytes"] - tier["store"]["bytes"])),
    ("ems_pool_blocks", "gauge", "Blocks stored in the tier", "blocks",
     lambda tier: tier["store"]["blocks"]),
    ("ems_pool_hits", "counter", "Lookups that found their block in the tier (disk: DRAM "
     "misses read from the spill tier)", "hits", lambda tier: tier["hits"]),
    ("ems_pool_misses", "counter", "Lookups that did not find their block in the tier "
     "(disk: DRAM misses the spill tier did not have either)", "misses",
     lambda tier: tier["misses"]),
    ("ems_pool_evictions", "counter", "Blocks removed to make room (disk: live blocks in "
     "segments deleted to stay within the quota)", "evictions",
     lambda tier: tier["store"].get("evicted_blocks", 0)),
]

# Counters of the DRAM pool alone: (name, help, field of Pool.stats()).
_DRAM_COUNTERS = [
    ("ems_pool_puts", "Blocks committed to the DRAM pool", "puts"),
    ("ems_pool_deletes", "Blocks deleted from the DRAM pool", "deletes"),
    ("ems_pool_full_rejections", "Reservations refused because no slot or index entry "
     "could be freed (ENOSPC)", "pool_full"),
    ("ems_pool_suspended_drops", "Blocks not stored because the pool was suspended (the "
     "node was not serving)", "suspended_drops"),
]

# Per size class of the DRAM pool: (name, kind, help, field of a Pool.stats() class row).
_CLASS_METRICS = [
    ("ems_pool_class_slabs", "gauge", "Slabs assigned to the size class", "slabs"),
    ("ems_pool_class_blocks", "gauge", "Blocks stored in the size class", "blocks"),
    ("ems_pool_class_used_bytes", "gauge", "Payload bytes of the blocks in the size class",
     "payload_bytes"),
    ("ems_pool_class_wasted_bytes", "gauge", "Slot bytes the blocks of the size class leave "
     "unused", "wasted_bytes"),
    ("ems_pool_class_evictions", "counter", "Blocks of the size class evicted to make room",
     "evictions"),
]

# Counters of the transfer server and its directory shard: (name, help, field of
# Server.stats()).
_SERVER_COUNTERS = [
    ("ems_transfer_requests", "Requests served over TCP and the local socket", "requests"),
    ("ems_transfer_bad_frames", "Frames rejected by the header check", "bad_frames"),
    ("ems_transfer_auth_failures", "Connections rejected for a wrong secret",
     "auth_failures"),
    ("ems_transfer_connections", "Connections accepted", "connections"),
    ("ems_transfer_refused_busy", "Connections refused at the connection limit",
     "refused_busy"),
    ("ems_transfer_received_bytes", "Bytes received by the transfer server", "bytes_in"),
    ("ems_transfer_sent_bytes", "Bytes sent by the transfer server", "bytes_out"),
    ("ems_transfer_get_blocks", "Blocks requested by remote GETs", "gets"),
    ("ems_transfer_get_hits", "Blocks served to remote GETs", "get_hits"),
    ("ems_transfer_put_blocks", "Blocks offered by PUTs, over TCP or the local socket",
     "puts"),
    ("ems_transfer_local_put_blocks", "Blocks in LOCAL_COMMIT requests: same-host clients' "
     "writes into the shared mapping", "local_puts"),
    ("ems_directory_lookups", "Keys looked up in this node's directory shard", "dir_lookups"),
    ("ems_directory_registrations", "Keys registered in this node's directory shard",
     "dir_registered"),
]

# The `kind` label of ems_transfer_errors_total and the Server.stats() field it counts.
ERROR_KINDS = {
    "bad_request": "err_bad_request",
    "unauthenticated": "err_unauthenticated",
    "unsupported_version": "err_unsupported_version",
    "too_large": "err_too_large",
    "internal": "err_internal",
    "busy": "refused_busy",
    "timeout": "err_timeout",
    "transport": "err_transport",
    "miss_handler": "miss_handler_failures",
}

# Counters of the spill tier: (name, help, source, field), where source is the tier's
# stats or their "store" part.
_TIER_COUNTERS = [
    ("ems_tier_promotions", "Blocks copied from the spill tier back into DRAM", "tier",
     "promotions"),
    ("ems_tier_spills", "Blocks written to the spill tier", "tier", "spills"),
    ("ems_tier_prefetched", "Blocks read into DRAM ahead of use by prefetch", "tier",
     "prefetched"),
    ("ems_tier_checksum_failures", "Spilled records whose checksum or key did not match",
     "store", "checksum_failures"),
    ("ems_tier_io_errors", "Spill tier reads or writes that failed", "store", "io_errors"),
    ("ems_tier_enospc", "Times the spill directory was found full", "store", "enospc"),
]


def _family(kind: str, name: str, text: str, labels: list[str]):
    factory = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return factory(name, text, labels=labels)


class _Collector:
    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        daemon = self.daemon
        if daemon.pool is None or daemon.pool.closed or daemon.server is None \
                or not daemon.server.running:
            return
        base = [daemon.config.cluster, daemon.config.node_id]
        pool = daemon.pool.stats()
        server = daemon.server.stats()
        tier = daemon.tier.stats() if daemon.tier is not None else None

        yield from _pool_metrics(base, pool, tier)
        yield from _class_metrics(base, pool["classes"])
        if tier is not None:
            yield from _tier_metrics(base, pool, tier)
        yield from _server_metrics(base, server)
        yield _latency_histogram(base, daemon.server.latency())
        nodes = GaugeMetricFamily("ems_cluster_nodes", "Nodes in the membership this node "
                                  "sees", labels=BASE_LABELS)
        nodes.add_metric(base, len(daemon.nodes))
        yield nodes
        yield from _activation_metrics(base, daemon.activation())
        yield from _node_metrics(base, daemon.record, pool)


def _pool_metrics(base: list[str], pool: dict, tier: dict | None):
    """Yield the pool families: a tier="dram" sample each, and a tier="disk" one where a
    spill tier is attached and the figure applies to it."""
    labels = BASE_LABELS + ["tier"]
    for name, kind, text, field, disk_value in _TIER_SPLIT:
        family = _family(kind, name, text, labels)
        family.add_metric(base + ["dram"], pool[field])
        if tier is not None:
            family.add_metric(base + ["disk"], disk_value(tier))
        yield family
    for name, text, field in _DRAM_COUNTERS:
        family = CounterMetricFamily(name, text, labels=labels)
        family.add_metric(base + ["dram"], pool[field])
        yield family


def _class_metrics(base: list[str], classes: list[dict]):
    """Yield the families per size class of the DRAM pool, labelled with the class's slot
    size in bytes. Only classes that hold a slab appear."""
    labels = BASE_LABELS + ["tier", "size_class"]
    for name, kind, text, field in _CLASS_METRICS:
        family = _family(kind, name, text + " (size_class: slot size in bytes)", labels)
        for row in classes:
            family.add_metric(base + ["dram", str(row["slot_size"])], row[field])
        yield family


def _tier_metrics(base: list[str], pool: dict, tier: dict):
    """Yield the spill tier's counters and state, labelled tier="disk". Its capacity, use,
    blocks, hits, misses and evictions are the tier="disk" samples of the pool families."""
    labels = BASE_LABELS + ["tier"]
    disk = base + ["disk"]
    sources = {"tier": tier, "store": tier["store"]}
    for name, text, source, field in _TIER_COUNTERS:
        family = CounterMetricFamily(name, text, labels=labels)
        family.add_metric(disk, sources[source].get(field, 0))
        yield family
    dropped = CounterMetricFamily("ems_tier_spill_dropped",
                                  "Blocks evicted from DRAM that could not be spilled "
                                  "(the eviction ring was full)", labels=labels)
    dropped.add_metric(disk, pool.get("spill_dropped", 0))
    yield dropped
    store = tier["store"]
    spilling = GaugeMetricFamily("ems_tier_spilling",
                                 "1 while the tier accepts blocks, 0 after ENOSPC",
                                 labels=labels)
    spilling.add_metric(disk, int(store["spilling"]))
    yield spilling
    mode = InfoMetricFamily("ems_tier_io", "I/O path of the spill tier")
    mode.add_metric([], {"cluster": base[0], "node": base[1], "tier": "disk",
                         "mode": store["io_mode"],
                         "direct": str(store.get("direct_io", False)).lower()})
    yield mode


def _server_metrics(base: list[str], server: dict):
    for name, text, field in _SERVER_COUNTERS:
        family = CounterMetricFamily(name, text, labels=BASE_LABELS)
        family.add_metric(base, server[field])
        yield family
    errors = CounterMetricFamily("ems_transfer_errors", "Failed requests and connections of "
                                 "the transfer server, by kind", labels=BASE_LABELS + ["kind"])
    for kind, field in ERROR_KINDS.items():
        errors.add_metric(base + [kind], server.get(field, 0))
    yield errors
    for name, text, value in [
            ("ems_transfer_connections_open", "Open connections", server["connections_open"]),
            ("ems_directory_entries", "Entries in this node's directory shard",
             server["dir_entries"])]:
        family = GaugeMetricFamily(name, text, labels=BASE_LABELS)
        family.add_metric(base, value)
        yield family


def _latency_histogram(base: list[str], latency: dict) -> HistogramMetricFamily:
    """Build ems_transfer_request_duration_seconds from Server.latency(): one histogram per
    opcode, with the C buckets summed into Prometheus's cumulative ones."""
    family = HistogramMetricFamily(
        "ems_transfer_request_duration_seconds", "Time from a request's header arriving to "
        "its response being sent, by operation", labels=BASE_LABELS + ["op"])
    bounds = [floatToGoString(b) for b in _core.LATENCY_BOUNDS_S] + ["+Inf"]
    for op, (counts, total_seconds) in latency.items():
        cumulative = list(itertools.accumulate(counts))
        family.add_metric(base + [op], list(zip(bounds, cumulative)), total_seconds)
    return family


def _activation_metrics(base: list[str], status):
    """Yield the activation families. ems_activation_state is 1 for the gate's current
    state and 0 for the others, and a daemon without a gate reports not_enforced.
    ems_serving is 1 while the node serves. The credential's expiry time appears while a
    credential is known."""
    family = GaugeMetricFamily("ems_activation_state", "Activation state of the node: 1 "
                               "for the current state", labels=BASE_LABELS + ["state"])
    states = STATES if status.state in STATES else (status.state,)
    for state in states:
        family.add_metric(base + [state], int(state == status.state))
    yield family
    serving = GaugeMetricFamily("ems_serving", "1 while the node serves blocks, 0 while "
                                "its pool is suspended", labels=BASE_LABELS)
    serving.add_metric(base, int(status.serving))
    yield serving
    if status.expires is not None:
        expiry = GaugeMetricFamily("ems_activation_expiry_timestamp_seconds",
                                   "Expiry time of the credential the node judged last, "
                                   "Unix seconds", labels=BASE_LABELS)
        expiry.add_metric(base, status.expires)
        yield expiry


def _node_metrics(base: list[str], record, pool: dict):
    info = InfoMetricFamily("ems_node", "Version, protocol range and page kind of the node")
    info.add_metric([], {"cluster": base[0], "node": base[1], "version": ems.__version__,
                         "protocol_min": str(record.proto_min),
                         "protocol_max": str(record.proto_max),
                         "page_kind": pool["page_kind"]})
    yield info
    protocol = GaugeMetricFamily("ems_node_protocol_version", "Oldest (bound=min) and "
                                 "newest (bound=max) transfer protocol version the node "
                                 "speaks", labels=BASE_LABELS + ["bound"])
    protocol.add_metric(base + ["min"], record.proto_min)
    protocol.add_metric(base + ["max"], record.proto_max)
    yield protocol


def activation_document(daemon) -> dict:
    """Build the JSON body of /activation."""
    status = daemon.activation()
    return {"node_id": daemon.config.node_id, "cluster": daemon.config.cluster,
            "enforced": status.state != NOT_ENFORCED, **status.as_dict()}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):   # scrapes are not events worth a log line
        pass


class MetricsServer:
    """The HTTP endpoint: /metrics (Prometheus text format: the ems_* families and the
    standard process_* ones), /healthz ("ok") and /activation (JSON: node_id, cluster,
    enforced, state, reason, serving, account, credential, expires)."""

    def __init__(self, daemon, host: str, port: int):
        registry = CollectorRegistry()
        registry.register(_Collector(daemon))
        ProcessCollector(registry=registry)
        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/healthz":
                healthy = daemon.server is not None and daemon.server.running
                start_response("200 OK" if healthy else "503 Service Unavailable",
                               [("Content-Type", "text/plain")])
                return [b"ok\n" if healthy else b"stopped\n"]
            if environ.get("PATH_INFO") == "/activation":
                body = json.dumps(activation_document(daemon)).encode()
                start_response("200 OK", [("Content-Type", "application/json")])
                return [body]
            return metrics_app(environ, start_response)

        self.httpd = make_server(host, port, app, WSGIServer, handler_class=_QuietHandler)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ems-metrics",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_metrics(daemon, host: str, port: int) -> MetricsServer:
    return MetricsServer(daemon, host, port)
