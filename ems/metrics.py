"""Prometheus metrics of a node daemon, served over HTTP on /metrics, with /healthz and
/activation (the activation gate's decision as JSON).

Values are read from the pool and the transfer server at scrape time, so nothing on the
data path updates Python objects. Names follow docs/cluster.md: an `ems_` prefix, units in
the name, a `node` label.
"""
from __future__ import annotations

import json
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

import ems
from ems.manage.activation import NOT_ENFORCED, STATES

# (metric name, help, source dict, field) for every counter read from the C side.
_COUNTERS = [
    ("ems_pool_hits", "Blocks read from this node's pool", "pool", "hits"),
    ("ems_pool_misses", "Reads of this node's pool that found no block", "pool", "misses"),
    ("ems_pool_evictions", "Blocks evicted to make room", "pool", "evictions"),
    ("ems_pool_puts", "Blocks committed to this node's pool", "pool", "puts"),
    ("ems_pool_suspended_drops", "Blocks not stored because the pool was suspended (the "
     "node was not serving)", "pool", "suspended_drops"),
    ("ems_transfer_requests", "Requests served over TCP and the local socket", "server", "requests"),
    ("ems_transfer_errors", "Requests answered with an error status", "server", "errors"),
    ("ems_transfer_bad_frames", "Frames refused by the header check", "server", "bad_frames"),
    ("ems_transfer_auth_failures", "Connections refused for a wrong secret", "server", "auth_failures"),
    ("ems_transfer_connections", "Connections accepted", "server", "connections"),
    ("ems_transfer_refused_busy", "Connections refused at the connection limit", "server", "refused_busy"),
    ("ems_transfer_received_bytes", "Bytes received by the transfer server", "server", "bytes_in"),
    ("ems_transfer_sent_bytes", "Bytes sent by the transfer server", "server", "bytes_out"),
    ("ems_transfer_get_blocks", "Blocks asked for by remote GETs", "server", "gets"),
    ("ems_transfer_get_hits", "Blocks served to remote GETs", "server", "get_hits"),
    ("ems_transfer_put_blocks", "Blocks offered by remote and local PUTs", "server", "puts"),
    ("ems_directory_lookups", "Keys looked up in this node's directory shard", "server", "dir_lookups"),
    ("ems_directory_registrations", "Keys registered in this node's directory shard", "server", "dir_registered"),
]


class _Collector:
    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        daemon = self.daemon
        node = daemon.config.node_id
        if daemon.pool is None or daemon.pool.closed or daemon.server is None \
                or not daemon.server.running:
            return
        sources = {"pool": daemon.pool.stats(), "server": daemon.server.stats()}
        pool = sources["pool"]
        for name, text, source, field in _COUNTERS:
            family = CounterMetricFamily(name, text, labels=["node"])
            family.add_metric([node], sources[source][field])
            yield family
        gauges = [
            ("ems_pool_capacity_bytes", "Data bytes of the DRAM pool", pool["capacity_bytes"]),
            ("ems_pool_used_bytes", "Payload bytes of stored blocks", pool["bytes_used"]),
            ("ems_pool_blocks", "Blocks stored", pool["blocks"]),
            ("ems_transfer_connections_open", "Open connections",
             sources["server"]["connections_open"]),
            ("ems_directory_entries", "Entries in this node's directory shard",
             sources["server"]["dir_entries"]),
            ("ems_cluster_nodes", "Nodes in the membership this node sees", len(daemon.nodes)),
        ]
        tier = daemon.tier.stats() if daemon.tier is not None else None
        disk = {} if tier is None else {
            "ems_pool_capacity_bytes": tier["store"]["quota_bytes"],
            "ems_pool_used_bytes": tier["store"]["bytes"],
            "ems_pool_blocks": tier["store"]["blocks"]}
        for name, text, value in gauges:
            family = GaugeMetricFamily(name, text, labels=["node", "tier"] if "pool" in name
                                       else ["node"])
            family.add_metric([node, "dram"] if "pool" in name else [node], value)
            if name in disk:
                family.add_metric([node, "disk"], disk[name])
            yield family
        if tier is not None:
            yield from _tier_metrics(node, pool, tier)
        yield from _activation_metrics(node, daemon.activation())
        info = InfoMetricFamily("ems_node", "Version, protocol range and page kind of the node")
        # The range the server speaks: the build's (_core.PROTO_VERSION_MIN and _MAX)
        # unless EMS_PROTO_MIN or EMS_PROTO_MAX narrowed it.
        info.add_metric([], {"node": node, "version": ems.__version__,
                             "protocol_min": str(daemon.server.proto_min),
                             "protocol_max": str(daemon.server.proto_max),
                             "page_kind": pool["page_kind"]})
        yield info


