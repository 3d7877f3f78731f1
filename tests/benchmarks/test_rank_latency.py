"""benchmarks/rank_latency.py: its requests (the most active users, distinct candidates) and
one small end-to-end run whose table has a row per (history length, candidate count)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import rank_latency as rl  # noqa: E402
from stream.recordings.data.synthetic import build_synthetic_recording  # noqa: E402
from stream.train.evaluate import iter_event_batches  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SMALL = {
    "trainer": {"batch_size": 128},
    "model": {
        "features": {"user_buckets": 1024, "item_buckets": 1024, "cat_buckets": 512, "text_buckets": 512},
        "bank": {"capacity": 600},
        "history": {"max_users": 200},
    },
}


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "syn.parquet"
    build_synthetic_recording(path, events=1200, users=40, items=200, seed=5)
    return path


def test_requests_are_the_most_active_users_with_distinct_candidates(recording):
    batches = list(iter_event_batches(recording, batch_size=128))
    reqs, fewest = rl.requests_for(batches, users=3, n=7)
    counts = Counter(u for b in batches for u in b.user_id)
    top = sorted(counts.values(), reverse=True)[:3]
    assert [counts[r.user_id] for r in reqs] == top and fewest == top[-1]
    for r in reqs:
        ids = [c.item_id for c in r.candidates]
        assert len(ids) == 7 == len(set(ids)) and all(c.item_text for c in r.candidates)


def test_a_small_run_prints_a_row_per_length_and_candidate_count(recording, tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "rank.md"
    argv = ["--recording", str(recording), "--config", str(config), "--events", "600", "--lengths", "4,16"]
    argv += ["--candidates", "1,5", "--users", "2", "--rounds", "1", "--out", str(out)]
    assert rl.main(argv) == 0
    rows = [
        line.split("|")[1:-1]
        for line in out.read_text().splitlines()
        if line.startswith("| ") and "ms" not in line
    ]
    cells = [(int(r[0]), int(r[1])) for r in rows]
    assert cells == [(4, 1), (16, 1), (4, 5), (16, 5)]
    assert all(float(r[2]) > 0 for r in rows) and [r[5].strip() for r in rows][::2] == ["1.00", "1.00"]
