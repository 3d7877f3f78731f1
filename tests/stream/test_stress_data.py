"""The stress streams: deterministic, valid events, and the statistics they advertise.

Each stream is meant to make one memory necessary; these tests check the generative
claims with simple online baselines (counting models, test-then-train, no torch): an
oracle that knows the latents scores well, a baseline without the mechanism does not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.metrics import auc_exact
from stream.cli.main import _STRESS_STREAMS
from stream.ingest.events import decode_batch
from stream.ingest.kafka_io import key_partition
from stream.recordings.data.common import DataError
from stream.recordings.data.stress import (
    HISTORY_L,
    NOISE_WORDS,
    STREAMS,
    TOPIC_WORDS,
    build_stress_recording,
    earlier_counts,
    generate,
    generate_capacity,
)
from stream.recordings.recording import recording_info

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def online_rate(keys: np.ndarray, like: np.ndarray, prior: float = 2.0) -> np.ndarray:
    """Test-then-train smoothed like rate of each event's key (before its own label)."""
    base = float(like.mean())
    likes_before = np.zeros(len(keys))
    order = np.argsort(keys, kind="stable")
    k, y = keys[order], like[order]
    starts = np.r_[0, np.flatnonzero(k[1:] != k[:-1]) + 1]
    run = np.diff(np.r_[starts, len(k)])
    csum = np.cumsum(y) - y
    likes_before[order] = csum - np.repeat(csum[starts], run)
    n_before = earlier_counts(keys)
    return (likes_before + prior * base) / (n_before + prior)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_deterministic_for_a_seed_and_valid(tmp_path, name):
    a = build_stress_recording(name, tmp_path / "a.parquet", events=3000, seed=7, partitions=3)
    b = build_stress_recording(name, tmp_path / "b.parquet", events=3000, seed=7, partitions=3)
    c = build_stress_recording(name, tmp_path / "c.parquet", events=3000, seed=8, partitions=3)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    assert recording_info(a).rows == 3000

    table = pq.read_table(a)
    part, keys = table.column("partition").to_numpy(), table.column("key").to_pylist()
    assert all(p == key_partition(k, 3) for p, k in zip(part.tolist(), keys))
    result = decode_batch(table.column("value").to_pylist())
    assert result.rejects == []
    batch = result.batch
    assert len(set(batch.event_id)) == 3000 and batch.event_id[0].startswith(f"{name}-7-")
    like, rating = batch.labels["like"], batch.labels["rating"]
    assert set(np.unique(like)) <= {0.0, 1.0} and ((rating >= 1) & (rating <= 5)).all()
    assert ((rating >= 4) == (like == 1.0)).all()
    assert (np.diff(batch.ts_ms) >= 0).all()
    assert all(batch.item_text) and batch.user_cat


def test_the_cli_builds_every_stress_stream(tmp_path):
    assert [n for n, _ in _STRESS_STREAMS] == list(STREAMS)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream.cli.main",
            "data",
            "stress-long-taste",
            "--out",
            str(tmp_path / "l.parquet"),
            "--events",
            "400",
            "--seed",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "wrote 400 stress-long-taste events" in out.stdout, out.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream.cli.main",
            "data",
            "stress-capacity",
            "--out",
            str(tmp_path / "x.parquet"),
            "--events",
            "-5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--events must be >= 0" in bad.stderr


def test_bad_arguments_are_clear_errors():
    with pytest.raises(DataError, match="unknown stress stream 'stress-nope'"):
        generate("stress-nope", 10)
    with pytest.raises(DataError, match="active <= clusters"):
        generate_capacity(10, seed=0, clusters=5, active=6)
    assert len(generate("stress-cold-items", 0)) == 0


def test_earlier_counts():
    assert earlier_counts(np.array([3, 1, 3, 3, 1, 7])).tolist() == [0, 0, 1, 2, 1, 0]
    assert earlier_counts(np.array([], np.int64)).tolist() == []


