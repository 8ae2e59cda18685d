"""Node-hour billing: the worked examples, and property tests of the formula.

The examples are checked three ways: the pure formula, the SQLite store fed by the sampler
(with a probe that reads a node-count timeline at the sampler's clock), and the bill the
API builds from the store. The property tests check that what the sampler meters live
equals what is recomputed from the stored samples and from the timeline itself.
"""
import calendar
import time
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ems.manage import billing
from ems.manage.app import bill_view
from ems.cluster.membership import NodeRecord
from ems.manage import zkstate
from ems.manage.sampler import GRACE_S, Sampler, ZooKeeperProbe
from ems.manage.server import init_directory
from ems.manage.service import Service
from ems.manage.store import Store


def at(hour: int, minute: int, day: int = 5) -> int:
    return calendar.timegm((2026, 12, day, hour, minute, 0))


EXAMPLE_ONE = [(at(15, 33), 8)]
EXAMPLE_TWO = [(at(15, 8), 8), (at(16, 20), 16), (at(17, 21), 4)]


class Clock:
    def __init__(self, now: int):
        self.now = now

    def __call__(self) -> float:
        return self.now


class TimelineProbe:
    """Fake of the ZooKeeper probe, for this unit of the sampler only: it returns the
    timeline's node count at the clock's time."""

    def __init__(self, clock: Clock, timeline: list[tuple[int, int]]):
        self.clock = clock
        self.timeline = timeline
        self.calls = 0

    def count(self, cluster: dict) -> int:
        self.calls += 1
        nodes = 0
        for t, n in self.timeline:
            if t <= self.clock.now:
                nodes = n
        return nodes

    def close(self) -> None:
        pass


# ---- the formula -------------------------------------------------------------------------

def test_sample_times_every_five_minutes():
    times = billing.sample_times(at(15, 33), at(16, 0))
    assert [time_text(t) for t in times] == ["15:35", "15:40", "15:45", "15:50", "15:55",
                                             "16:00"]


def time_text(t: int) -> str:
    return f"{t % 86400 // 3600:02d}:{t % 3600 // 60:02d}"


def test_sample_at_the_hour_closes_the_hour_before():
    assert billing.hour_of(at(16, 0)) == at(15, 0)
    assert billing.hour_of(at(16, 5)) == at(16, 0)
    with pytest.raises(ValueError, match="not a sample time"):
        billing.hour_of(at(16, 1))


def test_example_one_formula():
    samples = billing.samples_of_timeline(EXAMPLE_ONE, at(15, 0), at(16, 0))
    assert billing.hourly_sums(samples)[at(15, 0)] == 48
    assert billing.hourly_node_hours(samples)[at(15, 0)] == 4


def test_example_two_formula():
    samples = billing.samples_of_timeline(EXAMPLE_TWO, at(15, 0), at(17, 41))
    sums = billing.hourly_sums(samples)
    hours = billing.hourly_node_hours(samples)
    assert (sums[at(15, 0)], hours[at(15, 0)]) == (11 * 8, 7)
    assert (sums[at(16, 0)], hours[at(16, 0)]) == (3 * 8 + 9 * 16, 14)
    assert (sums[at(17, 0)], hours[at(17, 0)]) == (4 * 16 + 4 * 4, 6)


def test_no_minimum_charge():
    assert billing.node_hours(11) == 0
    assert billing.charge(0, Decimal("2.50")) == 0


# ---- through the sampler, the store and the bill -----------------------------------------

@pytest.fixture
def service_dir(tmp_path):
    directory = tmp_path / "manage"
    init_directory(str(directory), ["127.0.0.1"])
    return str(directory)


def meter(service_dir: str, timeline, start: int, end: int, price: str = "0.50"):
    """Run the sampler on every 5-minute step from start to end and return the service,
    the account id and the cluster id."""
    clock = Clock(start)
    service = Service(service_dir, clock=clock)
    account, _, _ = service.create_account("acme", price)
    cluster = service.create_cluster(account.id, "prod", "127.0.0.1:2181")
    sampler = Sampler(service, TimelineProbe(clock, timeline))
    sampler.publish_changed = lambda now: None   # no ZooKeeper in this unit test
    for t in range(start, end + 1, 60):
        clock.now = t
        sampler.step()
    return service, account.id, cluster["id"]


