"""Snapshot publishing and the serving ledger (what each replica runs, freshness).

The trainer hands each snapshot's content (dense weights, memory rows, and the
Kafka timestamps of the events the version newly includes) to the publisher,
which writes it to the store off the training thread. Replicas report back when
they activate or refuse a version; the first activation of version v makes
every event included up to v "live", and its freshness is that moment minus
the event's Kafka timestamp (README, "Snapshots and checkpoints").
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from memory_bank.base import DeltaState, FullState
from stream.messages import ServingEvent
from stream.snapshots.store import SnapshotError, SnapshotStore
from stream.train.health import HealthGateConfig


class SnapshotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Empty = <work_dir>/snapshots. Any pyarrow filesystem URI (s3://, gs://, hdfs://).
    uri: str = ""
    # The largest term of freshness: an event waits up to one interval for its version.
    # 0.5 s: freshness p99 under the pipeline benchmark's /rank load 1.5 s against 2.2-2.6
    # s at 1 s (benchmarks/results/pipeline_cpu.md); a deployment writing to an object
    # store sets it higher (configs/prod.example.yaml: 5 s).
    interval_s: float = Field(0.5, gt=0)
    # A base (full copy, written beside the delta) every K versions: replicas that start
    # load the newest base + the deltas after it; live ones only ever read deltas.
    # 40 x 0.5 s: a base every 20 s, as 20 x 1 s before.
    full_every: int = Field(40, ge=1)
    keep_versions: int = Field(100, ge=1)  # 50 s of versions at 0.5 s
    # What a version must pass before serving gets it (stream/train/health.py).
    health: HealthGateConfig = Field(default_factory=HealthGateConfig)


_MAX_VERSIONS_KEPT = 10_000  # first activations remembered (a day of 1 s versions is 86k)
_MAX_VERSIONS_PENDING = 1_000  # versions waiting for a first activation
# ... and the events they hold (16 bytes each: Kafka and trained timestamps). A bound in
# versions alone is no bound in memory: with serving off nothing is activated, and the
# 30-minute soak's publisher held every event of the run (1,000 versions of ~4,000
# events, 78 MB more after the warm-up). 1M events is 16 MB; the freshness of a replica
# further behind than that is not measured (its events count as never activated).
_MAX_EVENTS_PENDING = 1_000_000


class FreshnessLedger:
    """Pending versions' event timestamps until a replica activates them.

    Besides the end-to-end figure, the freshness of each steady-state event is split
    into legs, so a slow tail can be pinned on its cause: `train` (Kafka -> its unit trained: fetch,
    reader queue, training), `tick` (trained -> the snapshot that includes it was cut:
    the snapshot interval, or a publish still in flight), `write` (cut -> written to
    the store) and `swap` (written -> first activation by a replica).
    """

    LEGS = ("train", "tick", "write", "swap")

    def __init__(self, max_samples: int = 2_000_000, max_pending_events: int = _MAX_EVENTS_PENDING):
        # version -> (kafka ts (s), trained at (s) or None, cut at (s) or None)
        self._pending: dict[int, tuple[np.ndarray, np.ndarray | None, float | None]] = {}
        self._pending_events = 0  # events held in _pending
        self._max_pending_events = max_pending_events
        self._written_at: dict[int, float] = {}
        self._samples: list[np.ndarray] = []
        self._legs: list[np.ndarray] = []  # (n, 4) per activated version, when known
        self._count = 0
        self._max = max_samples
        self.first_activation: dict[int, float] = {}
        self._first_live_s: float | None = None
        self._steady: list[np.ndarray] = []
        # The first leg alone (event -> its version written to the store): separates a
        # trainer that lags the topic from replicas that are slow to swap.
        self._published: list[np.ndarray] = []
        self._published_count = 0
        self.never_activated = 0  # events of versions dropped before any replica went live on them

    def add_version(
        self,
        version: int,
        event_ts_ms: np.ndarray,
        trained_at_s: np.ndarray | None = None,
        cut_at_s: float | None = None,
    ) -> None:
        ts = np.asarray(event_ts_ms, dtype=np.int64)
        keep = ts > 0  # 0 = no Kafka timestamp
        trained = None if trained_at_s is None else np.asarray(trained_at_s, np.float64)[keep]
        self._pending[version] = (ts[keep] / 1000.0, trained, cut_at_s)
        self._pending_events += int(keep.sum())
        # Versions no replica ever activates (serving off, or every replica refusing) must
        # not pile up: past either bound the oldest are dropped, counted as never activated
        # (the newest version is always kept: a replica may still activate it).
        while len(self._pending) > _MAX_VERSIONS_PENDING or (
            self._pending_events > self._max_pending_events and len(self._pending) > 1
        ):
            old = min(self._pending)
            dropped = len(self._pending.pop(old)[0])
            self._pending_events -= dropped
            self.never_activated += dropped
            self._written_at.pop(old, None)

    def written(self, version: int, at_s: float) -> None:
        pending = self._pending.get(version)
        if pending is None:
            return
        self._written_at[version] = at_s
        if len(pending[0]) and self._published_count < self._max:
            self._published.append(at_s - pending[0])
            self._published_count += len(pending[0])

    def activated(self, version: int, at_s: float) -> None:
        live = [v for v in self._pending if v <= version]
        for v in sorted(live):
            ts, trained, cut = self._pending.pop(v)
            self._pending_events -= len(ts)
            written = self._written_at.pop(v, None)
            if v not in self.first_activation:
                self.first_activation[v] = at_s
                if len(self.first_activation) > _MAX_VERSIONS_KEPT:  # one per version: bounded
                    del self.first_activation[min(self.first_activation)]
            if self._first_live_s is None:  # serving is live from here (even on a version
                self._first_live_s = at_s  # with no events yet: the state a job starts from)
            if not len(ts) or self._count >= self._max:
                continue
            self._samples.append(at_s - ts)
            self._count += len(ts)
            # Steady state: events produced once serving was live. The ones before it
            # waited for the job's start-up (replicas loading their first version).
            steady = ts >= self._first_live_s
            if not steady.any():
                continue
            self._steady.append(at_s - ts[steady])
            if trained is not None and cut is not None and written is not None:
                ts, trained = ts[steady], trained[steady]
                self._legs.append(
                    np.stack(
                        [
                            trained - ts,
                            cut - trained,
                            np.full_like(ts, written - cut),
                            np.full_like(ts, at_s - written),
                        ],
                        axis=1,
                    )
                )  # (n, 4)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": 0, "p50_s": None, "p99_s": None}
        for prefix, chunks in (("", self._samples), ("steady_", self._steady), ("written_", self._published)):
            s = np.concatenate(chunks) if chunks else np.empty(0)
            if len(s):
                out[f"{prefix}count"] = len(s)
                out[f"{prefix}p50_s"] = float(np.percentile(s, 50))
                out[f"{prefix}p99_s"] = float(np.percentile(s, 99))
                if not prefix:
                    out["max_s"] = float(s.max())
        if self._legs:
            legs = np.concatenate(self._legs)  # (n, 4)
            total = legs.sum(axis=1)
            tail = legs[total >= np.percentile(total, 99)]
            out["legs"] = {
                name: {
                    "p50_s": float(np.percentile(legs[:, i], 50)),
                    "p99_s": float(np.percentile(legs[:, i], 99)),
                    "tail_mean_s": float(tail[:, i].mean()),
                }  # mean over the slowest 1%
                for i, name in enumerate(self.LEGS)
            }
        return out

    def samples(self) -> np.ndarray:
        return np.concatenate(self._samples) if self._samples else np.empty(0)


@dataclass(frozen=True)
class StoredChanges:
    """What the stored versions after `since` changed, up to `latest` (a restarted trainer
    re-marks these rows so that its first version is a delta on `latest`, see
    TrainerService.resume_chain): per memory, the rows of each table (the bank's and the
    histories' freed rows are a table too)."""

    since: int
    latest: int
    rows: dict[str, dict[str, np.ndarray]]  # memory -> table -> rows (sorted, unique)


def return_freed_buffers(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc's malloc give every block of `threshold_bytes` or more its own mapping,
    returned to the kernel when freed (Linux only). Returns whether it took effect.

    A publisher allocates a version's file buffers (safetensors and Parquet bytes: ~8 MB
    a delta, ~110 MB a base) on up to 8 call threads. glibc's threshold is dynamic: once a
    mapped block is freed it rises to that block's size (up to 32 MB), so the next ones
    come from the threads' arenas, whose freed space stays in the process, fragmented by
    the small blocks between them. Set explicitly, the threshold is fixed. Measured in one
    process (benchmarks/publisher_memory.py, benchmarks/results/soak_cpu.md "Publisher
    memory: the cause"): 740 MB of private memory, with steps of 65 MB, against 556 MB
    flat. The trainer wants the opposite (models/online.py keep_freed_memory_mapped): the
    setting is per process, so only a publisher that owns its process sets it.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, threshold_bytes))


