"""FreshnessLedger: event -> live in serving, and the same once serving was live."""

import numpy as np

from stream.snapshots.publisher import FreshnessLedger


def test_steady_state_leaves_out_events_produced_before_serving_was_live():
    ledger = FreshnessLedger()
    ledger.add_version(1, np.array([1_000, 2_000]))  # produced at 1 s and 2 s (ms)
    ledger.written(1, 9.0)
    ledger.activated(1, 10.0)  # start-up: live only at 10 s
    ledger.add_version(2, np.array([10_500, 11_000]))
    ledger.written(2, 11.2)
    ledger.activated(2, 11.5)
    s = ledger.summary()
    assert s["count"] == 4 and s["max_s"] == 9.0
    assert s["steady_count"] == 2 and np.isclose(s["steady_p99_s"], 0.995, atol=1e-6)
    assert s["written_p50_s"] > 0


def test_legs_split_each_steady_event_freshness_into_its_causes():
    ledger = FreshnessLedger()
    ledger.add_version(1, np.array([100]), np.array([0.3]), 0.4)  # start-up: live at 0.9 s
    ledger.written(1, 0.8)
    ledger.activated(1, 0.9)
    # produced at 1.0 s / 1.5 s, trained at 1.2 s / 1.6 s, cut at 2.0 s, written at 2.3 s,
    # live at 2.4 s
    ledger.add_version(2, np.array([1_000, 1_500]), np.array([1.2, 1.6]), 2.0)
    ledger.written(2, 2.3)
    ledger.activated(2, 2.4)
    s = ledger.summary()
    legs = s["legs"]
    assert set(legs) == {"train", "tick", "write", "swap"}
    # the slowest steady event (1.4 s) is the first of version 2: 0.2 train, 0.8 tick,
    # 0.3 write, 0.1 swap; the start-up event is not in the legs
    tail = {k: v["tail_mean_s"] for k, v in legs.items()}
    assert np.allclose([tail["train"], tail["tick"], tail["write"], tail["swap"]], [0.2, 0.8, 0.3, 0.1])
    assert np.isclose(sum(tail.values()), s["max_s"])


def test_a_first_version_without_events_makes_serving_live():
    """A job publishes the state it starts from before any event: serving is live from
    that activation on, and the empty version adds no samples (and breaks no percentile)."""
    ledger = FreshnessLedger()
    ledger.add_version(1, np.array([], dtype=np.int64), np.array([]), 0.5)
    ledger.written(1, 0.8)
    ledger.activated(1, 1.0)
    assert ledger.summary()["count"] == 0
    ledger.add_version(2, np.array([1_500]), np.array([1.6]), 2.0)
    ledger.written(2, 2.1)
    ledger.activated(2, 2.2)
    s = ledger.summary()
    assert s["count"] == 1 and s["steady_count"] == 1 and np.isclose(s["steady_p50_s"], 0.7)


def test_versions_never_activated_are_bounded():
    """With serving off (or every replica refusing), pending versions must not pile up."""
    led = FreshnessLedger()
    for v in range(1, 1501):
        led.add_version(v, np.full(3, 1_000_000 + v, dtype=np.int64))
        led.written(v, 2000.0 + v)
    assert len(led._pending) == 1000 and len(led._written_at) <= 1000
    assert led.never_activated == 3 * 500  # the events of the 500 oldest, counted