def test_example_two_through_sampler_and_bill(service_dir):
    service, account, cluster = meter(service_dir, EXAMPLE_TWO, at(15, 0), at(17, 41))
    try:
        bill = bill_view(service, account, "2026-12", None)
        by_hour = {item["hour"]: item for item in bill["items"]}
        assert by_hour["2026-12-05T15:00:00Z"]["node_hours"] == 7
        assert by_hour["2026-12-05T15:00:00Z"]["samples"] == 12
        assert by_hour["2026-12-05T16:00:00Z"]["node_hours"] == 14
        assert by_hour["2026-12-05T17:00:00Z"]["node_hours"] == 6
        assert by_hour["2026-12-05T17:00:00Z"]["samples"] == 8
        assert by_hour["2026-12-05T16:00:00Z"]["amount"] == "7.00"
        assert bill["node_hours"] == 27
        assert bill["total"] == "13.50"
        assert service.store.samples(cluster)[0] == (at(15, 0), 0)   # created at 15:00
        assert service.store.cluster(account, cluster)["activated"] == at(15, 10)
    finally:
        service.close()


def test_example_one_through_sampler(service_dir):
    service, account, _ = meter(service_dir, EXAMPLE_ONE, at(15, 0), at(16, 3))
    try:
        items = bill_view(service, account, "2026-12", None)["items"]
        assert [(i["hour"], i["node_sum"], i["node_hours"]) for i in items] == \
            [("2026-12-05T15:00:00Z", 48, 4)]
    finally:
        service.close()


def test_restarted_service_does_not_count_a_sample_twice(service_dir):
    service, account, cluster = meter(service_dir, EXAMPLE_ONE, at(15, 30), at(15, 40))
    service.close()
    clock = Clock(at(15, 40) + 30)   # restarted 30 s after the 15:40 sample
    again = Service(service_dir, clock=clock)
    try:
        probe = TimelineProbe(clock, EXAMPLE_ONE)
        sampler = Sampler(again, probe)
        sampler.publish_changed = lambda now: None
        sampler.step()
        assert probe.calls == 0, "the 15:40 sample was taken again"
        assert again.store.samples(cluster) == [(at(15, 30), 0), (at(15, 35), 8), (at(15, 40), 8)]
        assert again.store.hours(account)[0]["node_sum"] == 16
    finally:
        again.close()


def test_missed_sample_time_is_not_backfilled(service_dir):
    service, _, cluster = meter(service_dir, EXAMPLE_ONE, at(15, 30), at(15, 40))
    clock = service.clock
    try:
        sampler = Sampler(service, TimelineProbe(clock, EXAMPLE_ONE))
        sampler.publish_changed = lambda now: None
        clock.now = at(15, 50) + 200   # down across 15:45 and past 15:50's grace
        sampler.step()
        assert [t for t, _ in service.store.samples(cluster)] == [at(15, 30), at(15, 35),
                                                                 at(15, 40)]
    finally:
        service.close()


def test_hour_keeps_its_price(service_dir):
    service, account, cluster = meter(service_dir, EXAMPLE_ONE, at(15, 30), at(16, 0))
    try:
        service.store._db.execute("UPDATE accounts SET price = '9' WHERE id = ?", (account,))
        assert service.store.record_sample(cluster, at(16, 5), 8)
        hours = {row["hour"]: row["price"] for row in service.store.hours(account)}
        assert hours[at(15, 0)] == "0.50"
        assert hours[at(16, 0)] == "9"
    finally:
        service.close()


# ---- properties --------------------------------------------------------------------------

steps = st.lists(st.tuples(st.integers(0, 6 * 60), st.integers(0, 64)), max_size=12)


