"""Every message that crosses a process boundary, as a frozen dataclass.

  IngestUnit       ingest actor -> trainer actor   (PartitionReader.next_batch)
  PoisonedEvent    trainer -> the dead-letter topic (an event whose step fails on its own)
  TrainerProgress  trainer actor -> driver, admin  (TrainerService.progress)
  ServingEvent     serving replica -> publisher    (a version activated or refused)
  RunReport        `memstream eval` and `memstream run` -> the user (the JSON report)

A field renamed on one side fails where the message is built or read, and
tests/stream/test_messages.py pins the JSON keys users and benchmarks read.
JSON has no NaN: `finite_or_none` is the one place a non-finite number becomes null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import pyarrow as pa


def finite_or_none(x: Any) -> Any:
    """A JSON-safe copy: numpy scalars and arrays as Python values, NaN/inf as None, recursively."""
    if isinstance(x, dict):
        return {str(k): finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    if isinstance(x, np.ndarray):
        return finite_or_none(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


@dataclass(frozen=True)
class DeadLettered:
    """A message the reader sent to the dead-letter topic, as the trainer counts it."""

    partition: int
    offset: int
    category: str


@dataclass(frozen=True)
class PoisonedEvent:
    """An event whose training step failed on its own (trainer -> the dead-letter topic)."""

    partition: int
    offset: int
    event: dict[str, Any]  # the decoded event as JSON (the Kafka bytes are not kept)
    error: str


@dataclass(frozen=True)
class IngestUnit:
    """Whole poll units of one reader: never split, so a trainer that applies all of it and
    then moves its offsets to `next_offsets` has applied every message below them once."""

    events: pa.Table  # valid events (EventBatch.to_arrow()), columnar: crosses Ray zero-copy
    rejects: tuple[DeadLettered, ...]
    next_offsets: dict[int, int]  # partition -> offset after the last message covered


@dataclass(frozen=True)
class ServingEvent:
    """What a serving replica tells the publisher: it went live on a version, or refused one."""

    kind: Literal["activated", "refused"]
    version: int | None
    at: float  # wall time (s)
    reason: str | None = None  # refusals only


@dataclass(frozen=True)
class TrainerProgress:
    """The trainer's account of its lineage (exactly-once bookkeeping) and of this incarnation."""

    events_applied: int
    steps: int
    rejects_applied: dict[str, int]
    duplicates_dropped: int
    next_offsets: dict[int, int]
    lineage: dict[int, list[int]]
    events_consumed: int  # Kafka positions: next offset minus the lineage's first, summed
    snapshot_version: int | None
    publish_failures: int
    checkpoint_failures: int
    checkpoints: dict[str, Any]  # CheckpointManager.health(): saves, failures, last durable, quarantined
    restored_from: int | None
    throughput_eps: float | None
    busy: dict[str, float]
    uptime_s: float
    metrics: dict[str, Any]  # JSON-safe summary of the streaming metrics
    health: dict[str, Any]  # the health gate's last verdict (stream/train/health.py)
    slices: dict[str, Any] = field(default_factory=dict)  # StreamingMetrics.slice_summary(), JSON-safe
    # RankingState.usage(): per memory its slot usage and KL from uniform over the last usage
    # window (pkm, lmn) or its coverage of history lookups and fill (bank), JSON-safe.
    memory_usage: dict[str, Any] = field(default_factory=dict)
    # This incarnation's per-event predictions file (on the trainer's filesystem): path,
    # rows written, and the error that stopped it, if one did; None when not asked for.
    predictions: dict[str, Any] | None = None

    @property
    def events_dlq(self) -> int:
        return sum(self.rejects_applied.values())


@dataclass(frozen=True)
class TrainerFinal:
    """The trainer's part of the job's report, asked for once its loop has returned."""

    progress: TrainerProgress
    memories: dict[str, Any]  # component name -> stats(), JSON-safe
    auc_last20_like: float | None


