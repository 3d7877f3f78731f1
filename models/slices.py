"""Slice metrics: the like AUC and logloss by how much the stream had shown of the item
and of the user before each event was scored.

One cumulative AUC hides where the memories help: a cold item (no earlier event) is
scored from its content alone, a user with a long history is where a long-term memory
should matter. So every scored event gets two evidence counts, the number of earlier
events of its item and of its user (strictly before it in stream order, earlier events
of the same micro-batch included), and falls in three slices:

  item_evidence   "0", "1-4", "5-49", "50+"   (earlier events of the item)
  user_evidence   the same buckets           (earlier events of the user)
  user_history    "short" (< L earlier events of the user, L = model.history.length)
                  "long"  (>= L: the history window is full)

A count uses no label, only that the event happened, and is read before the event is
added: no slice sees anything the model had not seen at scoring time. Each slice keeps
n, the summed logloss and an `ExactAUC` with a smaller exact budget than the overall one
(a long run bins its scores at 1e-3 in logit space: bounded memory, error < 1e-3 in
practice); all of it goes through checkpoints with the rest of the metrics.

The counts are exact per id (the model's counters are hashed into shared buckets and
collide): ids are hashed to 64 bits (blake2b, stable across processes; a collision
among 10^8 ids has probability ~3e-4) and counted in a numpy open-addressing table,
~24-48 bytes per distinct id, every batch in a few vectorised passes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.metrics import ExactAUC, logloss_from_logits

# Bucket lower edges of the evidence slices: [0], [1, 4], [5, 49], [50, inf).
EVIDENCE_EDGES = (1, 5, 50)
EVIDENCE_BUCKETS = ("0", "1-4", "5-49", "50+")
HISTORY_BUCKETS = ("short", "long")
SLICES = {
    "item_evidence": EVIDENCE_BUCKETS,
    "user_evidence": EVIDENCE_BUCKETS,
    "user_history": HISTORY_BUCKETS,
}

_EMPTY = np.uint64(0)  # the table's free-slot key (a hash of 0 is stored as 1)


def evidence_bucket(counts: np.ndarray) -> np.ndarray:
    """(B,) earlier-event counts -> (B,) index into EVIDENCE_BUCKETS."""
    return np.searchsorted(np.asarray(EVIDENCE_EDGES), counts, side="right")


def history_bucket(user_counts: np.ndarray, history_length: int) -> np.ndarray:
    """(B,) earlier events of the user -> 0 (short: the window is not full) or 1 (long)."""
    return (np.asarray(user_counts) >= history_length).astype(np.int64)


class IdHasher64:
    """str ids -> nonzero uint64 (blake2b, 8 bytes), memoised in a bounded dict."""

    def __init__(self, cache_size: int = 1 << 18) -> None:
        self.cache: dict[str, int] = {}
        self.cache_size = cache_size

    def one(self, s: str) -> int:
        h = self.cache.get(s)
        if h is None:
            if len(self.cache) >= self.cache_size:
                self.cache.clear()
            digest = hashlib.blake2b(str(s).encode("utf-8", "surrogatepass"), digest_size=8).digest()
            h = int.from_bytes(digest, "little") or 1
            self.cache[s] = h
        return h

    def many(self, ids: np.ndarray) -> np.ndarray:
        flat = list(ids)
        out = list(map(self.cache.get, flat))
        if None in out:
            out = [self.one(x) if h is None else h for x, h in zip(flat, out)]
        return np.array(out, dtype=np.uint64)


class EvidenceCounter:
    """Exact event counts per 64-bit key: an open-addressing table (linear probing, load
    <= 1/2, doubled when fuller) of uint64 keys and uint32 counts saturating at
    `saturate_at`. `count_then_add` is the only update: what each row had before it."""

    def __init__(self, capacity: int = 1 << 12, saturate_at: int = 2**32 - 1) -> None:
        if capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two, got {capacity}")
        if not 0 < saturate_at <= 2**32 - 1:
            raise ValueError(f"saturate_at must be in [1, 2**32 - 1], got {saturate_at}")
        self.saturate_at = saturate_at
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.counts = np.zeros(capacity, dtype=np.uint32)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def _slots(self, keys: np.ndarray, insert: bool) -> np.ndarray:
        """Table positions of distinct nonzero `keys` (-1: absent), inserted when asked.
        Every pending key probes one position per pass; keys that find the same free slot
        in one pass: the first takes it, the others probe on."""
        mask = np.uint64(len(self.keys) - 1)
        pos = (keys & mask).astype(np.int64)
        slot = np.full(len(keys), -1, dtype=np.int64)
        pending = np.arange(len(keys))
        while len(pending):
            p = pos[pending]
            held = self.keys[p]
            done = held == keys[pending]
            slot[pending[done]] = p[done]
            free = held == _EMPTY
            if insert and free.any():
                fi = np.flatnonzero(free)
                taken, first = np.unique(p[fi], return_index=True)
                won = fi[first]
                self.keys[taken] = keys[pending[won]]
                slot[pending[won]] = taken
                self.size += len(taken)
                done[won] = True  # the losers stay: next pass they find the slot taken
            elif not insert:
                done |= free  # absent
            move = ~done & ~free  # held by another key: the next position
            pos[pending[move]] = (p[move] + 1) & int(mask)
            pending = pending[~done]
        return slot

    def _reserve(self, extra: int) -> None:
        if 2 * (self.size + extra) <= len(self.keys):
            return
        cap = len(self.keys)
        while 2 * (self.size + extra) > cap:
            cap *= 2
        occupied = self.keys != _EMPTY
        keys, counts = self.keys[occupied], self.counts[occupied]
        self.keys = np.zeros(cap, dtype=np.uint64)
        self.counts = np.zeros(cap, dtype=np.uint32)
        self.size = 0
        self.counts[self._slots(keys, insert=True)] = counts

    def get(self, keys: np.ndarray) -> np.ndarray:
        """(B,) keys -> (B,) int64 counts (0 for keys never added); no change."""
        uniq, inv = np.unique(np.asarray(keys, dtype=np.uint64), return_inverse=True)
        slot = self._slots(uniq, insert=False)
        out = np.where(slot >= 0, self.counts[np.maximum(slot, 0)], 0).astype(np.int64)
        return out[inv]

    def count_then_add(self, keys: np.ndarray) -> np.ndarray:
        """(B,) keys in stream order -> (B,) int64: for each row, the events of its key
        before it (the table's count plus earlier rows of this batch), then all B added."""
        keys = np.asarray(keys, dtype=np.uint64)
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int64)
        uniq, inv, n_in_batch = np.unique(keys, return_inverse=True, return_counts=True)
        self._reserve(len(uniq))
        slot = self._slots(uniq, insert=True)
        before = self.counts[slot].astype(np.int64)
        # Rank of each row among the rows of its key in this batch (stable: stream order).
        order = np.argsort(inv, kind="stable")
        run_start = np.cumsum(n_in_batch) - n_in_batch
        rank = np.empty(len(keys), dtype=np.int64)
        rank[order] = np.arange(len(keys)) - np.repeat(run_start, n_in_batch)
        cap = self.saturate_at
        self.counts[slot] = np.minimum(before + n_in_batch, cap).astype(np.uint32)
        return np.minimum(before[inv] + rank, cap)

    def export_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Entries in key order: equal counts export equal arrays, whatever the table layout."""
        occupied = np.flatnonzero(self.keys != _EMPTY)
        occupied = occupied[np.argsort(self.keys[occupied])]
        arrays = {
            "keys": self.keys[occupied].view(np.int64),
            "counts": self.counts[occupied].astype(np.int64),
        }
        return arrays, {"saturate_at": self.saturate_at}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> EvidenceCounter:
        keys = np.asarray(arrays["keys"], dtype=np.int64).view(np.uint64)
        out = cls(saturate_at=int(meta["saturate_at"]))
        out._reserve(len(keys))
        out.counts[out._slots(keys, insert=True)] = np.asarray(arrays["counts"]).astype(np.uint32)
        return out


@dataclass(frozen=True)
class Evidence:
    """Per scored event: earlier events of its item and of its user (stream order)."""

    item: np.ndarray  # (B,) int64
    user: np.ndarray  # (B,) int64


class _Slice:
    """n, summed logloss and a bounded exact AUC of the like events of one slice."""

    def __init__(self) -> None:
        # A smaller exact budget than the overall AUC's: ten of these live beside it.
        self.auc = ExactAUC(max_distinct=1 << 18)
        self.n = 0
        self.sum_logloss = 0.0

    def update(self, z: np.ndarray, y: np.ndarray) -> None:
        self.auc.update(z, y)
        self.n += len(z)
        self.sum_logloss += float(logloss_from_logits(z, y).sum())

    def summary(self) -> dict[str, Any]:
        auc = self.auc.value() if self.n else float("nan")
        return {
            "n": self.n,
            "auc.like": None if np.isnan(auc) else auc,
            "logloss.like": self.sum_logloss / self.n if self.n else None,
        }


class EvidenceSlices:
    """Evidence counts per item and user, and the like metrics of every slice."""

    def __init__(self, history_length: int, saturate_at: int = 2**32 - 1) -> None:
        self.history_length = history_length
        self.hasher = IdHasher64()
        self.items = EvidenceCounter(saturate_at=saturate_at)
        self.users = EvidenceCounter(saturate_at=saturate_at)
        self.slices = {name: {b: _Slice() for b in buckets} for name, buckets in SLICES.items()}

    def update(
        self, like_logit: np.ndarray, like_label: np.ndarray, user_id: np.ndarray, item_id: np.ndarray
    ) -> Evidence:
        """Count every event of the batch (labelled or not) and add the like events to
        their slices; returns each event's evidence as read before it."""
        ev = Evidence(
            item=self.items.count_then_add(self._keys(item_id)),
            user=self.users.count_then_add(self._keys(user_id)),
        )
        ok = ~np.isnan(like_label)
        if ok.any():
            z, y = np.asarray(like_logit, dtype=np.float32)[ok], like_label[ok]
            buckets = {
                "item_evidence": evidence_bucket(ev.item[ok]),
                "user_evidence": evidence_bucket(ev.user[ok]),
                "user_history": history_bucket(ev.user[ok], self.history_length),
            }
            for name, idx in buckets.items():
                for b, sl in enumerate(self.slices[name].values()):
                    hit = idx == b
                    if hit.any():
                        sl.update(z[hit], y[hit])
        return ev

    def _keys(self, ids: np.ndarray) -> np.ndarray:
        """String ids -> their blake2b keys; integer ids (models.ids keys, what the trainer
        passes: nothing to hash) as they are, 0 moved to 1 (0 marks a free slot)."""
        if np.issubdtype(np.asarray(ids).dtype, np.integer):
            keys = np.asarray(ids).astype(np.uint64)
            return np.where(keys == 0, np.uint64(1), keys)
        return self.hasher.many(ids)

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{slice: {bucket: {"n", "auc.like", "logloss.like"}}}; None where undefined."""
        return {name: {b: sl.summary() for b, sl in per.items()} for name, per in self.slices.items()}

    # Save / load: arrays for safetensors, scalars for JSON.
    def export_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"history_length": self.history_length, "slices": {}}
        for who, counter in (("items", self.items), ("users", self.users)):
            a, meta[who] = counter.export_state()
            arrays.update({f"{who}.{k}": v for k, v in a.items()})
        for name, per in self.slices.items():
            for b, sl in per.items():
                arrays.update({f"{name}.{b}.auc.{k}": v for k, v in sl.auc.state().items()})
                meta["slices"][f"{name}.{b}"] = [sl.n, sl.sum_logloss]
        return arrays, meta

    def import_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        def take(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

        self.history_length = int(meta["history_length"])
        self.items = EvidenceCounter.from_state(take("items."), meta["items"])
        self.users = EvidenceCounter.from_state(take("users."), meta["users"])
        for name, per in self.slices.items():
            for b, sl in per.items():
                sl.auc.load(take(f"{name}.{b}.auc."))
                sl.n, sl.sum_logloss = meta["slices"][f"{name}.{b}"]
