"""A batch's integer columns -> the model's feature tensors, on the model's device.

The model never sees strings: ids arrive as integers (models.ids, `batch.id_codes()`,
computed where the batch was decoded). This module packs a batch (any object with
EventBatch's attributes: `models` does not import `stream`) into one host array, copies
it to the device once (`StagingBuffer`), and derives everything there with tensor ops:
table rows for the user, the item, every categorical user feature (the slot layout is
the one piece of host logic: names -> slots), the scenario and the words of the item
text; transformed numeric features; and online counters and the user x word affinity,
read BEFORE the batch's labels are added (so no event's label reaches its own score:
progressive validation stays honest), causal within the batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from memory_bank.base import MemoryDelta
from models.config import FeatureConfig
from models.ids import MAX_WORDS, EventCodes, crc_code


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

    def id_codes(self) -> EventCodes: ...


class FeatureLayoutError(ValueError):
    """A feature layout that cannot be honoured (e.g. too many features for the slots)."""


def signed_log(x: torch.Tensor) -> torch.Tensor:
    """Numeric features of unknown scale: sign(x) * log1p(|x|); NaN -> 0."""
    x = torch.nan_to_num(x, nan=0.0)
    return torch.sign(x) * torch.log1p(x.abs())


def exclusive_group_cumsum(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For each row j: the sum of values[i] over i < j with keys[i] == keys[j].

    keys (B,), values (B, K) -> (B, K). Stable sort by key, exclusive cumulative sum, minus
    the sum at the start of each key's run. Tensor ops only, no host sync (the run starts
    come from a cummax, not from a data-dependent index).
    """
    n = keys.shape[0]
    if n == 0:  # e.g. no word of any item text in the batch (item_text is optional)
        return torch.zeros_like(values)
    k, order = torch.sort(keys, stable=True)  # (B,)
    v = values.index_select(0, order)
    csum = v.cumsum(0) - v  # exclusive over the sorted rows
    pos = torch.arange(n, device=keys.device)
    starts = torch.ones(n, dtype=torch.bool, device=keys.device)
    starts[1:] = k[1:] != k[:-1]
    run_start = torch.where(starts, pos, 0).cummax(0).values  # (B,) first sorted row of each run
    out_sorted = csum - csum.index_select(0, run_start)
    return torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)


