"""FreshnessLedger: event -> live in serving, and the same once serving was live."""

import numpy as np

from stream.publisher import FreshnessLedger


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
