"""A poison event through the real job: with the label contract switched off for `rating`,
an event with rating -1e300 (finite in JSON, infinite in float32) reaches the trainer. Its
step is isolated: the event is dead-lettered as `poison` with the error, every other event
is trained, the trainer never restarts (real broker, real local Ray, real model)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from stream.config import load_config
from stream.ingest.dlq import CATEGORY_HEADER, REASON_HEADER, SOURCE_HEADER
from stream.job.driver import StreamingJob
from stream.recordings.data.hostile import HostileMessage, produce

from .conftest import ROOT
from .test_hostile import _read_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]
VALID = 3000
POISON_AT = 1700


def test_a_poison_event_is_dead_lettered_and_the_rest_trained(ray_cluster, broker, ml1m_20k, tmp_path):
    rows = pq.read_table(ml1m_20k, columns=["key", "value"]).slice(0, VALID).to_pylist()
    poison = json.loads(rows[POISON_AT]["value"])
    poison["event_id"] = "poison-1"
    poison["labels"]["rating"] = -1e300
    messages = [HostileMessage(r["key"], r["value"], None, "valid") for r in rows]
    messages.insert(
        POISON_AT, HostileMessage(rows[POISON_AT]["key"], json.dumps(poison).encode(), "poison", "poison")
    )
    topic = "poison-mix"
    positions = produce(messages, broker, topic, partitions=4)["positions"]
    poison_at = positions[POISON_AT]

    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        [
            f'kafka.bootstrap="{broker}"',
            f"kafka.topic={topic}",
            "kafka.ingest_actors=2",
            "kafka.limits.labels.rating=null",  # no contract: the trainer is the last line
            f"job.work_dir={tmp_path / 'work'}",
            f"job.max_events={len(messages)}",
            "job.live_display=false",
            "serving.enabled=false",
            "admin.enabled=false",
            "checkpoints.interval_s=2",
            "snapshots.interval_s=1",
        ],
    )
    report = StreamingJob(cfg).run().to_json()

    assert report["trainer_restarts"] == 0
    assert report["dlq_categories"] == {"poison": 1}
    assert report["events_trained"] == VALID
    assert report["events_consumed"] == VALID + 1
    assert report["versions_withheld"] == 0  # the model was never hurt
    (letter,) = _read_all(broker, f"{topic}.dlq", 1)
    h = dict(letter.headers)
    assert h[CATEGORY_HEADER] == b"poison" and b"non-finite" in h[REASON_HEADER]
    assert h[SOURCE_HEADER].decode() == f"{topic}/{poison_at[0]}/{poison_at[1]}"
    assert json.loads(letter.value)["event_id"] == "poison-1"
