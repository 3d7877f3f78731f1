"""Evidence counting (exact, causal in the batch, saturating, checkpointed) and the slices."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from models.metrics import StreamingMetrics, auc_exact, logloss_from_logits
from models.slices import (
    EVIDENCE_BUCKETS,
    EvidenceCounter,
    EvidenceSlices,
    IdHasher64,
    evidence_bucket,
    history_bucket,
)


def _reference_counts(batches: list[np.ndarray]) -> list[np.ndarray]:
    """Per row: how many rows of its key came before it, one event at a time."""
    seen: Counter = Counter()
    out = []
    for keys in batches:
        row = []
        for k in keys.tolist():
            row.append(seen[k])
            seen[k] += 1
        out.append(np.array(row))
    return out


def test_counts_are_exclusive_in_stream_order_across_and_within_batches():
    rng = np.random.default_rng(0)
    batches = [rng.integers(1, 40, size=n).astype(np.uint64) for n in (1, 50, 7, 200, 0, 33)]
    counter = EvidenceCounter(capacity=8)  # grows several times on the way
    got = [counter.count_then_add(b) for b in batches]
    for g, want in zip(got, _reference_counts(batches)):
        np.testing.assert_array_equal(g, want)
    assert len(counter) == len(np.unique(np.concatenate(batches)))
    assert len(counter.keys) >= 2 * len(counter)  # load stays <= 1/2
    every = np.arange(1, 40, dtype=np.uint64)
    total = Counter(np.concatenate(batches).tolist())
    np.testing.assert_array_equal(counter.get(every), [total[k] for k in every.tolist()])


def test_colliding_home_slots_and_many_distinct_keys():
    # Keys that all hash to the same home slot of a 1024 table: linear probing, and
    # several new keys claiming one free slot in the same pass.
    keys = (np.arange(1, 300, dtype=np.uint64) << np.uint64(20)) | np.uint64(5)
    counter = EvidenceCounter(capacity=1024)
    np.testing.assert_array_equal(counter.count_then_add(keys), np.zeros(len(keys)))
    np.testing.assert_array_equal(counter.count_then_add(keys[::-1]), np.ones(len(keys)))
    big = np.random.default_rng(1).integers(1, 2**63, size=20_000).astype(np.uint64)
    counter.count_then_add(big)
    np.testing.assert_array_equal(counter.get(big), np.ones(len(big)))


def test_counts_saturate():
    counter = EvidenceCounter(saturate_at=5)
    keys = np.full(4, 7, dtype=np.uint64)
    np.testing.assert_array_equal(counter.count_then_add(keys), [0, 1, 2, 3])
    np.testing.assert_array_equal(counter.count_then_add(keys), [4, 5, 5, 5])
    assert counter.get(keys[:1])[0] == 5
    with pytest.raises(ValueError, match="saturate_at"):
        EvidenceCounter(saturate_at=2**32)


def test_counter_state_round_trip():
    rng = np.random.default_rng(2)
    a = EvidenceCounter(capacity=16)
    for _ in range(5):
        a.count_then_add(rng.integers(1, 2**64 - 1, size=40, dtype=np.uint64) % np.uint64(60) + np.uint64(1))
    a.count_then_add(np.array([2**64 - 1], dtype=np.uint64))  # the top bit survives int64 storage
    arrays, meta = a.export_state()
    assert all(v.dtype == np.int64 for v in arrays.values())
    b = EvidenceCounter.from_state({k: v.copy() for k, v in arrays.items()}, meta)
    again, _ = b.export_state()  # another layout (capacity, probe order), the same arrays
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)
    probe = np.r_[np.arange(1, 70, dtype=np.uint64), np.uint64(2**64 - 1)]
    np.testing.assert_array_equal(b.get(probe), a.get(probe))
    nxt = rng.integers(1, 61, size=50).astype(np.uint64)
    np.testing.assert_array_equal(b.count_then_add(nxt), a.count_then_add(nxt))


def test_hasher_is_stable_and_nonzero():
    h = IdHasher64(cache_size=2)
    ids = np.array(["u1", "u2", "u1", "", "u3", "u2"], dtype=object)
    first = h.many(ids)
    again = IdHasher64().many(ids)  # another process would compute the same
    np.testing.assert_array_equal(first, again)
    assert first[0] == first[2] and first[0] != first[1] and (first != 0).all()


def test_buckets():
    np.testing.assert_array_equal(
        evidence_bucket(np.array([0, 1, 4, 5, 49, 50, 10**9])), [0, 1, 1, 2, 2, 3, 3]
    )
    np.testing.assert_array_equal(history_bucket(np.array([0, 49, 50, 51]), 50), [0, 0, 1, 1])


def _stream(seed: int, steps: int = 12, b: int = 64):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        users = np.array([f"u{x}" for x in rng.integers(0, 15, size=b)], dtype=object)
        items = np.array([f"i{x}" for x in rng.zipf(1.6, size=b) % 200], dtype=object)
        y = (rng.random(b) < 0.45).astype(np.float64)
        y[rng.random(b) < 0.1] = np.nan  # events without the like task are counted, not scored
        z = (rng.normal(size=b) + y * 0.7).astype(np.float32)
        yield z, y, users, items


def test_slices_match_a_recomputation_from_the_evidence():
    sl = EvidenceSlices(history_length=20)
    seen_u: Counter = Counter()
    seen_i: Counter = Counter()
    rows = []
    for z, y, users, items in _stream(3):
        ev = sl.update(z, y, users, items)
        for j in range(len(z)):  # the definition, one event at a time
            assert ev.user[j] == seen_u[users[j]] and ev.item[j] == seen_i[items[j]]
            seen_u[users[j]] += 1
            seen_i[items[j]] += 1
        rows += list(zip(z, y, ev.item, ev.user))
    z, y, ie, ue = (np.array(c) for c in zip(*rows))
    ok = ~np.isnan(y)
    z, y, ie, ue = z[ok], y[ok], ie[ok], ue[ok]
    out = sl.summary()
    assert set(out) == {"item_evidence", "user_evidence", "user_history"}
    assert list(out["item_evidence"]) == list(EVIDENCE_BUCKETS) and list(out["user_history"]) == [
        "short",
        "long",
    ]
    groups = {
        "item_evidence": evidence_bucket(ie),
        "user_evidence": evidence_bucket(ue),
        "user_history": history_bucket(ue, 20),
    }
    for name, idx in groups.items():
        assert sum(v["n"] for v in out[name].values()) == ok.sum()
        for b, got in enumerate(out[name].values()):
            hit = idx == b
            assert set(got) == {"n", "auc.like", "logloss.like"} and got["n"] == hit.sum()
            if len(np.unique(y[hit])) == 2:
                assert got["auc.like"] == pytest.approx(auc_exact(z[hit], y[hit]), abs=1e-12)
            else:
                assert got["auc.like"] is None
            if hit.any():
                assert got["logloss.like"] == pytest.approx(
                    logloss_from_logits(z[hit], y[hit]).mean(), rel=1e-9
                )
            else:
                assert got["logloss.like"] is None
    assert out["user_history"]["long"]["n"] > 0 and out["item_evidence"]["0"]["n"] > 0


def test_metrics_state_carries_the_slices_so_a_restart_reports_the_same():
    whole = StreamingMetrics(window=50, history_length=10)
    first = StreamingMetrics(window=50, history_length=10)
    batches = list(_stream(4))
    for z, y, u, i in batches[:6]:
        whole.update(z, y, None, None, u, i)
        first.update(z, y, None, None, u, i)
    arrays, meta = first.export_state()
    resumed = StreamingMetrics(window=50, history_length=10)
    resumed.import_state({k: v.copy() for k, v in arrays.items()}, meta)
    for z, y, u, i in batches[6:]:
        a = whole.update(z, y, None, None, u, i)
        b = resumed.update(z, y, None, None, u, i)
        np.testing.assert_array_equal(a.item, b.item)
        np.testing.assert_array_equal(a.user, b.user)
    assert resumed.slice_summary() == whole.slice_summary()
    assert resumed.summary() == whole.summary()


def test_metrics_without_ids_skip_the_slices_and_an_old_state_loads():
    m = StreamingMetrics(window=10)
    z, y, _, _ = next(_stream(5))
    assert m.update(z, y) is None
    assert m.slice_summary()["item_evidence"]["0"] == {"n": 0, "auc.like": None, "logloss.like": None}
    arrays, meta = m.export_state()
    meta.pop("slices")  # a checkpoint written before the slices existed
    old = StreamingMetrics()
    old.import_state({k: v for k, v in arrays.items() if not k.startswith("slices.")}, meta)
    assert old.summary()["n.like"] == m.summary()["n.like"] and not math.isnan(old.summary()["auc.like"])


def test_integer_keys_count_like_the_ids_they_stand_for():
    """The trainer passes models.ids keys (no hashing in the step): same evidence as strings."""
    from models.ids import key64

    users = np.array(["u1", "u2", "u1", "u3", "u1"], dtype=object)
    items = np.array(["a", "a", "b", "a", "c"], dtype=object)
    z, y = np.zeros(5, np.float32), np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    by_id, by_key = EvidenceSlices(history_length=2), EvidenceSlices(history_length=2)
    for _ in range(2):
        a = by_id.update(z, y, users, items)
        keys = lambda xs: np.array([key64(x) for x in xs], dtype=np.int64)
        b = by_key.update(z, y, keys(users), keys(items))
        np.testing.assert_array_equal(a.item, b.item)
        np.testing.assert_array_equal(a.user, b.user)
    assert by_key.summary() == by_id.summary()