class SnapshotPublisher:
    """Writes snapshots; keeps the per-replica serving state and freshness.

    `owns_process`: this publisher is its process's only tenant (the publisher actor):
    it sets the process's malloc to return freed buffers (`return_freed_buffers`)."""

    def __init__(self, uri: str, keep_versions: int, owns_process: bool = False):
        if owns_process:
            return_freed_buffers()
        self.store = SnapshotStore(uri, keep_versions=keep_versions)
        self.ledger = FreshnessLedger()
        self.replicas: dict[str, dict[str, Any]] = {}
        self.published = 0
        self.bases_written = 0
        self.base_failures = 0
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
        event_trained_s: np.ndarray | None = None,
    ) -> dict[str, Any]:
        t0 = time.time()
        with self._lock:
            self.ledger.add_version(version, event_ts_ms, event_trained_s, meta.get("cut_at"))
        if isinstance(state, FullState):
            manifest = self.store.publish_full(version, state, meta)
        else:
            assert parent is not None
            manifest = self.store.publish_delta(version, parent, state, meta)
        with self._lock:
            self.published += 1
            self.ledger.written(version, time.time())
        return {"version": version, "kind": manifest["kind"], "write_s": time.time() - t0}

    def changed_since(self, since: int) -> StoredChanges | str:
        """The rows the stored versions after `since` changed, or why a delta on the
        latest version cannot be built from them (a string: the caller publishes full).

        Possible only when `since` is stored and every version after it, up to LATEST, is
        a delta whose parent is the version before: then the rows changed between `since`
        and LATEST are exactly those the deltas list."""
        latest = self.store.latest_version()
        if latest is None:
            return "the store has no version"
        if latest < since:
            return f"the store's latest version {latest} is older than the checkpoint's {since}"
        rows: dict[str, dict[str, list[np.ndarray]]] = {}
        try:
            self.store.manifest(since)  # it must still be there (retention may have dropped it)
            for v in range(since + 1, latest + 1):
                m = self.store.manifest(v)
                if m["kind"] != "delta" or m.get("parent") != v - 1:
                    return f"version {v} is {m['kind']} (parent {m.get('parent')}), not a delta on {v - 1}"
                for mem, d in self.store.load_delta(v).memories.items():
                    for table, (r, _) in d.tables.items():
                        rows.setdefault(mem, {}).setdefault(table, []).append(r)
        except SnapshotError as e:
            return f"{type(e).__name__}: {e}"
        return StoredChanges(
            since=since,
            latest=latest,
            rows={
                mem: {t: np.unique(np.concatenate(rs)).astype(np.int64) for t, rs in tables.items()}
                for mem, tables in rows.items()
            },
        )

    def publish_base(self, version: int, state: FullState, meta: dict[str, Any]) -> dict[str, Any]:
        """Write the full copy of an already published delta version (off the serving path:
        the version is live before this starts)."""
        t0 = time.time()
        try:
            self.store.publish_base(version, state, meta)
        except Exception:
            with self._lock:
                self.base_failures += 1
            raise
        with self._lock:
            self.bases_written += 1
        return {"version": version, "kind": "base", "write_s": time.time() - t0}

    def report_serving(self, replica_id: str, event: ServingEvent) -> None:
        with self._lock:
            r = self.replicas.setdefault(replica_id, {"replica": replica_id, "version": None, "refusals": 0})
            r["last_report"] = event.at
            if event.kind == "activated":
                r["version"] = event.version
                r["activated_at"] = event.at
                self.ledger.activated(event.version, event.at)
            else:
                r["refusals"] += 1
                r["last_refusal"] = {"version": event.version, "reason": event.reason, "at": event.at}

    def sizes(self) -> dict[str, int]:
        """Entries of what grows with the stream (benchmarks/soak.py)."""
        with self._lock:
            led = self.ledger
            return {
                "freshness_samples": led._count,
                "freshness_pending_versions": len(led._pending),
                "freshness_pending_events": led._pending_events,
                # Event -> written delays: 8 bytes each up to the ledger's max_samples (16 MB).
                "freshness_written_samples": led._published_count,
                "first_activations": len(led.first_activation),
                "replicas": len(self.replicas),
            }

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
            out.append(
                {
                    "version": v,
                    "kind": m["kind"],
                    "parent": m.get("parent"),
                    "created_at": m.get("created_at"),
                    "train_step": m.get("train_step"),
                    "events_applied": m.get("events_applied"),
                    "bytes": sum(f["size"] for f in m["files"].values()),
                    "base": m["kind"] == "delta" and self.store.has_base(v),
                    "latest": v == latest,
                    "pinned": v == pinned,
                }
            )
        return out

    def pin(self, version: int | None) -> dict[str, Any]:
        self.store.set_pinned(version)
        return {"pinned": version}