@dataclass(frozen=True)
class StreamingStats:
    """What only the streaming job has: Kafka positions, freshness, snapshots, serving."""

    events_consumed: int  # from Kafka positions: equals trained + dlq when nothing was lost
    duplicates_dropped: int
    trainer_busy: dict[str, float] | None
    trainer_uptime_s: float | None
    publish_failures: int | None
    freshness_p50_s: float | None
    freshness_p99_s: float | None
    freshness_samples: int | None
    freshness_steady_p50_s: float | None  # events produced after serving went live
    freshness_steady_p99_s: float | None
    written_p50_s: float | None  # event -> its version in the store (the trainer's part)
    written_p99_s: float | None
    freshness_legs: dict[str, Any] | None  # train / tick / write / swap: p50, p99, mean of the slowest 1%
    snapshots_published: int
    snapshot_bases_written: int
    snapshot_base_failures: int
    snapshot_version: int | None
    versions_withheld: int  # versions the health gate kept from serving
    checkpoint_saves: int
    checkpoint_failures: int
    checkpoints_quarantined: int
    last_durable_offsets: dict[str, int] | None  # of the newest checkpoint written or restored
    serving_version: int | None
    serving: list[dict[str, Any]]
    trainer_restarts: int
    restored_from_checkpoint: int | None
    predictions: dict[str, Any] | None = None  # the trainer's predictions file: path, rows, error


@dataclass(frozen=True)
class RunReport:
    """The report of `memstream eval` and of `memstream run`: the same quality and memory
    numbers for both; `streaming` is set by `run` only."""

    events_trained: int
    events_dlq: int
    dlq_categories: dict[str, int]
    steps: int
    duration_s: float
    throughput_eps: float | None
    auc_like: float | None = field(metadata={"key": "auc.like"})
    auc_like_error_bound: float | None = field(metadata={"key": "auc.like_error_bound"})  # 0: exact
    auc_last20_like: float | None = field(metadata={"key": "auc_last20.like"})
    logloss_like: float | None = field(metadata={"key": "logloss.like"})
    rmse_rating: float | None = field(metadata={"key": "rmse.rating"})
    window_auc_like: float | None = field(metadata={"key": "window.auc.like"})
    window_logloss_like: float | None = field(metadata={"key": "window.logloss.like"})
    window_rmse_rating: float | None = field(metadata={"key": "window.rmse.rating"})
    offsets: dict[int, int]  # partition -> next offset not trained
    memories: dict[str, Any]  # component name -> stats()
    config: dict[str, Any]
    streaming: StreamingStats | None
    # Like AUC/logloss by item evidence, user evidence and user history length
    # (models/slices.py): {slice: {bucket: {"n", "auc.like", "logloss.like"}}}.
    slices: dict[str, Any] | None = None

    @classmethod
    def from_metrics(cls, summary: dict[str, Any], auc_last20: float | None, **kw: Any) -> RunReport:
        """From a StreamingMetrics.summary() (or its JSON-safe brief) and the other fields."""
        return cls(
            auc_like=summary.get("auc.like"),
            auc_like_error_bound=summary.get("auc.like_error_bound"),
            auc_last20_like=auc_last20,
            logloss_like=summary.get("logloss.like"),
            rmse_rating=summary.get("rmse.rating"),
            window_auc_like=summary.get("window.auc.like"),
            window_logloss_like=summary.get("window.logloss.like"),
            window_rmse_rating=summary.get("window.rmse.rating"),
            **kw,
        )

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object users and benchmarks read: the streaming fields at the top
        level, and the memories' headline numbers (bank coverage, slot usage) beside their
        full stats."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name != "streaming":
                out[f.metadata.get("key", f.name)] = getattr(self, f.name)
        if self.streaming is not None:
            out.update({f.name: getattr(self.streaming, f.name) for f in fields(self.streaming)})
        m = self.memories
        bank, pkm, lmn = m.get("bank"), m.get("pkm"), m.get("lmn")
        out.update(
            {
                "bank.coverage": bank["coverage"]["cumulative"] if bank else None,
                "bank.staleness_cos": bank["staleness_cos"]["cumulative"] if bank else None,
                "pkm.slot_usage": pkm["cumulative"]["slot_usage"] if pkm else None,
                "pkm.slot_usage_window": pkm["window"]["slot_usage"] if pkm else None,
                "pkm.kl_uniform": pkm["cumulative"]["kl_uniform"] if pkm else None,
                "lmn.slot_usage": lmn["cumulative"]["slot_usage"] if lmn else None,
                "lmn.kl_uniform": lmn["cumulative"]["kl_uniform"] if lmn else None,
            }
        )
        return finite_or_none(out)
