"""Raw event columns -> integer ids and numbers (numpy side of the tokenization).

The model never sees strings. This module turns a batch (any object with
EventBatch's attributes: `models` does not import `stream`) into fixed-layout
arrays: hashed ids for the user, the item, every categorical user feature
(salted by its name so equal values of different fields do not collide),
the scenario and the words of the item text; transformed numeric features;
and online counters read BEFORE the batch's labels are added (so no event's
label reaches its own score: progressive validation stays honest).

Hashing is crc32 of the UTF-8 bytes (stable across processes, unlike hash()),
memoised in a bounded dict because ids repeat constantly in a stream.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from memory_bank.base import MemoryDelta
from models.config import FeatureConfig


class BatchLike(Protocol):
    """The attributes of stream.ingest.events.EventBatch that the model reads."""

    event_id: np.ndarray
    ts_ms: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray
    scenario: np.ndarray
    item_text: np.ndarray
    labels: dict[str, np.ndarray]
    user_cat: dict[str, np.ndarray]
    user_num: dict[str, np.ndarray]

    def __len__(self) -> int: ...


class FeatureLayoutError(ValueError):
    """A feature layout that cannot be honoured (e.g. too many features for the slots)."""


class StableHasher:
    """str -> bucket in [0, buckets), crc32 with a salt, memoised (bounded)."""

    def __init__(self, buckets: int, salt: str, cache_size: int = 1 << 20) -> None:
        self.buckets = buckets
        self.salt = salt.encode()
        self.cache: dict[str, int] = {}
        self.cache_size = cache_size

    def one(self, s: str | None) -> int:
        h = self.cache.get(s)  # None (padding) is memoised under None itself
        if h is None:
            if len(self.cache) >= self.cache_size:
                self.cache.clear()
            text = "\x00<none>" if s is None else s
            h = zlib.crc32(text.encode("utf-8", "surrogatepass"), zlib.crc32(self.salt)) % self.buckets
            self.cache[s] = h
        return h

    def many(self, xs: np.ndarray) -> np.ndarray:
        flat = xs.ravel().tolist()
        # The memo answers nearly every lookup (B x L history ids per step): map(dict.get)
        # does them in C, and only misses go through `one`. A generator calling `one` per
        # id was ~10% of a training step.
        out = list(map(self.cache.get, flat))
        if None in out:
            one = self.one
            out = [one(x) if h is None else h for x, h in zip(flat, out)]
        return np.array(out, dtype=np.int64).reshape(xs.shape)


_WORD = re.compile(r"[a-z0-9']+")


class TextHasher:
    """item_text -> up to `max_tokens` hashed word ids (+1; 0 is padding), memoised per text."""

    def __init__(self, buckets: int, max_tokens: int, cache_size: int = 1 << 16) -> None:
        self.words = StableHasher(buckets - 1, "word")
        self.max_tokens = max_tokens
        self.cache: dict[str, np.ndarray] = {}
        self.cache_size = cache_size

    def one(self, text: str | None) -> np.ndarray:
        if not text:
            return np.zeros(0, dtype=np.int64)
        ids = self.cache.get(text)
        if ids is None:
            if len(self.cache) >= self.cache_size:
                self.cache.clear()
            words = _WORD.findall(text.lower())[: self.max_tokens]
            ids = np.array([self.words.one(w) + 1 for w in words], dtype=np.int64)
            self.cache[text] = ids
        return ids

    def many(self, texts: np.ndarray) -> np.ndarray:
        """(B,) texts -> (B, max_tokens) int64, 0 = padding."""
        out = np.zeros((len(texts), self.max_tokens), dtype=np.int64)
        for i, t in enumerate(texts):
            ids = self.one(t)
            out[i, : len(ids)] = ids
        return out


def signed_log(x: np.ndarray) -> np.ndarray:
    """Numeric features of unknown scale: sign(x) * log1p(|x|); NaN -> 0."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0)
    return np.sign(x) * np.log1p(np.abs(x))


