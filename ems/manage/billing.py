"""Node-hour metering: sample times, the hourly formula and the charge.

A cluster is sampled every 5 minutes, at :05, :10, ... :55 and :00 of each hour (Unix times
that are multiples of 300 s). A sample counts the nodes working normally at that instant. The
sample at :00 closes the hour before it, so the hour that starts at H contains the samples at
H+5 min ... H+60 min. For each hour:

    billable node-hours = floor(sum of that hour's samples / 12)

and the charge is node-hours times the account's price per node-hour. Twelve samples of one
node make one node-hour. A partial hour is billed on the samples it has so far, and there is
no minimum charge.
"""
from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

SAMPLE_INTERVAL_S = 300
HOUR_S = 3600
SAMPLES_PER_HOUR = HOUR_S // SAMPLE_INTERVAL_S   # 12


def is_sample_time(t: int) -> bool:
    return t % SAMPLE_INTERVAL_S == 0


def sample_times(start: float, end: float) -> list[int]:
    """Sample times t with start <= t <= end (Unix seconds)."""
    first = -(-int(start) // SAMPLE_INTERVAL_S) * SAMPLE_INTERVAL_S
    if first < start:
        first += SAMPLE_INTERVAL_S
    return list(range(first, int(end) + 1, SAMPLE_INTERVAL_S))


def last_sample_time(now: float) -> int:
    """Return the latest sample time at or before `now`."""
    return int(now) // SAMPLE_INTERVAL_S * SAMPLE_INTERVAL_S


def hour_of(sample_time: int) -> int:
    """Start of the billing hour a sample belongs to: the sample at :00 closes the hour
    before it."""
    if not is_sample_time(sample_time):
        raise ValueError(f"{sample_time} is not a sample time (a multiple of "
                         f"{SAMPLE_INTERVAL_S} s)")
    return (sample_time - 1) // HOUR_S * HOUR_S


def node_hours(node_sum: int) -> int:
    """Billable node-hours of one hour whose samples add up to node_sum."""
    if node_sum < 0:
        raise ValueError(f"sum of node samples {node_sum} is negative")
    return node_sum // SAMPLES_PER_HOUR


def hourly_sums(samples: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Sum of nodes per billing hour from (sample time, nodes) pairs; one pair per time."""
    sums: dict[int, int] = {}
    seen: set[int] = set()
    for t, nodes in samples:
        if t in seen:
            raise ValueError(f"sample time {t} appears twice")
        seen.add(t)
        hour = hour_of(t)
        sums[hour] = sums.get(hour, 0) + nodes
    return sums


def hourly_node_hours(samples: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Billable node-hours per billing hour (hour start -> node-hours)."""
    return {hour: node_hours(total) for hour, total in sorted(hourly_sums(samples).items())}


def charge(hours: int, price: Decimal) -> Decimal:
    """Return the exact charge for `hours` node-hours at `price` per node-hour."""
    return Decimal(hours) * price


def samples_of_timeline(timeline: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Return the samples of a node-count timeline between start and end, inclusive.

    timeline: (time, nodes) steps in time order: from each time on, `nodes` nodes work,
    until the next step. Before the first step there are none. A node that starts exactly
    at a sample time is counted in it."""
    out, step, nodes = [], 0, 0
    for t in sample_times(start, end):
        while step < len(timeline) and timeline[step][0] <= t:
            nodes = timeline[step][1]
            step += 1
        out.append((t, nodes))
    return out
