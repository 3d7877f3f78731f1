"""Per-user history: a ring buffer of the last L events per user, as tensors on the device.

The model builds the user's history sequence from it every step (item vectors come
from the item memory bank, never re-encoded). Storage is one set of (max_users, L)
tensors on the store's device; a user owns one row (a "slot"); `count[slot]` is the
number of events ever appended, so the next write goes to column count % L and a
read gathers columns (count - L + j) % L, j = 0..L-1, most recent last.

Everything is an integer: users are keyed by `user_key` and entries hold the item's
crc32 code (the model derives the id-embedding row from it), its 63-bit key and the
bank row it had when appended (validated against the bank's `row_key` when read: see
`ItemMemoryBank.lookup_history`). Only the user -> slot map is on the host (a dict,
one operation per event's user); every per-position operation (B x L) is a tensor op.

Users are bounded: when a new user arrives and every slot is taken, the least
recently used user (append or get) is evicted; its slot is freed in the next delta.
A serving copy mirrors the trainer's slots (deltas ship slots, keys and ring rows).

The tensors grow with the users: new users take the lowest free slot, so the slots in
use are 0..n-1 (until evictions start, at max_users) and the tables hold only as many
rows as that needs, doubling from INITIAL_ROWS up to max_users. A 6k-user stream holds
8k rows (~60 MB at L = 200), not the 100k of the default bound (~720 MB). Growth copies
the tables once per doubling, on the host-known new slots: it never waits on the device.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from memory_bank.base import MemoryDelta, RowChanges, index_tensors


class HistoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    length: int = Field(200, ge=1, le=4096, description="L: events kept per user")
    max_users: int = Field(
        100_000,
        ge=1,
        description="users kept; LRU eviction beyond (~36 bytes * L each, allocated as users arrive)",
    )
    summary_dim: int = Field(
        0,
        ge=0,
        description="width of each user's long-term summary (a running mean over ALL the user's "
        "events, not only the last L: the LMN memory loss's target); 0 = none. The model sets it",
    )
    device: str = "cpu"  # RankingState sets the model's device


class HistoryCapacityError(RuntimeError):
    """One append names more distinct users than max_users (cannot all be kept)."""


class HistoryStateError(ValueError):
    """import_state / apply_delta got data that does not fit this store."""


# The per-entry ring tables, (rows + 1, L) each, and what a padded position holds.
RING = {"item_code": -1, "item_key": -1, "bank_row": -1, "ts_ms": 0, "signal": 0.0}
INITIAL_ROWS = 1024  # slot rows allocated before the first growth (fewer if max_users is)


@dataclass
class HistoryView:
    """Histories of B users as (B, L) tensors on the store's device, most recent event last,
    left-padded: item_code, item_key, bank_row (int64, -1 padded), ts_ms (int64, 0 padded),
    signal (float32, 0 padded), mask (bool, True = a real event); slot (B,) the users'
    rows (the empty row for an unknown user), for `summary_at` before the tables grow."""

    item_code: torch.Tensor
    item_key: torch.Tensor
    bank_row: torch.Tensor
    ts_ms: torch.Tensor
    signal: torch.Tensor
    mask: torch.Tensor
    slot: torch.Tensor


@dataclass(frozen=True)
class HistoryAppendPlan:
    """An append of n events, decided on the host (`UserHistoryStore.plan_append`) before
    the step that trains on them and applied after it (`commit_append`). Planning changes
    nothing but the LRU order a read changes anyway (`touch_slots`), so a step that fails
    drops its plan; its index arrays cross to the device inside the step's one staged copy
    (`index_arrays`, memory_bank.base.index_block)."""

    slot: np.ndarray  # (n,) every event's slot, new users' as planned
    new_users: np.ndarray  # (A,) user keys without a slot, first-seen order
    new_slots: np.ndarray  # (A,) the slots they are given (free ones, then evicted users')
    evict: int  # how many least recently used users are evicted to make room
    keep: np.ndarray  # (k,) events that survive: each user's last L of this append
    rank: np.ndarray  # (k,) each kept event's rank among its user's events of this append
    users: np.ndarray  # (u,) the distinct slots of this append
    run_len: np.ndarray  # (u,) their event counts
    summarise: bool  # every event's slot is needed too (the long-term summaries)

    def index_arrays(self) -> list[np.ndarray]:
        """What `commit_append` needs on the device, in its order."""
        out = [self.keep, self.slot[self.keep], self.rank, self.users, self.run_len, self.new_slots]
        return out + [self.slot] if self.summarise else out


class UserHistoryStore:
    """`append(user_keys, item_codes, item_keys, bank_rows, ts_ms, signal)` (a training step:
    `plan_append` before it, `commit_append` after it succeeded),
    `get(user_keys) -> HistoryView`, `summary` / `summary_at`, plus the shared memory
    API: stats / export_state / import_state / take_delta / apply_delta / mark_changed."""

    def __init__(self, cfg: HistoryConfig | None = None):
        self.cfg = cfg or HistoryConfig()
        self.device = torch.device(self.cfg.device)
        self._reset()

    def _reset(self) -> None:
        """Every slot empty, no user, no pending delta."""
        n, L, dev = self.cfg.max_users, self.cfg.length, self.device
        # The tables hold slots 0..rows-1 and one row more: row `rows` is always empty, what
        # unknown users read (`read` maps slot U to it), so a read needs no masking: a free
        # or fresh slot holds the padding values everywhere. Starts with that row only.
        self.rows = 0
        self.ring = {
            name: torch.full(
                (1, L), pad, dtype=torch.float32 if name == "signal" else torch.int64, device=dev
            )
            for name, pad in RING.items()
        }
        self.count = torch.zeros(1, dtype=torch.int64, device=dev)  # (rows+1,) events ever appended
        # (rows+1, S) running sum over every event summarised so far, and how many (append).
        self.summary_sum = torch.zeros(1, self.cfg.summary_dim, dtype=torch.float32, device=dev)
        self.summary_n = torch.zeros(1, dtype=torch.float32, device=dev)  # (rows+1,)
        self._grow(min(n, INITIAL_ROWS))
        self.slot_user = np.full(n, -1, dtype=np.int64)  # (U,) user key of each slot, -1 free
        self.slots: OrderedDict[int, int] = OrderedDict()  # user key -> slot, LRU order (oldest first)
        self.free = list(range(n - 1, -1, -1))  # pop() gives the lowest free slot
        self.changes = RowChanges(n)  # slots changed / freed since take_delta
        self.evictions = 0
        self.appended = 0

    def _grow(self, need: int) -> None:
        """Make the tables hold slots 0..need-1: double the rows until they do (at most
        max_users), keeping the rows held; the new ones (the new empty row too) padding."""
        if need <= self.rows:
            return
        rows = max(self.rows, 1)
        while rows < need:
            rows *= 2
        rows = min(self.cfg.max_users, rows)

        def grown(t: torch.Tensor, pad: float) -> torch.Tensor:
            out = t.new_full((rows + 1, *t.shape[1:]), pad)
            out[: self.rows] = t[: self.rows]
            return out

        self.ring = {name: grown(t, RING[name]) for name, t in self.ring.items()}
        self.count, self.summary_sum, self.summary_n = (
            grown(t, 0) for t in (self.count, self.summary_sum, self.summary_n)
        )
        self.rows = rows

    def __len__(self) -> int:
        return len(self.slots)

    def _tensor(self, a, dtype=torch.int64) -> torch.Tensor:
        """A host array (read-only ones too: arrow's) or a tensor -> a tensor on the device."""
        if isinstance(a, torch.Tensor):
            return a.to(self.device, dtype)
        return torch.tensor(np.asarray(a), dtype=dtype, device=self.device)

    # -- write ---------------------------------------------------------------------------------

    def plan_append(self, user_keys, known_slots: np.ndarray) -> HistoryAppendPlan:
        """Where an append of events by `user_keys` (n,) will go, without changing anything.
        `known_slots`: `touch_slots(user_keys)` of the same keys, just before (the batch's
        read: it moved the known users to the LRU's recent end). New users get the free
        slots, then those of the least recently used users (never one of this append).
        Raises HistoryCapacityError when the append's users cannot all be kept."""
        user_keys = np.asarray(user_keys, dtype=np.int64)
        n, U, L = len(user_keys), self.cfg.max_users, self.cfg.length
        slot = np.array(known_slots, dtype=np.int64)  # (n,) U = a new user
        is_new = slot == U
        new_users = np.zeros(0, dtype=np.int64)
        new_slots, evict = new_users, 0
        if is_new.any():
            new_users = np.asarray(list(dict.fromkeys(user_keys[is_new].tolist())), dtype=np.int64)
            evict = max(0, len(new_users) - len(self.free))
            if evict:  # the batch's own users must all fit
                kept = len(new_users) + len(np.unique(slot[~is_new]))
                if kept > U:
                    raise HistoryCapacityError(f"max_users={U} < {kept} users in one call")
                oldest = np.fromiter((s for _, s in zip(range(evict), self.slots.values())), np.int64, evict)
                new_slots = np.concatenate([np.asarray(self.free[::-1], dtype=np.int64), oldest])
            else:
                new_slots = np.asarray(self.free[len(self.free) - len(new_users) :][::-1], dtype=np.int64)
            slot_of_new = dict(zip(new_users.tolist(), new_slots.tolist()))
            slot[is_new] = [slot_of_new[u] for u in user_keys[is_new].tolist()]
        # Rank of each event among its user's events in this batch (stable: event order).
        order = np.argsort(slot, kind="stable")  # (n,)
        s_sorted = slot[order]
        starts = np.r_[0, np.flatnonzero(s_sorted[1:] != s_sorted[:-1]) + 1]  # first of each run
        run_len = np.diff(np.r_[starts, n])  # (u,) events per user in this batch
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - np.repeat(starts, run_len)
        per_user = np.empty(n, dtype=np.int64)
        per_user[order] = np.repeat(run_len, run_len)
        # Only a user's last L events of this batch survive; dropping the others keeps the
        # scatter of commit_append free of duplicate targets.
        keep = np.flatnonzero(rank >= per_user - L)  # (k,)
        summarise = self.cfg.summary_dim > 0
        return HistoryAppendPlan(
            slot, new_users, new_slots, evict, keep, rank[keep], s_sorted[starts], run_len, summarise
        )

    def commit_append(
        self,
        plan: HistoryAppendPlan,
        index: list[torch.Tensor],
        cols: dict[str, torch.Tensor],
        summary: torch.Tensor | None = None,
    ) -> None:
        """Apply `plan`: `index`, its `index_arrays` on the device (index_columns); `cols`
        the events' (n,) columns on the device (item_code, item_key, bank_row, ts_ms,
        signal); summary (n, S) one vector per event, added to its user's long-term summary
        (when summary_dim; every event counts there, not only the last L)."""
        n = len(plan.slot)
        lengths = {name: len(cols[name]) for name in RING}
        if any(m != n for m in lengths.values()):
            raise ValueError(f"append: lengths differ (user_keys {n}, {lengths})")
        keep_t, s_k, rank_k, users_t, run_t, new_slots_t, *rest = index
        for _ in range(plan.evict):
            self._evict_oldest()
        if len(plan.new_users):
            del self.free[len(self.free) - len(plan.new_users) :]  # the evicted users' slots too
            self.slots.update(zip(plan.new_users.tolist(), plan.new_slots.tolist()))
            self.slot_user[plan.new_slots] = plan.new_users
            self._grow(int(plan.new_slots.max()) + 1)
            self._clear_slots(plan.new_slots, new_slots_t)
        L = self.cfg.length
        flat = s_k * L + (self.count.index_select(0, s_k) + rank_k) % L  # (k,) distinct ring positions
        for name, t in self.ring.items():
            t.view(-1).index_copy_(0, flat, cols[name].to(t.dtype).index_select(0, keep_t))
        self.count.index_add_(0, users_t, run_t)
        if plan.summarise and summary is not None:
            slot_t = rest[0]  # (n,) every event's slot
            self.summary_sum.index_add_(0, slot_t, self._tensor(summary, torch.float32))
            self.summary_n.index_add_(0, slot_t, torch.ones(n, device=self.device))
        self.changes.dirty[plan.users] = True
        self.appended += n

    def _clear_slots(self, slots: np.ndarray, slots_t: torch.Tensor | None = None) -> None:
        """Slots back to empty on the device (their host bookkeeping is the caller's);
        `slots_t`: the same slots on the device already, else copied."""
        s = self._tensor(slots) if slots_t is None else slots_t
        for name, pad in RING.items():
            self.ring[name].index_fill_(0, s, pad)
        for t in (self.count, self.summary_sum, self.summary_n):
            t.index_fill_(0, s, 0)

    def _evict_oldest(self) -> None:
        user, s = self.slots.popitem(last=False)
        self.slot_user[s] = -1
        self.free.append(s)
        self.changes.free(np.asarray([s]), np.asarray([user]))
        self.evictions += 1

    def append(self, user_keys, item_codes, item_keys, bank_rows, ts_ms, signal, summary=None) -> None:
        """Append n events given in event order (a user's events land in that order): plans
        and commits at once (a training step plans before it runs, commits after it).

        user_keys (n,) int64; item_codes, item_keys, bank_rows (n,) int64 (host arrays or
        device tensors); ts_ms (n,) int; signal (n,) float. bank_rows: each item's bank row
        now (-1 none), checked against the bank's row_key when the entry is read.
        summary: (n, S) one vector per event, added to its user's long-term summary (when
        summary_dim; every event counts there, not only the last L). A use of each user (LRU).
        """
        user_keys = np.asarray(user_keys, dtype=np.int64)
        cols = {
            "item_code": item_codes,
            "item_key": item_keys,
            "bank_row": bank_rows,
            "ts_ms": ts_ms,
            "signal": signal,
        }
        lengths = {name: len(v) for name, v in cols.items()}
        if any(m != len(user_keys) for m in lengths.values()):
            raise ValueError(f"append: lengths differ (user_keys {len(user_keys)}, {lengths})")
        if len(user_keys) == 0:
            return
        plan = self.plan_append(user_keys, self.touch_slots(user_keys))
        index = index_tensors(plan.index_arrays(), self.device)
        dtypes = {name: torch.float32 if name == "signal" else torch.int64 for name in cols}
        self.commit_append(plan, index, {k: self._tensor(v, dtypes[k]) for k, v in cols.items()}, summary)

    def _slots_of(self, user_keys) -> np.ndarray:
        """(B,) user keys -> (B,) slots, the empty row U for unknown users; no LRU touch."""
        keys = np.asarray(user_keys, dtype=np.int64).tolist()
        return np.fromiter(
            map(self.slots.get, keys, repeat(self.cfg.max_users)), dtype=np.int64, count=len(keys)
        )

    def summary(self, user_keys) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) user keys -> the long-term summaries (B, S) (the mean of every vector added) and
        how many events they cover (B,); zeros for unknown users. Does not touch the LRU order."""
        return self.summary_at(self._tensor(self._slots_of(user_keys)))

    def summary_at(self, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`summary` of the slots (B,) of a HistoryView (already on the device; U = unknown)."""
        slot = slot.clamp(max=self.rows)  # U -> the empty row
        n = self.summary_n.index_select(0, slot)  # (B,)
        return self.summary_sum.index_select(0, slot) / n.clamp(min=1)[:, None], n

    # -- read ----------------------------------------------------------------------------------

    def read(self, slot) -> HistoryView:
        """slots (B,) (host array or device tensor; U = the empty row) -> their histories
        (B, L); no LRU touch. Positions before a slot's first event hold the padding values
        already (slots start empty)."""
        L = self.cfg.length
        s = self._tensor(slot).clamp(max=self.rows)  # (B,) U -> the empty row (the last)
        event = self.count.index_select(0, s)[:, None] - L + torch.arange(L, device=self.device)  # (B, L)
        flat = (s[:, None] * L + event % L).reshape(-1)  # (B*L,) positions in a ring's storage
        cols = {name: t.view(-1).index_select(0, flat).view(event.shape) for name, t in self.ring.items()}
        return HistoryView(**cols, mask=event >= 0, slot=s)

    def touch_slots(self, user_keys) -> np.ndarray:
        """(B,) user keys -> (B,) their slots on the host (U = unknown: the empty row), each
        known user moved to the LRU's recent end: a read's use. The trainer sends the slots to
        the device with the batch's features (one copy) and reads them there (`read`)."""
        keys = np.asarray(user_keys, dtype=np.int64).tolist()
        get, move_to_end = self.slots.get, self.slots.move_to_end
        slot = np.full(len(keys), self.cfg.max_users, dtype=np.int64)  # (B,) U = unknown
        for i, u in enumerate(keys):
            s = get(u)
            if s is not None:
                move_to_end(u)
                slot[i] = s
        return slot

    def get(self, user_keys, touch: bool = True) -> HistoryView:
        """(B,) user keys -> HistoryView of (B, L) tensors, most recent last; unknown users empty.
        A read counts as a use of the user (LRU) unless touch=False (admin queries)."""
        return self.read(self.touch_slots(user_keys) if touch else self._slots_of(user_keys))

    # -- stats / state -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        live = self._tensor(np.fromiter(self.slots.values(), dtype=np.int64, count=len(self.slots)))
        lengths = self.count.index_select(0, live).clamp(max=self.cfg.length).double()
        if not len(live):
            lengths = torch.zeros(1, dtype=torch.float64)
        return {
            "users": len(self.slots),
            "max_users": self.cfg.max_users,
            "rows_allocated": self.rows,  # grows with the users seen (doubling), <= max_users
            "bytes": self.nbytes(),
            "length": self.cfg.length,
            "events_appended": int(self.appended),
            "evictions": int(self.evictions),
            "mean_filled": float(lengths.mean()),
            "full_fraction": float((lengths >= self.cfg.length).double().mean()),
        }

    def nbytes(self) -> int:
        """Device bytes of the tables (ring, counts, summaries)."""
        tables = (*self.ring.values(), self.count, self.summary_sum, self.summary_n)
        return sum(t.numel() * t.element_size() for t in tables)

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The ring rows of live users only (free slots are all-empty), bit-exact, in LRU order
        (oldest first), with their user keys; free list and pending freed slots as they are."""
        lru = np.fromiter(self.slots.values(), dtype=np.int64, count=len(self.slots))  # (U',)
        lru_t = self._tensor(lru)
        tensors = {f"ring.{name}": t.index_select(0, lru_t).cpu() for name, t in self.ring.items()}
        tensors.update(
            lru_slots=torch.from_numpy(lru),
            lru_users=torch.tensor(list(self.slots.keys()), dtype=torch.int64),
            count=self.count.index_select(0, lru_t).cpu(),
            summary_sum=self.summary_sum.index_select(0, lru_t).cpu(),
            summary_n=self.summary_n.index_select(0, lru_t).cpu(),
            **self.changes.export_state(),
            free=torch.tensor(self.free, dtype=torch.int64),
        )
        meta = {
            "config": self.cfg.model_dump(exclude={"device"}),
            "evictions": self.evictions,
            "appended": self.appended,
        }
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        mine = self.cfg.model_dump(exclude={"device"})
        if meta["config"] != mine:
            raise HistoryStateError(f"config: saved {meta['config']}, have {mine}")
        if "lru_users" not in tensors:
            raise HistoryStateError("a history saved by an older release (users by string id): start fresh")
        self._reset()  # every slot empty, then the live ones filled
        lru = tensors["lru_slots"].numpy()
        if len(lru):
            self._grow(int(lru.max()) + 1)
        lru_t = self._tensor(lru)
        for name, t in self.ring.items():
            t.index_copy_(0, lru_t, tensors[f"ring.{name}"].to(self.device))
        for name in ("count", "summary_sum", "summary_n"):
            getattr(self, name).index_copy_(0, lru_t, tensors[name].to(self.device))
        users = tensors["lru_users"].tolist()
        self.slots = OrderedDict(zip(users, lru.tolist()))
        self.slot_user[lru] = users
        self.changes.import_state(tensors)
        self.free = tensors["free"].tolist()
        self.evictions, self.appended = int(meta["evictions"]), int(meta["appended"])

    def take_delta(self) -> MemoryDelta:
        """The slots changed since the previous call, and the slots freed since then.

        tables (rows = this store's slots): "user_key" (M,), "count" (M,), and each ring table
        ("item_code", "item_key", "bank_row", "ts_ms", "signal": (M, L), the raw ring row);
        "freed" (slots (F,), (F,) the user keys they held, -1 unknown). A serving copy mirrors
        the trainer's slots: it frees the "freed" slots first, then copies each changed one.
        The long-term summaries are not shipped: only training reads them (the LMN memory
        loss's target); checkpoints carry them (export_state).
        """
        rows, freed = self.changes.take()
        delta = MemoryDelta()
        delta.tables["freed"] = freed
        rows_t = self._tensor(rows)
        delta.tables["user_key"] = (rows, torch.from_numpy(self.slot_user[rows].copy()))
        delta.tables["count"] = (rows, self.count.index_select(0, rows_t).cpu())
        for name, t in self.ring.items():
            delta.tables[name] = (rows, t.index_select(0, rows_t).cpu())
        return delta

    def apply_delta(self, delta: MemoryDelta) -> None:
        """Serving copy: free the slots the trainer freed, then set each changed slot as the
        trainer has it; afterwards `get` answers as the trainer's."""
        freed, _ = delta.tables.get("freed", (np.zeros(0, dtype=np.int64), None))
        self._free_slots(freed)
        rows, keys = delta.tables.get("user_key", (np.zeros(0, dtype=np.int64), None))
        if len(rows) == 0:
            return
        if rows.max() >= self.cfg.max_users or delta.tables["item_code"][1].shape[1] != self.cfg.length:
            raise HistoryStateError(
                f"delta slots/length do not fit max_users={self.cfg.max_users}, length={self.cfg.length}"
            )
        self._grow(int(rows.max()) + 1)
        keys = keys.numpy()
        held = self.slot_user[rows]
        self._free_slots(rows[(held >= 0) & (held != keys)])  # reused without being freed here
        for u, s in zip(keys.tolist(), rows.tolist()):
            old = self.slots.get(u)
            if old is not None and old != s:  # moved: free its old slot
                self._free_slots(np.asarray([old]))
            self.slots[u] = s
        self.slot_user[rows] = keys
        rows_t = self._tensor(rows)
        for name, t in self.ring.items():
            t.index_copy_(0, rows_t, delta.tables[name][1].to(self.device, t.dtype))
        self.count.index_copy_(0, rows_t, delta.tables["count"][1].to(self.device))
        self.free = np.flatnonzero(self.slot_user < 0)[::-1].tolist()

    def _free_slots(self, slots: np.ndarray) -> None:
        """A serving copy's slots emptied (their users dropped), as the trainer freed them."""
        slots = np.unique(slots[self.slot_user[slots] >= 0]) if len(slots) else slots
        if not len(slots):
            return
        for u in self.slot_user[slots].tolist():
            del self.slots[u]
        self.slot_user[slots] = -1
        self._clear_slots(slots)
        self.free.extend(slots.tolist())

    def mark_changed(self, slots: np.ndarray) -> None:
        """Slots a serving copy may hold differently from this store (a restarted trainer's):
        the next delta re-ships the live ones and frees the others."""
        self.changes.mark_changed(slots, self.slot_user)