def exclusive_group_cumsum(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each row j: the sum of values[i] over i < j with keys[i] == keys[j].

    keys (B,), values (B, K) -> (B, K). Stable sort by key, cumulative sum, minus the
    sum at the start of each key's run, minus the row itself.
    """
    if len(keys) == 0:  # e.g. no word of any item text in the batch (item_text is optional)
        return np.zeros_like(values)
    order = np.argsort(keys, kind="stable")
    v = values[order]
    csum = np.cumsum(v, axis=0) - v  # exclusive over the sorted rows
    k = keys[order]
    starts = np.r_[0, np.flatnonzero(k[1:] != k[:-1]) + 1]
    run_len = np.diff(np.r_[starts, len(k)])
    out_sorted = csum - np.repeat(csum[starts], run_len, axis=0)
    out = np.empty_like(out_sorted)
    out[order] = out_sorted
    return out


def causal_batch_history(
    item_ids: np.ndarray,
    signal: np.ndarray,
    mask: np.ndarray,
    user_ids: np.ndarray,
    batch_items: np.ndarray,
    batch_signal: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histories as each event of the batch would see them: stored history + the same
    user's earlier events of this batch (their items and feedback), last L kept.

    item_ids (B, L) object, signal (B, L), mask (B, L) (the store's view before the
    batch, most recent last); user_ids, batch_items, batch_signal (B,) in event order.
    Event j with r earlier same-user events in the batch sees the window
    combined[r : r + L] of combined = stored (L) ++ those events (positions c >= L).
    """
    b, L = item_ids.shape
    codes = np.unique(user_ids, return_inverse=True)[1].reshape(-1)
    order = np.argsort(codes, kind="stable")
    k = codes[order]
    starts = np.r_[0, np.flatnonzero(k[1:] != k[:-1]) + 1]
    run_len = np.diff(np.r_[starts, b])
    start_sorted = np.repeat(starts, run_len)  # (B,) run start of each sorted row
    rank = np.empty(b, dtype=np.int64)
    rank[order] = np.arange(b) - start_sorted
    if not rank.any():
        return item_ids, signal, mask
    first = np.empty(b, dtype=np.int64)
    first[order] = start_sorted
    c = np.arange(L)[None, :] + rank[:, None]  # (B, L) combined index
    stored = c < L
    rows = np.arange(b)[:, None]
    cs = np.minimum(c, L - 1)
    pos = order[np.minimum(first[:, None] + np.maximum(c - L, 0), b - 1)]  # batch row of c >= L
    new_items = np.where(stored, item_ids[rows, cs], batch_items[pos])
    new_signal = np.where(stored, signal[rows, cs], batch_signal[pos]).astype(np.float32)
    new_mask = np.where(stored, mask[rows, cs], True)
    return new_items, new_signal, new_mask


class OnlineCounters:
    """Per user / per item running counts, like rate and mean rating (hashed rows).

    read() is called before update() for the same batch: features only ever
    contain labels of strictly earlier events.
    """

    NUM_FEATURES = 8  # per event: user (log n, like rate, mean rating), item (same), 2 crosses
    ITEM_LOG_COUNT = 3  # the column of read() holding log(1 + earlier events of the item)

    def __init__(self, user_buckets: int, item_buckets: int, prior: float, rating_center: float) -> None:
        self.prior = prior
        self.rating_center = rating_center
        # columns: count, likes, rating sum, rating count
        self.user = np.zeros((user_buckets, 4), dtype=np.float64)
        self.item = np.zeros((item_buckets, 4), dtype=np.float64)
        self.total = np.zeros(4, dtype=np.float64)
        # Rows updated since the last take (snapshot deltas ship only those).
        self.touched_user = np.zeros(user_buckets, dtype=bool)
        self.touched_item = np.zeros(item_buckets, dtype=bool)

    def _rates(self, rows: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """rows (B, 4), total (B, 4) global counts -> log count, smoothed like rate and mean rating."""
        g_like = (total[:, 1] + 1.0) / (total[:, 0] + 2.0)
        g_rating = np.where(total[:, 3] > 0, total[:, 2] / np.maximum(total[:, 3], 1.0), self.rating_center)
        n = rows[:, 0]
        like = (rows[:, 1] + self.prior * g_like) / (n + self.prior)
        rating = (rows[:, 2] + self.prior * g_rating) / (rows[:, 3] + self.prior)
        return np.log1p(n), like - g_like, rating - g_rating

    def item_evidence(self, item_idx: np.ndarray, in_batch: bool = True) -> np.ndarray:
        """(B,) rows -> (B,) float32 log(1 + earlier events of each item), causal in the batch."""
        n = self.item[item_idx, 0]
        if in_batch:
            n = n + exclusive_group_cumsum(item_idx, np.ones((len(item_idx), 1)))[:, 0]
        return np.log1p(n).astype(np.float32)

    def read(
        self,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        like: np.ndarray,
        rating: np.ndarray,
        in_batch: bool = True,
    ) -> np.ndarray:
        """(B,) rows -> (B, 8) float32 features, causal within the batch.

        Event j sees the counts before the batch plus the labels of the batch's events
        before j (exclusive prefix sums per user / item): exactly what a per-event
        learner would know, and never j's own label.
        """
        upd = self._increments(like, rating)  # (B, 4)
        if not in_batch:  # counts as of before the batch only
            upd = np.zeros_like(upd)
        users = self.user[user_idx] + exclusive_group_cumsum(user_idx, upd)
        items = self.item[item_idx] + exclusive_group_cumsum(item_idx, upd)
        total = self.total + np.cumsum(upd, axis=0) - upd  # (B, 4)
        un, ul, ur = self._rates(users, total)
        in_, il, ir = self._rates(items, total)
        return np.stack([un, ul, ur, in_, il, ir, ul * il, ur + ir], axis=1).astype(np.float32)

    @staticmethod
    def _increments(like: np.ndarray, rating: np.ndarray) -> np.ndarray:
        has_like, has_rating = ~np.isnan(like), ~np.isnan(rating)
        return np.stack(
            [
                np.ones(len(like)),
                np.where(has_like, like, 0.0),
                np.where(has_rating, rating, 0.0),
                has_rating.astype(np.float64),
            ],
            axis=1,
        )  # (B, 4): count, likes, rating sum, rating count

    def update(
        self, user_idx: np.ndarray, item_idx: np.ndarray, like: np.ndarray, rating: np.ndarray
    ) -> None:
        upd = self._increments(like, rating)
        np.add.at(self.user, user_idx, upd)
        np.add.at(self.item, item_idx, upd)
        self.total += upd.sum(0)
        self.touched_user[user_idx] = True
        self.touched_item[item_idx] = True


def feedback_signal(like: np.ndarray, rating: np.ndarray, center: float, scale: float) -> np.ndarray:
    """What an event says about the user's taste: centred rating, else +-1 like, else 0."""
    sig = np.where(np.isnan(rating), np.nan, (rating - center) / max(scale, 1e-6))
    return np.where(np.isnan(sig), np.where(np.isnan(like), 0.0, 2.0 * like - 1.0), sig).astype(np.float32)


class UserWordAffinity:
    """The user's running feedback per word of item_text (genres, title words, year).

    A hashed (user, word) table of (feedback sum, count). For a target item the
    features are the user's smoothed mean feedback over the item's words and the
    log evidence: "this user rates comedies high" as a number the model gets for
    free, causal within the batch like the counters.
    """

    NUM_FEATURES = 2

    def __init__(self, buckets: int, prior: float) -> None:
        self.prior = prior
        self.table = np.zeros((buckets, 2), dtype=np.float64)  # feedback sum, count
        self.touched = np.zeros(buckets, dtype=bool)  # rows updated since the last take

    def _keys(self, user_idx: np.ndarray, text_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,), (B, Lt) -> keys (B, Lt), valid (B, Lt): each distinct word of a row once."""
        words = np.sort(text_idx, axis=1)  # word order does not matter; duplicates adjacent
        valid = words > 0
        valid[:, 1:] &= words[:, 1:] != words[:, :-1]
        keys = (user_idx[:, None] * 1_000_003 + words) % len(self.table)
        return keys, valid

    def read(
        self, user_idx: np.ndarray, text_idx: np.ndarray, signal: np.ndarray, in_batch: bool
    ) -> np.ndarray:
        keys, valid = self._keys(user_idx, text_idx)
        got = self.table[keys] * valid[..., None]  # (B, Lt, 2)
        if in_batch:
            flat_keys = keys[valid]  # event-major: a key's earlier entries are earlier events
            inc = np.stack([np.repeat(signal, valid.sum(1)), np.ones(len(flat_keys))], axis=1)
            got[valid] += exclusive_group_cumsum(flat_keys, inc)
        ssum, cnt = got[..., 0].sum(1), got[..., 1].sum(1)  # (B,)
        return np.stack([ssum / (cnt + self.prior), np.log1p(cnt)], axis=1).astype(np.float32)

    def update(self, user_idx: np.ndarray, text_idx: np.ndarray, signal: np.ndarray) -> None:
        keys, valid = self._keys(user_idx, text_idx)
        inc = np.stack(
            [np.broadcast_to(signal[:, None], keys.shape)[valid], np.ones(int(valid.sum()))], axis=1
        )
        np.add.at(self.table, keys[valid], inc)
        self.touched[keys[valid]] = True


@dataclass
class FeatureArrays:
    """One batch as fixed-layout arrays (B = batch size)."""

    user_idx: np.ndarray  # (B,) int64
    item_idx: np.ndarray  # (B,) int64
    cat_idx: np.ndarray  # (B, C) int64, C = max_user_cat (missing fields hash "<none>")
    num: np.ndarray  # (B, 2*N) float32: signed log value and a missing flag per slot
    scenario_idx: np.ndarray  # (B,) int64 into the categorical table
    text_idx: np.ndarray  # (B, Lt) int64, 0 = padding
    counters: np.ndarray  # (B, NUM_COUNTER_FEATURES) float32: counters + user-word affinity
    # log(1 + earlier events of the item), this batch's earlier events included: how much the
    # item's id embedding has learned (the weight of its content vector, ranker._blend_content).
    item_evidence: np.ndarray  # (B,) float32


NUM_COUNTER_FEATURES = OnlineCounters.NUM_FEATURES + UserWordAffinity.NUM_FEATURES
_RECENT_DROPS = 32  # distinct dropped names kept for the admin API and reports


class FeatureBuilder:
    """Stateful (slot layout, counters, hash caches) batch -> FeatureArrays."""

    def __init__(self, cfg: FeatureConfig) -> None:
        self.cfg = cfg
        self.users = StableHasher(cfg.user_buckets, "user")
        self.items = StableHasher(cfg.item_buckets, "item")
        self.cats = StableHasher(cfg.cat_buckets, "cat")
        self.text = TextHasher(cfg.text_buckets, cfg.max_text_tokens)
        # Slot layout: name -> slot; fixed names from config, otherwise first seen
        # (sorted within the batch) and then frozen. Saved with the trainer state.
        self.cat_slots: dict[str, int] = {n: i for i, n in enumerate(cfg.user_cat)}
        self.num_slots: dict[str, int] = {n: i for i, n in enumerate(cfg.user_num)}
        if len(self.cat_slots) > cfg.max_user_cat or len(self.num_slots) > cfg.max_user_num:
            raise FeatureLayoutError("more named user features than max_user_cat / max_user_num")
        # Admission of undeclared names (FeatureConfig.admit_after): sightings of candidates,
        # names admitted in the current window, and drops counted, never stored unbounded.
        self.admitting = True  # serving copies never admit: their layout comes with snapshots
        self.sightings: dict[str, int] = {}
        self.admitted_in_window = 0
        self.events_in_window = 0
        self.dropped_total = 0  # (batch, name) pairs whose values were dropped
        self.dropped_recent: list[str] = []  # the last few distinct names dropped
        self.counters = OnlineCounters(
            cfg.user_buckets, cfg.item_buckets, cfg.counter_prior, cfg.rating_center
        )
        self.affinity = UserWordAffinity(
            cfg.affinity_buckets if cfg.use_word_affinity else 1, cfg.counter_prior
        )

    def _slot(self, slots: dict[str, int], name: str, cap: int, fixed: bool, seen: int) -> int | None:
        """The slot of feature `name`, admitting it if it has been seen in enough events
        (`seen` of them in this batch); None: its values are dropped (and counted)."""
        s = slots.get(name)
        if s is not None:
            return s
        cfg = self.cfg
        if not fixed and self.admitting and len(slots) < cap:
            n = self.sightings.get(name, 0) + seen
            if n >= cfg.admit_after and self.admitted_in_window < cfg.max_admitted_per_window:
                self.sightings.pop(name, None)
                self.admitted_in_window += 1
                s = slots[name] = len(slots)
                return s
            if name in self.sightings or len(self.sightings) < cfg.max_candidate_names:
                self.sightings[name] = n
        self.dropped_total += 1
        if name not in self.dropped_recent:
            self.dropped_recent = [*self.dropped_recent[-(_RECENT_DROPS - 1) :], name]
        return None

    def build(self, batch: BatchLike) -> FeatureArrays:
        cfg = self.cfg
        b = len(batch)
        user_idx = self.users.many(batch.user_id)
        item_idx = self.items.many(batch.item_id)
        cat_idx = np.empty((b, cfg.max_user_cat), dtype=np.int64)
        cat_idx[:] = [self.cats.one(f"slot{j}=") for j in range(cfg.max_user_cat)]
        self.events_in_window += b
        if self.events_in_window >= cfg.admission_window_events:
            self.events_in_window, self.admitted_in_window = 0, 0
        for name in sorted(batch.user_cat):
            seen = sum(v is not None for v in batch.user_cat[name])
            s = self._slot(self.cat_slots, name, cfg.max_user_cat, bool(cfg.user_cat), seen)
            if s is not None:
                vals = batch.user_cat[name]
                cat_idx[:, s] = [self.cats.one(f"{name}={v}" if v is not None else f"slot{s}=") for v in vals]
        num = np.zeros((b, 2 * cfg.max_user_num), dtype=np.float32)
        num[:, 1::2] = 1.0  # missing flag set until a value arrives
        for name in sorted(batch.user_num):
            seen = int((~np.isnan(batch.user_num[name])).sum())
            s = self._slot(self.num_slots, name, cfg.max_user_num, bool(cfg.user_num), seen)
            if s is not None:
                v = batch.user_num[name]
                num[:, 2 * s] = signed_log(v)
                num[:, 2 * s + 1] = np.isnan(v)
        scenario_idx = self.cats.many(np.array([f"scenario={s}" for s in batch.scenario], dtype=object))
        text_idx = self.text.many(batch.item_text)
        nan = np.full(b, np.nan)
        like = batch.labels.get(cfg.like_task, nan)
        rating = batch.labels.get(cfg.rating_task, nan)
        counters = np.zeros((b, NUM_COUNTER_FEATURES), dtype=np.float32)
        if cfg.use_counters:
            counters[:, : OnlineCounters.NUM_FEATURES] = self.counters.read(
                user_idx, item_idx, like, rating, cfg.in_batch_features
            )
        if cfg.use_word_affinity:
            signal = feedback_signal(like, rating, cfg.rating_center, cfg.rating_scale)
            counters[:, OnlineCounters.NUM_FEATURES :] = self.affinity.read(
                user_idx, text_idx, signal, cfg.in_batch_features
            )
        if cfg.use_counters:  # read() has it already
            evidence = counters[:, OnlineCounters.ITEM_LOG_COUNT].copy()
        else:
            evidence = self.counters.item_evidence(item_idx, cfg.in_batch_features)
        return FeatureArrays(user_idx, item_idx, cat_idx, num, scenario_idx, text_idx, counters, evidence)

    def learn(self, feats: FeatureArrays, like: np.ndarray, rating: np.ndarray) -> None:
        """Add the batch's labels to the counters (after it was scored)."""
        cfg = self.cfg
        self.counters.update(feats.user_idx, feats.item_idx, like, rating)
        if cfg.use_word_affinity:
            signal = feedback_signal(like, rating, cfg.rating_center, cfg.rating_scale)
            self.affinity.update(feats.user_idx, feats.text_idx, signal)

    # ---- state (memory_bank.base.Stateful) ----------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        """The live state arrays, by their names in export_state."""
        c = self.counters
        return {
            "counters.user": c.user,
            "counters.item": c.item,
            "counters.total": c.total,
            "affinity": self.affinity.table,
        }

    def _meta(self) -> dict[str, Any]:
        return {
            "cat_slots": self.cat_slots,
            "num_slots": self.num_slots,
            "sightings": dict(self.sightings),
            "admitted_in_window": self.admitted_in_window,
            "events_in_window": self.events_in_window,
            "dropped_total": self.dropped_total,
            "dropped_recent": list(self.dropped_recent),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "cat_slots": dict(self.cat_slots),
            "num_slots": dict(self.num_slots),
            "dropped_total": self.dropped_total,
            "dropped_recent": list(self.dropped_recent),
            "candidate_names": len(self.sightings),
            "events_counted": int(self.counters.total[0]),
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Copies of the counters and the affinity table, and the slot layout."""
        return {k: torch.from_numpy(v.copy()) for k, v in self._arrays().items()}, self._meta()

    def _take_touched(self) -> dict[str, np.ndarray]:
        """Rows of each state array updated since the previous call (then cleared)."""
        c, a = self.counters, self.affinity
        out = {
            "counters.user": np.flatnonzero(c.touched_user),
            "counters.item": np.flatnonzero(c.touched_item),
            "counters.total": np.zeros(1, dtype=np.int64),
            "affinity": np.flatnonzero(a.touched),
        }
        for mask in (c.touched_user, c.touched_item, a.touched):
            mask[:] = False
        return out

    def take_delta(self) -> MemoryDelta:
        """The counter and affinity rows updated since the previous call (a 1-D array is one
        row), and the slot layout as JSON in ids["meta"]."""
        layout = {"cat_slots": self.cat_slots, "num_slots": self.num_slots}  # what serving reads
        d = MemoryDelta(ids={"meta": [json.dumps(layout, sort_keys=True)]})
        arrays = self._arrays()
        for k, rows in self._take_touched().items():
            d.tables[k] = (rows, torch.from_numpy(np.ascontiguousarray(_as_rows(arrays[k])[rows])))
        return d

    def apply_delta(self, delta: MemoryDelta) -> None:
        arrays = self._arrays()
        for k, (rows, vals) in delta.tables.items():
            _as_rows(arrays[k])[rows] = vals.numpy()  # a view: writes land in the live array
        if delta.ids.get("meta"):
            self._set_meta(json.loads(delta.ids["meta"][0]))

    def _set_meta(self, meta: dict[str, Any]) -> None:
        """The slot layout, and (full states only; deltas carry the layout alone) the
        admission bookkeeping."""
        self.cat_slots = dict(meta["cat_slots"])
        self.num_slots = dict(meta["num_slots"])
        if "sightings" in meta:
            self.sightings = dict(meta["sightings"])
            self.admitted_in_window = int(meta["admitted_in_window"])
            self.events_in_window = int(meta["events_in_window"])
            self.dropped_total = int(meta["dropped_total"])
            self.dropped_recent = list(meta["dropped_recent"])

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        arr = {
            k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v).copy() for k, v in tensors.items()
        }
        self.counters.user = arr["counters.user"]
        self.counters.item = arr["counters.item"]
        self.counters.total = arr["counters.total"]
        self.affinity.table = arr["affinity"]
        self.counters.touched_user = np.zeros(len(self.counters.user), dtype=bool)
        self.counters.touched_item = np.zeros(len(self.counters.item), dtype=bool)
        self.affinity.touched = np.zeros(len(self.affinity.table), dtype=bool)
        self._set_meta(meta)


def _as_rows(a: np.ndarray) -> np.ndarray:
    """A 1-D state array is one row; tables keep their rows (a view either way)."""
    return a.reshape(1, -1) if a.ndim == 1 else a