# (metric name, help, field of SpillTier.stats() or of its "store" dict) per tier counter.
_TIER_COUNTERS = [
    ("ems_tier_hits", "Misses of DRAM read from the spill tier", "tier", "hits"),
    ("ems_tier_misses", "Misses of DRAM the spill tier did not have either", "tier", "misses"),
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


def _tier_metrics(node: str, pool: dict, tier: dict):
    """Counters of the spill tier, labelled tier="disk"; its capacity, use and blocks are
    the tier="disk" samples of the ems_pool_* gauges."""
    sources = {"tier": tier, "store": tier["store"]}
    for name, text, source, field in _TIER_COUNTERS:
        family = CounterMetricFamily(name, text, labels=["node", "tier"])
        family.add_metric([node, "disk"], sources[source].get(field, 0))
        yield family
    dropped = CounterMetricFamily("ems_tier_spill_dropped",
                                  "Blocks evicted from DRAM that could not be spilled "
                                  "(the eviction ring was full)", labels=["node", "tier"])
    dropped.add_metric([node, "disk"], pool.get("spill_dropped", 0))
    yield dropped
    store = tier["store"]
    spilling = GaugeMetricFamily("ems_tier_spilling",
                                 "1 while the tier accepts blocks, 0 after ENOSPC",
                                 labels=["node", "tier"])
    spilling.add_metric([node, "disk"], int(store["spilling"]))
    yield spilling
    mode = InfoMetricFamily("ems_tier_io", "I/O path of the spill tier")
    mode.add_metric([], {"node": node, "tier": "disk", "mode": store["io_mode"],
                         "direct": str(store.get("direct_io", False)).lower()})
    yield mode


def _activation_metrics(node: str, status):
    """ems_activation_state: 1 for the gate's current state, 0 for the others (a daemon
    without a gate reports not_enforced); ems_serving: 1 while the node serves."""
    family = GaugeMetricFamily("ems_activation_state", "Activation state of the node: 1 "
                               "for the current state", labels=["node", "state"])
    states = STATES if status.state in STATES else (status.state,)
    for state in states:
        family.add_metric([node, state], int(state == status.state))
    yield family
    serving = GaugeMetricFamily("ems_serving", "1 while the node serves blocks, 0 while "
                                "its pool is suspended", labels=["node"])
    serving.add_metric([node], int(status.serving))
    yield serving


def activation_document(daemon) -> dict:
    """Build the JSON body of /activation."""
    status = daemon.activation()
    return {"node_id": daemon.config.node_id, "cluster": daemon.config.cluster,
            "enforced": status.state != NOT_ENFORCED, **status.as_dict()}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):   # scrapes are not events worth a log line
        pass


class MetricsServer:
    """The HTTP endpoint: /metrics (Prometheus text format), /healthz ("ok") and
    /activation (JSON: node_id, cluster, enforced, state, reason, serving, account,
    credential, expires)."""

    def __init__(self, daemon, host: str, port: int):
        registry = CollectorRegistry()
        registry.register(_Collector(daemon))
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
