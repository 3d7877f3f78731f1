"""Snapshot content <-> a servable model, on both sides of the snapshot store.

Trainer side: `full_snapshot(trainer)` and `delta_snapshot(trainer, counters)`
turn an OnlineTrainer's state into the store's FullState / DeltaState:
  dense       every dense tensor (full each version: small, changes every step)
  embeddings  id tables (full, or the rows the sparse optimizer touched)
  bank, history, lmn/pkm values   each memory's export_state / take_delta
  features    online counters (full, or the rows that changed)
Serving side: `ServedModel` rebuilds a model from a chain and answers rank
requests, computing the user side once per request (UG-Sep) and scoring all
candidates against it.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from memory_bank.base import MemoryDelta
from models.config import ModelConfig, TrainerConfig
from models.online import WORD_TABLE, OnlineTrainer
from models.ranker import CandidateInputs
from stream.events import EventBatch
from stream.snapshots import DeltaState, FullState, SnapshotChain

EMBEDDING_TABLES = ("user_emb", "item_emb", "cat_emb", "text_emb", "user_bias", "item_bias")


# -- trainer side ------------------------------------------------------------------------------


class CounterTracker:
    """Rows of the feature builder's state (online counters, affinity tables) changed
    since the previous snapshot: the builder marks the rows its updates touch; the
    tracker starts from a clean slate at a full snapshot."""

    def __init__(self, trainer: OnlineTrainer):
        self._trainer = trainer
        trainer.features.take_touched()  # the full snapshot has everything up to now

    def take_delta(self) -> MemoryDelta:
        arrays, meta = self._trainer.features.export_state()
        touched = self._trainer.features.take_touched()
        d = MemoryDelta(ids={"meta": [json.dumps(meta, sort_keys=True)]})
        for k, v in arrays.items():
            cur = _as_rows(v)
            rows = touched[k]
            d.tables[k] = (rows, torch.from_numpy(np.ascontiguousarray(cur[rows])))
        return d


def _as_rows(a: np.ndarray) -> np.ndarray:
    """A 1-D state array is one row; tables keep their rows."""
    return a.reshape(1, -1) if a.ndim == 1 else a


def apply_feature_delta(features, delta: MemoryDelta) -> None:
    arrays, _ = features.export_state()  # the live arrays themselves
    for k, (rows, vals) in delta.tables.items():
        target = _as_rows(arrays[k])  # a view: writes land in the live array
        target[rows] = vals.numpy()
    if delta.ids.get("meta"):
        meta = json.loads(delta.ids["meta"][0])
        features.cat_slots = dict(meta["cat_slots"])
        features.num_slots = dict(meta["num_slots"])
        features.dropped_features = set(meta["dropped"])


def snapshot_meta(trainer: OnlineTrainer) -> dict[str, Any]:
    return {
        "model_config": trainer.cfg.model_dump(mode="json"),
        "train_step": trainer.steps,
        "events_applied": trainer.events_applied,
        "offsets": {str(p): o + 1 for p, o in trainer.max_offset.items()},
    }


def serving_dense_state(trainer: OnlineTrainer, word_table: bool = True) -> dict[str, torch.Tensor]:
    """Dense tensors serving reads: the model's persistent state (not usage statistics
    such as hit counters or query reservoirs) and the doc encoder (cold-start items);
    deltas leave out the encoder's word table (its touched rows travel as a memory)."""
    persistent = trainer.model.state_dict().keys()
    dense = trainer.dense_state(word_table=word_table)
    out = {k: v for k, v in dense.items() if k in persistent or k.startswith("encoder.")}
    if trainer.bank is not None:  # the learned vector unknown items read; trained every step
        out["bank.missing"] = trainer.bank.missing.detach().cpu().clone()
    return out


