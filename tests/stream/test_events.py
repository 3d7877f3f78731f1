"""decode_batch never raises on input, classifies every reject, and round-trips valid events."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stream.config import ConfigError, load_config
from stream.ingest.events import (
    REJECT_CATEGORIES,
    Event,
    EventBatch,
    EventLimits,
    LabelSpec,
    decode_batch,
    decode_one,
)

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
    # Any finite label is valid here: no label specs (their own tests are below).
    limits = EventLimits(max_future_skew_ms=0, labels={})
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
        json.dumps({**good, "event_id": "e5", "labels": {"rating": 1e6}}).encode(),
        b'{"event_id":"e6","event_id":"e7","ts_ms":1,"user_id":"u","item_id":"i","labels":{"like":1}}',
    ]
    result = decode_batch(values, now_ms=NOW_MS)
    assert result.batch.event_id.tolist() == ["e1"]
    assert [r.category for r in result.rejects][-2:] == ["label_out_of_range", "invalid_json"]
    assert [r.category for r in result.rejects][:-2] == [
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


def _event_json(**kw) -> bytes:
    ev = {"event_id": "e1", "ts_ms": 1, "user_id": "u", "item_id": "i", "labels": {"like": 1.0}}
    ev.update(kw)
    return json.dumps(ev).encode()


@pytest.mark.parametrize(
    "labels, fragment",
    [
        ({"rating": 1e6}, "labels.rating: 1000000.0 is not in [1, 5]"),
        ({"rating": -1e300}, "labels.rating: -1e+300 is not in [1, 5]"),
        ({"rating": 0.999}, "labels.rating: 0.999 is not in [1, 5]"),
        ({"rating": 5.5}, "labels.rating: 5.5 is not in [1, 5]"),
        ({"like": 7}, "labels.like: 7.0 is not in {0, 1}"),
        ({"like": 1e38}, "labels.like: 1e+38 is not in {0, 1}"),
        ({"like": -1.0}, "labels.like: -1.0 is not in {0, 1}"),
        ({"like": 0.5}, "labels.like: 0.5 is not in {0, 1}"),
        ({"like": 1.0, "rating": 6.0}, "labels.rating: 6.0 is not in [1, 5]"),
    ],
)
def test_labels_outside_their_spec_are_rejected_naming_task_value_and_range(labels, fragment):
    ev, rej = decode_one(_event_json(labels=labels), EventLimits(), NOW_MS)
    assert ev is None and rej.category == "label_out_of_range"
    assert rej.reason.startswith(fragment) and "task" in rej.reason, rej.reason


@pytest.mark.parametrize(
    "labels",
    [
        {"like": 0.0},
        {"like": 1},
        {"like": -0.0},
        {"rating": 1.0},
        {"rating": 5},
        {"rating": 3.5},
        {"like": 1.0, "rating": 4.0},
        {"click": -1e300},  # no spec: only finite is checked, as before
        {"watch_s": 1e300},
    ],
)
def test_labels_inside_their_spec_or_without_one_are_accepted(labels):
    ev, rej = decode_one(_event_json(labels=labels), EventLimits(), NOW_MS)
    assert rej is None and ev.labels == labels


def test_non_finite_labels_keep_their_category_under_a_spec():
    raw = _event_json().replace(b'"like": 1.0', b'"like": NaN')
    _, rej = decode_one(raw, EventLimits(), NOW_MS)
    assert rej.category == "non_finite_label"


def test_label_specs_are_configurable_and_removable():
    limits = EventLimits(labels={"rating": {"min": 0, "max": 10}, "like": None, "watch": {"min": 0}})
    ok = [{"rating": 9.0}, {"like": 7.0}, {"watch": 1e9}]
    for labels in ok:
        assert decode_one(_event_json(labels=labels), limits, NOW_MS)[1] is None, labels
    _, rej = decode_one(_event_json(labels={"watch": -1.0}), limits, NOW_MS)
    assert rej.category == "label_out_of_range" and "[0, inf]" in rej.reason
    assert EventLimits(labels={}).labels == {}
    assert decode_one(_event_json(labels={"rating": 1e6}), EventLimits(labels={}), NOW_MS)[1] is None
    # the dump is what a config file says, and reads back the same
    dumped = EventLimits().model_dump()["labels"]
    assert dumped == {"like": "binary", "rating": {"min": 1.0, "max": 5.0}}
    assert EventLimits.model_validate(EventLimits().model_dump()) == EventLimits()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"min": 5, "max": 1}, "min=5.0 is greater than max=1.0"),
        ("bin", "expected 'binary' or a range"),
        ({}, "a range needs min, max or both"),
        ({"binary": True, "max": 1}, "a binary label takes no min/max"),
        ({"min": float("nan")}, "finite number"),
        ({"lo": 1}, "Extra inputs are not permitted"),
    ],
)
def test_a_bad_label_spec_names_its_field(spec, message):
    with pytest.raises(ValidationError, match="labels.rating") as err:
        EventLimits(labels={"rating": spec})
    assert message in str(err.value)
    assert LabelSpec.model_validate("binary").binary


def test_label_specs_in_config_files_and_overrides():
    cfg = load_config("configs/default.yaml")
    assert cfg.kafka.limits.labels == {"like": LabelSpec(binary=True), "rating": LabelSpec(min=1, max=5)}
    # the specs cover the tasks the default model trains on
    assert {cfg.model.features.like_task, cfg.model.features.rating_task} <= set(cfg.kafka.limits.labels)
    with pytest.raises(ConfigError, match=r"kafka\.limits\.labels\.rating: .*min=5.0 is greater"):
        load_config("configs/default.yaml", ["kafka.limits.labels.rating={min: 5, max: 1}"])
    cfg = load_config("configs/default.yaml", ["kafka.limits.labels.rating=null"])
    assert cfg.kafka.limits.labels == {"like": LabelSpec(binary=True), "rating": None}


_BASE = '"ts_ms":1,"user_id":"u","item_id":"i"'


@pytest.mark.parametrize(
    "raw, where_key",
    [
        ('{"event_id":"a","event_id":"b",' + _BASE + ',"labels":{"like":1}}', "duplicate key 'event_id'"),
        ('{"event_id":"a",' + _BASE + ',"labels":{"like":7,"like":1}}', "labels: duplicate key 'like'"),
        ('{"event_id":"a",' + _BASE + ',"labels":{"like":1,"like":1}}', "labels: duplicate key 'like'"),
        (
            '{"event_id":"a",' + _BASE + ',"labels":{"like":1},"user_features":{"x":"1","y":2,"x":3}}',
            "user_features: duplicate key 'x'",
        ),
        # the same key once escaped
        (
            '{"event_id":"a",' + _BASE + ',"labels":{"like":1},"user_features":{"x":"1","\\u0078":"2"}}',
            "user_features: duplicate key 'x'",
        ),
        # whitespace before the colons, and escaped quotes: the cheap count cannot decide
        (
            '{ "event_id" : "a" , "event_id" : "b", ' + _BASE + ', "item_text": "say \\"hi\\"",'
            ' "labels" : {"like" : 1}}',
            "duplicate key 'event_id'",
        ),
        (
            '{"event_id":"a",' + _BASE + ',"labels":{"like":1},"item_text":null,"item_text":"t"}',
            "'item_text'",
        ),
        ('{"event_id":"a",' + _BASE + ',"labels":{"like":1},"scenario":"s","scenario":"s"}', "'scenario'"),
    ],
)
def test_duplicate_json_keys_are_invalid_json_naming_the_key(raw, where_key):
    ev, rej = decode_one(raw.encode(), EventLimits(), NOW_MS)
    assert ev is None and rej.category == "invalid_json"
    assert where_key in rej.reason, rej.reason


def test_duplicate_keys_inside_ignored_unknown_fields_are_rejected_too():
    limits = EventLimits(allow_unknown_fields=True)
    dup = '{"event_id":"a",' + _BASE + ',"labels":{"like":1},"extra":[1,{"q":1,"q":2}]}'
    _, rej = decode_one(dup.encode(), limits, NOW_MS)
    assert rej.category == "invalid_json" and "extra[1]: duplicate key 'q'" in rej.reason
    fine = '{"event_id":"a",' + _BASE + ',"labels":{"like":1},"extra":[1,{"q":1,"r":{"q":2}}]}'
    assert decode_one(fine.encode(), limits, NOW_MS)[1] is None


@st.composite
def pair_events(draw) -> tuple[list, bool]:
    """A valid event as (key, value) pairs (objects too), maybe with one key repeated."""
    ev = draw(valid_events).model_dump(exclude_defaults=draw(st.booleans()))
    pairs = [(k, list(v.items()) if isinstance(v, dict) else v) for k, v in ev.items()]
    dup = draw(st.booleans())
    if dup:
        objects = [pairs] + [v for _, v in pairs if isinstance(v, list) and v]
        target = draw(st.sampled_from(objects))
        key, value = draw(st.sampled_from(target))
        target.insert(draw(st.integers(0, len(target))), (key, value))
    return pairs, dup


def _dump_pairs(v, sep: str) -> str:
    if isinstance(v, list):
        return "{" + ", ".join(json.dumps(k) + sep + _dump_pairs(x, sep) for k, x in v) + "}"
    return json.dumps(v)


@FAST
@given(pair_events(), st.sampled_from([":", ": ", " : ", "\n:\t"]))
def test_an_event_is_rejected_for_duplicate_keys_exactly_when_it_has_one(event, sep):
    pairs, dup = event
    raw = _dump_pairs(pairs, sep).encode()
    ev, rej = decode_one(raw, EventLimits(labels={}), NOW_MS)
    if dup:
        assert rej is not None and rej.category == "invalid_json" and "duplicate key" in rej.reason
    else:
        assert rej is None, rej


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
