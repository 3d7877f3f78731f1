"""A servable model version: a `RankingState` rebuilt from a snapshot chain, read-only.

`ServedModel` holds the model state alone (no optimizer, no RNG, no process-wide torch
setting): it loads a chain's full snapshot and applies its deltas
(`RankingState.load_full` / `apply_delta`), and answers rank requests, computing the
user side once per request (UG-Sep) and scoring all candidates against it. What a
snapshot contains is the model state's business (models/state.py); the store's layout
is stream/snapshots/store.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from memory_bank.base import DeltaState, FullState
from models.config import ModelConfig
from models.ranker import CandidateInputs
from models.state import RankingState
from stream.errors import MemstreamError
from stream.ingest.events import EventBatch
from stream.snapshots.store import SnapshotChain


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


class NonFiniteScores(MemstreamError):
    """The model version gives a NaN or infinite score: the version is broken, not the
    request (a request's numbers are checked finite, and the features' transform maps
    every finite number to a finite value: signed_log, at most ~710 in magnitude)."""

    def __init__(self, version: int, item_ids: list[str]):
        shown = ", ".join(repr(i) for i in item_ids[:5]) + (
            f" and {len(item_ids) - 5} more" if len(item_ids) > 5 else ""
        )
        super().__init__(
            f"the model version {version} gives non-finite scores (for {len(item_ids)} "
            f"candidate(s): {shown}); publish or pin a healthy version"
        )
        self.version = version
        self.item_ids = item_ids


class ServedModel:
    """One model version, used read-only."""

    def __init__(self, chain: SnapshotChain, device: str = "cpu"):
        cfg = ModelConfig.model_validate(chain.manifest["model_config"])
        self.state = RankingState(cfg, device)
        self.state.ranker.eval()
        # A request never changes the model: new feature names are the trainer's to admit.
        self.state.features.admitting = False
        self.version = -1
        self._lock = threading.Lock()  # features.build mutates hash caches
        self.load_chain(chain)

    def fits(self, chain: SnapshotChain) -> bool:
        """Whether `chain` was written by a model of this one's config (load_chain in place)."""
        return ModelConfig.model_validate(chain.manifest["model_config"]) == self.state.cfg

    def load_chain(self, chain: SnapshotChain) -> None:
        """Become `chain`'s version in place: its full snapshot, then its deltas."""
        self._load_full(chain.full)
        for v, d in zip(chain.versions[1:], chain.deltas):
            self.apply_delta(d, v)
        self.version = chain.version

    def _load_full(self, full: FullState) -> None:
        self.state.load_full(full)

    def apply_delta(self, delta: DeltaState, version: int) -> None:
        self.state.apply_delta(delta)
        self.version = version

    # The request as a batch of N rows (one per candidate) sharing the user's fields.
    def _as_batch(self, req: RankRequest) -> EventBatch:
        n = len(req.candidates)
        obj = lambda v: np.array([v] * n, dtype=object)
        cat = {k: obj(v) for k, v in req.user_features.items() if isinstance(v, str)}
        num = {k: np.full(n, float(v)) for k, v in req.user_features.items() if not isinstance(v, str)}
        return EventBatch(
            event_id=obj(""),
            ts_ms=np.full(n, int(time.time() * 1000), dtype=np.int64),
            user_id=obj(req.user_id),
            item_id=np.array([c.item_id for c in req.candidates], dtype=object),
            scenario=obj(req.scenario),
            item_text=np.array([c.item_text for c in req.candidates], dtype=object),
            query=obj(req.query),
            user_cat=cat,
            user_num=num,
        )

    @torch.no_grad()
    def rank(self, req: RankRequest, reuse_user_side: bool = True) -> dict[str, Any]:
        st = self.state
        batch = self._as_batch(req)
        n = len(batch)
        codes = batch.id_codes()
        with self._lock:
            feats = st.features.build(batch, in_batch=False)  # candidates, not events
            hist = st.history.get(codes.user_key[:1])  # (1, L): the user side once
        # (N, Db) bank rows; unseen items with text are encoded now (cold start)
        target_vec = None if st.bank is None else st.target_vectors(codes.item_key, batch.item_text)
        u, c = st.model_inputs(feats, hist, target_vec, user_rows=slice(0, 1))
        m = st.ranker
        if reuse_user_side:
            scores = m.score_candidates(m.encode_user(u).expand(n), c)
        else:  # the baseline the benchmark compares with: user side once per candidate
            rows = []
            for i in range(n):
                ci = CandidateInputs(
                    **{f.name: None if (x := getattr(c, f.name)) is None else x[i : i + 1] for f in fields(c)}
                )
                rows.append(m.score_candidates(m.encode_user(u), ci))
            scores = type(rows[0])(
                torch.cat([r.like_logit for r in rows]), torch.cat([r.rating for r in rows])
            )
        bad = ~(torch.isfinite(scores.like_logit) & torch.isfinite(scores.rating))
        if bad.any():
            raise NonFiniteScores(
                self.version, [req.candidates[i].item_id for i in bad.nonzero()[:, 0].tolist()]
            )
        return {
            "version": self.version,
            "scores": {
                "like": torch.sigmoid(scores.like_logit).cpu().tolist(),
                "rating": scores.rating.cpu().tolist(),
            },
            "item_ids": [c.item_id for c in req.candidates],
        }
