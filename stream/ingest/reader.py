"""Kafka ingest: one reader per set of partitions, decoding into columnar batches.

`PartitionReader` owns a kafka-python consumer with a *static* assignment (the
driver decides who reads which partition; no group rebalances), a poll thread
and a bounded buffer of decoded batches. The trainer pulls from it
(`next_batch`), so backpressure is simple: when the buffer is full the poll
thread waits on a condition instead of fetching more, and memory stays bounded
however slow the trainer is. Nothing busy-polls: every wait is on a condition
or inside Kafka's long poll.

Rejected values go to the dead-letter topic with their reason; the reader never
raises on message content. Seeks, commits and polls share one lock because
KafkaConsumer is not thread-safe.

`IngestActor` is the Ray wrapper (stream/job/driver.py creates them).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from stream.ingest.event_format import EventFormat
from stream.ingest.events import DecodeResult, EventBatch, EventLimits, Reject, decode_batch
from stream.messages import DeadLettered, IngestUnit

log = logging.getLogger(__name__)


class KafkaConfig(BaseModel):
    """Where events come from and how they are read."""

    model_config = ConfigDict(extra="forbid")

    # None = the embedded local broker (started by `memstream run`).
    bootstrap: str | None = None
    topic: str = "interactions"
    # Empty = `<topic>.dlq`.
    dlq_topic: str = ""
    group_id: str = "memstream-trainer"
    # Partitions per ingest actor are assigned round-robin by the driver.
    ingest_actors: int = Field(1, ge=1)
    poll_timeout_ms: int = Field(200, ge=1)
    # The broker answers a fetch once it has fetch_min_bytes or fetch_max_wait_ms passed:
    # at a trickle, one fetch per ~100 ms instead of one per few messages (kafka-python
    # spends about a millisecond of CPU per fetch; so does the broker). Adds at most
    # fetch_max_wait_ms to freshness; 1 byte = answer at once.
    fetch_min_bytes: int = Field(32_768, ge=1)
    fetch_max_wait_ms: int = Field(100, ge=0, le=5_000)
    # One poll = one unit handed to the trainer whole (see PartitionReader.next_batch).
    max_poll_records: int = Field(512, ge=1)
    # Bound on decoded-but-untrained events held by each reader (backpressure).
    buffer_max_events: int = Field(20_000, ge=1)
    # Cross-batch duplicate event ids: a message whose event_id was already
    # accepted at most this many offsets earlier on the same partition is
    # dead-lettered as duplicate_event_id (see RecentIds for the exact rule).
    # Not caught: a repeat further back than the window, one on another partition
    # (a producer that changed the key), and, after an ingest actor restart, a
    # repeat of an event read before the restart (the window lives in memory).
    # Memory: up to 2 x window ids per partition. 0 = off.
    dedup_window: int = Field(50_000, ge=0)
    # Extra kafka-python consumer/producer settings (security_protocol, sasl_*,
    # ssl_*, client_id...), passed through unchanged.
    client_options: dict[str, Any] = Field(default_factory=dict)
    limits: EventLimits = Field(default_factory=EventLimits)
    # The topic's value format: memstream's own event (native, the default) or a team's
    # JSON/Avro mapped onto it (stream/ingest/event_format.py, README "Your event format").
    event_format: EventFormat = Field(default_factory=EventFormat)

    def dlq(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"

    @field_validator("client_options")
    @classmethod
    def _expand_env(cls, opts: dict[str, Any]) -> dict[str, Any]:
        """`${NAME}` in a string value is read from the environment (secrets stay out of YAML)."""
        out = {}
        for key, value in opts.items():
            if isinstance(value, str):
                for name in _ENV_REF.findall(value):
                    if name not in os.environ:
                        raise ValueError(f"client_options.{key} refers to ${{{name}}}, which is not set")
                    value = value.replace(f"${{{name}}}", os.environ[name])
            out[key] = value
        return out


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class IngestError(Exception):
    pass


class ReaderNotSought(IngestError):
    """next_batch with an epoch on a reader that was never sought: a fresh incarnation
    (Ray restarted the ingest actor, and a request queued while it restarted reached the
    new one). The caller must seek it to its offsets; answering None instead would
    stall its partitions forever, since the caller would never learn it restarted."""


class RecentIds:
    """Event ids recently accepted on one partition, for cross-batch dedup.

    Rule, a function of the log alone so that a re-read gives the same answer:
    the message at offset f with id x is a duplicate iff x was accepted at an
    offset o with f - window <= o < f. A re-read of the message itself (o == f,
    after a seek back for a trainer restart) is not a duplicate. Entries are kept
    down to `2 * window` offsets below the highest offset seen, so re-seeks up to
    `window` back from the read position decide exactly as the first read did.
    """

    def __init__(self, window: int):
        self.window = window
        self._first: dict[str, int] = {}  # id -> offset of its accepted occurrence
        self._order: deque[tuple[int, str]] = deque()  # (offset, id) in insertion order
        self._high = -1

    def __len__(self) -> int:
        return len(self._first)

    def is_duplicate(self, event_id: str, offset: int) -> bool:
        """Record `event_id` at `offset` unless it repeats an accepted one; True if it does."""
        if self.window <= 0:
            return False
        first = self._first.get(event_id)
        if first is not None and offset - self.window <= first < offset:
            return True
        if first is None or offset < first:
            self._first[event_id] = offset
            self._order.append((offset, event_id))
        if offset > self._high:
            self._high = offset
            floor = offset - 2 * self.window
            while self._order and self._order[0][0] < floor:
                off, eid = self._order.popleft()
                if self._first.get(eid) == off:
                    del self._first[eid]
        return False


@dataclass
class _Unit:
    """One poll's worth of messages: valid events, rejects, and the offsets it covers."""

    batch: EventBatch
    rejects: list[DeadLettered]
    next_offsets: dict[int, int]

    def size(self) -> int:  # what the buffer bound counts: every message held
        return len(self.batch) + len(self.rejects)


