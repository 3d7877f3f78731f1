"""The trainer's side of the streaming job, without Ray: exactly-once training on
ingest units, checkpoints with offsets, and snapshot payloads.

Exactly once: the service keeps, per partition, the next offset not yet applied
(`next_offsets`). A unit from a reader is applied whole (its valid events in
micro-batches, its rejects counted), then the offsets advance past every message
it covered. Checkpoints store the trainer state together with those offsets; on
start the newest complete checkpoint is restored and the readers are sought to
its offsets, so messages after it are applied again exactly once. Rows below
`next_offsets` (a reader re-delivering after a seek) are dropped.

Snapshots across a restart: a checkpoint records the version it was cut after
(`delta_chain`) and every change mark relative to it. A restarted trainer asks the
store what the versions after that one changed (SnapshotPublisher.changed_since),
marks those rows too (`resume_chain`), and its first version is a delta on the
store's latest; only when that chain is broken (the version is gone, a full version
or a gap came after it, an older checkpoint without the marks) is it full.

Per-event predictions (`open_predictions`): every trained micro-batch's scores go to
this incarnation's Parquet file (stream/train/predictions.py); a write that fails stops
the file, never the training.

stream/job/actors.py wraps this in a Ray actor; tests drive it directly.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_marks
from safetensors.numpy import save_file as save_marks

from memory_bank.base import DeltaState, FullState
from models.online import OnlineTrainer, PoisonBatchError
from stream.ingest.events import EventBatch
from stream.messages import IngestUnit, PoisonedEvent, TrainerProgress, finite_or_none
from stream.snapshots.publisher import StoredChanges
from stream.train.checkpoints import CheckpointManager
from stream.train.health import ModelHealthGate
from stream.train.predictions import PredictionsError, PredictionWriter, incarnation_path

log = logging.getLogger(__name__)

POISON = "poison"  # the dead-letter category of events whose training step fails
# The change marks a checkpoint carries beside the trainer state: the feature builder's
# touched rows, which its own export_state does not keep (the history's dirty slots, the
# bank's dirty rows and the delta tracker's marks are in the trainer state already).
CHAIN_MARKS = "chain_marks.safetensors"


class TrainerFault(RuntimeError):
    """The trainer cannot train at all (not one event of a batch trains on its own)."""


@dataclass
class SnapshotPayload:
    """What the trainer hands the publisher (tensors travel by the object store)."""

    version: int
    parent: int | None
    state: FullState | DeltaState
    meta: dict[str, Any]  # meta["cut_at"]: wall time the payload was taken
    event_ts_ms: np.ndarray  # Kafka timestamps of the events new in this version
    event_trained_s: np.ndarray  # wall time each of them finished training (freshness legs)
    base: FullState | None = None  # every `full_every` versions: a full copy of this delta


@dataclass
class PendingCheckpoint:
    """A checkpoint captured but not yet written: its offsets are not durable yet."""

    offsets: dict[int, int]
    meta: dict[str, Any]
    state: tuple[dict[str, Any], dict[str, Any]]  # OnlineTrainer.capture_state()
    chain_marks: dict[str, np.ndarray]  # CHAIN_MARKS: the features' touched masks (uint8)


class TrainerService:
    def __init__(
        self,
        trainer: OnlineTrainer,
        checkpoints: CheckpointManager,
        full_every: int,
        first_version: int,
        gate: ModelHealthGate | None = None,
    ):
        self.trainer = trainer
        self.checkpoints = checkpoints
        self.gate = gate or ModelHealthGate()
        self.full_every = full_every
        self.lock = threading.RLock()  # training vs. queries (admin) vs. checkpoints
        self.next_offsets: dict[int, int] = {}
        self.rejects_applied: dict[str, int] = {}
        self.duplicates_dropped = 0
        # Applied-offset lineage per partition: [count, sum, sum of squares] of the
        # offsets applied (trained or rejected) in this lineage, checkpointed with the
        # state. count == end offset and the sums == those of 0..count-1 means every
        # offset applied once (a loss plus a double application would have to cancel
        # in both sums): how the chaos benchmark checks exactly-once.
        self.lineage: dict[int, list[int]] = {}
        # The first offset applied per partition in this lineage: with next_offsets, how many
        # messages the Kafka positions say were consumed (compared with trained + dlq).
        self.lineage_start: dict[int, int] = {}
        self.restored_from: int | None = None
        self.restored_captured_at: float | None = None  # when the restored checkpoint was taken
        # The version the restored checkpoint's change marks are relative to (None: the
        # first version is full); resume_chain turns it into a delta on the store's latest.
        self.resume_from: int | None = None
        self.resumed_chain: dict[str, Any] | None = None  # how the restart's snapshots went on
        self.started_at = time.time()
        ckpt = checkpoints.latest()
        if ckpt is not None:
            trainer.load(ckpt.path / "state")
            self.next_offsets = {int(p): int(o) for p, o in ckpt.meta["offsets"].items()}
            self.rejects_applied = dict(ckpt.meta.get("rejects_applied", {}))
            self.lineage = {int(p): list(v) for p, v in ckpt.meta.get("lineage", {}).items()}
            self.lineage_start = {int(p): int(o) for p, o in ckpt.meta.get("lineage_start", {}).items()}
            self.restored_from = ckpt.seq
            # (written: older checkpoints have only the time they were written, a bit later)
            self.restored_captured_at = ckpt.meta.get("captured_at", ckpt.meta.get("created_at"))
            first_version = max(first_version, int(ckpt.meta.get("snapshot_version", 0)) + 1)
            self._restore_chain_marks(ckpt.path, ckpt.meta.get("delta_chain"))
        # Snapshots: the first one after a start is full unless resume_chain continues the
        # stored chain.
        self.next_version = max(1, first_version)
        self.last_published: int | None = None
        self.chain_open = False  # a full version went out and deltas follow it
        self.publish_failures = 0
        self.checkpoint_failures = 0
        self.republish = False  # the last publish failed: publish again even without new events
        self._pending_ts: list[np.ndarray] = []
        self._pending_trained: list[np.ndarray] = []
        # Throughput of this incarnation: events trained between its first and last unit.
        self._first_unit_t: float | None = None
        self._last_unit_t: float | None = None
        self._trained_here = 0
        # Where this incarnation's time went (seconds): training steps, building snapshot
        # payloads, capturing checkpoints (on the training thread) and writing them (off
        # it); the training thread's other wall time is waiting for data.
        self._poisoned: list[PoisonedEvent] = []
        self.max_pending_poison = 10_000
        self.busy = {"train_s": 0.0, "snapshot_s": 0.0, "checkpoint_s": 0.0, "checkpoint_write_s": 0.0}
        self.predictions: PredictionWriter | None = None
        self._predictions_status: dict[str, Any] | None = None

    # -- per-event predictions -------------------------------------------------------------------
    def open_predictions(self, path: str | Path) -> Path:
        """Write this incarnation's scored events to the first free name of `path`'s
        series (`F`, `F.1.parquet`, ...): an earlier incarnation's file is never touched;
        the rows start at the events this trainer restored (`seq` = events_applied)."""
        target, incarnation = incarnation_path(path)
        fc = self.trainer.cfg.features
        self.predictions = PredictionWriter(
            target,
            fc.like_task,
            fc.rating_task,
            start_seq=self.trainer.events_applied,
            incarnation=incarnation,
            restored_from=self.restored_from,
            history_length=self.trainer.cfg.history.length,
        )
        self._predictions_status = {"path": str(target), "rows": 0, "error": None}
        log.info("per-event predictions of this trainer go to %s", target)
        return target

    def _write_predictions(self, mb: EventBatch, result: Any) -> None:
        if self.predictions is None:
            return
        try:
            self.predictions.write(mb, result, self.trainer.events_applied - result.events)
        except Exception as e:  # the file is a by-product: it never stops the training
            log.error("per-event predictions stopped (training goes on): %s", e)
            self._stop_predictions(str(e) if isinstance(e, PredictionsError) else f"{type(e).__name__}: {e}")

    def _stop_predictions(self, error: str | None) -> None:
        writer, self.predictions = self.predictions, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as e:  # a full disk fails the footer too
            error = error or f"closing {writer.path} failed: {e}"
        if self._predictions_status is not None:
            self._predictions_status.update(rows=writer.rows_written, error=error)

    def close_predictions(self) -> None:
        """Flush and close the predictions file (readable from then on); idempotent."""
        with self.lock:
            self._stop_predictions(None)

    # -- training ------------------------------------------------------------------------------
    def apply_unit(self, unit: IngestUnit) -> int:
        """Train on one reader result (see PartitionReader.next_batch); returns events trained."""
        return self.apply_units([unit])

    def apply_units(self, units: list[IngestUnit]) -> int:
        """Train on the results several readers returned together, merged into one stream
        in Kafka-timestamp order, ties broken by (partition, offset): the partitions
        interleave as they were produced, small units from many readers make full
        micro-batches, and the order does not depend on which reader's unit came first (the
        features of tied events differ with their order: the in-batch sums are causal by
        position). Returns events trained."""
        t0 = time.monotonic()
        parts = [EventBatch.from_arrow(u.events) for u in units if u.events.num_rows]
        batch = EventBatch.concat(parts)
        if len(parts) > 1:
            batch = batch.take(np.lexsort((batch.kafka_offset, batch.kafka_partition, batch.kafka_ts_ms)))
        rejects = [r for u in units for r in u.rejects]
        next_offsets: dict[int, int] = {}
        for u in units:
            for p, o in u.next_offsets.items():
                next_offsets[int(p)] = max(next_offsets.get(int(p), 0), int(o))
        trained = 0
        with self.lock:
            if len(batch):
                floor = np.array(
                    [self.next_offsets.get(int(p), -1) for p in batch.kafka_partition], dtype=np.int64
                )
                fresh = batch.kafka_offset >= floor
                self.duplicates_dropped += int((~fresh).sum())
                if not fresh.all():
                    batch = batch.take(np.flatnonzero(fresh))
                poisoned: list[int] = []
                for start, mb in self.trainer.micro_batches(batch):
                    bad = self._train_isolating(mb)
                    trained += len(mb) - len(bad)
                    poisoned += [start + i for i in bad]
                kept = np.ones(len(batch), dtype=bool)
                kept[poisoned] = False
                self._pending_ts.append(batch.kafka_ts_ms[kept].copy())
                self._pending_trained.append(np.full(int(kept.sum()), time.time()))
                for p, off in zip(batch.kafka_partition.tolist(), batch.kafka_offset.tolist()):
                    self._note_applied(p, off)
            for r in rejects:
                if r.offset >= self.next_offsets.get(r.partition, -1):
                    self.rejects_applied[r.category] = self.rejects_applied.get(r.category, 0) + 1
                    self._note_applied(r.partition, r.offset)
            for p, nxt in next_offsets.items():
                self.next_offsets[p] = max(self.next_offsets.get(p, 0), nxt)
            self.busy["train_s"] += time.monotonic() - t0
            if trained:
                if self._first_unit_t is None:
                    self._first_unit_t = t0
                self._last_unit_t = time.monotonic()
                self._trained_here += trained
        return trained

    def _train_isolating(self, mb: EventBatch) -> list[int]:
        """Train on `mb`; if its step is poisoned, split it in halves until the events at
        fault are alone, train the rest, and quarantine those (returns their positions).

        Nothing of a poisoned step reaches the model (OnlineTrainer.step), so the events
        trained are exactly the others, in their order. A micro-batch of which every event
        fails on its own is not poison but a fault of the trainer: that error is raised.
        """
        try:
            result = self.trainer.step(mb)
        except PoisonBatchError as e:
            if len(mb) == 1:
                self._quarantine(mb, str(e))
                return [0]
            half = len(mb) // 2
            bad = self._train_isolating(mb.take(slice(0, half)))
            bad += [half + i for i in self._train_isolating(mb.take(slice(half, None)))]
            if len(bad) == len(mb) >= 8:
                raise TrainerFault(
                    f"every one of {len(mb)} events failed its training step on its own "
                    f"(first error: {e}): a fault of the trainer, not of the data"
                ) from e
            return bad
        self._write_predictions(mb, result)
        return []

    def _quarantine(self, one: EventBatch, error: str) -> None:
        p, off = int(one.kafka_partition[0]), int(one.kafka_offset[0])
        log.warning(
            "poison event %r at partition %d offset %d dead-lettered: %s", one.event_id[0], p, off, error
        )
        self.rejects_applied[POISON] = self.rejects_applied.get(POISON, 0) + 1
        if len(self._poisoned) < self.max_pending_poison:  # a flood is counted, not held
            self._poisoned.append(PoisonedEvent(p, off, _event_json(one), error[:500]))

    def take_poisoned(self) -> list[PoisonedEvent]:
        """Poison events found since the last call (for the dead-letter topic)."""
        with self.lock:
            out, self._poisoned = self._poisoned, []
            return out

    def _note_applied(self, partition: int, offset: int) -> None:
        first = self.lineage_start.get(int(partition))
        if first is None or offset < first:  # rejects are noted after a unit's events
            self.lineage_start[int(partition)] = int(offset)
        acc = self.lineage.setdefault(int(partition), [0, 0, 0])
        acc[0] += 1
        acc[1] += offset
        acc[2] += offset * offset

    def throughput_eps(self) -> float | None:
        if self._first_unit_t is None or self._last_unit_t is None:
            return None
        span = self._last_unit_t - self._first_unit_t
        return self._trained_here / span if span > 0 else None

    # -- checkpoints ---------------------------------------------------------------------------
    def capture_checkpoint(self) -> PendingCheckpoint:
        """A consistent copy of the state and the offsets it covers, taken under the lock
        (the training thread pays only for the copy; `write_checkpoint` can run elsewhere)."""
        t0 = time.monotonic()
        with self.lock:
            offsets = dict(self.next_offsets)
            meta = {
                "offsets": {str(p): o for p, o in offsets.items()},
                "events_applied": self.trainer.events_applied,
                "rejects_applied": dict(self.rejects_applied),
                "lineage": {str(p): list(v) for p, v in self.lineage.items()},
                "lineage_start": {str(p): o for p, o in self.lineage_start.items()},
                "train_step": self.trainer.steps,
                "captured_at": time.time(),  # poison letters after it may be replayed
                "snapshot_version": self.last_published or 0,
                # The marks below are the changes since this version (None: the chain is
                # not open, e.g. after a withheld or failed version; a restart goes full).
                "delta_chain": self.last_published if self.chain_open else None,
            }
            state = self.trainer.capture_state()
            marks = self.trainer.features.export_marks()
            self.busy["checkpoint_s"] += time.monotonic() - t0
        return PendingCheckpoint(offsets, meta, state, marks)

    def write_checkpoint(self, pending: PendingCheckpoint) -> None:
        """Make a captured checkpoint durable (temp dir, fsync, manifest, rename)."""
        t0 = time.monotonic()
        try:
            self.checkpoints.save(lambda d: _write_checkpoint_dir(d, pending), pending.meta)
        except Exception:
            self.checkpoint_failures += 1
            raise
        self.busy["checkpoint_write_s"] += time.monotonic() - t0

    def checkpoint(self) -> dict[int, int]:
        """Write a durable checkpoint; returns the offsets it covers (commit them after)."""
        pending = self.capture_checkpoint()
        self.write_checkpoint(pending)
        return pending.offsets

    # -- snapshots across a restart ------------------------------------------------------------
    def _restore_chain_marks(self, path: Path, since: int | None) -> None:
        """Put back the feature builder's touched rows (its import_state clears them); the
        other marks came back with the trainer state."""
        if since is None or not (path / CHAIN_MARKS).exists():
            log.info(
                "checkpoint %s carries no delta chain (%s): the first snapshot is full",
                path.name,
                "an older checkpoint" if since is not None else "no open chain when it was cut",
            )
            return
        marks = load_marks(str(path / CHAIN_MARKS))
        feats = self.trainer.features
        expected = feats.export_marks()
        for key, mask in expected.items():
            if key not in marks or marks[key].shape != mask.shape:
                log.warning(
                    "checkpoint %s: marks of %s do not fit; the first snapshot is full", path.name, key
                )
                return
        for key in expected:
            feats.mark_rows(key, marks[key])
        self.resume_from = int(since)

    def resume_chain(self, changes: StoredChanges | str) -> bool:
        """Continue the store's delta chain after a restart: mark every row the stored
        versions after the checkpoint's changed (the restored state may differ there from
        what serving runs), so that the next version is a delta on `changes.latest`.

        `changes` is SnapshotPublisher.changed_since(self.resume_from), or
        the reason it could not be had; then (or when the marks do not fit this model) the
        next version is full, as it always was. Returns whether the chain goes on."""
        with self.lock:
            since, self.resume_from = self.resume_from, None
            if since is None:
                return False
            why = changes if isinstance(changes, str) else self._mark_stored_changes(changes)
            if why is not None:
                log.warning("restart from version %d: the next snapshot is full (%s)", since, why)
                self.resumed_chain = {"since": since, "resumed": False, "reason": why}
                return False
            self.last_published = changes.latest
            self.chain_open = True
            self.next_version = max(self.next_version, changes.latest + 1)
            rows = sum(len(r) for t in changes.rows.values() for r in t.values())
            log.info(
                "restart: snapshots go on as deltas on version %d (checkpoint cut after %d; "
                "%d rows of the versions between re-marked)",
                changes.latest,
                since,
                rows,
            )
            self.resumed_chain = {"since": since, "resumed": True, "latest": changes.latest, "rows": rows}
            return True

    def _mark_stored_changes(self, changes: StoredChanges) -> str | None:
        """Mark the rows `changes` lists in this trainer's change tracking; the reason they
        do not fit (the next version must then be full), else None."""
        state = self.trainer.state
        comps = state.components()
        tracker = {k: v.numpy().copy() for k, v in state.tracker.export_state().items()}
        feats = self.trainer.features
        for mem in changes.rows:
            if mem not in comps:
                return f"the stored versions change memory {mem!r}, which this model does not have"
        for mem, tables in changes.rows.items():
            for table, rows in tables.items():
                if mem == "features":
                    if table == "counters.total":  # one row, shipped in every delta
                        continue
                    why = feats.mark_rows(table, rows)
                    if why is not None:
                        return f"the stored versions change {why}"
                    continue
                elif mem in ("history", "bank"):
                    continue  # their own row marks: below
                else:
                    mask = tracker.get(f"{mem}.{table}")
                if mask is None:
                    return f"the stored versions change {mem}.{table}, which this trainer does not track"
                if len(rows) and int(rows.max()) >= len(mask):
                    return f"{mem}.{table}: stored row {int(rows.max())} is past this model's {len(mask)}"
                mask[rows] = 1
        state.tracker.import_state({k: torch.from_numpy(v) for k, v in tracker.items()})
        for mem in ("history", "bank"):  # serving mirrors their slots / rows: re-ship or free each
            if mem in comps:
                tables = changes.rows.get(mem, {})
                comps[mem].mark_changed(np.concatenate([np.zeros(0, np.int64), *tables.values()]))
        return None

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot_payload(self) -> SnapshotPayload | None:
        """The next version's content: full after a start (or a failed publish or a withheld
        version), else a delta; every `full_every` versions the delta also carries a full
        copy (a base). None when the health gate withholds it (see stream/train/health.py):
        nothing is handed out, and the events stay pending for the next version."""
        t0 = time.monotonic()
        with self.lock:
            version = self.next_version
            base: FullState | None = None
            model = self.trainer.state
            if self.last_published is None or not self.chain_open:
                state: FullState | DeltaState = model.full_snapshot()
                model.start_delta_chain()  # the next delta is relative to this full version
                self.chain_open = True
                parent = None
            else:
                state = model.take_delta()
                parent = self.last_published
                if (version - 1) % self.full_every == 0:
                    base = model.full_snapshot()
            summary = self.trainer.metrics.summary()
            verdict = self.gate.check(
                state, summary.get("window.logloss.like") if summary["n.like"] else None
            )
            if not verdict.healthy:
                # The rows of this delta are gone from the tracking: the next version is full.
                self.chain_open = False
                self.busy["snapshot_s"] += time.monotonic() - t0
                log.error(
                    "snapshot version %d withheld from serving: %s (withheld %d in a row)",
                    version,
                    verdict.reason,
                    self.gate.withheld_in_a_row,
                )
                return None
            meta = self.snapshot_meta()
            meta["metrics"] = finite_or_none(summary)
            meta["cut_at"] = time.time()
            ts = np.concatenate(self._pending_ts) if self._pending_ts else np.empty(0, np.int64)
            trained = np.concatenate(self._pending_trained) if self._pending_trained else np.empty(0)
            self._pending_ts, self._pending_trained = [], []
            self.next_version = version + 1
            self.republish = False
            self.busy["snapshot_s"] += time.monotonic() - t0
            self.last_published = version
        return SnapshotPayload(
            version=version,
            parent=parent,
            state=state,
            meta=meta,
            event_ts_ms=ts,
            event_trained_s=trained,
            base=base,
        )

    def snapshot_meta(self) -> dict[str, Any]:
        """The manifest's account of a version: config, step, and the offsets it covers."""
        return {
            "model_config": self.trainer.cfg.model_dump(mode="json"),
            "train_step": self.trainer.steps,
            "events_applied": self.trainer.events_applied,
            "offsets": {str(p): o for p, o in self.next_offsets.items()},
        }

    def publish_failed(self, version: int, error: BaseException) -> None:
        """The publisher did not store `version`: the next snapshot is a full one, since a
        delta on top of a version that never landed could never be loaded by serving."""
        with self.lock:
            log.warning("snapshot version %d was not published (%s); the next one is full", version, error)
            self.chain_open = False
            self.publish_failures += 1
            self.republish = True

    # -- queries -------------------------------------------------------------------------------
    def progress(self) -> TrainerProgress:
        with self.lock:
            return TrainerProgress(
                events_applied=self.trainer.events_applied,
                steps=self.trainer.steps,
                rejects_applied=dict(self.rejects_applied),
                duplicates_dropped=self.duplicates_dropped,
                next_offsets=dict(self.next_offsets),
                lineage={p: list(v) for p, v in self.lineage.items()},
                events_consumed=sum(self.next_offsets.get(p, o) - o for p, o in self.lineage_start.items()),
                snapshot_version=self.last_published,
                publish_failures=self.publish_failures,
                checkpoint_failures=self.checkpoint_failures,
                checkpoints=finite_or_none(self.checkpoints.health()),
                restored_from=self.restored_from,
                throughput_eps=self.throughput_eps(),
                busy={k: round(v, 3) for k, v in self.busy.items()},
                uptime_s=round(time.time() - self.started_at, 3),
                metrics=finite_or_none(self.trainer.metrics.summary()),
                health=finite_or_none(self.gate.summary()),
                slices=finite_or_none(self.trainer.metrics.slice_summary()),
                memory_usage=finite_or_none(self.trainer.state.usage()),
                predictions=self._predictions_status_now(),
            )

    def _predictions_status_now(self) -> dict[str, Any] | None:
        if self._predictions_status is None:
            return None
        out = dict(self._predictions_status)
        if self.predictions is not None:  # open: flushed rows plus the buffered ones
            out["rows"] = self.predictions.rows_written + self.predictions.buffered
        return out

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return self.trainer.stats()


def _write_checkpoint_dir(d: Path, pending: PendingCheckpoint) -> None:
    OnlineTrainer.write_state(d / "state", *pending.state)
    save_marks(pending.chain_marks, str(d / CHAIN_MARKS))


def _event_json(one: EventBatch) -> dict[str, Any]:
    """The event of a one-row batch as JSON (its Kafka bytes are not kept after decode)."""
    out: dict[str, Any] = {
        "event_id": one.event_id[0],
        "ts_ms": int(one.ts_ms[0]),
        "user_id": one.user_id[0],
        "item_id": one.item_id[0],
        "scenario": one.scenario[0],
        "labels": {k: float(v[0]) for k, v in one.labels.items() if not np.isnan(v[0])},
        "user_features": {
            **{k: v[0] for k, v in one.user_cat.items() if v[0] is not None},
            **{k: float(v[0]) for k, v in one.user_num.items() if not np.isnan(v[0])},
        },
    }
    for k in ("item_text", "query"):
        if getattr(one, k)[0] is not None:
            out[k] = getattr(one, k)[0]
    return out
