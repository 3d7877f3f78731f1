"""Dead letters land on `<topic>.dlq` with the original bytes, key and reason headers."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from stream.ingest.dlq import (
    CATEGORY_HEADER,
    KEY_TRUNCATED_HEADER,
    MAX_KEY_BYTES,
    POISON_CATEGORY,
    REASON_HEADER,
    SOURCE_HEADER,
    DeadLetterWriter,
    PoisonDeadLetters,
    dead_lettered_positions,
    dlq_topic,
    source_label,
)
from stream.ingest.events import REJECT_CATEGORIES, Reject, decode_batch
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


# -- poison letters: once each across trainer restarts --------------------------------------------


def _poisoned(unit, at: list[int]):
    """`unit` with rating 1e300 (inf in float32: its step is poisoned) at the rows `at`."""
    from stream.ingest.events import EventBatch
    from stream.messages import IngestUnit

    b = EventBatch.from_arrow(unit.events)
    b.labels["rating"] = b.labels["rating"].copy()
    b.labels["rating"][at] = 1e300
    return IngestUnit(b.to_arrow(), unit.rejects, unit.next_offsets), b


def _poison_letters(broker, topic, expected):
    letters = read_all(broker, topic, expected=expected + 1, timeout_s=5)  # one more: none may come
    return sorted(
        dict(x.headers)[SOURCE_HEADER].decode()
        for x in letters
        if dict(x.headers)[CATEGORY_HEADER] == POISON_CATEGORY.encode()
    )


@pytest.mark.timeout(120)
def test_a_poison_event_replayed_after_a_restart_is_dead_lettered_once(broker, tmp_path):
    """The letter is written when the event is found, before the checkpoint that moves past
    it; the trainer crashes; the restored one replays the event, finds it poisoned again,
    and must not write it twice. A poison event it finds for the first time is written."""
    from tests.stream.conftest import small_service, synthetic_units

    units = synthetic_units(tmp_path / "syn.parquet", events=300)
    first, b1 = _poisoned(units[1], [3])
    second, b2 = _poisoned(units[2], [7])
    dlq, src = dlq_topic("restarts"), "restarts"

    svc = small_service(tmp_path / "ck")
    letters = PoisonDeadLetters(
        broker, dlq, src, resumed_at_s=svc.restored_captured_at, floor=svc.next_offsets
    )
    svc.apply_unit(units[0])
    svc.checkpoint()
    svc.apply_unit(first)
    letters(svc.take_poisoned())  # written; then the trainer dies before its next checkpoint
    assert letters.skipped == 0

    again = small_service(tmp_path / "ck")  # restored from the checkpoint before the poison
    assert again.restored_from is not None and again.restored_captured_at is not None
    letters = PoisonDeadLetters(
        broker, dlq, src, resumed_at_s=again.restored_captured_at, floor=again.next_offsets
    )
    again.apply_unit(first)  # the replay
    again.apply_unit(second)
    letters(again.take_poisoned())
    assert letters.skipped == 1

    want = [
        source_label(src, int(b.kafka_partition[i]), int(b.kafka_offset[i])) for b, i in ((b1, 3), (b2, 7))
    ]
    assert _poison_letters(broker, dlq, expected=2) == sorted(want)
    assert again.progress().rejects_applied == {"poison": 2}  # each counted once in the lineage


@pytest.mark.timeout(60)
def test_read_back_keeps_the_poison_letters_of_the_topic_since_the_time(broker):
    result = decode_batch([b"{broken"])
    reject = result.rejects[0]
    dlq = dlq_topic("readback")
    with DeadLetterWriter(broker, dlq) as w:
        w.send(Reject(b"{}", POISON_CATEGORY, "old"), source=("readback", 0, 1))
        w.flush()
        time.sleep(0.05)
        since_ms = int(time.time() * 1000)
        w.send(Reject(b"{}", POISON_CATEGORY, "x"), source=("readback", 0, 5))
        w.send(Reject(b"{}", POISON_CATEGORY, "x"), source=("readback", 3, 9))
        w.send(Reject(b"{}", POISON_CATEGORY, "other topic"), source=("elsewhere", 0, 6))
        w.send(reject, source=("readback", 0, 7))  # invalid_json: a reader's, not poison
        w.send(Reject(b"{}", POISON_CATEGORY, "no position"), source="readback")
    got = dead_lettered_positions(
        broker, dlq, source_topic="readback", category=POISON_CATEGORY, since_ms=since_ms
    )
    assert got == {(0, 5), (3, 9)}
    later = int(time.time() * 1000) + 60_000
    assert (
        dead_lettered_positions(
            broker, dlq, source_topic="readback", category=POISON_CATEGORY, since_ms=later
        )
        == set()
    )
