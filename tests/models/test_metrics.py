"""Streaming metrics: exact AUC against a brute-force pair count, logloss, RMSE, windows, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import ExactAUC, StreamingMetrics, auc_exact, logloss_from_logits


def brute_auc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y > 0.5], s[y <= 0.5]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 200
    s = np.round(rng.normal(size=n), 1).astype(np.float32)  # many ties
    y = (rng.random(n) < 0.4).astype(np.float64)
    assert auc_exact(s, y) == pytest.approx(brute_auc(s, y), abs=1e-12)


def test_streaming_auc_equals_batch_auc_across_compactions():
    rng = np.random.default_rng(1)
    acc = ExactAUC(compact_every=64)  # force many merges
    ss, ys = [], []
    for _ in range(40):
        s = np.round(rng.normal(size=37), 2).astype(np.float32)
        y = (rng.random(37) < 0.5).astype(np.float64)
        acc.update(s, y)
        ss.append(s)
        ys.append(y)
    s, y = np.concatenate(ss), np.concatenate(ys)
    assert acc.value() == pytest.approx(brute_auc(s, y), abs=1e-12)


def test_auc_degenerate_cases():
    assert math.isnan(auc_exact(np.array([0.1, 0.2]), np.array([1.0, 1.0])))
    assert auc_exact(np.array([0.1, 0.9]), np.array([0.0, 1.0])) == 1.0
    assert auc_exact(np.array([0.5, 0.5]), np.array([0.0, 1.0])) == 0.5


def test_logloss_rmse_window_and_tail():
    rng = np.random.default_rng(2)
    m = StreamingMetrics(window=50, keep_log=True)
    zs, ys, errs = [], [], []
    for _ in range(10):
        z = rng.normal(size=16).astype(np.float32)
        y = (rng.random(16) < 0.5).astype(np.float64)
        y[0] = np.nan  # a missing label is skipped
        r_pred = rng.normal(3, 1, size=16)
        r = rng.integers(1, 6, size=16).astype(np.float64)
        m.update(z, y, r_pred, r)
        ok = ~np.isnan(y)
        zs.append(z[ok])
        ys.append(y[ok])
        errs.append((r_pred - r) ** 2)
    z, y, e = np.concatenate(zs), np.concatenate(ys), np.concatenate(errs)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    summ = m.summary()
    assert summ["logloss.like"] == pytest.approx(
        float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))), rel=1e-9
    )
    assert summ["rmse.rating"] == pytest.approx(math.sqrt(e.mean()), rel=1e-12)
    assert summ["window.auc.like"] == pytest.approx(brute_auc(z[-50:], y[-50:]), abs=1e-12)
    assert summ["window.rmse.rating"] == pytest.approx(math.sqrt(e[-50:].mean()), rel=1e-12)
    tail = int(len(z) * 0.8)
    assert m.auc_last(0.2) == pytest.approx(brute_auc(z[tail:], y[tail:]), abs=1e-12)
    assert summ["auc.like"] == pytest.approx(brute_auc(z, y), abs=1e-12)
    np.testing.assert_allclose(logloss_from_logits(np.array([0.0]), np.array([1.0])), [math.log(2)])


def test_metrics_state_round_trip():
    rng = np.random.default_rng(3)
    a = StreamingMetrics(window=30)
    for _ in range(5):
        a.update(
            rng.normal(size=20).astype(np.float32),
            (rng.random(20) < 0.5) * 1.0,
            rng.normal(size=20),
            rng.normal(size=20),
        )
    arrays, meta = a.export_state()
    b = StreamingMetrics()
    b.import_state({k: v.copy() for k, v in arrays.items()}, meta)
    assert b.summary() == a.summary()
    assert b.auc_last(0.2) == a.auc_last(0.2)


def test_exclusive_group_cumsum_matches_loop():
    from models.features import exclusive_group_cumsum

    rng = np.random.default_rng(4)
    keys = rng.integers(0, 5, size=40)
    vals = rng.normal(size=(40, 3))
    out = exclusive_group_cumsum(torch.from_numpy(keys), torch.from_numpy(vals)).numpy()
    for j in range(40):
        expect = vals[:j][keys[:j] == keys[j]].sum(0)
        np.testing.assert_allclose(out[j], expect, atol=1e-12)
    assert exclusive_group_cumsum(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2)).shape == (0, 2)


def test_causal_batch_history_matches_per_event_appends():
    """Event j sees exactly what the store would hold had events before j been appended one by
    one: every per-position column, and the mask."""
    from models.features import causal_batch_history

    rng = np.random.default_rng(5)
    L, B = 4, 12
    stored: dict[int, list[tuple[int, float]]] = {}  # user -> (item, signal) events, oldest first

    def view(users):
        item = np.full((len(users), L), -1, np.int64)
        sig = np.zeros((len(users), L), np.float32)
        mask = np.zeros((len(users), L), bool)
        for r, u in enumerate(users):
            last = stored.get(int(u), [])[-L:]
            for c, (i, s) in enumerate(last):
                item[r, L - len(last) + c], sig[r, L - len(last) + c], mask[r, L - len(last) + c] = i, s, True
        return item, sig, mask

    for step in range(6):
        users = rng.integers(0, 4, size=B) * 1_000_003  # keys, not small rows
        items = step * 100 + np.arange(B)
        sig = rng.normal(size=B).astype(np.float32)
        item, s, mask = view(users)
        cols, m = causal_batch_history(
            {"item": torch.from_numpy(item), "signal": torch.from_numpy(s)},
            torch.from_numpy(mask),
            torch.from_numpy(users),
            {"item": torch.from_numpy(items), "signal": torch.from_numpy(sig)},
        )
        for j in range(B):  # reference: per-event view, then append
            ri, rs, rm = view(users[j : j + 1])
            assert m[j].tolist() == rm[0].tolist()
            assert cols["item"][j][m[j]].tolist() == ri[0][rm[0]].tolist()
            np.testing.assert_array_equal(cols["signal"][j][m[j]].numpy(), rs[0][rm[0]])
            stored.setdefault(int(users[j]), []).append((int(items[j]), float(sig[j])))


def test_user_word_affinity_in_batch_equals_per_event_updates():
    from models.features import UserWordAffinity

    rng = np.random.default_rng(6)
    batched, ref = UserWordAffinity(4096, prior=2.0), UserWordAffinity(4096, prior=2.0)
    for _ in range(4):
        users = torch.from_numpy(rng.integers(0, 3, size=10))
        text = torch.from_numpy(rng.integers(0, 6, size=(10, 5)))  # 0 = padding, repeated words in a row
        sig = torch.from_numpy(rng.normal(size=10).astype(np.float32))
        got = batched.read(users, text, sig, in_batch=True)
        for j in range(10):
            one = ref.read(users[j : j + 1], text[j : j + 1], sig[j : j + 1], False)[0]
            np.testing.assert_allclose(got[j].numpy(), one.numpy(), rtol=1e-6)
            ref.update(users[j : j + 1], text[j : j + 1], sig[j : j + 1])
        batched.update(users, text, sig)
    assert torch.equal(batched.touched, ref.touched)
    np.testing.assert_allclose(batched.table.numpy(), ref.table.numpy(), rtol=1e-12)


def test_item_word_rates_in_batch_equal_per_event_updates():
    from models.features import ItemWordRates

    rng = np.random.default_rng(8)
    batched, ref = ItemWordRates(64, prior=2.0), ItemWordRates(64, prior=2.0)
    for _ in range(4):
        text = torch.from_numpy(rng.integers(0, 6, size=(10, 5)))  # 0 = padding, repeated words in a row
        sig = torch.from_numpy(rng.normal(size=10).astype(np.float32))
        evidence = torch.from_numpy(np.log1p(rng.integers(0, 4, size=10)).astype(np.float32))
        got = batched.read(text, sig, evidence, in_batch=True)
        for j in range(10):
            one = ref.read(text[j : j + 1], sig[j : j + 1], evidence[j : j + 1], False)[0]
            np.testing.assert_allclose(got[j].numpy(), one.numpy(), rtol=1e-5, atol=1e-7)
            ref.update(text[j : j + 1], sig[j : j + 1])
        batched.update(text, sig)
    assert torch.equal(batched.touched, ref.touched)
    np.testing.assert_allclose(batched.table.numpy(), ref.table.numpy(), rtol=1e-12)
    assert got.abs().sum() > 0


def test_item_word_rates_are_each_words_shrunk_deviation_faded_by_the_items_evidence():
    """A new item's features: its words' (S_w - n_w * mean) / (n_w + prior), summed and
    averaged over its distinct words, times prior / (n_item + prior); a word every item has
    deviates by nothing."""
    from models.features import ItemWordRates

    rates = ItemWordRates(16, prior=1.0)
    # words: 1 = every item ("genres"), 2 = liked ("drama"), 3 = disliked ("horror")
    text = torch.tensor([[1, 2, 0], [1, 2, 0], [1, 3, 0], [1, 3, 0]])
    rates.update(text, torch.tensor([1.0, 1.0, -1.0, -1.0]))  # stream mean 0
    new = torch.tensor([[1, 2, 2], [1, 3, 0], [1, 0, 0]])  # a duplicate word counts once
    got = rates.read(new, torch.zeros(3), torch.zeros(3), in_batch=False)
    dev2, dev3 = 2.0 / 3.0, -2.0 / 3.0  # S_w / (n_w + prior), the mean being 0
    np.testing.assert_allclose(got.numpy(), [[dev2, dev2 / 2], [dev3, dev3 / 2], [0.0, 0.0]], rtol=1e-6)
    seen = rates.read(new[:1], torch.zeros(1), torch.log1p(torch.tensor([3.0])), in_batch=False)
    np.testing.assert_allclose(seen.numpy(), [[dev2 / 4, dev2 / 8]], rtol=1e-6)  # 1 / (3 + 1)
    assert rates.stats() == {"words_seen": 3, "buckets": 16, "events": 4, "mean_feedback": 0.0}
    # Against the stream's mean, not zero: every event rated +1 leaves every word at 0.
    flat = ItemWordRates(16, prior=1.0)
    flat.update(text, torch.ones(4))
    assert flat.read(new, torch.zeros(3), torch.zeros(3), in_batch=False).abs().max() < 1e-6


def test_online_counters_in_batch_equal_per_event_updates():
    """Batched reads (causal within the batch) and updates, the decayed user sums included,
    equal one event at a time; and the decayed sums are the plain recurrence S = a S + x."""
    from models.features import OnlineCounters

    rng = np.random.default_rng(7)
    a = 0.8
    batched, ref = (OnlineCounters(64, 64, 5.0, 3.5, decay=a) for _ in range(2))
    ewma: dict[int, np.ndarray] = {}
    for _ in range(5):
        users = torch.from_numpy(rng.integers(0, 3, size=40))  # ~13 events per user per batch
        items = torch.from_numpy(rng.integers(0, 8, size=40))
        like = torch.from_numpy(rng.integers(0, 2, size=40).astype(np.float64))
        like[rng.random(40) < 0.2] = float("nan")  # some events without the label
        rating = torch.from_numpy(rng.integers(1, 6, size=40).astype(np.float64))
        got = batched.read(users, items, like, rating, in_batch=True)
        for j in range(40):
            one = ref.read(users[j : j + 1], items[j : j + 1], like[j : j + 1], rating[j : j + 1], False)
            np.testing.assert_allclose(got[j].numpy(), one[0].numpy(), rtol=1e-5, atol=1e-6)
            ref.update(users[j : j + 1], items[j : j + 1], like[j : j + 1], rating[j : j + 1])
            u = int(users[j])
            x = np.array([1.0, np.nan_to_num(like[j].item()), rating[j].item(), 1.0])  # _increments
            ewma[u] = a * ewma.get(u, np.zeros(4)) + x
        batched.update(users, items, like, rating)
    np.testing.assert_allclose(batched.user.numpy(), ref.user.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(batched.item.numpy(), ref.item.numpy(), rtol=1e-12)
    for u, want in ewma.items():
        np.testing.assert_allclose(batched.user[u, 4:].numpy(), want, rtol=1e-12)
    assert got[:, 8:].abs().sum() > 0  # the decayed features are read


def test_online_counters_base_rates_are_the_streams_rates_so_far():
    """The two base-rate columns: the logit of the smoothed like rate and the mean rating less
    rating_center over the events before each one (the batch's earlier events included),
    whatever the user or item: the score's level from the stream's first event."""
    from models.features import OnlineCounters as OC

    rng = np.random.default_rng(3)
    counters = OC(64, 64, 5.0, 3.5)
    likes, ratings = [], []
    for _ in range(3):
        users = torch.from_numpy(rng.integers(0, 9, size=30))
        items = torch.from_numpy(rng.integers(0, 9, size=30))
        like = torch.from_numpy((rng.random(30) < 0.7).astype(np.float64))
        rating = torch.from_numpy(rng.integers(1, 6, size=30).astype(np.float64))
        rating[rng.random(30) < 0.3] = float("nan")  # events without a rating
        got = counters.read(users, items, like, rating).numpy()
        for j in range(30):
            p = (sum(likes) + 1.0) / (len(likes) + 2.0)
            mean = np.mean(ratings) if ratings else 3.5
            np.testing.assert_allclose(got[j, OC.BASE_LIKE_LOGIT], np.log(p / (1 - p)), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[j, OC.BASE_RATING], mean - 3.5, rtol=1e-5, atol=1e-6)
            likes.append(float(like[j]))
            if not np.isnan(float(rating[j])):
                ratings.append(float(rating[j]))
        counters.update(users, items, like, rating)
    assert got[:, OC.BASE_LIKE_LOGIT].min() > 0.3  # ~0.7 like rate: the level is learned from nothing


def test_auc_summary_is_bounded_with_its_error_stated():
    rng = np.random.default_rng(0)
    exact, bounded = (
        ExactAUC(compact_every=500),
        ExactAUC(compact_every=500, max_distinct=2_000, resolution=1e-2),
    )
    scores, labels = [], []
    for _ in range(40):
        y = rng.random(500) < 0.4
        z = (rng.normal(size=500) + 0.8 * y).astype(np.float32)
        exact.update(z, y)
        bounded.update(z, y)
        scores.append(z)
        labels.append(y)
    truth = auc_exact(np.concatenate(scores), np.concatenate(labels))
    assert exact.value() == truth and exact.error_bound() == 0.0
    assert bounded.binned and len(bounded.uniq) < 2_000  # 20,000 distinct scores, far fewer bins
    assert abs(bounded.value() - truth) <= bounded.error_bound() < 0.01
    again = ExactAUC()
    again.load(bounded.state())  # the mode survives a checkpoint
    assert again.binned and again.value() == bounded.value()