def full_snapshot(trainer: OnlineTrainer) -> FullState:
    m = trainer.model
    dense = serving_dense_state(trainer)
    tables = {n: getattr(m, n).weight.detach().cpu().clone() for n in EMBEDDING_TABLES}
    memories: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {
        "embeddings": (tables, {}),
        "history": trainer.history.export_state(),
    }
    arrays, fmeta = trainer.features.export_state()
    memories["features"] = ({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, fmeta)
    if trainer.bank is not None:
        memories["bank"] = trainer.bank.export_state()
    for name in ("lmn", "pkm"):
        mem = getattr(m, name)
        if mem is not None:
            memories[name] = mem.export_state()
    # A full snapshot restarts delta tracking: drain whatever was pending.
    trainer.take_deltas()
    return FullState(dense, memories)


def delta_snapshot(trainer: OnlineTrainer, counters: CounterTracker) -> DeltaState:
    memories = trainer.take_deltas()
    memories["features"] = counters.take_delta()
    dense = serving_dense_state(trainer, word_table=False)
    for name in ("lmn", "pkm"):
        # A memory's delta carries its small dense tensors (query net, keys) whole so it
        # stands alone; here the dense state already has them: ship them once.
        if name in memories:
            tables = memories[name].tables
            shipped = [k[len(name) + 1:] for k in dense if k.startswith(name + ".")]  # e.g. memory.base_keys
            for table in [t for t in tables if any(k == t or k.endswith("." + t) for k in shipped)]:
                del tables[table]
    return DeltaState(dense, memories)


# -- serving side ------------------------------------------------------------------------------


class RankCandidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(..., min_length=1, max_length=256)
    item_text: str | None = Field(None, max_length=4096)


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(..., min_length=1, max_length=256)
    user_features: dict[str, str | float] = Field(default_factory=dict, max_length=64)
    scenario: str = Field("feed", min_length=1, max_length=128)
    query: str | None = Field(None, max_length=4096)
    candidates: list[RankCandidate] = Field(..., min_length=1, max_length=10_000)

    @field_validator("user_features")
    @classmethod
    def _finite(cls, v: dict[str, str | float]) -> dict[str, str | float]:
        for k, x in v.items():
            if not isinstance(x, str) and not np.isfinite(x):
                raise ValueError(f"user_features.{k} must be finite")
        return v


class ServedModel:
    """One model version: an OnlineTrainer's model and memories, used read-only."""

    def __init__(self, chain: SnapshotChain, device: str = "cpu", threads: int = 1):
        cfg = ModelConfig.model_validate(chain.manifest["model_config"])
        self.trainer = OnlineTrainer(cfg, TrainerConfig(device=device, threads=threads, keep_score_log=False))
        self.trainer.model.eval()
        self.version = -1
        self._lock = threading.Lock()  # features.build mutates hash caches
        self.load_chain(chain)

    def fits(self, chain: SnapshotChain) -> bool:
        """Whether `chain` was written by a model of this one's config (load_chain in place)."""
        return ModelConfig.model_validate(chain.manifest["model_config"]) == self.trainer.cfg

    def load_chain(self, chain: SnapshotChain) -> None:
        """Become `chain`'s version in place: its full snapshot, then its deltas."""
        self._load_full(chain.full)
        for v, d in zip(chain.versions[1:], chain.deltas):
            self.apply_delta(d, v)
        self.version = chain.version

    def _load_full(self, full: FullState) -> None:
        t, m = self.trainer, self.trainer.model
        self._load_dense(full.dense)
        with torch.no_grad():
            for name, w in full.memories["embeddings"][0].items():
                getattr(m, name).weight.copy_(w)
        t.history.import_state(*full.memories["history"])
        arrays, fmeta = full.memories["features"]
        t.features.import_state({k: v.numpy() for k, v in arrays.items()}, fmeta)
        if t.bank is not None:
            t.bank.import_state(*full.memories["bank"])
        for name in ("lmn", "pkm"):
            mem = getattr(m, name)
            if mem is not None:
                mem.import_state(*full.memories[name])

    def _load_dense(self, dense: dict[str, torch.Tensor], delta: bool = False) -> None:
        t = self.trainer
        model_sd = {k: v for k, v in dense.items() if not k.startswith(("encoder.", "bank."))}
        missing, unexpected = t.model.load_state_dict(model_sd, strict=False)
        if unexpected:
            raise ValueError(f"snapshot has tensors this model does not: {unexpected[:5]}")
        if t.encoder is not None:
            enc = {k[len("encoder."):]: v for k, v in dense.items() if k.startswith("encoder.")}
            missing, unexpected = t.encoder.load_state_dict(enc, strict=False)
            allowed = {WORD_TABLE[len("encoder."):]} if delta else set()
            if unexpected or set(missing) - allowed:
                raise ValueError(f"snapshot's doc encoder does not fit: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        if t.bank is not None and "bank.missing" in dense:
            with torch.no_grad():
                t.bank.missing.copy_(dense["bank.missing"])

    def apply_delta(self, delta: DeltaState, version: int) -> None:
        t, m = self.trainer, self.trainer.model
        self._load_dense(delta.dense, delta=True)
        mems = delta.memories
        with torch.no_grad():
            for name, (rows, vals) in mems.get("embeddings", MemoryDelta()).tables.items():
                w = getattr(m, name).weight
                w.index_copy_(0, torch.from_numpy(rows).to(w.device), vals.to(w))
            for name, (rows, vals) in mems.get("encoder_words", MemoryDelta()).tables.items():
                w = t.encoder.get_parameter(name[len("encoder."):])
                w.index_copy_(0, torch.from_numpy(rows).to(w.device), vals.to(w))
        if "history" in mems:
            t.history.apply_delta(mems["history"])
        if "features" in mems:
            apply_feature_delta(t.features, mems["features"])
        if t.bank is not None and "bank" in mems:
            t.bank.apply_delta(mems["bank"])
        for name in ("lmn", "pkm"):
            mem = getattr(m, name)
            if mem is not None and name in mems:
                mem.apply_delta(mems[name])
        self.version = version

    # The request as a batch of N rows (one per candidate) sharing the user's fields.
    def _as_batch(self, req: RankRequest) -> EventBatch:
        n = len(req.candidates)
        obj = lambda v: np.array([v] * n, dtype=object)  # noqa: E731
        cat = {k: obj(v) for k, v in req.user_features.items() if isinstance(v, str)}
        num = {k: np.full(n, float(v)) for k, v in req.user_features.items() if not isinstance(v, str)}
        return EventBatch(
            event_id=obj(""), ts_ms=np.full(n, int(time.time() * 1000), dtype=np.int64),
            user_id=obj(req.user_id), item_id=np.array([c.item_id for c in req.candidates], dtype=object),
            scenario=obj(req.scenario), item_text=np.array([c.item_text for c in req.candidates], dtype=object),
            query=obj(req.query), user_cat=cat, user_num=num,
        )

    @torch.no_grad()
    def rank(self, req: RankRequest, reuse_user_side: bool = True) -> dict[str, Any]:
        t = self.trainer
        batch = self._as_batch(req)
        n = len(batch)
        with self._lock:
            feats = t.features.build(batch)
            hist = t.history.get(batch.user_id[:1])  # (1, L): the user side once
        target_vec = None if t.bank is None else self._candidate_vectors(batch)  # (N, Db)
        u, c = t.model_inputs(feats, hist.item_ids, hist.signal, hist.mask, target_vec, user_rows=slice(0, 1))
        m = t.model
        if reuse_user_side:
            scores = m.score_candidates(m.encode_user(u).expand(n), c)
        else:  # the baseline the benchmark compares with: user side once per candidate
            rows = []
            for i in range(n):
                ci = CandidateInputs(*(None if x is None else x[i : i + 1] for x in
                                       (c.item_idx, c.text_idx, c.counters, c.target_vec)))
                rows.append(m.score_candidates(m.encode_user(u), ci))
            scores = type(rows[0])(torch.cat([r.like_logit for r in rows]), torch.cat([r.rating for r in rows]))
        return {
            "version": self.version,
            "scores": {
                "like": torch.sigmoid(scores.like_logit).cpu().tolist(),
                "rating": scores.rating.cpu().tolist(),
            },
            "item_ids": [c.item_id for c in req.candidates],
        }

    def _candidate_vectors(self, batch: EventBatch) -> torch.Tensor:
        """Bank rows of the candidates; unseen items with text are encoded now (cold start)."""
        t = self.trainer
        bank = t.bank
        rows = bank.rows_of(batch.item_id)  # read-only: serving does not reorder the bank's LRU
        rows_t = torch.from_numpy(rows).to(bank.bank.device)
        vec = torch.where((rows_t >= 0).unsqueeze(1), bank.bank.index_select(0, rows_t.clamp(min=0)), bank.missing)
        cold = [i for i in np.flatnonzero(rows < 0).tolist() if batch.item_text[i]]
        if cold:
            fresh = t.encoder([batch.item_text[i] for i in cold])
            vec = vec.index_put((torch.tensor(cold, device=vec.device),), fresh)
        return vec
