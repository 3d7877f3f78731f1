"""Record and replay against a real broker: round trips, repartitioning, pacing, CLI."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kafka import KafkaProducer

from stream.ingest.kafka_io import ensure_topic, key_partition
from stream.recordings.data.synthetic import build_synthetic_recording
from stream.recordings.recording import (
    RECORDING_SCHEMA,
    RecordingError,
    event_time_order,
    iter_recording,
    record,
    recording_info,
    replay,
    write_recording,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def per_partition(path: Path) -> dict[int, list[tuple]]:
    """partition -> [(key, value, timestamp, headers)] in offset order."""
    rows = pq.read_table(path).to_pylist()
    out: dict[int, list[tuple]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["partition"], r["offset"])):
        headers = [(h["key"], h["value"]) for h in r["headers"]]
        out[r["partition"]].append((r["key"], r["value"], r["timestamp_ms"], headers))
    return dict(out)


def produce_mixed_topic(bootstrap: str, topic: str, partitions: int, n: int) -> dict[int, list]:
    """Messages with and without keys, headers and values, in several batches per partition."""
    ensure_topic(bootstrap, topic, partitions)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=4096)
    sent: dict[int, list] = defaultdict(list)
    try:
        for i in range(n):
            p = i % partitions
            key = None if i % 7 == 0 else b"user-%d" % (i % 13)
            value = None if i % 11 == 0 and key is not None else b'{"n": %d}' % i
            headers = [("trace", b"t%d" % i), ("empty", b"")] if i % 3 == 0 else []
            ts = 1_700_000_000_000 + i * 10 + (5 if i % 5 == 0 else 0)  # not monotonic
            producer.send(topic, key=key, value=value, headers=headers, partition=p, timestamp_ms=ts)
            sent[p].append((key, value, ts, headers))
        producer.flush()
    finally:
        producer.close()
    return dict(sent)


def test_record_replay_record_round_trip(broker, tmp_path):
    sent = produce_mixed_topic(broker, "rt-source", partitions=3, n=3000)
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"

    stats = record(broker, "rt-source", first)
    assert stats.rows == 3000 and stats.partitions == 3
    assert pq.read_schema(first).remove_metadata() == RECORDING_SCHEMA
    assert recording_info(first).partitions == 3
    assert per_partition(first) == sent

    replayed = replay(first, broker, "rt-copy")
    assert (replayed.rows, replayed.partitions, replayed.topic_created) == (3000, 3, True)
    assert replayed.kept_partitions
    record(broker, "rt-copy", second)
    assert per_partition(second) == sent
    # Same rows in the same order: file order is a function of the topic's content.
    assert pq.read_table(first).drop_columns("topic").equals(pq.read_table(second).drop_columns("topic"))


def test_replay_to_other_partition_count_partitions_by_key(broker, tmp_path):
    build_synthetic_recording(tmp_path / "syn.parquet", events=2000, users=50, items=100, seed=3)
    replay(tmp_path / "syn.parquet", broker, "rekeyed", partitions=3)
    stats = record(broker, "rekeyed", tmp_path / "back.parquet")
    assert stats.partitions == 3 and stats.rows == 2000
    back = pq.read_table(tmp_path / "back.parquet").to_pylist()
    assert all(r["partition"] == key_partition(r["key"], 3) for r in back)
    original = pq.read_table(tmp_path / "syn.parquet").to_pylist()

    def values_by_key(rows):
        ordered = sorted(rows, key=lambda r: (r["key"], r["timestamp_ms"], r["value"]))
        return {k: [r["value"] for r in g] for k, g in itertools.groupby(ordered, lambda r: r["key"])}

    assert values_by_key(back) == values_by_key(original)


def test_gzip_replay_round_trips(broker, tmp_path):
    # The producer's choice when the crc32c C extension is missing (stream/ingest/kafka_io.py).
    path = build_synthetic_recording(tmp_path / "g.parquet", events=800, users=30, items=60, seed=8)
    replay(path, broker, "gzipped", compression_type="gzip")
    record(broker, "gzipped", tmp_path / "back.parquet")
    assert per_partition(tmp_path / "back.parquet") == per_partition(path)


def test_record_stops_at_max_messages(broker, tmp_path):
    produce_mixed_topic(broker, "capped", partitions=2, n=500)
    stats = record(broker, "capped", tmp_path / "capped.parquet", max_messages=120)
    assert stats.rows == 120 == recording_info(tmp_path / "capped.parquet").rows


def test_replay_speed_factor_keeps_the_asked_rate(broker, tmp_path):
    # 500 events at 100/s recorded (~5 s of timestamps); speed 2 -> ~2.5 s.
    path = build_synthetic_recording(
        tmp_path / "paced.parquet", events=500, users=20, items=50, seed=5, events_per_s=100.0
    )
    ts = pq.read_table(path, columns=["timestamp_ms"]).column(0).to_numpy()
    recorded_rate = (len(ts) - 1) / ((ts[-1] - ts[0]) / 1000.0)
    stats = replay(path, broker, "paced", speed=2.0)
    assert stats.rows == 500
    achieved = (stats.rows - 1) / stats.seconds
    assert 0.8 * 2 * recorded_rate <= achieved <= 1.2 * 2 * recorded_rate, (achieved, recorded_rate)


def test_replay_fixed_rate(broker, tmp_path):
    path = build_synthetic_recording(tmp_path / "r.parquet", events=600, users=20, items=50, seed=6)
    stats = replay(path, broker, "fixed-rate", rate=400.0)
    assert 0.8 * 400 <= (stats.rows - 1) / stats.seconds <= 1.2 * 400


def test_iter_recording_is_file_order_in_bounded_batches(tmp_path):
    path = build_synthetic_recording(tmp_path / "s.parquet", events=1000, users=30, items=40, seed=1)
    batches = list(iter_recording(path, batch_rows=128))
    assert all(len(b) <= 128 for b in batches) and sum(len(b) for b in batches) == 1000
    offsets = np.concatenate([b.column("timestamp_ms").to_numpy() for b in batches])
    assert (offsets == pq.read_table(path).column("timestamp_ms").to_numpy()).all()


def test_event_time_order_merges_partitions_and_keeps_offset_order():
    rng = np.random.default_rng(0)
    partition = rng.integers(0, 4, size=400).astype(np.int32)
    offset = np.zeros(400, np.int64)
    for p in range(4):
        offset[partition == p] = np.arange((partition == p).sum())
    ts = rng.integers(0, 1000, size=400)
    order = event_time_order(partition, offset, ts)
    assert sorted(order.tolist()) == list(range(400))
    for p in range(4):
        assert (np.diff(offset[order][partition[order] == p]) == 1).all()
    sorted_ts = np.sort(ts)
    ts_in_partition_order = np.zeros(400, np.int64)
    for p in range(4):
        ts_in_partition_order[partition == p] = np.sort(ts[partition == p])
    merged = event_time_order(partition, offset, ts_in_partition_order)
    assert (ts_in_partition_order[merged] == sorted_ts).all()


def test_a_record_without_key_and_value_is_refused_before_sending(broker, tmp_path):
    table = pa.table(
        {
            "topic": ["t"],
            "partition": pa.array([0], pa.int32()),
            "offset": pa.array([7], pa.int64()),
            "timestamp_ms": pa.array([1], pa.int64()),
            "key": pa.array([None], pa.binary()),
            "value": pa.array([None], pa.binary()),
            "headers": pa.array([[]], RECORDING_SCHEMA.field("headers").type),
        }
    )
    path = write_recording(tmp_path / "null.parquet", table, partitions=1)
    with pytest.raises(RecordingError, match="offset 7"):
        replay(path, broker, "never-sent")


def test_replay_of_a_missing_file_is_a_typed_error(broker, tmp_path):
    with pytest.raises(RecordingError, match="no recording"):
        replay(tmp_path / "nope.parquet", broker, "never")
    with pytest.raises(RecordingError, match="speed"):
        replay(build_synthetic_recording(tmp_path / "x.parquet", 10, 2, 2, 0), broker, "t", speed="fast")


def test_cli_replay_and_record(broker, tmp_path):
    path = build_synthetic_recording(tmp_path / "c.parquet", events=300, users=10, items=20, seed=2)
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "stream.cli.main", *a],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ},
        check=False,
    )
    out = run("replay", str(path), "--bootstrap", broker, "--topic", "cli-topic", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "replayed 300 events" in out.stdout and "events/s" in out.stdout
    out = run(
        "record", "--bootstrap", broker, "--topic", "cli-topic", "--out", str(tmp_path / "back.parquet")
    )
    assert out.returncode == 0 and "recorded 300 messages" in out.stdout, out.stderr
    out = run(
        "record", "--bootstrap", broker, "--topic", "no-such-topic", "--out", str(tmp_path / "x.parquet")
    )
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    started = time.monotonic()
    out = run("replay", str(path), "--state-dir", str(tmp_path / "no-broker"))
    assert out.returncode == 2 and "memstream broker start" in out.stderr
    assert time.monotonic() - started < 30


def test_paced_replay_stops_early_when_asked_and_delivers_what_it_sent(broker, tmp_path):
    import threading

    src = tmp_path / "src.parquet"
    build_synthetic_recording(src, events=2000, users=50, items=100, seed=4)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    stats = replay(src, broker, "stopped-early", rate=400, stop=stop)  # 5 s if not stopped
    assert time.monotonic() - t0 < 3 and 0 < stats.rows < 2000
    back = tmp_path / "back.parquet"
    record(broker, "stopped-early", back)
    assert recording_info(back).rows == stats.rows
