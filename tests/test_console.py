"""The web console in headless Chromium against a real management service on loopback.

The page signs its API calls in the browser. The test reads the numbers it shows (each
carries its raw value in data-value) and checks them against the same API, then keeps a
screenshot. Chromium runs headless, without sandbox (the tests run as root) and with its
background network features off; it reaches only the service on 127.0.0.1.
"""
import html.parser
import os
import shutil
import subprocess
import time

import pytest

import cluster_rig as rig
import manage_rig
import ems
from ems.manage import billing
from ems.manage.sampler import Sampler

BLOCK = 65536
SCREENSHOT = os.path.join(os.path.dirname(__file__), "..", "docs", "console.png")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium: install Debian's chromium package (.ci/run does)")


def browse(url: str, profile: str, *extra: str) -> subprocess.CompletedProcess:
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
            "--ignore-certificate-errors", f"--user-data-dir={profile}",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-default-apps", "--disable-extensions",
            "--disable-domain-reliability", "--no-first-run", "--no-pings",
            "--metrics-recording-only", "--virtual-time-budget=30000", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


class Fields(html.parser.HTMLParser):
    """Collects (data-field, data-value, data-node, data-tier) of the rendered page."""

    def __init__(self):
        super().__init__()
        self.fields = []
        self.row = {}
        self.status = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.row = attrs
        if attrs.get("id") == "status":
            self.status = attrs.get("data-state")
        if "data-field" in attrs:
            self.fields.append((attrs["data-field"], attrs.get("data-value"),
                                self.row.get("data-node"), self.row.get("data-tier")))

    def value(self, name, node=None, tier=None):
        found = [v for f, v, n, t in self.fields if f == name and n == node and t == tier]
        assert len(found) == 1, f"field {name} (node {node}, tier {tier}): {found}"
        return found[0]


def test_console_shows_the_api_numbers(tmp_path, zookeeper):
    plane = manage_rig.start_plane(tmp_path, zookeeper, capacity="32M")
    try:
        service, client = plane.service, plane.client
        service.admin.call("POST", f"/v1/accounts/{plane.account['id']}/topups",
                           {"amount": "100"})
        plane.activate()
        manage_rig.wait_state(plane.daemon, "active")
        keys = [i.to_bytes(4, "big") * 8 for i in range(40)]
        with ems.connect("local", socket_path=plane.daemon.socket_path,
                         secret=rig.SECRET.encode()) as local:
            assert local.put_many(keys[:30], [bytes(BLOCK)] * 30) == 30
        # Over TCP, so the daemon counts them (reads through shared memory are counted by
        # the client): 30 hits and 10 misses.
        conn = ems._core.Connection("127.0.0.1", plane.daemon.port, secret=rig.SECRET.encode())
        try:
            conn.get_many_into(keys, [bytearray(BLOCK) for _ in keys])
        finally:
            conn.close()

        # Twelve samples of the one node in the coming hour: one node-hour at 1.00.
        sampler = Sampler(service.server.service, service.server.service.probe)
        hour = (int(time.time()) // billing.HOUR_S + 1) * billing.HOUR_S
        for step in range(1, 13):
            assert sampler.sample_at(hour + step * billing.SAMPLE_INTERVAL_S)

        url = (f"{service.url}/console/#key={client.key_id}&secret={client.secret}")
        result = browse(url, str(tmp_path / "profile"), "--dump-dom")
        page = Fields()
        page.feed(result.stdout)
        assert page.status == "ready", result.stdout[-3000:] + result.stderr[-3000:]

        account = client.call("GET", "/v1/account")
        bill = client.call("GET", "/v1/bill")
        nodes = client.call("GET", f"/v1/clusters/{plane.cluster['id']}/nodes")["nodes"]
        assert page.value("balance") == account["balance"] == "100.00"
        assert page.value("bill_due") == account["bill_due"] == "1.00"
        assert page.value("standing") == "good"
        assert page.value("bill_total") == bill["total"]
        assert page.value("bill_node_hours") == str(bill["node_hours"]) == "1"
        (node,) = nodes
        dram = next(t for t in node["tiers"] if t["tier"] == "dram")
        assert page.value("state", "n1", "dram") == node["state"] == "active"
        assert page.value("capacity", "n1", "dram") == str(dram["capacity_bytes"])
        assert page.value("used", "n1", "dram") == str(dram["used_bytes"]) == str(30 * BLOCK)
        assert page.value("blocks", "n1", "dram") == str(dram["blocks"]) == "30"
        assert float(page.value("hit_ratio", "n1", "dram")) == pytest.approx(node["hit_ratio"])
        assert node["hit_ratio"] == pytest.approx(30 / 40)

        shot = tmp_path / "console.png"
        result = browse(url, str(tmp_path / "profile2"), f"--screenshot={shot}",
                        "--window-size=1280,1000", "--hide-scrollbars")
        assert shot.exists(), result.stderr[-2000:]
        assert shot.stat().st_size > 10000, "the screenshot is blank"
        if os.environ.get("EMS_UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        plane.stop()


def test_console_without_key_asks_to_sign_in(tmp_path):
    service = manage_rig.start(str(tmp_path / "manage"))
    try:
        result = browse(f"{service.url}/console/", str(tmp_path / "profile"), "--dump-dom")
        page = Fields()
        page.feed(result.stdout)
        assert page.status == "signed-out"
        assert 'id="signin"' in result.stdout
        with open(f"{service.directory}/audit.log") as f:
            assert f.read() == "", "the sign-in page called the API"
    finally:
        service.stop()
