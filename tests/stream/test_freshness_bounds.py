"""The freshness ledger holds a bounded number of events, not only of versions: with
serving off no version is ever activated, and a bound in versions let the 30-minute
soak's publisher hold every event of the run (benchmarks/results/soak_cpu.md)."""

import numpy as np

from stream.snapshots.publisher import FreshnessLedger


def test_pending_events_are_bounded_and_the_dropped_ones_counted():
    led = FreshnessLedger(max_pending_events=1_000)
    for v in range(1, 51):  # 50 versions of 100 events: 5,000 events, none activated
        led.add_version(
            v, np.full(100, 1_000_000 + v, dtype=np.int64), np.full(100, 1_000.0 + v), 1_001.0 + v
        )
        led.written(v, 1_002.0 + v)
    assert led._pending_events == sum(len(p[0]) for p in led._pending.values()) <= 1_000
    assert sorted(led._pending) == list(range(41, 51))  # the newest ones are kept
    assert led.never_activated == 4_000
    assert len(led._written_at) <= len(led._pending)

    led.activated(50, 2_000.0)  # a replica catches up: the kept versions are measured
    assert led._pending_events == 0 and not led._pending
    assert led.summary()["count"] == 1_000


def test_one_version_larger_than_the_bound_is_kept_for_its_activation():
    led = FreshnessLedger(max_pending_events=10)
    led.add_version(1, np.full(5, 1_000, dtype=np.int64))
    led.add_version(2, np.full(50, 2_000, dtype=np.int64))
    assert list(led._pending) == [2] and led.never_activated == 5
    led.activated(2, 10.0)
    assert led.summary()["count"] == 50 and led._pending_events == 0
