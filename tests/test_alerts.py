"""The alert rules (deploy/prometheus/alerts.yml), the Grafana dashboard
(deploy/grafana/ems.json) and the metric list of docs/operations.md, checked with
promtool and against what a real daemon and a real management service expose.

promtool comes from Debian's `prometheus` package, which .ci/run installs; without it the
promtool tests skip. The name checks need no promtool: every ems_* name that a rule, a
panel or the document uses must be in the live exposition, and every family that is
exposed must be in the document, so no name can drift.
"""
import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

import cluster_rig as rig
import manage_rig
import metrics_rig
from metrics_rig import ems_names, families, scrape, series_names

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ems.json"
OPERATIONS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install Debian's prometheus package "
                             "(.ci/run does)")

# Grafana's variables, replaced by values PromQL accepts before promtool parses a panel.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$cluster": "c1", "$node": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          cwd=ALERTS.parent)


def alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [panel for panel in panels if panel["type"] != "row"]


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and template variables."""
    queries = [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    queries += [v["definition"] for v in variables if v["type"] == "query"]
    return queries


def metrics_section() -> str:
    """The `## Metrics` section of docs/operations.md, up to the next `## ` heading."""
    text = OPERATIONS.read_text()
    start = text.index("\n## Metrics\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


# ---- promtool ---------------------------------------------------------------------------


@needs_promtool
def test_promtool_check_rules():
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test():
    tested = {case["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    """promtool parses each panel query, written as a recording rule."""
    rules = []
    for i, query in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        if query.startswith("label_values("):   # Grafana's own function, not PromQL
            query = query[len("label_values("):].rsplit(",", 1)[0]
        rules.append({"record": f"ems_dashboard:query_{i}", "expr": query})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the dashboard's shape ----------------------------------------------------------------


def test_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ems-overview"
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "cluster", "node"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]


def test_dashboard_panels_filter_by_cluster_and_node():
    """Every daemon series a panel selects is narrowed to the chosen cluster and nodes."""
    for panel in dashboard_panels():
        for target in panel["targets"]:
            for selector in re.findall(r"\b(ems_[a-z0-9_]+)(\{[^}]*\})?", target["expr"]):
                name, matchers = selector
                if name.startswith("ems_manage_"):
                    continue
                assert 'cluster="$cluster"' in matchers, (panel["title"], name)
                if name != "ems_node_info" and name != "ems_serving":
                    assert 'node=~"$node"' in matchers, (panel["title"], name)


# ---- names against a live exposition --------------------------------------------------


@pytest.fixture(scope="module")
def exposition(tmp_path_factory):
    """The /metrics text of a daemon with every optional family and of a management
    service with its sampler, after one API call."""
    daemon = metrics_rig.start_full_node(str(tmp_path_factory.mktemp("alerts-node")))
    try:
        manage = manage_rig.start(str(tmp_path_factory.mktemp("alerts-manage") / "svc"),
                                  sample=True)
        try:
            manage.admin.call("GET", "/v1/account")
            yield {"daemon": scrape(daemon.metrics_port),
                   "manage": scrape(manage.server.metrics.port)}
        finally:
            manage.stop()
    finally:
        rig.stop(daemon)


def exposed_names(exposition) -> set[str]:
    return series_names(exposition["daemon"]) | series_names(exposition["manage"])


def test_alert_rules_use_exposed_metrics(exposition):
    exposed = exposed_names(exposition)
    for rule in alert_rules():
        names = ems_names(rule["expr"])
        assert names or "up{" in rule["expr"], rule["alert"]
        assert names <= exposed, (rule["alert"], sorted(names - exposed))


def test_dashboard_uses_exposed_metrics(exposition):
    exposed = exposed_names(exposition)
    for query in dashboard_queries():
        names = ems_names(query)
        assert names, query
        assert names <= exposed, (query, sorted(names - exposed))


def test_docs_list_every_exposed_family(exposition):
    documented = ems_names(metrics_section())
    for source, text in exposition.items():
        exposed = {name for name in families(text) if name.startswith("ems_")}
        assert exposed, source
        missing = exposed - documented
        assert not missing, f"{source} exposes {sorted(missing)}, not in docs/operations.md"


def test_docs_list_no_unexposed_metric(exposition):
    exposed = exposed_names(exposition)
    stale = ems_names(metrics_section()) - exposed
    assert not stale, f"docs/operations.md lists {sorted(stale)}, which nothing exposes"
