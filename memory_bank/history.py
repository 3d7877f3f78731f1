"""Per-user history: a ring buffer of the last L (item id, event time, signal) per user.

The model builds the user's history sequence from it every step (item vectors
come from the item memory bank, never re-encoded). Storage is one set of
(max_users, L) arrays; a user owns one row (a "slot"); `count[slot]` is the
number of events ever appended, so the next write goes to column count % L and
a read gathers columns (count - L + j) % L, j = 0..L-1, most recent last.

Users are bounded: when a new user arrives and every slot is taken, the least
recently used user (append or get) is evicted and reported as a tombstone.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from memory_bank.base import MemoryDelta


class HistoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    length: int = Field(50, ge=1, le=4096, description="L: events kept per user")
    max_users: int = Field(100_000, ge=1, description="users kept; LRU eviction beyond (~20 bytes * L each)")
    summary_dim: int = Field(
        0,
        ge=0,
        description="width of each user's long-term summary (a running mean over ALL the user's "
        "events, not only the last L: the LMN memory loss's target); 0 = none. The model sets it",
    )


class HistoryCapacityError(RuntimeError):
    """One append names more distinct users than max_users (cannot all be kept)."""


class HistoryStateError(ValueError):
    """import_state / apply_delta got data that does not fit this store."""


@dataclass
class HistoryView:
    """Histories of B users, most recent event last, left-padded.

    item_ids (B, L) object (None where padded), ts_ms (B, L) int64 (0 padded),
    signal (B, L) float32 (0 padded), mask (B, L) bool (True = a real event).
    """

    item_ids: np.ndarray
    ts_ms: np.ndarray
    signal: np.ndarray
    mask: np.ndarray


class UserHistoryStore:
    """`append(user_ids, item_ids, ts_ms, signal)`, `get(user_ids) -> HistoryView`, plus the
    shared memory API: stats / export_state / import_state / take_delta / apply_delta."""

    def __init__(self, cfg: HistoryConfig | None = None):
        self.cfg = cfg or HistoryConfig()
        self._reset()

    def _reset(self) -> None:
        """Every slot empty, no user, no pending delta."""
        n, L = self.cfg.max_users, self.cfg.length
        self.items = np.full((n, L), None, dtype=object)  # (U, L) ring of item ids
        self.ts_ms = np.zeros((n, L), dtype=np.int64)  # (U, L)
        self.signal = np.zeros((n, L), dtype=np.float32)  # (U, L)
        self.count = np.zeros(n, dtype=np.int64)  # (U,) events ever appended per slot
        # (U, S) running sum over every event summarised so far, and how many (add_summary).
        self.summary_sum = np.zeros((n, self.cfg.summary_dim), dtype=np.float32)
        self.summary_n = np.zeros(n, dtype=np.float32)  # (U,)
        self.slot_user = np.full(n, None, dtype=object)  # (U,) user id of each slot
        self.slots: OrderedDict[str, int] = OrderedDict()  # user -> slot, LRU order (oldest first)
        self.free = list(range(n - 1, -1, -1))  # pop() gives the lowest free slot
        self.dirty = np.zeros(n, dtype=bool)  # (U,) changed since take_delta
        self.tombstones: list[str] = []
        self.evictions = 0
        self.appended = 0

    def __len__(self) -> int:
        return len(self.slots)

    # -- write ---------------------------------------------------------------------------------

    def _slots_for(self, user_ids: np.ndarray) -> np.ndarray:
        """(n,) user ids -> (n,) slots, allocating (and LRU-evicting) for new users."""
        slots, get, touch = self.slots, self.slots.get, self.slots.move_to_end
        out = np.empty(len(user_ids), dtype=np.int64)
        new: dict[str, list[int]] = {}
        for i, u in enumerate(user_ids.tolist()):
            s = get(u)
            if s is None:
                new.setdefault(u, []).append(i)
            else:
                touch(u)
                out[i] = s
        if len(new) > len(self.free):  # evictions needed: the batch's own users must all fit
            known = np.delete(out, [i for positions in new.values() for i in positions])
            if len(new) + len(np.unique(known)) > self.cfg.max_users:
                raise HistoryCapacityError(
                    f"max_users={self.cfg.max_users} < {len(new) + len(np.unique(known))} users in one call"
                )
        for u, positions in new.items():
            if not self.free:
                self._evict_oldest()
            s = self.free.pop()
            slots[u] = s
            self.slot_user[s] = u
            out[positions] = s
        return out

    def _clear_slot(self, s: int) -> None:
        self.items[s] = None
        self.ts_ms[s] = 0
        self.signal[s] = 0
        self.count[s] = 0
        self.summary_sum[s] = 0
        self.summary_n[s] = 0
        self.slot_user[s] = None
        self.dirty[s] = False
        self.free.append(s)

    def _evict_oldest(self) -> None:
        user, s = self.slots.popitem(last=False)
        self._clear_slot(s)
        self.tombstones.append(user)
        self.evictions += 1

    def append(self, user_ids, item_ids, ts_ms, signal) -> None:
        """Append n events given in event order (a user's events land in that order).

        user_ids (n,) str, item_ids (n,) str, ts_ms (n,) int, signal (n,) float.
        """
        user_ids = np.asarray(user_ids, dtype=object)
        n = len(user_ids)
        if n == 0:
            return
        item_ids = np.asarray(item_ids, dtype=object)
        ts = np.asarray(ts_ms, dtype=np.int64)
        sig = np.asarray(signal, dtype=np.float32)
        if not (len(item_ids) == len(ts) == len(sig) == n):
            raise ValueError(
                f"append: lengths differ (user_ids {n}, item_ids {len(item_ids)}, "
                f"ts_ms {len(ts)}, signal {len(sig)})"
            )
        L = self.cfg.length
        slot = self._slots_for(user_ids)  # (n,)
        # Rank of each event among its user's events in this batch (stable: event order).
        order = np.argsort(slot, kind="stable")  # (n,)
        s_sorted = slot[order]
        starts = np.r_[0, np.flatnonzero(s_sorted[1:] != s_sorted[:-1]) + 1]  # first of each run
        run_len = np.diff(np.r_[starts, n])  # (U',) events per user in this batch
        rank_sorted = np.arange(n) - np.repeat(starts, run_len)  # (n,)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = rank_sorted
        per_user = np.empty(n, dtype=np.int64)
        per_user[order] = np.repeat(run_len, run_len)
        # Only a user's last L events of this batch survive; dropping the others keeps the
        # fancy assignment below free of duplicate targets.
        keep = rank >= per_user - L  # (n,)
        col = (self.count[slot] + rank) % L  # (n,)
        s_k, c_k = slot[keep], col[keep]
        self.items[s_k, c_k] = item_ids[keep]
        self.ts_ms[s_k, c_k] = ts[keep]
        self.signal[s_k, c_k] = sig[keep]
        users_in_batch = s_sorted[starts]  # (U',)
        self.count[users_in_batch] += run_len
        self.dirty[users_in_batch] = True
        self.appended += n

    def add_summary(self, user_ids, vectors: np.ndarray) -> None:
        """Add one vector (n, S) per event to its user's long-term summary. The users must be
        in the store (call after `append` of the same events)."""
        user_ids = np.asarray(user_ids, dtype=object)
        if not self.cfg.summary_dim or len(user_ids) == 0:
            return
        slot = np.fromiter(
            map(self.slots.__getitem__, user_ids.tolist()), dtype=np.int64, count=len(user_ids)
        )
        np.add.at(self.summary_sum, slot, np.asarray(vectors, dtype=np.float32))
        np.add.at(self.summary_n, slot, np.float32(1))

    def summary(self, user_ids) -> tuple[np.ndarray, np.ndarray]:
        """(B,) user ids -> the long-term summaries (B, S) (the mean of every vector added) and
        how many events they cover (B,); zeros for unknown users. Does not touch the LRU order."""
        user_ids = np.asarray(user_ids, dtype=object)
        get = self.slots.get
        slot = np.fromiter((get(u, -1) for u in user_ids.tolist()), dtype=np.int64, count=len(user_ids))
        known = slot >= 0
        s = np.where(known, slot, 0)
        n = np.where(known, self.summary_n[s], np.float32(0))  # (B,)
        mean = np.where(known[:, None], self.summary_sum[s] / np.maximum(n, 1)[:, None], np.float32(0))
        return mean.astype(np.float32), n

    # -- read ----------------------------------------------------------------------------------

    def get(self, user_ids) -> HistoryView:
        """(B,) user ids -> HistoryView of (B, L) arrays, most recent last; unknown users empty."""
        user_ids = np.asarray(user_ids, dtype=object)
        B, L = len(user_ids), self.cfg.length
        get, touch = self.slots.get, self.slots.move_to_end
        slot = np.full(B, -1, dtype=np.int64)  # (B,)
        for i, u in enumerate(user_ids.tolist()):
            s = get(u)
            if s is not None:
                touch(u)
                slot[i] = s
        known = slot >= 0
        s = np.where(known, slot, 0)  # (B,)
        event = np.where(known, self.count[s], 0)[:, None] - L + np.arange(L)  # (B, L) event index
        mask = event >= 0  # (B, L)
        col = event % L  # (B, L)
        rows = s[:, None]
        items = self.items[rows, col]  # (B, L)
        items[~mask] = None
        ts = np.where(mask, self.ts_ms[rows, col], 0)
        sig = np.where(mask, self.signal[rows, col], np.float32(0))
        return HistoryView(item_ids=items, ts_ms=ts, signal=sig, mask=mask)

    # -- stats / state -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        live = np.fromiter(self.slots.values(), dtype=np.int64, count=len(self.slots))
        lengths = np.minimum(self.count[live], self.cfg.length) if len(live) else np.zeros(1)
        return {
            "users": len(self.slots),
            "max_users": self.cfg.max_users,
            "length": self.cfg.length,
            "events_appended": int(self.appended),
            "evictions": int(self.evictions),
            "mean_filled": float(lengths.mean()),
            "full_fraction": float((lengths >= self.cfg.length).mean()),
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The ring rows of live users only (free slots are all-empty), bit-exact, in LRU order;
        item ids interned into `meta['item_vocab']` (codes -1 = empty)."""
        lru = np.fromiter(self.slots.values(), dtype=np.int64, count=len(self.slots))  # (U',) oldest first
        items = self.items[lru]  # (U', L)
        present = items != None
        vocab: dict[str, int] = {}
        codes = np.full(items.shape, -1, dtype=np.int64)
        codes[present] = [vocab.setdefault(x, len(vocab)) for x in items[present].tolist()]
        tensors = {
            "lru_slots": torch.from_numpy(lru),
            "item_codes": torch.from_numpy(codes),
            "ts_ms": torch.from_numpy(self.ts_ms[lru]),
            "signal": torch.from_numpy(self.signal[lru]),
            "count": torch.from_numpy(self.count[lru]),
            "summary_sum": torch.from_numpy(self.summary_sum[lru]),
            "summary_n": torch.from_numpy(self.summary_n[lru]),
            "dirty_slots": torch.from_numpy(np.flatnonzero(self.dirty)),
            "free": torch.tensor(self.free, dtype=torch.int64),
        }
        meta = {
            "config": self.cfg.model_dump(),
            "item_vocab": list(vocab),
            "lru_users": list(self.slots.keys()),
            "tombstones": list(self.tombstones),
            "evictions": self.evictions,
            "appended": self.appended,
        }
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        saved = HistoryConfig(**meta["config"])
        if saved != self.cfg:
            raise HistoryStateError(f"config: saved {saved.model_dump()}, have {self.cfg.model_dump()}")
        self._reset()  # every slot empty, then the live ones filled
        lru = tensors["lru_slots"].numpy()
        vocab = np.asarray([*meta["item_vocab"], None], dtype=object)  # code -1 -> None
        self.items[lru] = vocab[tensors["item_codes"].numpy()]
        self.ts_ms[lru] = tensors["ts_ms"].numpy()
        self.signal[lru] = tensors["signal"].numpy()
        self.count[lru] = tensors["count"].numpy()
        self.summary_sum[lru] = tensors["summary_sum"].numpy()
        self.summary_n[lru] = tensors["summary_n"].numpy()
        self.dirty[tensors["dirty_slots"].numpy()] = True
        self.free = tensors["free"].tolist()
        self.slots = OrderedDict(zip(meta["lru_users"], lru.tolist()))
        self.slot_user[lru] = np.asarray(meta["lru_users"], dtype=object)
        self.tombstones = list(meta["tombstones"])
        self.evictions, self.appended = int(meta["evictions"]), int(meta["appended"])

    def take_delta(self) -> MemoryDelta:
        """Users whose history changed since the previous call, as full rows (most recent last).

        tables: "ts_ms" (rows, (M, L) int64), "signal" (rows, (M, L) float32),
        "length" (rows, (M,) int64 valid entries); rows = this store's slots.
        ids: "users" (M user ids, row-aligned), "items" (M*L item ids, row-major, "" = padding).
        tombstones: users evicted since the previous call (apply them first).
        The long-term summaries are not shipped: only training reads them (the LMN memory
        loss's target); checkpoints carry them (export_state).
        """
        rows = np.flatnonzero(self.dirty)
        self.dirty[:] = False
        users = self.slot_user[rows].tolist()
        delta = MemoryDelta(tombstones=list(dict.fromkeys(self.tombstones)))  # evicted twice: once
        self.tombstones = []
        if len(rows):
            # Read without touching the LRU order: the delta is not a use.
            L = self.cfg.length
            event = self.count[rows][:, None] - L + np.arange(L)  # (M, L)
            mask = event >= 0
            col = event % L
            items = self.items[rows[:, None], col]
            items[~mask] = ""
            delta.tables["ts_ms"] = (
                rows,
                torch.from_numpy(np.where(mask, self.ts_ms[rows[:, None], col], 0)),
            )
            delta.tables["signal"] = (
                rows,
                torch.from_numpy(np.where(mask, self.signal[rows[:, None], col], np.float32(0))),
            )
            delta.tables["length"] = (rows, torch.from_numpy(mask.sum(1).astype(np.int64)))
            delta.ids["users"] = users
            delta.ids["items"] = items.ravel().tolist()
        return delta

    def apply_delta(self, delta: MemoryDelta) -> None:
        """Serving copy: drop the tombstoned users, then set each changed user's history.

        The copy keys by user id (its own slots); afterwards `get` answers as the trainer's.
        """
        for user in delta.tombstones:
            s = self.slots.pop(user, None)
            if s is not None:
                self._clear_slot(s)
        if "users" not in delta.ids:
            return
        users = np.asarray(delta.ids["users"], dtype=object)
        L = self.cfg.length
        if delta.tables["ts_ms"][1].shape[1] != L:
            raise HistoryStateError(f"length: delta has {delta.tables['ts_ms'][1].shape[1]}, store has {L}")
        slot = self._slots_for(users)  # (M,)
        lengths = delta.tables["length"][1].numpy()
        items = np.asarray(delta.ids["items"], dtype=object).reshape(len(users), L)
        mask = np.arange(L) >= (L - lengths)[:, None]  # (M, L)
        items[~mask] = None
        # Stored with count = length: the most recent event sits in column length-1 (mod L).
        col = (np.arange(L)[None, :] - (L - lengths)[:, None]) % L  # (M, L) ring column of each entry
        self.items[slot[:, None], col] = items
        self.ts_ms[slot[:, None], col] = delta.tables["ts_ms"][1].numpy()
        self.signal[slot[:, None], col] = delta.tables["signal"][1].numpy()
        self.count[slot] = lengths