def timeline_of(start: int, raw: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted((start + minute * 60, nodes) for minute, nodes in raw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=steps, seconds=st.integers(0, 299), restarts=st.sets(st.integers(0, 72)))
def test_live_metering_equals_recomputation(tmp_path_factory, raw, seconds, restarts):
    """Sampled live, with restarts that repeat a sample time, the hours in the store equal
    the hours recomputed from the stored samples and from the timeline."""
    start = at(9, 0) + seconds
    timeline = timeline_of(start, raw)
    path = str(tmp_path_factory.mktemp("db") / "state.db")
    store = Store(path)
    account = store.create_account("acme", "1.25", start)
    cluster = store.create_cluster(account.id, "prod", "127.0.0.1:2181", start)["id"]
    end = start + 6 * 3600
    for i, t in enumerate(billing.sample_times(start, end)):
        nodes = TimelineProbe(Clock(t), timeline).count({})
        assert store.record_sample(cluster, t, nodes)
        if i in restarts:   # a restarted service meets the same sample time again
            store.close()
            store = Store(path)
            assert not store.record_sample(cluster, t, nodes)
    live = {row["hour"]: billing.node_hours(row["node_sum"]) for row in store.hours(account.id)}
    stored = billing.hourly_node_hours(store.samples(cluster))
    expected = billing.hourly_node_hours(billing.samples_of_timeline(timeline, start, end))
    assert live == stored == expected
    total = sum(expected.values()) * Decimal("1.25")
    assert store.charged(account.id) == total
    store.close()


@given(raw=steps)
def test_hours_never_exceed_the_nodes_running(raw):
    """Each hour bills at most the largest node count times one hour, and whole hours of a
    constant count bill exactly that count."""
    start = at(9, 0)
    timeline = timeline_of(start, raw)
    samples = billing.samples_of_timeline(timeline, start, start + 6 * 3600)
    peak = max((n for _, n in samples), default=0)
    for hour, node_hours in billing.hourly_node_hours(samples).items():
        assert node_hours <= peak
    constant = billing.samples_of_timeline([(start, 5)], start, start + 3 * 3600)
    assert list(billing.hourly_node_hours(constant).values()) == [0, 5, 5, 5]


def test_probe_skips_unreadable_node_records(zookeeper):
    cluster = {"name": "garbage-records", "zookeeper": zookeeper.hosts, "account": "acct-1"}
    good = NodeRecord("good", "127.0.0.1", 7000)
    zk = zkstate.connect(zookeeper.hosts)
    try:
        nodes = "/ems/clusters/garbage-records/nodes"
        zk.create(f"{nodes}/good", good.to_json(), makepath=True)
        zk.create(f"{nodes}/deep", b"[" * 100000 + b"]" * 100000)
        zk.create(f"{nodes}/junk", b"\xff{not json")
    finally:
        zk.stop()
        zk.close()
    probe = ZooKeeperProbe()
    try:
        assert probe.records(cluster) == [good]
        assert probe.count(cluster) == 0   # the good node has no /activation endpoint
    finally:
        probe.close()


def test_unreachable_zookeepers_do_not_delay_others(service_dir, zookeeper):
    """Each cluster on a ZooKeeper that does not respond costs a connection timeout (10 s)
    and a notice timeout (3 s). One by one, sixteen of them take 208 s. A pass longer than
    GRACE_S may start no pass within a sample time's grace period, which loses that sample
    for every cluster."""
    import zookeeper_server

    clock = Clock(billing.last_sample_time(time.time()))
    service = Service(service_dir, clock=clock)
    sampler = Sampler(service, ZooKeeperProbe())
    try:
        account, _, _ = service.create_account("acme", "1")
        ports = set()
        while len(ports) < 16:
            ports.add(zookeeper_server.free_port())
        for i, port in enumerate(sorted(ports)):
            service.create_cluster(account.id, f"down-{i}", f"127.0.0.1:{port}")
        healthy = service.create_cluster(account.id, "slow-pass-healthy", zookeeper.hosts)

        started = time.monotonic()
        sampler.step()
        elapsed = time.monotonic() - started
        assert service.store.samples(healthy["id"]) == [(clock.now, 0)]
        assert elapsed < GRACE_S, f"one sampler pass took {elapsed:.0f} s"
    finally:
        sampler.stop()
        service.close()
