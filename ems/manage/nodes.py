"""Node figures for the console: each node's activation state and, from its Prometheus
endpoint, capacity, use and blocks per tier and its hit ratio.

The service reads the nodes' own HTTP endpoints (the address and metrics port each node
registered in ZooKeeper), so the figures are as fresh as one request and never stored.
"""
from __future__ import annotations

import json
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ems.cluster.membership import NodeRecord

TIMEOUT_S = 2.0
MAX_METRICS_BYTES = 4 << 20


def _get(record: NodeRecord, path: str) -> bytes:
    host = f"[{record.host}]" if ":" in record.host else record.host
    url = f"http://{host}:{record.metrics_port}{path}"
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return response.read(MAX_METRICS_BYTES)


def figures(metrics_text: str) -> dict:
    """Per-tier capacity, use and blocks, and DRAM and disk hits and misses, from a
    node's Prometheus exposition."""
    tiers: dict[str, dict] = {}
    counts = {"hits": 0.0, "misses": 0.0, "disk_hits": 0.0}
    gauges = {"ems_pool_capacity_bytes": "capacity_bytes", "ems_pool_used_bytes": "used_bytes",
              "ems_pool_blocks": "blocks"}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            tier = sample.labels.get("tier", "dram")
            if sample.name in gauges:
                tiers.setdefault(tier, {"tier": tier})[gauges[sample.name]] = int(sample.value)
            elif sample.name == "ems_pool_hits_total" and tier == "dram":
                counts["hits"] += sample.value
            elif sample.name == "ems_pool_misses_total" and tier == "dram":
                counts["misses"] += sample.value
            elif sample.name in ("ems_tier_hits_total", "ems_pool_hits_total") and tier == "disk":
                counts["disk_hits"] += sample.value
    lookups = counts["hits"] + counts["misses"]
    # A DRAM miss that the disk tier served is a hit of the node.
    ratio = (counts["hits"] + counts["disk_hits"]) / lookups if lookups else None
    return {"tiers": sorted(tiers.values(), key=lambda t: t["tier"] != "dram"),
            "hits": int(counts["hits"]), "disk_hits": int(counts["disk_hits"]),
            "misses": int(counts["misses"]), "hit_ratio": ratio}


def node_view(record: NodeRecord) -> dict:
    """Build one node's console entry. `error` gives the reason when figures are missing."""
    view = {"node_id": record.node_id, "address": f"{record.host}:{record.port}",
            "version": record.version, "state": None, "serving": None, "tiers": [],
            "hit_ratio": None, "error": None}
    if not record.metrics_port:
        view["error"] = "the node has no metrics endpoint"
        return view
    try:
        activation = json.loads(_get(record, "/activation"))
        view["state"] = activation.get("state")
        view["serving"] = activation.get("serving")
        view.update(figures(_get(record, "/metrics").decode("utf-8", "replace")))
    except (OSError, ValueError) as exc:
        view["error"] = f"no response from {record.host}:{record.metrics_port}: {exc}"
    return view