def group_rank(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys (B,) in event order -> (rank (B,): earlier rows with the same key, first (B,): the
    row index, in sorted order, where the key's run starts) and the sort order (B,)."""
    n = keys.shape[0]
    k, order = torch.sort(keys, stable=True)
    pos = torch.arange(n, device=keys.device)
    starts = torch.ones(n, dtype=torch.bool, device=keys.device)
    starts[1:] = k[1:] != k[:-1]
    run_start = torch.where(starts, pos, 0).cummax(0).values  # (B,) sorted
    rank = torch.empty_like(pos).index_copy_(0, order, pos - run_start)
    first = torch.empty_like(pos).index_copy_(0, order, run_start)
    return rank, first, order


def causal_batch_history(
    stored: dict[str, torch.Tensor],
    mask: torch.Tensor,
    user_keys: torch.Tensor,
    batch: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Histories as each event of the batch would see them: stored history + the same
    user's earlier events of this batch, last L kept.

    stored[name] (B, L) per-position columns of the store's view before the batch (most
    recent last), mask (B, L); user_keys (B,) in event order; batch[name] (B,) the same
    columns of the batch's own events. Event j with r earlier same-user events in the
    batch sees the window combined[r : r + L] of combined = stored (L) ++ those events
    (positions c >= L). Tensor ops only (no host sync): a batch with no repeated user
    gets its stored view back through the same gathers.
    """
    b, L = mask.shape
    rank, first, order = group_rank(user_keys)
    c = torch.arange(L, device=mask.device)[None, :] + rank[:, None]  # (B, L) combined index
    from_store = c < L
    cs = torch.clamp(c, max=L - 1)
    pos = order[torch.clamp(first[:, None] + torch.clamp(c - L, min=0), max=b - 1)]  # batch row of c >= L
    out = {name: torch.where(from_store, col.gather(1, cs), batch[name][pos]) for name, col in stored.items()}
    return out, torch.where(from_store, mask.gather(1, cs), True)


def feedback_signal(like: torch.Tensor, rating: torch.Tensor, center: float, scale: float) -> torch.Tensor:
    """What an event says about the user's taste: centred rating, else +-1 like, else 0 (float32)."""
    sig = (rating - center) / max(scale, 1e-6)
    like_sig = torch.where(torch.isnan(like), 0.0, 2.0 * like - 1.0)
    return torch.where(torch.isnan(sig), like_sig, sig).to(torch.float32)


def _increments(like: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
    """(B,) labels (float64, NaN = missing) -> (B, 4): count, likes, rating sum, rating count."""
    has_like, has_rating = ~torch.isnan(like), ~torch.isnan(rating)
    return torch.stack(
        [
            torch.ones_like(like),
            torch.where(has_like, like, 0.0),
            torch.where(has_rating, rating, 0.0),
            has_rating.to(like.dtype),
        ],
        dim=1,
    )


class OnlineCounters:
    """Per user / per item running counts, like rate and mean rating (hashed rows), as
    float64 tensors on the model's device; and per user the same four sums decayed by
    `decay` at each of the user's events (an exponentially weighted recent rate).

    read() is called before update() for the same batch: features only ever
    contain labels of strictly earlier events.

    Why the decayed rate: a user's like rate drifts within a session (a user rating a
    backlog of films, then the new ones), and the cumulative rate follows it ever more
    slowly. Measured on the ML-100K / ML-1M streams, the decayed rate alone ranks the
    events on items never seen before better than the cumulative user and item rates
    together (benchmarks/results/memory_value.md).
    """

    # user (log n, like, rating), item (same), 2 crosses, decayed user (like, rating), global
    # (like logit, mean rating)
    NUM_FEATURES = 12
    ITEM_LOG_COUNT = 3  # the column of read() holding log(1 + earlier events of the item)
    # Columns of read() on the label's scale (a deviation from the global rate / mean): the
    # wide part's prior init (ranker) reads the like and the rating through these.
    LIKE_DEV = (4, 8)  # item like rate, decayed user like rate
    RATING_DEV = (5, 9)  # item mean rating, decayed user mean rating
    # The stream's base rates so far, as the logit of the global like rate and the global mean
    # rating less `rating_center`: with the prior init the score's level follows the stream's
    # from its first event. Without them the level was the output bias's, learned from zero:
    # in ML-100K's first batch every score sat ~0.8 below where the second batch put it, and
    # the pooled AUC of the stream's first 1,024 events was 0.60 against 0.71 for the rates
    # alone (most of the events on never-seen items are in the first batches).
    BASE_LIKE_LOGIT = 10
    BASE_RATING = 11

    def __init__(
        self,
        user_buckets: int,
        item_buckets: int,
        prior: float,
        rating_center: float,
        device: torch.device | str = "cpu",
        decay: float | None = None,
    ) -> None:
        self.prior = prior
        self.rating_center = rating_center
        self.decay = decay
        # Earlier same-user events of a batch that a decayed read sums exactly: older ones
        # weigh below 1e-6 of the newest (decay ** window), and are left out.
        self.decay_window = 1 if not decay else max(1, math.ceil(math.log(1e-6) / math.log(decay)))
        f64 = {"dtype": torch.float64, "device": device}
        # columns: count, likes, rating sum, rating count; users: the same again, decayed
        self.user = torch.zeros((user_buckets, 8), **f64)
        self.item = torch.zeros((item_buckets, 4), **f64)
        self.total = torch.zeros(4, **f64)
        # Rows updated since the last take (snapshot deltas ship only those).
        self.touched_user = torch.zeros(user_buckets, dtype=torch.bool, device=device)
        self.touched_item = torch.zeros(item_buckets, dtype=torch.bool, device=device)

    def _global(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """total (B, 4) global counts -> the smoothed global like rate and mean rating (B,) each,
        finite from the stream's first event."""
        g_like = (total[:, 1] + 1.0) / (total[:, 0] + 2.0)
        g_rating = torch.where(
            total[:, 3] > 0, total[:, 2] / torch.clamp(total[:, 3], min=1.0), self.rating_center
        )
        return g_like, g_rating

    def _rates(
        self, rows: torch.Tensor, g_like: torch.Tensor, g_rating: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """rows (B, 4), the global rates (B,) each (`_global`) -> log count, smoothed like rate
        and mean rating, each rate as its deviation from the global one."""
        n = rows[:, 0]
        like = (rows[:, 1] + self.prior * g_like) / (n + self.prior)
        rating = (rows[:, 2] + self.prior * g_rating) / (rows[:, 3] + self.prior)
        return torch.log1p(n), like - g_like, rating - g_rating

    def item_evidence(self, item_idx: torch.Tensor, in_batch: bool = True) -> torch.Tensor:
        """(B,) rows -> (B,) float32 log(1 + earlier events of each item), causal in the batch."""
        n = self.item[item_idx, 0]
        if in_batch:
            n = n + exclusive_group_cumsum(item_idx, torch.ones_like(n)[:, None])[:, 0]
        return torch.log1p(n).to(torch.float32)

    def _decayed_before(self, user_idx: torch.Tensor, upd: torch.Tensor) -> torch.Tensor:
        """(B, 4) each event's user's decayed sums as of just before it: the stored sums decayed
        once per earlier same-user event of the batch, plus those events, each decayed once per
        event after it: decay**r * S + sum_k decay**(k - 1) * x[r - k] (r = the event's rank
        among its user's events of the batch). A gather of the last `decay_window` earlier
        events (a cumulative sum of decay**-r terms would overflow or cancel)."""
        a = self.decay
        rank, first, order = group_rank(user_idx)  # (B,) each
        k = torch.arange(1, self.decay_window + 1, device=user_idx.device)  # (K,)
        src = rank[:, None] - k[None, :]  # (B, K) rank of the k-th earlier same-user event
        pos = order[(first[:, None] + src).clamp(min=0)]  # (B, K) its batch row
        w = torch.where(src >= 0, a ** (k - 1).to(upd.dtype), 0.0)  # (B, K)
        earlier = (w[..., None] * upd[pos]).sum(1)  # (B, 4)
        return (a ** rank.to(upd.dtype))[:, None] * self.user[user_idx, 4:] + earlier

    def read(
        self,
        user_idx: torch.Tensor,
        item_idx: torch.Tensor,
        like: torch.Tensor,
        rating: torch.Tensor,
        in_batch: bool = True,
    ) -> torch.Tensor:
        """(B,) rows -> (B, NUM_FEATURES) float32 features, causal within the batch.

        Event j sees the counts before the batch plus the labels of the batch's events
        before j (exclusive prefix sums per user / item): exactly what a per-event
        learner would know, and never j's own label.
        """
        upd = _increments(like, rating)  # (B, 4)
        if not in_batch:  # counts as of before the batch only
            upd = torch.zeros_like(upd)
        users = self.user[user_idx, :4] + exclusive_group_cumsum(user_idx, upd)
        items = self.item[item_idx] + exclusive_group_cumsum(item_idx, upd)
        total = self.total + upd.cumsum(0) - upd  # (B, 4)
        g_like, g_rating = self._global(total)  # (B,) each, shared by every rate below
        un, ul, ur = self._rates(users, g_like, g_rating)
        in_, il, ir = self._rates(items, g_like, g_rating)
        if self.decay:
            # Without in_batch the rows are not a sequence of the user's events: each reads the
            # stored decayed sums as they are (no decay per earlier row).
            decayed = self._decayed_before(user_idx, upd) if in_batch else self.user[user_idx, 4:]
            _, dl, dr = self._rates(decayed, g_like, g_rating)
        else:
            dl = dr = torch.zeros_like(ul)
        base = [torch.log(g_like) - torch.log1p(-g_like), g_rating - self.rating_center]
        cols = [un, ul, ur, in_, il, ir, ul * il, ur + ir, dl, dr, *base]
        return torch.stack(cols, dim=1).to(torch.float32)

    def update(
        self, user_idx: torch.Tensor, item_idx: torch.Tensor, like: torch.Tensor, rating: torch.Tensor
    ) -> None:
        upd = _increments(like, rating)
        if self.decay:
            # Each user's decayed sums become decay**n * S + sum_i decay**(n - 1 - r_i) * x_i
            # (n: its events in the batch): per event its own term, and on the user's first
            # event of the batch the (decay**n - 1) * S that rescales the stored sums.
            rank, first, order = group_rank(user_idx)
            run_size = torch.zeros_like(rank).index_add_(0, first, torch.ones_like(rank))  # at run starts
            n = run_size[first]  # (B,) the event's user's events in the batch
            a = self.decay
            own = (a ** (n - 1 - rank).to(upd.dtype))[:, None] * upd
            rescale = ((a ** n.to(upd.dtype) - 1.0)[:, None] * self.user[user_idx, 4:]) * (rank == 0)[:, None]
            self.user[:, 4:].index_add_(0, user_idx, own + rescale)
        self.user[:, :4].index_add_(0, user_idx, upd)
        self.item.index_add_(0, item_idx, upd)
        self.total += upd.sum(0)
        self.touched_user[user_idx] = True
        self.touched_item[item_idx] = True


def distinct_words(text_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Lt) word ids (0 = padding) -> words sorted within each row (B, Lt) and valid (B, Lt):
    each distinct word of a row once (word order does not matter; duplicates come adjacent)."""
    words = torch.sort(text_idx, dim=1).values
    valid = words > 0
    valid[:, 1:] &= words[:, 1:] != words[:, :-1]
    return words, valid


def _word_increments(valid: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """(B, Lt, 2): (signal, 1) where the word is valid, zeros elsewhere (adding 0 is exact)."""
    v = valid.to(torch.float64)
    return torch.stack([signal.to(torch.float64)[:, None] * v, v], dim=-1)


def _word_sums(
    table: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, signal: torch.Tensor, in_batch: bool
) -> torch.Tensor:
    """(B, Lt, 2) each row's (feedback sum, count) per word key as of before the row: the
    table, plus with `in_batch` the batch's earlier rows (row-major flattening is
    event-major: a key's earlier entries are earlier events); zeros where not valid."""
    got = table[keys] * valid[..., None]
    if in_batch:
        inc = _word_increments(valid, signal)
        earlier = exclusive_group_cumsum(keys.reshape(-1), inc.reshape(-1, 2)).view_as(got)
        got = got + earlier * valid[..., None]
    return got


def _add_word_feedback(
    table: torch.Tensor, touched: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, signal: torch.Tensor
) -> None:
    """Add each valid (row, word)'s (signal, 1) to its key's row and mark the rows touched."""
    flat = keys.reshape(-1)
    table.index_add_(0, flat, _word_increments(valid, signal).reshape(-1, 2))
    touched.scatter_reduce_(0, flat, valid.reshape(-1).to(torch.uint8), reduce="amax")


class UserWordAffinity:
    """The user's running feedback per word of item_text (genres, title words, year).

    A hashed (user, word) table of (feedback sum, count). For a target item the
    features are the user's smoothed mean feedback over the item's words and the
    log evidence: "this user rates comedies high" as a number the model gets for
    free, causal within the batch like the counters. Tensors on the model's device.
    """

    NUM_FEATURES = 2
    MEAN_FEEDBACK = 0  # the column of read() holding the user's mean feedback over the words

    def __init__(self, buckets: int, prior: float, device: torch.device | str = "cpu") -> None:
        self.prior = prior
        self.table = torch.zeros((buckets, 2), dtype=torch.float64, device=device)  # feedback sum, count
        # Rows updated since the last take (uint8: a scatter-max of the batch's valid words).
        self.touched = torch.zeros(buckets, dtype=torch.uint8, device=device)

    def _keys(self, user_idx: torch.Tensor, text_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,), (B, Lt) -> keys (B, Lt), valid (B, Lt): each distinct word of a row once."""
        words, valid = distinct_words(text_idx)
        return (user_idx[:, None] * 1_000_003 + words) % self.table.shape[0], valid

    def read(
        self, user_idx: torch.Tensor, text_idx: torch.Tensor, signal: torch.Tensor, in_batch: bool
    ) -> torch.Tensor:
        keys, valid = self._keys(user_idx, text_idx)
        got = _word_sums(self.table, keys, valid, signal, in_batch)  # (B, Lt, 2)
        ssum, cnt = got[..., 0].sum(1), got[..., 1].sum(1)  # (B,)
        return torch.stack([ssum / (cnt + self.prior), torch.log1p(cnt)], dim=1).to(torch.float32)

    def update(self, user_idx: torch.Tensor, text_idx: torch.Tensor, signal: torch.Tensor) -> None:
        keys, valid = self._keys(user_idx, text_idx)
        _add_word_feedback(self.table, self.touched, keys, valid, signal)


class ItemWordRates:
    """The stream's running feedback per word of item_text, over all users.

    A hashed word table of (feedback sum, count) and a last row of the stream's totals. For
    a target item the features are its words' deviations from the stream's mean feedback,
    each shrunk by its evidence, d_w = (S_w - n_w * mean) / (n_w + prior), summed and
    averaged over the item's distinct words, and faded by the item's own evidence n as
    prior / (n + prior): "dramas from the seventies are rated above the stream's mean" for an
    item nobody has rated yet, handing over to the item's own counters as they fill. What a
    logistic regression learns as its genre and title-word weights, here an exact count from
    the stream's first event on; the per-user table beside it (UserWordAffinity) needs the
    same user to have rated such words before. Words every item has ("genres") deviate by
    ~0. Causal within the batch like the counters; tensors on the model's device.
    """

    NUM_FEATURES = 2
    SUM_DEVIATION = 0  # columns of read(): the summed and the mean word deviation
    MEAN_DEVIATION = 1

    def __init__(self, buckets: int, prior: float, device: torch.device | str = "cpu") -> None:
        self.prior = prior
        self.buckets = buckets
        # Rows 0..buckets-1: words (feedback sum, count); row `buckets`: every event's.
        self.table = torch.zeros((buckets + 1, 2), dtype=torch.float64, device=device)
        self.touched = torch.zeros(buckets + 1, dtype=torch.uint8, device=device)

    def _keys(self, text_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Lt) -> keys (B, Lt), valid (B, Lt): each distinct word of a row once."""
        words, valid = distinct_words(text_idx)
        return words % self.buckets, valid

    def read(
        self, text_idx: torch.Tensor, signal: torch.Tensor, item_log_count: torch.Tensor, in_batch: bool
    ) -> torch.Tensor:
        """(B, Lt) words, (B,) signals, (B,) log(1 + the item's earlier events) -> (B, 2)."""
        keys, valid = self._keys(text_idx)
        got = _word_sums(self.table, keys, valid, signal, in_batch)  # (B, Lt, 2)
        total = self.table[self.buckets].expand(len(keys), 2)  # (B, 2)
        if in_batch:
            per_event = torch.stack(
                [signal.to(torch.float64), torch.ones_like(signal, dtype=torch.float64)], 1
            )
            total = total + (per_event.cumsum(0) - per_event)  # (B, 2) the earlier events' too
        mean = total[:, 0] / total[:, 1].clamp(min=1.0)  # (B,) the stream's mean feedback so far
        dev = (got[..., 0] - got[..., 1] * mean[:, None]) / (got[..., 1] + self.prior)  # (B, Lt)
        dev = dev * valid
        n_words = valid.sum(1).clamp(min=1)
        fade = self.prior / (torch.expm1(item_log_count.to(torch.float64)) + self.prior)  # (B,)
        total_dev = dev.sum(1) * fade  # (B,)
        return torch.stack([total_dev, total_dev / n_words], dim=1).to(torch.float32)

    def stats(self) -> dict[str, Any]:
        """Hashed word rows with evidence, the events counted and their mean feedback (for
        the admin API; reads the device)."""
        ssum, n = self.table[self.buckets].tolist()
        return {
            "words_seen": int((self.table[: self.buckets, 1] > 0).sum()),
            "buckets": self.buckets,
            "events": int(n),
            "mean_feedback": ssum / n if n else None,
        }

    def update(self, text_idx: torch.Tensor, signal: torch.Tensor) -> None:
        keys, valid = self._keys(text_idx)
        _add_word_feedback(self.table, self.touched, keys, valid, signal)
        self.table[self.buckets, 0] += signal.to(torch.float64).sum()
        self.table[self.buckets, 1] += len(signal)  # a host number: no copy to the device
        self.touched[self.buckets] = 1


@dataclass
class FeatureArrays:
    """One batch as fixed-layout tensors on the model's device (B = batch size): what the
    one host-to-device copy of the step brought, and what was derived from it there."""

    user_idx: torch.Tensor  # (B,) int64
    item_idx: torch.Tensor  # (B,) int64
    cat_idx: torch.Tensor  # (B, C) int64, C = max_user_cat (missing fields hash "slot<j>=")
    num: torch.Tensor  # (B, 2*N) float32: signed log value and a missing flag per slot
    scenario_idx: torch.Tensor  # (B,) int64 into the categorical table
    text_idx: torch.Tensor  # (B, Lt) int64, 0 = padding
    counters: torch.Tensor  # (B, NUM_COUNTER_FEATURES) float32: counters, user-word affinity, word rates
    # log(1 + earlier events of the item), this batch's earlier events included: how much the
    # item's id embedding has learned (the weight of its content vector, ranker._blend_content).
    item_evidence: torch.Tensor  # (B,) float32
    like: torch.Tensor  # (B,) float64, NaN = no label (FeatureConfig.like_task)
    rating: torch.Tensor  # (B,) float64, NaN = no label (FeatureConfig.rating_task)
    signal: torch.Tensor  # (B,) float32 what each event says about its user's taste (feedback_signal)
    user_key: torch.Tensor  # (B,) int64 (models.ids): the history slot's identity
    item_key: torch.Tensor  # (B,) int64: the item's bank identity
    item_code: torch.Tensor  # (B,) int64 crc32 item code (history entries)
    ts_ms: torch.Tensor  # (B,) int64
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the caller's columns (build)


NUM_COUNTER_FEATURES = (
    OnlineCounters.NUM_FEATURES + UserWordAffinity.NUM_FEATURES + ItemWordRates.NUM_FEATURES
)
WORD_RATES_AT = OnlineCounters.NUM_FEATURES + UserWordAffinity.NUM_FEATURES  # their first column
_RECENT_DROPS = 32  # distinct dropped names kept for the admin API and reports


class StagingBuffer:
    """The one host-to-device copy of a step: a host array into a reused (pinned, on CUDA)
    buffer, then one non-blocking copy. Reuse is safe: the step's single blocking read
    comes after the copy, so the previous copy is complete when the next one is staged."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None

    def to_device(self, host: np.ndarray) -> torch.Tensor:
        src = torch.from_numpy(host)
        if self.device.type != "cuda":
            return src
        n = src.numel()
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 1 << 16), dtype=src.dtype).pin_memory()
        staged = self._pinned[:n].view(src.shape)
        staged.copy_(src)
        return staged.to(self.device, non_blocking=True)


class FeatureBuilder:
    """Stateful (slot layout, counters) batch -> FeatureArrays. Ids arrive as integers
    (models.ids, `batch.id_codes()`): the builder packs the batch's columns into one host
    array, copies it to the device once, and derives every feature there."""

    def __init__(self, cfg: FeatureConfig, device: torch.device | str = "cpu") -> None:
        if cfg.max_text_tokens > MAX_WORDS:
            raise FeatureLayoutError(
                f"max_text_tokens={cfg.max_text_tokens} > {MAX_WORDS} (models.ids.MAX_WORDS)"
            )
        self.cfg = cfg
        self.device = torch.device(device)
        self.staging = StagingBuffer(self.device)
        # What a categorical slot without a value hashes as (one code per slot).
        self._empty_slot = np.array([crc_code(f"slot{j}=", "cat") for j in range(cfg.max_user_cat)], np.int64)
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
            cfg.user_buckets,
            cfg.item_buckets,
            cfg.counter_prior,
            cfg.rating_center,
            self.device,
            decay=cfg.user_decay,
        )
        self.affinity = UserWordAffinity(
            cfg.affinity_buckets if cfg.use_word_affinity else 1, cfg.counter_prior, self.device
        )
        self.word_rates = ItemWordRates(
            cfg.text_buckets if cfg.use_word_rates else 1, cfg.counter_prior, self.device
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

    # Columns of the packed host array: int64 ids, then float64 values (as their bits).
    _INT_COLS = ("user", "item", "scenario", "user_key", "item_key", "ts_ms")

    def _pack(self, batch: BatchLike, extra: dict[str, np.ndarray]) -> np.ndarray:
        """The batch's columns as one (B, K) int64 host array (floats as their bits): ids,
        categorical slots, words, the caller's `extra` columns, then like, rating and the
        numeric slots."""
        cfg = self.cfg
        b, C, N, Lt = len(batch), cfg.max_user_cat, cfg.max_user_num, cfg.max_text_tokens
        codes = batch.id_codes()
        widths = _widths(extra)
        n_int = len(self._INT_COLS) + C + Lt + sum(widths)
        host = np.empty((b, n_int + 2 + N), dtype=np.int64)
        at = n_int - sum(widths)
        for col, w in zip(extra.values(), widths):
            host[:, at : at + w] = np.asarray(col).reshape(b, w)
            at += w
        for j, col in enumerate((codes.user, codes.item, codes.scenario, codes.user_key, codes.item_key)):
            host[:, j] = col
        host[:, 5] = batch.ts_ms
        cat = host[:, len(self._INT_COLS) : len(self._INT_COLS) + C]
        cat[:] = self._empty_slot
        self.events_in_window += b
        if self.events_in_window >= cfg.admission_window_events:
            self.events_in_window, self.admitted_in_window = 0, 0
        for name in sorted(batch.user_cat):
            col = codes.user_cat[name]
            present = col >= 0
            s = self._slot(self.cat_slots, name, C, bool(cfg.user_cat), int(present.sum()))
            if s is not None:
                cat[:, s] = np.where(present, col, self._empty_slot[s])
        words_at = len(self._INT_COLS) + C
        host[:, words_at : words_at + Lt] = codes.words[:, :Lt]
        floats = host[:, n_int:].view(np.float64)  # (B, 2 + N)
        nan = np.full(b, np.nan)
        floats[:, 0] = batch.labels.get(cfg.like_task, nan)
        floats[:, 1] = batch.labels.get(cfg.rating_task, nan)
        floats[:, 2:] = np.nan  # a slot without a value: missing
        for name in sorted(batch.user_num):
            v = batch.user_num[name]
            s = self._slot(self.num_slots, name, N, bool(cfg.user_num), int((~np.isnan(v)).sum()))
            if s is not None:
                floats[:, 2 + s] = v
        return host

    def build(
        self, batch: BatchLike, extra: dict[str, np.ndarray] | None = None, in_batch: bool | None = None
    ) -> FeatureArrays:
        """The batch's features on the device. `extra`: (B,) or (B, k) int64 host columns of
        the caller (e.g. the targets' bank rows, the users' history slots) that cross in the
        same copy; they come back, same shapes, as `FeatureArrays.extra` on the device.

        `in_batch` (default `in_batch_features`): whether a row's counters include the
        batch's earlier rows, as they do for a batch of events in time order. A ranking
        request's rows are candidates, not events: serving passes False, or the k-th
        candidate would read its user as having k more events (and the stream k more),
        scoring the same item differently by its place in the request."""
        cfg = self.cfg
        in_batch = cfg.in_batch_features if in_batch is None else in_batch
        C, Lt = cfg.max_user_cat, cfg.max_text_tokens
        extra = extra or {}
        t = self.staging.to_device(self._pack(batch, extra))  # (B, K): the step's one H2D copy
        words_at = len(self._INT_COLS) + C
        widths = _widths(extra)
        n_int = words_at + Lt + sum(widths)
        user_idx = t[:, 0] % cfg.user_buckets
        item_idx = t[:, 1] % cfg.item_buckets
        scenario_idx = t[:, 2] % cfg.cat_buckets
        cat_idx = t[:, len(self._INT_COLS) : len(self._INT_COLS) + C] % cfg.cat_buckets
        words = t[:, words_at : words_at + Lt]
        text_idx = torch.where(words >= 0, words % (cfg.text_buckets - 1) + 1, 0)
        floats = t[:, n_int:].view(torch.float64)  # (B, 2 + N)
        like, rating, num_raw = floats[:, 0], floats[:, 1], floats[:, 2:]
        num = torch.stack([signed_log(num_raw), torch.isnan(num_raw).to(num_raw.dtype)], dim=2)
        num = num.reshape(len(t), -1).to(torch.float32)  # (B, 2N): value, missing flag per slot
        signal = feedback_signal(like, rating, cfg.rating_center, cfg.rating_scale)
        counters = torch.zeros((len(t), NUM_COUNTER_FEATURES), dtype=torch.float32, device=t.device)
        if cfg.use_counters:
            counters[:, : OnlineCounters.NUM_FEATURES] = self.counters.read(
                user_idx, item_idx, like, rating, in_batch
            )
        if cfg.use_word_affinity:
            counters[:, OnlineCounters.NUM_FEATURES : WORD_RATES_AT] = self.affinity.read(
                user_idx, text_idx, signal, in_batch
            )
        if cfg.use_counters:  # read() has it already
            evidence = counters[:, OnlineCounters.ITEM_LOG_COUNT].clone()
        else:
            evidence = self.counters.item_evidence(item_idx, in_batch)
        if cfg.use_word_rates:
            counters[:, WORD_RATES_AT:] = self.word_rates.read(text_idx, signal, evidence, in_batch)
        return FeatureArrays(
            user_idx=user_idx,
            item_idx=item_idx,
            cat_idx=cat_idx,
            num=num,
            scenario_idx=scenario_idx,
            text_idx=text_idx,
            counters=counters,
            item_evidence=evidence,
            like=like,
            rating=rating,
            signal=signal,
            user_key=t[:, 3],
            item_key=t[:, 4],
            item_code=t[:, 1],
            ts_ms=t[:, 5],
            extra=_extra_views(t, words_at + Lt, extra, widths),
        )

    def learn(self, feats: FeatureArrays) -> None:
        """Add the batch's labels to the counters (after it was scored)."""
        self.counters.update(feats.user_idx, feats.item_idx, feats.like, feats.rating)
        if self.cfg.use_word_affinity:
            self.affinity.update(feats.user_idx, feats.text_idx, feats.signal)
        if self.cfg.use_word_rates:
            self.word_rates.update(feats.text_idx, feats.signal)

    # ---- state (memory_bank.base.Stateful) ----------------------------------------------

    def _arrays(self) -> dict[str, torch.Tensor]:
        """The live state tensors, by their names in export_state."""
        c = self.counters
        return {
            "counters.user": c.user,
            "counters.item": c.item,
            "counters.total": c.total,
            "affinity": self.affinity.table,
            "word_rates": self.word_rates.table,
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
            **({"word_rates": self.word_rates.stats()} if self.cfg.use_word_rates else {}),
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Copies of the counters and the affinity table (cpu), and the slot layout."""
        return {k: v.detach().cpu().clone() for k, v in self._arrays().items()}, self._meta()

    def _touched(self) -> dict[str, torch.Tensor]:
        """The live masks of rows updated since the last take, by state tensor name."""
        c = self.counters
        return {
            "counters.user": c.touched_user,
            "counters.item": c.touched_item,
            "affinity": self.affinity.touched,
            "word_rates": self.word_rates.touched,
        }

    def export_marks(self) -> dict[str, np.ndarray]:
        """Copies of the touched-row masks (uint8, host): a checkpoint keeps them so that a
        restarted trainer's next delta still covers rows changed before it."""
        return {k: m.to(torch.uint8).cpu().numpy() for k, m in self._touched().items()}

    def mark_rows(self, table: str, rows: np.ndarray) -> str | None:
        """Mark `rows` of state tensor `table` as touched (a 0/1 mask of the table's length is
        taken as a mask); the reason they do not fit this builder, else None."""
        mask = self._touched().get(table)
        if mask is None:
            return f"features.{table}: not a tracked table of this model"
        rows = np.asarray(rows)
        if rows.dtype != np.int64 and rows.shape == mask.shape:  # a saved mask
            rows = np.flatnonzero(rows)
        if len(rows) and int(rows.max()) >= len(mask):
            return f"features.{table}: row {int(rows.max())} is past this model's {len(mask)}"
        mask[torch.from_numpy(rows.astype(np.int64)).to(mask.device)] = 1
        return None

    def _take_touched(self) -> dict[str, torch.Tensor]:
        """Rows of each state tensor updated since the previous call (then cleared)."""
        touched = self._touched()
        out = {k: m.nonzero().squeeze(1) for k, m in touched.items()}
        out["counters.total"] = torch.zeros(1, dtype=torch.int64, device=self.device)  # in every delta
        for mask in touched.values():
            mask.zero_()
        return out

    def take_delta(self) -> MemoryDelta:
        """The counter and affinity rows updated since the previous call (a 1-D tensor is one
        row), and the slot layout as JSON in ids["meta"]."""
        layout = {"cat_slots": self.cat_slots, "num_slots": self.num_slots}  # what serving reads
        d = MemoryDelta(ids={"meta": [json.dumps(layout, sort_keys=True)]})
        arrays = self._arrays()
        for k, rows in self._take_touched().items():
            d.tables[k] = (rows.cpu().numpy(), _as_rows(arrays[k]).index_select(0, rows).cpu())
        return d

    @torch.no_grad()
    def apply_delta(self, delta: MemoryDelta) -> None:
        arrays = self._arrays()
        for k, (rows, vals) in delta.tables.items():
            dst = _as_rows(arrays[k])  # a view: writes land in the live tensor
            dst.index_copy_(0, torch.as_tensor(rows, device=dst.device), vals.to(dst))
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

    @torch.no_grad()
    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for k, dst in self._arrays().items():
            src = torch.as_tensor(tensors[k])
            if src.shape != dst.shape:
                raise FeatureLayoutError(f"features.{k}: saved {tuple(src.shape)}, have {tuple(dst.shape)}")
            dst.copy_(src)
        for mask in self._touched().values():
            mask.zero_()
        self._set_meta(meta)


def _widths(extra: dict[str, np.ndarray]) -> list[int]:
    """Columns each extra takes in the packed array: 1 for (B,), k for (B, k)."""
    return [1 if np.ndim(a) == 1 else int(np.shape(a)[1]) for a in extra.values()]


def _extra_views(t: torch.Tensor, at: int, extra: dict[str, np.ndarray], widths: list[int]):
    """The extras' columns of the staged tensor, in their host shapes."""
    out = {}
    for (name, a), w in zip(extra.items(), widths):
        out[name] = t[:, at] if np.ndim(a) == 1 else t[:, at : at + w]
        at += w
    return out


def _as_rows(a: torch.Tensor) -> torch.Tensor:
    """A 1-D state tensor is one row; tables keep their rows (a view either way)."""
    return a.reshape(1, -1) if a.ndim == 1 else a
