"""Streaming metrics for progressive validation: exact AUC, logloss, RMSE.

Exact AUC over an unbounded stream. AUC depends only on the order of scores, so
a stream is summarised without loss by, for every DISTINCT score value, the
number of positives and negatives that received it. We keep that summary as
three sorted arrays (unique scores, pos counts, neg counts) and merge new
events into it in chunks (append to a pending buffer; when it exceeds
`compact_every`, np.unique + bincount merge, O((U + P) log(U + P))). The value
is then one sweep over the sorted unique scores, ties counted as 1/2 — exactly
the Mann-Whitney statistic, the same number a brute-force pairwise count gives.
Memory is bounded by the number of distinct float32 scores, not by the stream
length (logits saturate and repeat; for ML-1M the summary has < 1M entries).
A stream long enough to pass `max_distinct` distinct scores (2M entries, 40 MB) is
then summarised at a fixed resolution: scores are rounded to bins of `resolution`
in logit space (1e-3 by default: at most ~60k bins over [-30, 30]) and the summary
is exact over the bins. Pairs within one bin count 1/2 whatever their true order,
so the error is at most half the share of positive-negative pairs that share a bin;
`error_bound()` reports that number (0 while the summary is exact).

Scores are logits (float32): monotone in the probability but without the ties
that float32 sigmoid creates near 0 and 1.

Windowed metrics (the last W events) use ring buffers; the optional ordered log
(float32 score, uint8 label per event) gives the AUC of any tail of the stream
at the end (`auc_last(0.2)`: the last 20%).

Slices (models/slices.py): given the events' user and item ids, `update` also counts how
many earlier events each item and user had and keeps the like AUC/logloss per evidence
bucket (`slice_summary()`); that state is saved and loaded with the rest.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.slices import Evidence


def auc_exact(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC with ties counted 1/2; NaN when one class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels) > 0.5
    uniq, inv = np.unique(s, return_inverse=True)
    pos = np.bincount(inv, weights=y, minlength=len(uniq))
    neg = np.bincount(inv, weights=~y, minlength=len(uniq))
    return _auc_from_counts(pos, neg)


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """pos/neg counts per distinct score, in ascending score order."""
    p, n = float(pos.sum()), float(neg.sum())
    if p == 0 or n == 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg  # negatives strictly below each score
    wins = float(np.dot(pos, neg_below)) + 0.5 * float(np.dot(pos, neg))
    return wins / (p * n)


def logloss_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-event binary cross entropy computed stably from logits."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


class ExactAUC:
    """Cumulative exact AUC: a lossless (score -> pos, neg) summary merged in chunks."""

    def __init__(
        self, compact_every: int = 1 << 16, max_distinct: int = 1 << 21, resolution: float = 1e-3
    ) -> None:
        self.compact_every = compact_every
        self.max_distinct = max_distinct
        self.resolution = resolution
        self.binned = False  # True once the summary passed max_distinct: scores rounded to bins
        self.uniq = np.empty(0, dtype=np.float32)
        self.pos = np.empty(0, dtype=np.int64)
        self.neg = np.empty(0, dtype=np.int64)
        self._pending_s: list[np.ndarray] = []
        self._pending_y: list[np.ndarray] = []
        self._pending_n = 0

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self._pending_s.append(np.asarray(scores, dtype=np.float32))
        self._pending_y.append(np.asarray(labels) > 0.5)
        self._pending_n += len(scores)
        if self._pending_n >= self.compact_every:
            self.compact()

    def _bin(self, s: np.ndarray) -> np.ndarray:
        return (np.round(s.astype(np.float64) / self.resolution) * self.resolution).astype(np.float32)

    def compact(self) -> None:
        if not self._pending_n:
            return
        pending = [self._bin(x) for x in self._pending_s] if self.binned else self._pending_s
        s = np.concatenate([self.uniq] + pending)
        y = np.concatenate(self._pending_y)
        k = len(self.uniq)
        uniq, inv = np.unique(s, return_inverse=True)
        pos = np.bincount(inv[k:], weights=y, minlength=len(uniq)).astype(np.int64)
        neg = np.bincount(inv[k:], weights=~y, minlength=len(uniq)).astype(np.int64)
        np.add.at(pos, inv[:k], self.pos)
        np.add.at(neg, inv[:k], self.neg)
        self.uniq, self.pos, self.neg = uniq, pos, neg
        self._pending_s, self._pending_y, self._pending_n = [], [], 0
        if not self.binned and len(self.uniq) > self.max_distinct:
            self._to_bins()

    def _to_bins(self) -> None:
        """Merge the summary into fixed-resolution bins (from now on every score is binned)."""
        self.binned = True
        uniq, inv = np.unique(self._bin(self.uniq), return_inverse=True)
        self.pos = np.bincount(inv, weights=self.pos, minlength=len(uniq)).astype(np.int64)
        self.neg = np.bincount(inv, weights=self.neg, minlength=len(uniq)).astype(np.int64)
        self.uniq = uniq

    def error_bound(self) -> float:
        """An upper bound of |value() - the exact AUC|: 0 while exact; once binned, half the
        share of positive-negative pairs that share a bin (ties of equal scores included)."""
        if not self.binned:
            return 0.0
        self.compact()
        p, n = float(self.pos.sum()), float(self.neg.sum())
        return 0.5 * float(np.dot(self.pos, self.neg)) / (p * n) if p and n else 0.0

    def value(self) -> float:
        self.compact()
        return _auc_from_counts(self.pos.astype(np.float64), self.neg.astype(np.float64))

    def state(self) -> dict[str, np.ndarray]:
        self.compact()
        return {"uniq": self.uniq, "pos": self.pos, "neg": self.neg, "binned": np.array([self.binned])}

    def load(self, st: dict[str, np.ndarray]) -> None:
        self.uniq = np.asarray(st["uniq"], dtype=np.float32)
        self.pos = np.asarray(st["pos"], dtype=np.int64)
        self.neg = np.asarray(st["neg"], dtype=np.int64)
        self.binned = bool(st["binned"][0]) if "binned" in st else False
        self._pending_s, self._pending_y, self._pending_n = [], [], 0


class _Ring:
    """Fixed-capacity ring of float64 rows (last W events)."""

    def __init__(self, capacity: int, width: int) -> None:
        self.buf = np.zeros((capacity, width), dtype=np.float64)
        self.head = 0  # next write position
        self.size = 0

    def push(self, rows: np.ndarray) -> None:
        cap = len(self.buf)
        rows = rows[-cap:]
        m = len(rows)
        idx = (self.head + np.arange(m)) % cap
        self.buf[idx] = rows
        self.head = int((self.head + m) % cap)
        self.size = min(cap, self.size + m)

    def view(self) -> np.ndarray:
        return self.buf[: self.size] if self.size < len(self.buf) else self.buf


class StreamingMetrics:
    """Progressive-validation metrics of one ranking run: `like` (binary) and `rating`.

    update() takes the scores the model gave BEFORE learning from the events.
    NaN labels (task absent from an event) are skipped for that task.
    `history_length` is the model's history window L (the user_history slices' edge).
    """

    def __init__(self, window: int = 10_000, keep_log: bool = True, history_length: int = 50) -> None:
        from models.slices import EvidenceSlices  # it builds on ExactAUC, defined above

        self.window = window
        self.keep_log = keep_log
        self.slices = EvidenceSlices(history_length)
        self.auc = ExactAUC()
        self.n_like = 0
        self.sum_logloss = 0.0
        self.n_rating = 0
        self.sum_sq = 0.0
        self.win_like = _Ring(window, 2)  # (logit, label)
        self.win_rating = _Ring(window, 1)  # squared error
        self._log_s: list[np.ndarray] = []
        self._log_y: list[np.ndarray] = []

    def update(
        self,
        like_logit: np.ndarray,
        like_label: np.ndarray,
        rating_pred: np.ndarray | None = None,
        rating_label: np.ndarray | None = None,
        user_id: np.ndarray | None = None,
        item_id: np.ndarray | None = None,
    ) -> Evidence | None:
        """Add a scored batch; with its user and item ids, also to the slices, and then
        returns each event's evidence (earlier events of its item and user)."""
        ok = ~np.isnan(like_label)
        if ok.any():
            z, y = like_logit[ok].astype(np.float32), like_label[ok]
            self.auc.update(z, y)
            self.n_like += int(ok.sum())
            self.sum_logloss += float(logloss_from_logits(z, y).sum())
            self.win_like.push(np.stack([z.astype(np.float64), y], axis=1))
            if self.keep_log:
                self._log_s.append(z)
                self._log_y.append((y > 0.5).astype(np.uint8))
        if rating_pred is not None and rating_label is not None:
            ok = ~np.isnan(rating_label)
            if ok.any():
                se = (rating_pred[ok].astype(np.float64) - rating_label[ok]) ** 2
                self.n_rating += int(ok.sum())
                self.sum_sq += float(se.sum())
                self.win_rating.push(se[:, None])
        if user_id is None or item_id is None:
            return None
        return self.slices.update(like_logit, like_label, user_id, item_id)

    def slice_summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The like metrics per slice (models/slices.py): {slice: {bucket: {"n", "auc.like",
        "logloss.like"}}}, None where a bucket has no events or one class."""
        return self.slices.summary()

    def auc_last(self, fraction: float) -> float:
        """Exact AUC of the last `fraction` of the `like` events (needs keep_log)."""
        if not self.keep_log:
            raise RuntimeError("auc_last needs keep_log=True")
        s, y = self.score_log()
        start = math.floor(len(s) * (1.0 - fraction))
        return auc_exact(s[start:], y[start:])

    def score_log(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self._log_s) > 1:  # keep one chunk: cheap appends stay cheap later
            self._log_s = [np.concatenate(self._log_s)]
            self._log_y = [np.concatenate(self._log_y)]
        if not self._log_s:
            return np.empty(0, np.float32), np.empty(0, np.uint8)
        return self._log_s[0], self._log_y[0]

    def summary(self) -> dict[str, float]:
        wl = self.win_like.view()
        wr = self.win_rating.view()
        nan = math.nan
        return {
            "auc.like": self.auc.value(),
            "logloss.like": self.sum_logloss / self.n_like if self.n_like else nan,
            "rmse.rating": math.sqrt(self.sum_sq / self.n_rating) if self.n_rating else nan,
            "window.auc.like": auc_exact(wl[:, 0], wl[:, 1]) if len(wl) else nan,
            "window.logloss.like": float(logloss_from_logits(wl[:, 0], wl[:, 1]).mean()) if len(wl) else nan,
            "window.rmse.rating": math.sqrt(float(wr.mean())) if len(wr) else nan,
            "n.like": self.n_like,
            "n.rating": self.n_rating,
            "auc.like_error_bound": self.auc.error_bound(),
        }

    # Save / load: arrays for safetensors, scalars for JSON.
    def export_state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {f"auc.{k}": v for k, v in self.auc.state().items()}
        arrays["win_like"] = self.win_like.buf
        arrays["win_rating"] = self.win_rating.buf
        if self.keep_log:
            s, y = self.score_log()
            arrays["log_s"], arrays["log_y"] = s, y
        slice_arrays, slice_meta = self.slices.export_state()
        arrays.update({f"slices.{k}": v for k, v in slice_arrays.items()})
        meta = {
            "window": self.window,
            "keep_log": self.keep_log,
            "n_like": self.n_like,
            "sum_logloss": self.sum_logloss,
            "n_rating": self.n_rating,
            "sum_sq": self.sum_sq,
            "win_like": [self.win_like.head, self.win_like.size],
            "win_rating": [self.win_rating.head, self.win_rating.size],
            "slices": slice_meta,
        }
        return arrays, meta

    def import_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.__init__(
            window=meta["window"], keep_log=meta["keep_log"], history_length=self.slices.history_length
        )
        self.auc.load({k[4:]: v for k, v in arrays.items() if k.startswith("auc.")})
        self.n_like, self.sum_logloss = meta["n_like"], meta["sum_logloss"]
        self.n_rating, self.sum_sq = meta["n_rating"], meta["sum_sq"]
        self.win_like.buf = arrays["win_like"].copy()
        self.win_like.head, self.win_like.size = meta["win_like"]
        self.win_rating.buf = arrays["win_rating"].copy()
        self.win_rating.head, self.win_rating.size = meta["win_rating"]
        if self.keep_log and "log_s" in arrays:
            self._log_s, self._log_y = [arrays["log_s"].copy()], [arrays["log_y"].copy()]
        if "slices" in meta:  # a state saved before the slices existed starts them empty
            self.slices.import_state(
                {k[7:]: v for k, v in arrays.items() if k.startswith("slices.")}, meta["slices"]
            )