def test_cold_items_only_content_scores_the_new_items():
    s = generate("stress-cold-items", seed=0)  # the benchmark's size: 200k events
    item_ev = earlier_counts(s.event_item)
    cold = item_ev < 5
    assert 0.30 <= cold.mean() <= 0.50  # a large share of events on items with < 5 earlier events
    assert auc_exact(s.oracle_p[cold], s.like[cold]) > 0.85  # the taste x topic signal exists
    # Id-only: the user's and the item's own online like rates (logit sum). The user rate
    # says little (tastes are centred), a new item's rate is its prior: near chance.
    lg = lambda r: np.log(r) - np.log1p(-r)
    id_only = lg(online_rate(s.event_user, s.like)) + lg(online_rate(s.event_item, s.like))
    assert auc_exact(id_only[cold], s.like[cold]) < 0.60
    # Content: the user's online like rate on the item's topic, read from its words only
    # (the topic vocabulary word its text contains).
    word_topic = {w: t for t, ws in enumerate(TOPIC_WORDS) for w in ws}
    text_topic = np.array(
        [word_topic[next(w for w in t.lower().split() if w in word_topic)] for t in s.item_text]
    )
    content = online_rate(s.event_user * 100 + text_topic[s.event_item], s.like)
    assert auc_exact(content[cold], s.like[cold]) > 0.70
    assert (text_topic == s.latents["item_topic"]).all()  # the words reveal the topic exactly


def test_long_taste_is_hidden_from_the_last_l_items():
    s = generate("stress-long-taste", seed=0)
    user_ev = earlier_counts(s.event_user)
    long = user_ev >= HISTORY_L
    assert long.mean() > 0.5  # most events are scored with a history longer than L
    per_user = np.bincount(s.event_user)
    assert len(per_user) == 2000 and (per_user >= 200).mean() > 0.15  # hundreds of events for many
    in_session = s.latents["in_session"]
    assert 0.55 < in_session.mean() < 0.65
    assert abs(s.like[in_session].mean() - s.like.mean()) < 0.06  # sessions: about the base rate
    assert auc_exact(s.oracle_p[long], s.like[long]) > 0.72  # the taste signal exists

    # A per-(user, topic) like rate over the whole history beats the same rate over the
    # user's last L events: the taste is beyond the recent window (300 users keep it short).
    topic = s.latents["item_topic"][s.event_item]
    whole = online_rate(s.event_user * 16 + topic, s.like)
    base = float(s.like.mean())
    rows_of = [np.flatnonzero(s.event_user == u) for u in range(300)]
    recent = {}
    for rows in rows_of:
        t, y = topic[rows], s.like[rows]
        for j in range(HISTORY_L, len(rows)):
            same = t[j - HISTORY_L : j] == t[j]
            recent[rows[j]] = (y[j - HISTORY_L : j][same].sum() + 2 * base) / (same.sum() + 2)
    sl = np.fromiter(recent, np.int64)
    auc_whole = auc_exact(whole[sl], s.like[sl])
    auc_recent = auc_exact(np.fromiter(recent.values(), np.float64), s.like[sl])
    assert auc_whole > auc_recent + 0.025, (auc_whole, auc_recent)


def test_capacity_signal_is_in_the_cells_not_the_clusters():
    s = generate("stress-capacity", seed=0)
    uc = s.latents["user_cluster"][s.event_user]
    ic = s.latents["item_cluster"][s.event_item]
    assert s.latents["cells"].shape == (1000, 40)  # 40,000 cells of a 1000 x 1000 table
    assert {f["ucluster"] for f in s.user_features} == {f"uc{c}" for c in range(1000)}
    assert all(t.split()[0] == f"ic{c}" for t, c in zip(s.item_text, s.latents["item_cluster"]))
    assert not set(NOISE_WORDS) & {f"ic{c}" for c in range(1000)}
    assert auc_exact(s.oracle_p, s.like) > 0.8
    lg = lambda r: np.log(r) - np.log1p(-r)
    additive = lg(online_rate(uc, s.like)) + lg(online_rate(ic, s.like))
    assert auc_exact(additive, s.like) < 0.56  # no cluster's own rate carries the cells
    cell_rate = online_rate(uc * 1000 + ic, s.like)
    seen = earlier_counts(uc * 1000 + ic) >= 3
    assert auc_exact(cell_rate[seen], s.like[seen]) > 0.75  # memorising cells works
