"""A team's own format end to end on the real broker: a topic of foreign JSON and one of Avro
in the Confluent wire format (schemas from a real HTTP registry on localhost), read by the
job's PartitionReader, the values that do not map dead-lettered with the failing path, and
`memstream eval` over a recording of the topic giving the same events."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from kafka import KafkaProducer

from stream.config import load_config
from stream.ingest.avro import LocalSchemaRegistry, encode
from stream.ingest.dlq import CATEGORY_HEADER, REASON_HEADER, SOURCE_HEADER
from stream.ingest.event_format import EventFormat
from stream.ingest.kafka_io import ensure_topic
from stream.ingest.reader import KafkaConfig, PartitionReader
from stream.recordings.recording import record
from stream.train.evaluate import run_eval

from .test_hostile import _read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
GOOD = 300
NOW_S = int(time.time())

JSON_FORMAT = {
    "kind": "json",
    "event_id": {"derive": "position"},
    "ts_ms": {"path": "when", "unit": "s"},
    "user_id": "who.id",
    "item_id": "what[0].sku",
    "labels": {"like": {"path": "outcome.liked", "coerce": "bool"}},
    "item_text": {"parts": ["what[0].title", {"path": "what[0].tags", "prefix": "tags: "}]},
}


def foreign_json(i: int) -> dict:
    return {
        "when": NOW_S - 3600 + i,
        "who": {"id": i % 37},
        "what": [{"sku": f"s{i % 53}", "title": f"Film {i % 53}", "tags": ["a", "b"][: i % 3]}],
        "outcome": {"liked": (i * 7) % 3 == 0},
        "noise": {"ignored": i},
    }


PLAY_SCHEMA = {
    "type": "record",
    "name": "Play",
    "fields": [
        {"name": "play_id", "type": "string"},
        {"name": "started", "type": "long"},
        {"name": "listener", "type": "int"},
        {
            "name": "track",
            "type": {"type": "record", "name": "Track", "fields": [{"name": "id", "type": "long"}]},
        },
        {"name": "completed", "type": "boolean"},
    ],
}


def play(i: int) -> dict:
    started = int((time.time() - 600 + i) * 1000)
    return {
        "play_id": f"p{i}",
        "started": started,
        "listener": i % 41,
        "track": {"id": i % 61},
        "completed": i % 3 == 0,
    }


def _produce(broker: str, topic: str, values: list[bytes]) -> None:
    ensure_topic(broker, topic, 2)
    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=20)
    for i, v in enumerate(values):
        producer.send(topic, value=v, key=str(i % 37).encode(), partition=i % 2)
    producer.flush()
    producer.close()


def _read_through_reader(broker: str, cfg: KafkaConfig, expect: int, timeout_s: float = 30):
    reader = PartitionReader(cfg, broker, [0, 1])
    try:
        reader.seek(None)
        reader.start()
        events, rejects, deadline = [], [], time.monotonic() + timeout_s
        while len(events) + len(rejects) < expect and time.monotonic() < deadline:
            unit = reader.next_batch(1000, 1.0)
            if unit is not None:
                events += unit.events.column("event_id").to_pylist()
                rejects += unit.rejects
        return events, rejects
    finally:
        reader.close()  # flushes the dead letters


def _dead_letters(broker: str, cfg: KafkaConfig, expect: int) -> list[dict[str, str]]:
    letters = _read_all(broker, cfg.dlq(), expect, timeout_s=20)
    return [{k: v.decode() for k, v in r.headers} for r in letters]


def test_foreign_json_topic_through_the_reader_and_eval(broker, tmp_path):
    topic = f"foreign-json-{uuid.uuid4().hex[:8]}"
    values = [json.dumps(foreign_json(i)).encode() for i in range(GOOD)]
    missing_user = foreign_json(GOOD)
    del missing_user["who"]["id"]
    values.insert(100, json.dumps(missing_user).encode())
    values.insert(200, b'{"when": "later"}')
    _produce(broker, topic, values)
    fmt = EventFormat.model_validate(JSON_FORMAT)
    cfg = KafkaConfig(topic=topic, poll_timeout_ms=100, fetch_min_bytes=1, event_format=fmt)

    events, rejects = _read_through_reader(broker, cfg, len(values))
    assert len(events) == GOOD and len(set(events)) == GOOD
    assert all(e.startswith(f"{topic}/") for e in events)  # derived from the position
    assert sorted(r.category for r in rejects) == ["mapping_failed", "mapping_failed"]
    letters = _dead_letters(broker, cfg, 2)
    reasons = sorted(h[REASON_HEADER] for h in letters)
    assert reasons == ["mapping: when: 'later' is not a number", "mapping: who.id: missing"]
    assert all(h[CATEGORY_HEADER] == "mapping_failed" and h[SOURCE_HEADER].startswith(topic) for h in letters)

    # A recording keeps the raw values: eval maps them the same way, same ids, same rejects.
    rec = tmp_path / "foreign.parquet"
    record(broker, topic, rec)
    eval_cfg = load_config(None, ["trainer.batch_size=64"])
    eval_cfg.kafka = eval_cfg.kafka.model_copy(update={"event_format": fmt, "topic": topic})
    report = run_eval(eval_cfg, rec, progress=False).to_json()
    assert report["events_trained"] == GOOD
    assert report["dlq_categories"] == {"mapping_failed": 2}


def test_avro_topic_in_the_confluent_wire_format(broker):
    topic = f"foreign-avro-{uuid.uuid4().hex[:8]}"
    with LocalSchemaRegistry({7: PLAY_SCHEMA}) as registry:
        values = [encode(play(i), PLAY_SCHEMA, schema_id=7) for i in range(GOOD)]
        values.insert(50, encode(play(999), PLAY_SCHEMA, schema_id=8))  # an id the registry lacks
        values.insert(60, b'{"json": "on an Avro topic"}')
        _produce(broker, topic, values)
        fmt = EventFormat.model_validate(
            {
                "kind": "avro",
                "avro": {"registry_url": registry.url},
                "event_id": "play_id",
                "ts_ms": {"path": "started", "unit": "ms"},
                "user_id": "listener",
                "item_id": "track.id",
                "labels": {"like": {"path": "completed", "coerce": "bool"}},
            }
        )
        cfg = KafkaConfig(topic=topic, poll_timeout_ms=100, fetch_min_bytes=1, event_format=fmt)
        events, rejects = _read_through_reader(broker, cfg, len(values))
        assert sorted(events) == sorted(f"p{i}" for i in range(GOOD))
        assert [r.category for r in rejects] == ["invalid_avro", "invalid_avro"]
        assert registry.requests.count("/schemas/ids/7") == 1  # cached: one fetch per reader
    letters = _dead_letters(broker, cfg, 2)
    reasons = sorted(h[REASON_HEADER] for h in letters)
    assert "schema id 8" in reasons[1] and "404" in reasons[1]
    assert "magic byte 0" in reasons[0]
