"""kafka.event_format: a team's JSON or Avro mapped onto the event, and every value that does
not fit rejected with the path that failed (never an exception out of the decoder)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.cli.main import main
from stream.config import ConfigError, config_from_dict, load_config
from stream.ingest.avro import LocalSchemaRegistry, encode
from stream.ingest.event_format import EventFormat, parse_path
from stream.ingest.events import REJECT_CATEGORIES, EventLimits, decode_batch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "foreign_format.example.yaml"
SAMPLE = ROOT / "configs" / "foreign_format.sample.jsonl"
NOW_MS = 1_714_600_000_000  # 2024-05-01, after every timestamp below

BASE = {
    "kind": "json",
    "event_id": "meta.id",
    "ts_ms": {"path": "meta.ts", "unit": "s"},
    "user_id": "payload.user.id",
    "item_id": "payload.items[0].sku",
    "labels": {"like": {"path": "payload.liked", "coerce": "bool"}},
}


def doc(**over) -> dict:
    d = {
        "meta": {"id": "e1", "ts": 1_714_500_000},
        "payload": {"user": {"id": 42}, "items": [{"sku": "A1"}], "liked": True},
    }
    d.update(over)
    return d


def fmt(**over) -> EventFormat:
    return EventFormat.model_validate({**BASE, **over})


def decode(f: EventFormat, *docs, partition=None, offset=None, limits=None):
    raws = [d if isinstance(d, bytes) else json.dumps(d).encode() for d in docs]
    return decode_batch(
        raws,
        limits or EventLimits(),
        kafka_partition=partition,
        kafka_offset=offset,
        now_ms=NOW_MS,
        mapping=f.mapping(),
        topic="clicks",
    )


def only_reject(res):
    assert len(res.batch) == 0 and len(res.rejects) == 1, res.rejects
    return res.rejects[0]


# -- paths and config ------------------------------------------------------------


def test_paths_compile_to_keys_and_indices():
    assert parse_path("payload.user.id") == ("payload", "user", "id")
    assert parse_path("items[0].sku") == ("items", 0, "sku")
    assert parse_path("m[1][-1]") == ("m", 1, -1)
    for bad in ("", "a..b", ".a", "a.", "a[x]", "a[0", "a[0]b"):
        with pytest.raises(ValueError):
            parse_path(bad)


def test_config_errors_name_the_field():
    cases = {
        "kafka.event_format.user_id.path": {**BASE, "user_id": "a..b"},
        "kafka.event_format.labels.like.coerce": {**BASE, "labels": {"like": {"path": "x", "coerce": "int"}}},
        "kafka.event_format.ts_ms.unit": {**BASE, "ts_ms": {"path": "t", "unit": "minutes"}},
        "kafka.event_format.event_id": {**BASE, "event_id": {"const": "x"}},
        "kafka.event_format.avro": {**BASE, "kind": "avro", "avro": {"schema_file": "/no/such.avsc"}},
    }
    for field, section in cases.items():
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            config_from_dict({"kafka": {"event_format": section}})
    with pytest.raises(ConfigError, match="needs a source for ts_ms, labels"):
        config_from_dict({"kafka": {"event_format": {**BASE, "ts_ms": None, "labels": {}}}})
    with pytest.raises(ConfigError, match="a mapping needs kind: json or kind: avro"):
        config_from_dict({"kafka": {"event_format": {"user_id": "a"}}})
    # A constant the field cannot hold fails at load, not per event.
    with pytest.raises(ConfigError, match="scenario: constant True"):
        config_from_dict({"kafka": {"event_format": {**BASE, "scenario": {"const": True}}}})


def test_default_is_native_and_unmapped():
    cfg = load_config(None)
    assert cfg.kafka.event_format.native and cfg.kafka.event_format.mapping() is None


# -- mapping -----------------------------------------------------------------------


def test_nested_json_maps_with_coercions():
    f = fmt(
        scenario={"path": "ctx.surface", "default": "feed"},
        labels={
            "like": {"path": "payload.liked", "coerce": "bool"},
            "rating": {"path": "payload.stars", "coerce": "number"},
            "action": {"path": "payload.action", "values": {"click": 1, "skip": 0}},
        },
        user_features={"country": "payload.user.cc", "age": "payload.user.age", "vip": "payload.user.vip"},
        item_text={
            "parts": ["payload.items[0].title", {"path": "tags", "prefix": "tags: "}],
            "separator": " | ",
        },
        query={"path": "q"},
    )
    d = doc(ctx={"surface": "search"}, tags=["a", "b"], q="heat", extra={"ignored": [1, 2]})
    d["payload"].update(stars="4.5", action="skip", items=[{"sku": 9.0, "title": "Heat"}])
    d["payload"]["user"].update(cc="FR", age=31, vip=False)
    res = decode(f, d)
    assert not res.rejects
    b = res.batch
    assert list(b.event_id) == ["e1"] and list(b.user_id) == ["42"] and list(b.item_id) == ["9"]
    assert b.ts_ms[0] == 1_714_500_000_000 and list(b.scenario) == ["search"]
    assert {k: float(v[0]) for k, v in b.labels.items()} == {"like": 1.0, "rating": 4.5, "action": 0.0}
    assert list(b.user_cat["country"]) == ["FR"] and list(b.user_cat["vip"]) == ["false"]
    assert b.user_num["age"][0] == 31.0
    assert list(b.item_text) == ["Heat | tags: a, b"] and list(b.query) == ["heat"]


def test_missing_optional_parts_are_skipped_and_defaults_used():
    f = fmt(
        scenario={"path": "ctx.surface", "default": "feed"},
        labels={"like": {"path": "payload.liked", "coerce": "bool"}, "rating": "payload.stars"},
        user_features={"country": "payload.user.cc"},
        item_text={"parts": ["title", {"path": "tags", "prefix": "tags: "}]},
    )
    res = decode(f, doc(title="Heat", tags=None))
    assert not res.rejects
    b = res.batch
    assert list(b.scenario) == ["feed"] and list(b.item_text) == ["Heat"]
    assert "rating" not in b.labels and not b.user_cat


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d["payload"]["user"].pop("id"), "mapping: payload.user.id: missing"),
        (lambda d: d["payload"]["user"].update(id=None), "mapping: payload.user.id: null"),
        (lambda d: d["payload"]["user"].update(id=True), "mapping: payload.user.id: a boolean"),
        (lambda d: d["payload"]["user"].update(id=1.5), "mapping: payload.user.id: a float"),
        (lambda d: d["payload"]["user"].update(id=""), "mapping: payload.user.id: empty string"),
        (lambda d: d["payload"].update(user="u1"), "mapping: payload.user.id: missing"),
        (lambda d: d["payload"].update(items=[]), "mapping: payload.items[0].sku: missing"),
        (lambda d: d["payload"].update(items={"0": 1}), "mapping: payload.items[0].sku: missing"),
        (lambda d: d["meta"].update(ts="soon"), "mapping: meta.ts: 'soon' is not a number"),
        (lambda d: d["payload"].update(liked="maybe"), "mapping: payload.liked: 'maybe' is not a boolean"),
    ],
)
def test_a_value_that_does_not_map_is_rejected_with_its_path(change, reason):
    d = doc()
    change(d)
    rej = only_reject(decode(fmt(), d))
    assert rej.category == "mapping_failed"
    assert rej.reason.startswith(reason), rej.reason


def test_timestamps_in_seconds_ms_iso_and_auto():
    def ts(unit, value):
        res = decode(fmt(ts_ms={"path": "meta.ts", "unit": unit}), doc(meta={"id": "e", "ts": value}))
        return int(res.batch.ts_ms[0]) if len(res.batch) else res.rejects[0].reason

    ms = 1_714_564_800_000  # 2024-05-01T12:00:00Z
    assert ts("s", ms / 1000) == ms and ts("s", str(ms // 1000)) == ms
    assert ts("ms", ms) == ms and ts("ms", float(ms)) == ms
    assert ts("iso", "2024-05-01T12:00:00Z") == ms
    assert ts("iso", "2024-05-01T14:00:00+02:00") == ms
    assert ts("iso", "2024-05-01T12:00:00") == ms  # no offset: UTC
    assert ts("auto", ms) == ms and ts("auto", ms // 1000) == ms and ts("auto", "2024-05-01T12:00:00Z") == ms
    assert "not an ISO-8601" in ts("iso", "yesterday")
    assert "expected an ISO-8601 string" in ts("iso", 5)
    assert "not a finite" in ts("s", 1e308) or "out of range" in ts("s", 1e308)
    assert "out of range" in ts("ms", 10**400)


def test_validation_runs_after_mapping():
    f = fmt(labels={"rating": "payload.stars"})
    d = doc()
    d["payload"]["stars"] = 9
    assert only_reject(decode(f, d)).category == "label_out_of_range"
    future = doc(meta={"id": "e", "ts": NOW_MS / 1000 + 7 * 86400})
    assert only_reject(decode(fmt(), future)).category == "bad_timestamp"
    d = doc()
    d["payload"]["liked"] = None  # the only label missing: no label at all
    assert only_reject(decode(fmt(), d)).category == "missing_field"
    long_id = doc(meta={"id": "x" * 500, "ts": 1_714_500_000})
    assert only_reject(decode(fmt(), long_id)).category == "limit_exceeded"


def test_parse_failures_keep_their_categories():
    res = decode(fmt(), b"{broken", b"[1, 2]", b"\xff\xfe", b"", b'{"a": NaN}', b"x" * 70_000)
    assert [r.category for r in res.rejects] == [
        "invalid_json",
        "not_an_object",
        "invalid_utf8",
        "empty",
        "invalid_json",
        "too_large",
    ]
    assert res.rejects[0].raw == b"{broken"  # the DLQ keeps the original bytes


def test_derived_event_ids():
    by_position = fmt(event_id={"derive": "position"})
    res = decode(by_position, doc(), doc(), partition=[3, 3], offset=[10, 11])
    assert list(res.batch.event_id) == ["clicks/3/10", "clicks/3/11"]
    assert list(res.batch.kafka_offset) == [10, 11]
    rej = only_reject(decode(by_position, doc()))
    assert "needs the Kafka position" in rej.reason
    by_content = fmt(event_id={"derive": "content"})
    other = doc(meta={"id": "e2", "ts": 1_714_500_001})
    res = decode(by_content, doc(), other, doc())
    # Byte-identical values (a producer's retry) get one id: the repeat is a duplicate.
    assert len(res.batch) == 2 and [r.category for r in res.rejects] == ["duplicate_event_id"]
    assert len(set(res.batch.event_id)) == 2


def test_example_config_and_sample_map():
    f = load_config(EXAMPLE).kafka.event_format
    res = decode_batch(SAMPLE.read_bytes().splitlines(), EventLimits(), now_ms=NOW_MS, mapping=f.mapping())
    assert not res.rejects and len(res.batch) == 3
    assert list(res.batch.item_text)[0] == "Heat (1995) | genres: Action, Crime"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(["meta", "payload", "id", "ts", "user", "items", "liked", "sku", "0"])


def _shaped(draw_value):
    # Random documents that often share the mapping's keys, so the paths get half-way.
    return st.recursive(
        draw_value, lambda inner: st.dictionaries(_keys, inner, max_size=4) | st.lists(inner, max_size=3)
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(_json | _shaped(_json), min_size=1, max_size=8))
def test_random_json_maps_or_is_rejected_never_raises(docs):
    f = fmt(
        scenario={"path": "ctx", "default": "feed"},
        user_features={"c": "payload.user", "n": {"path": "payload.items", "kind": "number"}},
        item_text={"parts": ["payload", {"path": "items[1]", "prefix": "p"}]},
        labels={"like": {"path": "payload.liked", "coerce": "bool"}, "r": "payload.items[-1].sku"},
    )
    raws = [json.dumps(d).encode() for d in docs]
    res = decode_batch(raws, EventLimits(labels={}), now_ms=NOW_MS, mapping=f.mapping())
    assert len(res.batch) + len(res.rejects) == len(raws)
    for r in res.rejects:
        assert r.category in REJECT_CATEGORIES and r.reason and not r.reason.startswith("unexpected"), r


@settings(max_examples=200, deadline=None)
@given(raws=st.lists(st.binary(max_size=64), min_size=1, max_size=8))
def test_random_bytes_never_raise_out_of_the_json_or_avro_decoder(raws, tmp_path_factory):
    schema = tmp_path_factory.getbasetemp() / "random.avsc"
    if not schema.exists():
        schema.write_text(json.dumps(AVRO_SCHEMA))
    for f in (fmt(), _avro_format(schema, layout="raw")):
        res = decode_batch(raws, EventLimits(), now_ms=NOW_MS, mapping=f.mapping())
        assert len(res.batch) + len(res.rejects) == len(raws)
        assert {r.category for r in res.rejects} <= set(REJECT_CATEGORIES)


# -- Avro --------------------------------------------------------------------------

AVRO_SCHEMA = {
    "type": "record",
    "name": "Interaction",
    "namespace": "team.clicks",
    "fields": [
        {"name": "uuid", "type": "string"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {
            "name": "user",
            "type": {"type": "record", "name": "User", "fields": [{"name": "id", "type": "long"}]},
        },
        {"name": "item", "type": "string"},
        {"name": "liked", "type": ["null", "boolean"], "default": None},
        {"name": "title", "type": ["null", "string"], "default": None},
    ],
}


def avro_record(i: int, **over) -> dict:
    rec = {
        "uuid": f"a-{i}",
        "at": datetime(2024, 5, 1, 12, 0, i % 60, tzinfo=UTC),
        "user": {"id": 100 + i},
        "item": f"sku-{i % 7}",
        "liked": i % 2 == 0,
        "title": f"Title {i}",
    }
    rec.update(over)
    return rec


def avro_bytes(record: dict, schema=AVRO_SCHEMA, schema_id: int | None = None) -> bytes:
    return encode(record, schema, schema_id)


def _avro_format(schema_file=None, registry_url=None, layout=None) -> EventFormat:
    avro = {"schema_file": str(schema_file) if schema_file else None, "registry_url": registry_url}
    if layout:
        avro["wire_format"] = layout
    return EventFormat.model_validate(
        {
            "kind": "avro",
            "avro": avro,
            "event_id": "uuid",
            "ts_ms": "at",
            "user_id": "user.id",
            "item_id": "item",
            "labels": {"like": {"path": "liked", "coerce": "bool"}},
            "item_text": "title",
        }
    )


def test_avro_with_a_schema_file(tmp_path):
    schema = tmp_path / "clicks.avsc"
    schema.write_text(json.dumps(AVRO_SCHEMA))
    f = _avro_format(schema)
    good = avro_bytes(avro_record(1))
    res = decode_batch(
        [good, avro_bytes(avro_record(2, liked=None)), good[:-3], good + b"\x00", b"\x00\x01"],
        EventLimits(),
        now_ms=NOW_MS,
        mapping=f.mapping(),
    )
    assert list(res.batch.event_id) == ["a-1"] and list(res.batch.user_id) == ["101"]
    assert res.batch.ts_ms[0] == 1_714_564_801_000 and list(res.batch.item_text) == ["Title 1"]
    cats = [r.category for r in res.rejects]
    assert cats[0] == "missing_field"  # liked null: no label
    assert cats[1:] == ["invalid_avro"] * 3
    assert "bytes left after the datum" in res.rejects[2].reason


def test_avro_paths_are_checked_against_the_schema_at_load(tmp_path):
    schema = tmp_path / "clicks.avsc"
    schema.write_text(json.dumps(AVRO_SCHEMA))
    section = _avro_format(schema).model_dump()
    section["user_id"] = {"path": "member.id"}
    with pytest.raises(ConfigError, match="user_id: path 'member.id' starts with a field"):
        config_from_dict({"kafka": {"event_format": section}})
    (tmp_path / "bad.avsc").write_text('{"type": "record"}')
    section["avro"]["schema_file"] = str(tmp_path / "bad.avsc")
    with pytest.raises(ConfigError, match="is not an Avro schema"):
        config_from_dict({"kafka": {"event_format": section}})


def test_confluent_wire_format_with_a_local_registry():
    v2 = {**AVRO_SCHEMA, "fields": [*AVRO_SCHEMA["fields"], {"name": "extra", "type": "int", "default": 0}]}
    with LocalSchemaRegistry({1: AVRO_SCHEMA, 2: v2}) as registry:
        mapping = _avro_format(registry_url=registry.url).mapping()
        values = [avro_bytes(avro_record(i), schema_id=1) for i in range(5)]
        values.append(avro_bytes(avro_record(9, extra=5), schema=v2, schema_id=2))
        values += [avro_bytes(avro_record(7), schema_id=99), b"\x01garbage", avro_bytes(avro_record(8))]
        res = decode_batch(values, EventLimits(), now_ms=NOW_MS, mapping=mapping)
        assert list(res.batch.event_id) == [f"a-{i}" for i in range(5)] + ["a-9"]
        assert [r.category for r in res.rejects] == ["invalid_avro"] * 3
        assert "schema id 99" in res.rejects[0].reason and "404" in res.rejects[0].reason
        assert "magic byte 0" in res.rejects[1].reason
        # Each id is fetched once, an unknown one too (remembered), however many values use it.
        decode_batch(values, EventLimits(), now_ms=NOW_MS, mapping=mapping)
        assert sorted(registry.requests) == ["/schemas/ids/1", "/schemas/ids/2", "/schemas/ids/99"]


def test_an_unreachable_registry_rejects_with_the_reason():
    registry = LocalSchemaRegistry({})
    url = registry.url
    registry.close()  # nothing listens there any more
    mapping = _avro_format(registry_url=url).mapping()
    res = decode_batch(
        [avro_bytes(avro_record(1), schema_id=1)], EventLimits(), now_ms=NOW_MS, mapping=mapping
    )
    rej = only_reject(res)
    assert rej.category == "invalid_avro" and "not usable" in rej.reason and "3 attempts" in rej.reason


# -- the CLI -----------------------------------------------------------------------


def test_schema_prints_the_mapping_or_the_native_json_schema(capsys):
    assert main(["schema", "--config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "user_id" in out and "<- actor.uid" in out and "occurred_at [iso]" in out
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "Event"


def test_check_format_shows_each_line_and_fails_on_a_reject(tmp_path, capsys):
    assert main(["check-format", "--config", str(EXAMPLE), "--sample", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok {") == 3 and "3 mapped, 0 rejected" in out
    bad = tmp_path / "bad.jsonl"
    lines = SAMPLE.read_text().splitlines()
    broken = json.loads(lines[0])
    del broken["actor"]["uid"]
    bad.write_text("\n".join([lines[0], json.dumps(broken), "not json", lines[0]]) + "\n")
    fmt_only = tmp_path / "format.yaml"
    fmt_only.write_text(json.dumps({"event_format": load_config(EXAMPLE).kafka.event_format.model_dump()}))
    assert main(["check-format", "--format", str(fmt_only), "--sample", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "line 2: rejected [mapping_failed] mapping: actor.uid: missing" in out
    assert "line 3: rejected [invalid_json]" in out
    assert "line 4: rejected [duplicate_event_id]" in out
    assert main(["check-format", "--config", str(EXAMPLE), "--sample", str(tmp_path / "none.jsonl")]) == 2
