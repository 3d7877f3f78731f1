"""decode_batch never raises on input, classifies every reject, and round-trips valid events."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.ingest.events import REJECT_CATEGORIES, Event, EventBatch, EventLimits, decode_batch

NOW_MS = 1_800_000_000_000
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_well_formed(values: list, result) -> None:
    assert len(result.batch) + len(result.rejects) == len(values)
    assert sorted(result.accepted_positions.tolist() + result.rejected_positions.tolist()) == list(
        range(len(values))
    )
    for reject in result.rejects:
        assert reject.category in REJECT_CATEGORIES, reject
        assert isinstance(reject.reason, str) and reject.reason.strip(), reject
        assert isinstance(reject.raw, bytes)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
junk = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.lists(st.integers(), max_size=2)
)
ids = st.text(min_size=1, max_size=12)
labels = st.dictionaries(
    st.text(min_size=1, max_size=8), st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=3
)
features = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.text(max_size=8) | st.floats(allow_nan=False, allow_infinity=False),
    max_size=4,
)
valid_events = st.builds(
    Event,
    event_id=ids,
    ts_ms=st.integers(0, NOW_MS),
    user_id=ids,
    item_id=ids,
    scenario=ids,
    labels=labels,
    user_features=features,
    item_text=st.none() | st.text(max_size=40),
    query=st.none() | st.text(max_size=20),
)


@st.composite
def near_schema_dicts(draw) -> dict:
    """A valid event's dict with a few fields dropped, retyped, poisoned or added."""
    event = draw(valid_events).model_dump()
    for name in draw(st.lists(st.sampled_from(sorted(event)), max_size=3)):
        action = draw(st.sampled_from(["drop", "junk", "nan", "huge"]))
        if action == "drop":
            event.pop(name, None)
        elif action == "junk":
            event[name] = draw(junk)
        elif action == "nan":
            event[name] = {"like": draw(st.sampled_from([math.nan, math.inf, -math.inf]))}
        else:
            event[name] = "x" * 5000
    if draw(st.booleans()):
        event[draw(st.text(min_size=1, max_size=6))] = draw(junk)
    return event


@FAST
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_bytes_never_raise(values):
    assert_well_formed(values, decode_batch(values, now_ms=NOW_MS))


@FAST
@given(st.lists(json_values, max_size=6))
def test_random_json_values_never_raise(values):
    raw = [json.dumps(v).encode() for v in values]
    assert_well_formed(raw, decode_batch(raw, now_ms=NOW_MS))


@FAST
@given(st.lists(near_schema_dicts(), max_size=6), st.booleans())
def test_near_schema_dicts_never_raise(dicts, as_str):
    # Non-finite floats become NaN/Infinity tokens, which strict JSON refuses: a reject too.
    raw = [json.dumps(d) if as_str else json.dumps(d).encode() for d in dicts]
    assert_well_formed(raw, decode_batch(raw, now_ms=NOW_MS))


@FAST
@given(st.lists(junk | st.binary(max_size=20), max_size=6))
def test_values_of_any_python_type_never_raise(values):
    assert_well_formed(values, decode_batch(values, now_ms=NOW_MS))


@FAST
@given(st.lists(valid_events, min_size=1, max_size=6, unique_by=lambda e: e.event_id))
def test_valid_events_round_trip(events):
    limits = EventLimits(max_future_skew_ms=0)
    raw = [e.model_dump_json().encode() for e in events]
    result = decode_batch(raw, limits, now_ms=NOW_MS)
    assert result.rejects == []
    assert [Event.model_validate_json(r) for r in raw] == events
    expected = EventBatch.from_events(events)
    for name in ("event_id", "user_id", "item_id", "scenario", "item_text", "query"):
        assert getattr(result.batch, name).tolist() == getattr(expected, name).tolist()
    assert result.batch.ts_ms.tolist() == [e.ts_ms for e in events]
    assert result.batch.labels.keys() == expected.labels.keys()
    for task, column in expected.labels.items():
        np.testing.assert_array_equal(result.batch.labels[task], column)
    back = EventBatch.from_arrow(result.batch.to_arrow())
    assert back.event_id.tolist() == result.batch.event_id.tolist()


def test_duplicate_ids_and_known_rejects_are_categorised():
    good = {"event_id": "e1", "ts_ms": 1, "user_id": "u", "item_id": "i", "labels": {"like": 1.0}}
    values = [
        json.dumps(good),  # str input is accepted like bytes
        json.dumps(good).encode(),  # duplicate id
        b"",
        b"\xff\xfe",
        b"{not json",
        b"[1, 2]",
        json.dumps({**good, "event_id": "e2", "labels": {}}).encode(),
        json.dumps({**good, "event_id": "e3", "ts_ms": "yesterday"}).encode(),
        json.dumps({**good, "event_id": "e4", "colour": "red"}).encode(),
        b"x" * (EventLimits().max_message_bytes + 1),
        None,
    ]
    result = decode_batch(values, now_ms=NOW_MS)
    assert result.batch.event_id.tolist() == ["e1"]
    assert [r.category for r in result.rejects] == [
        "duplicate_event_id",
        "empty",
        "invalid_utf8",
        "invalid_json",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "unknown_field",
        "too_large",
        "empty",
    ]


def test_schema_command_prints_the_event_json_schema():
    out = subprocess.run(
        [sys.executable, "-m", "stream.cli.main", "schema"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    schema = json.loads(out.stdout)
    assert schema["title"] == "Event"
    assert {"event_id", "ts_ms", "user_id", "item_id", "labels"} <= set(schema["required"])
