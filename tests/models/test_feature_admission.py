"""Undeclared user-feature names: admitted after enough sightings, capped per window, and
the names that are not admitted counted in bounded state (a name spray cannot take the
slots or grow the snapshot)."""

from __future__ import annotations

import json

from models.config import FeatureConfig
from models.features import FeatureBuilder
from stream.ingest.events import EventLimits, decode_batch


def _batch(n: int, features: dict, start: int = 0):
    values = [
        json.dumps(
            {
                "event_id": f"e{start + i}",
                "ts_ms": 1_000 + i,
                "user_id": f"u{i % 7}",
                "item_id": "i1",
                "labels": {"like": 1.0},
                "user_features": features,
            }
        ).encode()
        for i in range(n)
    ]
    res = decode_batch(values, EventLimits(max_features=200, min_ts_ms=0))
    assert not res.rejects
    return res.batch


def test_one_event_with_many_new_names_takes_no_slot():
    fb = FeatureBuilder(FeatureConfig(admit_after=32))
    spray = {f"junk{k}": "x" for k in range(64)}
    fb.build(_batch(1, spray))
    assert fb.cat_slots == {} and fb.dropped_total == 64 and len(fb.dropped_recent) == 32
    fb.build(_batch(64, {"gender": "F", "age": "25"}))  # real features, in many events
    assert set(fb.cat_slots) == {"age", "gender"}
    assert fb.stats()["candidate_names"] == 64  # the junk is only tracked, boundedly


def test_admission_counts_sightings_across_batches_and_is_capped_per_window():
    cfg = FeatureConfig(
        admit_after=10, max_admitted_per_window=2, admission_window_events=100, max_candidate_names=3
    )
    fb = FeatureBuilder(cfg)
    fb.build(_batch(6, {"a": "1"}))
    assert "a" not in fb.cat_slots
    fb.build(_batch(6, {"a": "1", "b": "2", "c": "3", "d": "4"}))  # a: 12 sightings -> admitted
    assert fb.cat_slots == {"a": 0} and set(fb.sightings) == {"b", "c", "d"}
    fb.build(_batch(10, {"b": "2", "c": "3", "e": "5"}))  # b admitted, c over the window's cap of 2
    assert fb.cat_slots == {"a": 0, "b": 1} and fb.sightings == {"c": 16, "d": 6, "e": 10}
    fb.build(_batch(1, {"f": "6"}))  # three candidates tracked already: f is only counted
    assert "f" not in fb.sightings and fb.dropped_recent[-1] == "f"
    fb.build(_batch(80, {"c": "3"}))  # a new window: c gets in
    assert fb.cat_slots == {"a": 0, "b": 1, "c": 2}


def test_admission_state_survives_export_import_and_serving_never_admits():
    cfg = FeatureConfig(admit_after=10)
    fb = FeatureBuilder(cfg)
    fb.build(_batch(6, {"a": "1"}))
    copy = FeatureBuilder(cfg)
    copy.import_state(*fb.export_state())
    assert copy.sightings == {"a": 6} and copy.dropped_total == fb.dropped_total == 1
    copy.build(_batch(6, {"a": "1"}))
    assert copy.cat_slots == {"a": 0}
    served = FeatureBuilder(cfg)
    served.admitting = False
    served.build(_batch(50, {"a": "1"}))
    assert served.cat_slots == {}
    served.apply_delta(copy.take_delta())  # the layout comes with the trainer's deltas
    assert served.cat_slots == {"a": 0}
