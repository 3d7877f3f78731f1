"""A reader that was never sought (a restarted ingest actor) refuses epoch-tagged requests
instead of answering None forever; the chaos run stalled two partitions on this."""

from __future__ import annotations

import json

import pytest

from stream.ingest.reader import KafkaConfig, PartitionReader, ReaderNotSought

pytestmark = [pytest.mark.integration]


def test_unsought_reader_raises_then_serves_after_seek(broker):
    from kafka import KafkaProducer

    topic = "ingest-restart"
    p = KafkaProducer(bootstrap_servers=broker)
    for i in range(20):
        ev = {"event_id": f"e{i}", "ts_ms": 1000 + i, "user_id": "u", "item_id": "i", "labels": {"like": 1.0}}
        p.send(topic, key=b"u", value=json.dumps(ev).encode(), partition=0)
    p.flush()
    p.close()
    reader = PartitionReader(KafkaConfig(topic=topic, poll_timeout_ms=100), broker, [0])
    try:
        with pytest.raises(ReaderNotSought, match="has not been sought"):
            reader.next_batch(100, 0.1, epoch="from-before-the-restart")
        assert reader.next_batch(100, 0.1, epoch=None) is None  # untagged callers: just nothing yet
        epoch = reader.seek({0: 5}, "fresh")
        reader.start()
        got = reader.next_batch(100, 10.0, epoch=epoch)
        assert got is not None and got.next_offsets[0] == 20 and got.events.num_rows == 15
    finally:
        reader.close()
