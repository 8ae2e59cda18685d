"""Prometheus metrics of the management service, served over plain HTTP on /metrics.

Request counts and durations are recorded by the API's middleware, authentication
failures by its signature check. Account, cluster and sampler figures are read at scrape
time (from the database and the sampler's counters). Every name starts with
`ems_manage_`, and docs/operations.md lists them. The registry also has
prometheus_client's standard process_* families.
"""
from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector,
                               disable_created_metrics, make_wsgi_app)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

import ems

# The `reason` label of ems_manage_auth_failures_total (ems.manage.signing.SignatureError).
AUTH_FAILURE_REASONS = ("missing_header", "malformed_header", "unknown_key", "stale",
                        "bad_signature", "replayed")

# The `action` label of a request that matched no route of the API: an unknown path, or a
# body rejected before routing. Route names would otherwise come from the request's path.
UNMATCHED = "unmatched"


class ManageMetrics:
    """The service's registry and the instruments the API updates."""

    def __init__(self, service, sampler=None):
        # No *_created series next to the counters and histograms: they would double the
        # series for no use here. The switch is global to prometheus_client, so it also
        # applies to other registries in this process.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ems_manage_requests", "API requests answered, by route name and HTTP status",
            ["action", "status"], registry=self.registry)
        self.request_duration = Histogram(
            "ems_manage_request_duration_seconds", "Time to answer an API request, by "
            "route name and HTTP status", ["action", "status"], registry=self.registry)
        self.auth_failures = Counter(
            "ems_manage_auth_failures", "Signed requests rejected with 401, by reason",
            ["reason"], registry=self.registry)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason=reason)
        self.registry.register(_StateCollector(service, sampler))
        ProcessCollector(registry=self.registry)

    def observe_request(self, action: str, status: int, seconds: float) -> None:
        self.requests.labels(action=action, status=str(status)).inc()
        self.request_duration.labels(action=action, status=str(status)).observe(seconds)


class _StateCollector:
    """Account and cluster gauges read from the database, and the sampler's counters,
    at scrape time."""

    def __init__(self, service, sampler):
        self.service = service
        self.sampler = sampler

    def collect(self):
        info = InfoMetricFamily("ems_manage", "Version of the management service")
        info.add_metric([], {"version": ems.__version__})
        yield info
        yield from self._accounts()
        if self.sampler is not None:
            yield from self._sampler()

    def _accounts(self):
        store = self.service.store
        arrears = GaugeMetricFamily("ems_manage_account_in_arrears",
                                    "1 while the account's balance is below its bill due",
                                    labels=["account"])
        balance = GaugeMetricFamily("ems_manage_account_balance",
                                    "Sum of the account's top-ups", labels=["account"])
        due = GaugeMetricFamily("ems_manage_account_bill_due",
                                "Sum of the account's metered charges", labels=["account"])
        nodes = GaugeMetricFamily("ems_manage_cluster_nodes",
                                  "Working nodes in the cluster's last sample",
                                  labels=["account", "cluster"])
        for account in store.accounts():
            paid, charged = store.paid(account.id), store.charged(account.id)
            arrears.add_metric([account.id], float(paid < charged))
            balance.add_metric([account.id], float(paid))
            due.add_metric([account.id], float(charged))
            for cluster in store.clusters(account.id, live_only=True):
                samples = store.samples(cluster["id"])
                nodes.add_metric([account.id, cluster["id"]], samples[-1][1] if samples else 0)
        yield from (arrears, balance, due, nodes)

    def _sampler(self):
        sampler = self.sampler
        passes = CounterMetricFamily("ems_manage_sampler_passes",
                                     "Sampler passes finished, failed ones included")
        passes.add_metric([], sampler.passes)
        yield passes
        samples = CounterMetricFamily("ems_manage_sampler_samples",
                                      "Samples recorded, one per cluster and sample time")
        samples.add_metric([], sampler.samples_recorded)
        yield samples
        failures = CounterMetricFamily("ems_manage_sampler_failures", "Sampler failures: "
                                       "kind=probe for a cluster whose nodes could not be "
                                       "counted (retried), kind=pass for a pass that raised",
                                       labels=["kind"])
        failures.add_metric(["probe"], sampler.probe_failures)
        failures.add_metric(["pass"], sampler.pass_failures)
        yield failures


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


class MetricsEndpoint:
    """/metrics of a ManageMetrics registry on its own HTTP server thread."""

    def __init__(self, metrics: ManageMetrics, host: str, port: int):
        self.httpd = make_server(host, port, make_wsgi_app(metrics.registry), WSGIServer,
                                 handler_class=_QuietHandler)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ems-manage-metrics",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
