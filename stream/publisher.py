"""Snapshot publishing and the serving ledger (what each replica runs, freshness).

The trainer hands each snapshot's content (dense weights, memory rows, and the
Kafka timestamps of the events the version newly includes) to the publisher,
which writes it to the store off the training thread. Replicas report back when
they activate or refuse a version; the first activation of version v makes
every event included up to v "live", and its freshness is that moment minus
the event's Kafka timestamp (DESIGN section 7).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stream.snapshots import DeltaState, FullState, SnapshotStore


class SnapshotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Empty = <work_dir>/snapshots. Any pyarrow filesystem URI (s3://, gs://, hdfs://).
    uri: str = ""
    interval_s: float = Field(1.0, gt=0)
    full_every: int = Field(20, ge=1)  # a full snapshot every K versions, deltas between
    keep_versions: int = Field(50, ge=1)


class FreshnessLedger:
    """Pending versions' event timestamps until a replica activates them."""

    def __init__(self, max_samples: int = 2_000_000):
        self._pending: dict[int, np.ndarray] = {}  # version -> kafka ts (ms) of its new events
        self._samples: list[np.ndarray] = []
        self._count = 0
        self._max = max_samples
        self.first_activation: dict[int, float] = {}
        self._first_live_s: float | None = None
        self._steady: list[np.ndarray] = []
        # The first leg alone (event -> its version written to the store): separates a
        # trainer that lags the topic from replicas that are slow to swap.
        self._published: list[np.ndarray] = []
        self._published_count = 0

    def add_version(self, version: int, event_ts_ms: np.ndarray) -> None:
        self._pending[version] = np.asarray(event_ts_ms, dtype=np.int64)

    def written(self, version: int, at_s: float) -> None:
        ts = self._pending.get(version)
        if ts is not None and self._published_count < self._max:
            ts = ts[ts > 0]
            self._published.append(at_s - ts / 1000.0)
            self._published_count += len(ts)

    def activated(self, version: int, at_s: float) -> None:
        live = [v for v in self._pending if v <= version]
        for v in sorted(live):
            ts = self._pending.pop(v)
            ts = ts[ts > 0]
            self.first_activation.setdefault(v, at_s)
            if len(ts) and self._count < self._max:
                self._samples.append(at_s - ts / 1000.0)
                self._count += len(ts)
                if self._first_live_s is None:
                    self._first_live_s = at_s
                # Steady state: events produced once serving was live. The ones before it
                # waited for the job's start-up (replicas loading their first version).
                steady = ts / 1000.0 >= self._first_live_s
                if steady.any():
                    self._steady.append(at_s - ts[steady] / 1000.0)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": 0, "p50_s": None, "p99_s": None}
        for prefix, chunks in (("", self._samples), ("steady_", self._steady), ("written_", self._published)):
            if chunks:
                s = np.concatenate(chunks)
                out[f"{prefix}count"] = len(s)
                out[f"{prefix}p50_s"] = float(np.percentile(s, 50))
                out[f"{prefix}p99_s"] = float(np.percentile(s, 99))
                if not prefix:
                    out["max_s"] = float(s.max())
        return out

    def samples(self) -> np.ndarray:
        return np.concatenate(self._samples) if self._samples else np.empty(0)


class SnapshotPublisher:
    """Writes snapshots; keeps the per-replica serving state and freshness."""

    def __init__(self, uri: str, keep_versions: int):
        self.store = SnapshotStore(uri, keep_versions=keep_versions)
        self.ledger = FreshnessLedger()
        self.replicas: dict[str, dict[str, Any]] = {}
        self.published = 0
        self.failures = 0
        self._lock = threading.Lock()

    def latest_version(self) -> int | None:
        return self.store.latest_version()

    def publish(
        self,
        version: int,
        parent: int | None,
        state: FullState | DeltaState,
        meta: dict[str, Any],
        event_ts_ms: np.ndarray,
    ) -> dict[str, Any]:
        t0 = time.time()
        with self._lock:
            self.ledger.add_version(version, event_ts_ms)
        if isinstance(state, FullState):
            manifest = self.store.publish_full(version, state, meta)
        else:
            assert parent is not None
            manifest = self.store.publish_delta(version, parent, state, meta)
        with self._lock:
            self.published += 1
            self.ledger.written(version, time.time())
        return {"version": version, "kind": manifest["kind"], "write_s": time.time() - t0}

    def report_serving(self, replica_id: str, event: dict[str, Any]) -> None:
        with self._lock:
            r = self.replicas.setdefault(
                replica_id, {"replica": replica_id, "version": None, "refusals": 0}
            )
            r["last_report"] = event.get("at", time.time())
            if event["type"] == "activated":
                r["version"] = event["version"]
                r["activated_at"] = event["at"]
                self.ledger.activated(event["version"], event["at"])
            elif event["type"] == "refused":
                r["refusals"] += 1
                r["last_refusal"] = {k: event.get(k) for k in ("version", "reason", "at")}

    def serving_state(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.replicas.values()]

    def freshness(self) -> dict[str, Any]:
        with self._lock:
            return self.ledger.summary()

    def freshness_samples(self) -> np.ndarray:
        with self._lock:
            return self.ledger.samples()

    def snapshots(self) -> list[dict[str, Any]]:
        """Newest first: version, kind, parent, created_at, train step, latest/pinned flags."""
        latest, pinned = self.store.latest_version(), self.store.pinned_version()
        out = []
        for v in reversed(self.store.versions()):
            m = self.store.manifest(v)
            out.append({
                "version": v,
                "kind": m["kind"],
                "parent": m.get("parent"),
                "created_at": m.get("created_at"),
                "train_step": m.get("train_step"),
                "events_applied": m.get("events_applied"),
                "bytes": sum(f["size"] for f in m["files"].values()),
                "latest": v == latest,
                "pinned": v == pinned,
            })
        return out

    def pin(self, version: int | None) -> dict[str, Any]:
        self.store.set_pinned(version)
        return {"pinned": version}
