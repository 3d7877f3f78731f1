"""Hostile input through the real job: every bad message dead-lettered with its category and
reason, every valid one trained, no trainer restart (real broker, real local Ray, real model)."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest
from kafka import KafkaConsumer, TopicPartition

from stream.config import load_config
from stream.ingest.dlq import CATEGORY_HEADER, REASON_HEADER, SOURCE_HEADER, TRUNCATED_HEADER
from stream.job.driver import StreamingJob
from stream.recordings.data.hostile import hostile_mix, produce

from .conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]
VALID = 3000


def _read_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 60) -> list:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=2000,
    )
    try:
        parts = consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out, deadline = [], time.time() + timeout_s
        while len(out) < expect and time.time() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
        return out
    finally:
        consumer.close()


def test_hostile_mix_dead_lettered_by_category_valid_trained(ray_cluster, broker, ml1m_20k, tmp_path):
    rows = pq.read_table(ml1m_20k, columns=["key", "value"]).slice(0, VALID).to_pylist()
    mix = hostile_mix(
        [(r["key"], r["value"]) for r in rows],
        seed=11,
        now_ms=int(time.time() * 1000),
        ratio=10,
        dup_min_gap=600,
    )
    topic = "hostile-mix"
    positions = produce(mix, broker, topic, partitions=4)["positions"]
    expected = dict(zip(positions, mix))
    bad = [m for m in mix if m.expected is not None]
    assert {m.kind for m in mix} >= {"ten_mb", "duplicate_event_id", "deeply_nested", "label_nan"}
    # finite labels outside the default specs, and repeated JSON keys
    assert {m.kind for m in mix} >= {
        "rating_1e6",
        "rating_neg_1e300",
        "like_7",
        "like_1e38",
        "duplicate_event_id_key",
        "duplicate_label_key",
    }

    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        [
            f'kafka.bootstrap="{broker}"',
            f"kafka.topic={topic}",
            "kafka.ingest_actors=2",
            f"job.work_dir={tmp_path / 'work'}",
            f"job.max_events={len(mix)}",
            "job.live_display=false",
            "serving.enabled=false",
            "checkpoints.interval_s=2",
            "snapshots.interval_s=1",
            "admin.port=0",
            f"admin.token={'t' * 32}",
        ],
    )
    report = StreamingJob(cfg).run().to_json()

    assert report["trainer_restarts"] == 0
    assert report["events_trained"] == len(mix) - len(bad)
    assert report["events_dlq"] == len(bad)
    assert report["events_consumed"] == report["events_trained"] + report["events_dlq"] == len(mix)
    want_counts: dict[str, int] = {}
    for m in bad:
        want_counts[m.expected] = want_counts.get(m.expected, 0) + 1
    assert report["dlq_categories"] == want_counts

    letters = _read_all(broker, f"{topic}.dlq", len(bad))
    assert len(letters) == len(bad)  # each bad message exactly once
    for r in letters:
        h = dict(r.headers)
        src_topic, p, o = h[SOURCE_HEADER].decode().rsplit("/", 2)
        m = expected[(int(p), int(o))]
        assert src_topic == topic and h[CATEGORY_HEADER].decode() == m.expected, (m.kind, h)
        assert h[REASON_HEADER]
        if m.expected == "label_out_of_range":  # names the task, the value and what is allowed
            assert h[REASON_HEADER].decode().startswith("labels."), h[REASON_HEADER]
        if m.kind in ("duplicate_event_id_key", "duplicate_label_key"):
            assert b"duplicate key" in h[REASON_HEADER], h[REASON_HEADER]
        if TRUNCATED_HEADER in h:  # the 10 MB one: a prefix, and its true size
            assert int(h[TRUNCATED_HEADER]) == len(m.value) and m.value.startswith(r.value)
        else:
            assert r.value == (m.value or b"") and r.key == m.key, m.kind
