"""Dead letters land on `<topic>.dlq` with the original bytes, key and reason headers."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from stream.ingest.dlq import (
    CATEGORY_HEADER,
    KEY_TRUNCATED_HEADER,
    MAX_KEY_BYTES,
    REASON_HEADER,
    SOURCE_HEADER,
    DeadLetterWriter,
    dlq_topic,
    source_label,
)
from stream.ingest.events import REJECT_CATEGORIES, decode_batch
from stream.ingest.kafka_io import topic_partition_count

pytestmark = pytest.mark.integration


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 15.0) -> list:
    partitions = topic_partition_count(bootstrap, topic) or 0
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        got: list = []
        deadline = time.monotonic() + timeout_s
        while len(got) < expected and time.monotonic() < deadline:
            got += [r for rs in consumer.poll(timeout_ms=200).values() for r in rs]
        return got
    finally:
        consumer.close()


def test_rejects_go_to_the_dlq_with_reason_headers(broker):
    raw = [b"{broken", b"", b'{"event_id": 5}', b"\xff"]
    keys = [b"k0", None, b"k2", b"k3"]
    result = decode_batch(raw)
    assert len(result.rejects) == 4
    with DeadLetterWriter(broker, dlq_topic("orders")) as dlq:
        for pos, reject in zip(result.rejected_positions.tolist(), result.rejects):
            dlq.send(reject, key=keys[pos], source=("orders", 2, 100 + pos))
        dlq.send(result.rejects[0], source="orders")  # position unknown
        dlq.flush()
        assert (dlq.sent, dlq.failed) == (5, 0)

    letters = read_all(broker, "orders.dlq", expected=5)
    assert len(letters) == 5
    by_source = {}
    for letter in letters:
        headers = dict(letter.headers)
        assert headers[CATEGORY_HEADER].decode() in REJECT_CATEGORIES
        assert headers[REASON_HEADER].decode().strip()
        by_source[headers[SOURCE_HEADER].decode()] = letter
    assert set(by_source) == {"orders/2/100", "orders/2/101", "orders/2/102", "orders/2/103", "orders"}
    for pos in range(4):
        letter = by_source[f"orders/2/{100 + pos}"]
        assert letter.value == raw[pos] and letter.key == keys[pos]
    assert dict(by_source["orders/2/100"].headers)[CATEGORY_HEADER] == b"invalid_json"


def test_an_oversized_key_is_cut_with_a_marker(broker):
    result = decode_batch([b"{broken"])
    key = b"k" * (1 << 20)  # 1 MB
    with DeadLetterWriter(broker, dlq_topic("bigkeys")) as dlq:
        dlq.send(result.rejects[0], key=key, source=("bigkeys", 0, 7))
        dlq.flush()
    (letter,) = read_all(broker, "bigkeys.dlq", expected=1)
    assert len(letter.key) == MAX_KEY_BYTES and letter.key == key[:MAX_KEY_BYTES]
    assert dict(letter.headers)[KEY_TRUNCATED_HEADER] == str(1 << 20).encode()


def test_source_label():
    assert source_label("t", 1, 5) == "t/1/5"
    assert source_label("t", 1, None) == "t/1"
    assert source_label("t", -1, -1) == "t"
