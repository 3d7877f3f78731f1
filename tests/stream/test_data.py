"""ML-1M and synthetic recordings: contents, layout, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from stream.ingest.events import decode_batch
from stream.ingest.kafka_io import key_partition
from stream.recordings.data.movielens import (
    ML1M_ROWS,
    ML100K_ROWS,
    DataError,
    build_ml1m_recording,
    build_movielens_recording,
)
from stream.recordings.data.synthetic import TOPIC_WORDS, build_synthetic_recording
from stream.recordings.recording import recording_info

REPO = Path(__file__).resolve().parents[2]


def assert_kafka_layout(table, partitions: int) -> None:
    """Partition = default partitioner on the key; offsets 0.. per partition in row order."""
    part = table.column("partition").to_numpy()
    keys = table.column("key").to_pylist()
    distinct = {k: key_partition(k, partitions) for k in set(keys)}
    assert (part == np.array([distinct[k] for k in keys])).all()
    offsets = table.column("offset").to_numpy()
    for p in range(partitions):
        assert (offsets[part == p] == np.arange((part == p).sum())).all()
    assert (table.column("timestamp_ms").to_numpy() == ts_of(table)).all()


def ts_of(table) -> np.ndarray:
    return np.array([json.loads(v)["ts_ms"] for v in table.column("value").to_pylist()])


@pytest.fixture(scope="module")
def ml1m_full(tmp_path_factory) -> Path:
    return build_ml1m_recording(tmp_path_factory.mktemp("ml1m") / "ml1m.parquet")


@pytest.mark.slow
def test_ml1m_full_recording(ml1m_full):
    info = recording_info(ml1m_full)
    assert (info.rows, info.partitions) == (ML1M_ROWS, 4)
    table = pq.read_table(ml1m_full, columns=["timestamp_ms", "value"])
    assert (np.diff(table.column("timestamp_ms").to_numpy()) >= 0).all()
    values = table.column("value").cast("string")
    like = pc.sum(pc.match_substring(values, '"like":1.0')).as_py()
    assert 0.57 <= like / ML1M_ROWS <= 0.58


@pytest.mark.slow
def test_ml1m_prefix_is_deterministic_and_valid(ml1m_full, tmp_path):
    a = build_ml1m_recording(tmp_path / "a.parquet", limit=30_000)
    b = build_ml1m_recording(tmp_path / "b.parquet", limit=30_000)
    assert a.read_bytes() == b.read_bytes()
    prefix = pq.read_table(a)
    full_head = pq.read_table(ml1m_full).slice(0, 30_000)
    assert prefix.column("value").equals(full_head.column("value"))
    assert_kafka_layout(prefix, 4)
    result = decode_batch(prefix.column("value").to_pylist())
    assert result.rejects == []
    batch = result.batch
    assert batch.event_id[0].startswith("ml1m-") and len(set(batch.event_id)) == 30_000
    assert set(batch.labels) == {"like", "rating"}
    assert ((batch.labels["rating"] >= 4) == (batch.labels["like"] == 1.0)).all()
    assert set(batch.user_cat) == {"age", "gender", "occupation", "zip3"}
    assert batch.scenario[0] == "feed" and "Genres:" in batch.item_text[0]
    assert (batch.user_id == np.array([k.decode() for k in prefix.column("key").to_pylist()])).all()


def test_ml100k_recording_is_a_second_movielens_stream(tmp_path):
    path = build_movielens_recording("ml-100k", tmp_path / "k.parquet")
    table = pq.read_table(path)
    assert table.num_rows == ML100K_ROWS
    assert (np.diff(table.column("timestamp_ms").to_numpy()) >= 0).all()
    assert_kafka_layout(table, 4)
    result = decode_batch(table.column("value").to_pylist())
    assert result.rejects == []
    batch = result.batch
    assert batch.event_id[0].startswith("ml100k-") and len(set(batch.event_id)) == ML100K_ROWS
    assert ((batch.labels["rating"] >= 4) == (batch.labels["like"] == 1.0)).all()
    assert set(batch.user_cat) == {"age", "gender", "occupation", "zip3"}
    assert len(set(batch.user_id)) == 943 and len(set(batch.item_id)) == 1664
    assert all("Genres: " in t and not t.endswith("Genres: .") for t in batch.item_text)
    assert (
        build_movielens_recording("ml-100k", tmp_path / "k2.parquet", limit=5000).read_bytes()
        == build_movielens_recording("ml-100k", tmp_path / "k3.parquet", limit=5000).read_bytes()
    )
    with pytest.raises(DataError, match="unknown MovieLens dataset"):
        build_movielens_recording("ml-20m", tmp_path / "x.parquet")


def test_synthetic_is_deterministic_for_a_seed(tmp_path):
    a = build_synthetic_recording(tmp_path / "a.parquet", 3000, 100, 200, seed=11)
    b = build_synthetic_recording(tmp_path / "b.parquet", 3000, 100, 200, seed=11)
    c = build_synthetic_recording(tmp_path / "c.parquet", 3000, 100, 200, seed=12)
    assert a.read_bytes() == b.read_bytes()
    assert pq.read_table(a).column("value") != pq.read_table(c).column("value")


def test_synthetic_events_are_valid_skewed_and_learnable(tmp_path):
    path = build_synthetic_recording(tmp_path / "s.parquet", 20_000, 500, 1000, seed=3, partitions=3)
    table = pq.read_table(path)
    assert recording_info(path).partitions == 3
    assert_kafka_layout(table, 3)
    result = decode_batch(table.column("value").to_pylist())
    assert result.rejects == []
    batch = result.batch
    assert (np.diff(batch.ts_ms) >= 0).all()
    # Zipf popularity: the top 10% of items take most of the traffic.
    _, counts = np.unique(batch.item_id, return_counts=True)
    assert np.sort(counts)[::-1][:100].sum() > 0.5 * len(batch)
    # Learnable: a user's like rate per item topic (read off the item text) in the first
    # half of the stream predicts the second half.
    word_topic = {word: t for t, words in enumerate(TOPIC_WORDS) for word in words}
    topic = np.array(
        [next(word_topic[w] for w in text.lower().split() if w in word_topic) for text in batch.item_text]
    )
    _, user = np.unique(batch.user_id, return_inverse=True)
    cell = user * len(TOPIC_WORDS) + topic
    like = batch.labels["like"]
    half = len(like) // 2
    seen = np.bincount(cell[:half], minlength=cell.max() + 1)
    liked = np.bincount(cell[:half], weights=like[:half], minlength=cell.max() + 1)
    rate = (liked + 1) / (seen + 2)
    assert auc(rate[cell[half:]], like[half:]) > 0.65


def auc(score: np.ndarray, label: np.ndarray) -> float:
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = label == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def test_cli_data_commands(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "stream.cli.main", "data", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env={**os.environ},
            check=False,
        )

    out = run(
        "synthetic",
        "--out",
        str(tmp_path / "s.parquet"),
        "--events",
        "500",
        "--users",
        "20",
        "--items",
        "30",
        "--seed",
        "1",
    )
    assert out.returncode == 0 and "wrote 500 synthetic events" in out.stdout, out.stderr
    out = run("ml-1m", "--out", str(tmp_path / "m.parquet"), "--limit", "1000")
    assert out.returncode == 0 and "wrote 1,000 ML-1M events" in out.stdout, out.stderr
    out = run("ml-100k", "--out", str(tmp_path / "k.parquet"), "--limit", "1000")
    assert out.returncode == 0 and "wrote 1,000 ML-100K events" in out.stdout, out.stderr