class PartitionReader:
    def __init__(self, cfg: KafkaConfig, bootstrap: str, partitions: list[int]):
        from kafka import KafkaConsumer, TopicPartition

        from stream.ingest.dlq import DeadLetterWriter

        self.cfg = cfg
        self.partitions = sorted(partitions)
        self._tps = [TopicPartition(cfg.topic, p) for p in self.partitions]
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=cfg.max_poll_records,
            fetch_min_bytes=cfg.fetch_min_bytes,
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            **cfg.client_options,
        )
        self._consumer.assign(self._tps)
        self._dlq = DeadLetterWriter(bootstrap, cfg.dlq(), **cfg.client_options)
        self._mapping = cfg.event_format.mapping()  # None: the native format
        self._lock = threading.Lock()  # guards the consumer
        self._cv = threading.Condition()  # guards the buffer and counters
        self._buffer: deque[_Unit] = deque()
        self._buffered = 0
        self._generation = 0  # bumped by every seek: polls started before it are dropped
        self._epoch = ""  # the token of the last seek (see seek / next_batch)
        self._verify: dict[int, tuple[int, int]] = {}  # partition -> (sought offset, probe)
        self._dlq_next: dict[int, int] = {}  # per partition: first offset not yet dead-lettered
        self._stop = False
        self.counters = {"consumed": 0, "accepted": 0, "rejected": 0}
        self._dedup = {p: RecentIds(cfg.dedup_window) for p in self.partitions}
        self.reject_categories: dict[str, int] = {}
        self._thread: threading.Thread | None = None

    # -- control (called by the trainer / driver) -----------------------------
    def seek(self, offsets: dict[int, int] | None, epoch: str | None = None) -> str:
        """Drop buffered batches and continue from `offsets` (partition -> next offset).

        Partitions missing from `offsets` start from the beginning of the log.
        `epoch` (chosen by the caller, a fresh one per seek; returned) is the only
        token `next_batch` serves afterwards, so a request still in flight from
        before the seek (e.g. from a trainer that died) cannot take units the new
        position has moved past, and a retried seek with the same token is harmless.
        """
        with self._lock, self._cv:
            self._generation += 1
            self._buffer.clear()
            self._buffered = 0
            self._verify.clear()
            for tp in self._tps:
                off = (offsets or {}).get(tp.partition)
                if off is None:
                    self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, int(off))
                    self._verify[tp.partition] = (int(off), int(off))
            self._epoch = epoch if epoch is not None else uuid.uuid4().hex
            self._cv.notify_all()
            return self._epoch

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll_loop, name="ingest-poll", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._consumer.close()
        self._dlq.close()

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit next offsets to the consumer group (after a durable checkpoint)."""
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        mine = {p: o for p, o in offsets.items() if p in self.partitions}
        if not mine:
            return
        payload = {
            TopicPartition(self.cfg.topic, p): OffsetAndMetadata(int(o), "", -1) for p, o in mine.items()
        }
        with self._lock:
            self._consumer.commit(offsets=payload)

    def end_offsets(self) -> dict[int, int]:
        with self._lock:
            ends = self._consumer.end_offsets(self._tps)
        return {tp.partition: int(o) for tp, o in ends.items()}

    # -- data ------------------------------------------------------------------
    def next_batch(self, max_events: int, timeout_s: float, epoch: str | None = None) -> IngestUnit | None:
        """Whole poll units (never split) totalling about `max_events`, or None after `timeout_s`.

        Units are never split so a consumer that applies the whole result and then
        advances its offsets to `next_offsets` has applied every message below them
        exactly once (rejects included).
        """
        deadline = time.monotonic() + timeout_s
        if epoch is not None and not self._epoch:
            raise ReaderNotSought(
                f"reader of partitions {self.partitions} has not been sought since it started; "
                "seek it to the trainer's offsets before asking for batches"
            )
        with self._cv:
            stale = lambda: epoch is not None and epoch != self._epoch
            while not self._buffer and not self._stop and not stale():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
            if not self._buffer or stale():
                return None
            units: list[_Unit] = []
            n = 0
            while self._buffer and (not units or n + len(self._buffer[0].batch) <= max_events):
                u = self._buffer.popleft()
                units.append(u)
                n += len(u.batch)
                self._buffered -= u.size()
            self._cv.notify_all()
        next_offsets: dict[int, int] = {}
        for u in units:
            next_offsets.update(u.next_offsets)
        return IngestUnit(
            events=EventBatch.concat([u.batch for u in units]).to_arrow(),
            rejects=tuple(r for u in units for r in u.rejects),
            next_offsets=next_offsets,
        )

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {
                **self.counters,
                "buffered": self._buffered,
                "reject_categories": dict(self.reject_categories),
                "dedup_ids": sum(len(d) for d in self._dedup.values()),
                "partitions": self.partitions,
            }

    # -- the poll thread ---------------------------------------------------------
    def _poll_loop(self) -> None:
        while True:
            with self._cv:
                while self._buffered >= self.cfg.buffer_max_events and not self._stop:
                    self._cv.wait(1.0)  # backpressure: the trainer is behind
                if self._stop:
                    return
            try:
                with self._lock:
                    # Read under the consumer lock: a seek holds it while it moves the
                    # position and bumps the generation, so this poll and this number agree.
                    generation = self._generation
                    polled = self._consumer.poll(
                        timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_poll_records
                    )
                    polled = self._check_seek_landing(polled)
            except Exception as e:  # broker outage: kafka-python retries; keep going
                log.warning("poll failed (%s: %s); retrying", type(e).__name__, e)
                time.sleep(0.5)
                continue
            if not polled:
                continue
            self._ingest(polled, generation)

    def _drop_repeats(self, res, values: list, parts: list[int], offsets: list[int]):
        """Move events repeating a recently accepted event id (same partition) to the rejects."""
        if self.cfg.dedup_window <= 0 or not len(res.batch):
            return res
        keep = []
        repeats: list[tuple[int, Reject]] = []
        for row, pos in enumerate(res.accepted_positions.tolist()):
            eid = res.batch.event_id[row]
            if self._dedup[parts[pos]].is_duplicate(eid, offsets[pos]):
                raw = values[pos]
                raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
                repeats.append(
                    (
                        pos,
                        Reject(
                            raw,
                            "duplicate_event_id",
                            f"event_id {eid!r} already accepted on partition {parts[pos]} within the last "
                            f"{self.cfg.dedup_window} offsets",
                        ),
                    )
                )
            else:
                keep.append(row)
        if not repeats:
            return res
        rejected = list(zip(res.rejected_positions.tolist(), res.rejects)) + repeats
        rejected.sort(key=lambda pr: pr[0])
        return DecodeResult(
            batch=res.batch.take(np.asarray(keep, dtype=np.int64)),
            rejects=[r for _, r in rejected],
            accepted_positions=res.accepted_positions[np.asarray(keep, dtype=np.int64)],
            rejected_positions=np.asarray([p for p, _ in rejected], dtype=np.int64),
        )

    def _check_seek_landing(self, polled: dict) -> dict:
        """After a seek to offset X, the first records must start at or before X.

        Kafka returns the record batch that contains X (the client skips the head).
        A broker that answers with a later batch would make us skip X.. silently
        (Tansu 0.6 does this for an offset in the middle of a batch), and exactly-once
        would be lost. So until a partition lands, records starting after X are
        dropped and the consumer re-seeks earlier (doubling the step back); records
        before X are dropped once it lands. Landing at offset 0 accepts a real gap
        (compaction, transaction markers). Called with the consumer lock held.
        """
        if not self._verify:
            return polled
        out = {}
        for tp, records in polled.items():
            check = self._verify.get(tp.partition)
            if check is None or not records:
                out[tp] = records
                continue
            target, probe = check
            first = records[0].offset
            if first <= target or probe == 0:
                del self._verify[tp.partition]
                kept = [r for r in records if r.offset >= target]
                if kept:
                    out[tp] = kept
                continue
            step = max(512, 2 * (target - probe))
            probe = max(0, target - step)
            log.warning(
                "partition %s: asked for offset %d, broker answered from %d; re-seeking to %d",
                tp.partition,
                target,
                first,
                probe,
            )
            self._verify[tp.partition] = (target, probe)
            self._consumer.seek(tp, probe)
        return out

    def _ingest(self, polled: dict, generation: int) -> None:
        values, parts, offsets, ts, keys = [], [], [], [], []
        for tp, records in polled.items():
            for r in records:
                values.append(r.value)
                parts.append(tp.partition)
                offsets.append(r.offset)
                ts.append(r.timestamp)
                keys.append(r.key)
        res = decode_batch(
            values,
            self.cfg.limits,
            kafka_partition=parts,
            kafka_offset=offsets,
            kafka_ts_ms=ts,
            mapping=self._mapping,
            topic=self.cfg.topic,
        )
        with self._cv:
            if generation != self._generation:
                return  # a seek happened while we polled: these records are stale
            res = self._drop_repeats(res, values, parts, offsets)
            # Re-reads after a seek back (trainer restart) must not dead-letter twice.
            fresh_rejects = []
            unit_rejects = []
            for pos, rej in zip(res.rejected_positions.tolist(), res.rejects):
                p, off = parts[pos], offsets[pos]
                unit_rejects.append(DeadLettered(p, off, rej.category))
                if off >= self._dlq_next.get(p, -1):
                    self._dlq_next[p] = off + 1
                    fresh_rejects.append((pos, rej))
                    self.reject_categories[rej.category] = self.reject_categories.get(rej.category, 0) + 1
            self.counters["consumed"] += len(values)
            self.counters["accepted"] += len(res.batch)
            self.counters["rejected"] += len(fresh_rejects)
            next_offsets: dict[int, int] = {}
            for p, off in zip(parts, offsets):
                next_offsets[p] = max(next_offsets.get(p, 0), off + 1)
            self._buffer.append(_Unit(res.batch, unit_rejects, next_offsets))
            self._buffered += self._buffer[-1].size()
            self._cv.notify_all()
        for pos, rej in fresh_rejects:
            self._dlq.send(rej, key=keys[pos], source=(self.cfg.topic, parts[pos], offsets[pos]))
