"""The trainer's main loop, without Ray: pull units, train, publish, checkpoint.

`TrainerLoop.run()` is what the trainer actor runs (stream/job/actors.py wraps it
around Ray handles). It talks to two ports, so tests drive it with fakes:
  UnitSource     the ingest readers: seek them to offsets, poll whatever units are
                 ready, commit group offsets (after a durable checkpoint only);
  SnapshotSink   the publisher: hand it a version, ask whether it was stored.

Per turn: whatever the readers have within a moment is trained as one stream
(`TrainerService.apply_units`; events whose step fails on their own go to `dead_letter`); every `snapshot_interval_s` the next version goes to
the sink once the previous one settled (a failed one makes the next one full); every
`checkpoint_interval_s` a checkpoint is captured here and written on a thread, and
only once it is durable are its offsets committed. On stop (or `max_events`): the last
version, a final checkpoint inline, and its offsets committed. However `run` ends (an
error included), the per-event predictions file is closed: readable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from stream.messages import IngestUnit, PoisonedEvent, TrainerProgress
from stream.train.checkpoints import CheckpointDurabilityError
from stream.train.service import SnapshotPayload, TrainerService

log = logging.getLogger(__name__)


class UnitSource(Protocol):
    def seek_all(self, offsets: dict[int, int]) -> None:
        """Every reader to `offsets` (what they deliver next starts there)."""
        ...

    def poll(self, timeout_s: float, offsets: dict[int, int]) -> list[IngestUnit]:
        """The units ready within `timeout_s` (possibly none). A reader found dead is sought
        to `offsets` (the trainer's, as of now) before it is asked again."""
        ...

    def commit(self, offsets: dict[int, int], wait: bool) -> None:
        """Move the consumer group's offsets (monitoring; the checkpoint holds the truth)."""
        ...


class SnapshotSink(Protocol):
    def publish(self, payload: SnapshotPayload) -> Any:
        """Start storing a version; returns a handle for `settled`."""
        ...

    def settled(self, handle: Any, wait: bool) -> bool | BaseException:
        """False while pending; True once stored; the exception if storing it failed."""
        ...

    def drain(self) -> None:
        """Wait for work the sink does on its own (bases) before the loop returns."""
        ...


class TrainerLoop:
    def __init__(
        self,
        svc: TrainerService,
        source: UnitSource,
        sink: SnapshotSink,
        snapshot_interval_s: float,
        checkpoint_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        dead_letter: Callable[[list[PoisonedEvent]], None] | None = None,
    ):
        self.svc = svc
        self.source = source
        self.sink = sink
        self.snapshot_interval_s = snapshot_interval_s
        self.checkpoint_interval_s = checkpoint_interval_s
        self.clock = clock
        self.dead_letter = dead_letter  # where poison events go (the DLQ topic); None: logged only
        self.stop = threading.Event()
        self._publishing: dict[int, Any] = {}  # version -> handle, until settled
        self._ckpt_writer: threading.Thread | None = None
        self.fatal: BaseException | None = None  # set by the checkpoint writer: ends the run

    def applied(self) -> int:
        """Messages applied in this lineage: trained + dead-lettered."""
        return self.svc.trainer.events_applied + sum(self.svc.rejects_applied.values())

    # -- the loop --------------------------------------------------------------------------------
    def run(self, max_events: int | None = None, poll_timeout_s: float = 0.2) -> TrainerProgress:
        """Train until `stop` is set or `max_events` messages are applied."""
        try:
            return self._run(max_events, poll_timeout_s)
        finally:
            self.svc.close_predictions()

    def _run(self, max_events: int | None, poll_timeout_s: float) -> TrainerProgress:
        svc = self.svc
        self.source.seek_all(dict(svc.next_offsets))
        last_ckpt = last_snap = self.clock()
        published_at = self.applied()
        # The state we start from (fresh or restored) goes out at once unless it already did
        # (publish_start): replicas load the large first version while the first events
        # train, so what follows are small deltas.
        pending = self.publish() if svc.last_published is None else None
        while not self.stop.is_set():
            if self.fatal is not None:
                raise self.fatal
            if max_events is not None and self.applied() >= max_events:
                break
            units = self.source.poll(poll_timeout_s, svc.next_offsets)
            if units:
                svc.apply_units(units)
                self._dead_letter_poison()
            now = self.clock()
            settled = pending is None or self.settle(pending)
            if (
                now - last_snap >= self.snapshot_interval_s
                and settled
                and (self.applied() > published_at or svc.republish)
            ):
                pending = self.publish()
                published_at, last_snap = self.applied(), now
            if now - last_ckpt >= self.checkpoint_interval_s and self.checkpoint():
                last_ckpt = now
        # Final: the last version and a checkpoint covering everything applied.
        if pending is not None:
            self.settle(pending, wait=True)
        if self.applied() > published_at or svc.republish:
            self.settle(self.publish(), wait=True)
        self.checkpoint(final=True)
        self.sink.drain()
        if self.fatal is not None:
            raise self.fatal
        return svc.progress()

    def _dead_letter_poison(self) -> None:
        poisoned = self.svc.take_poisoned()
        if poisoned and self.dead_letter is not None:
            try:
                self.dead_letter(poisoned)
            except Exception as e:
                log.error("%d poison events not written to the dead-letter topic: %s", len(poisoned), e)

    def publish_start(self) -> int | None:
        """Publish the state this trainer starts from (unless done) and wait until stored."""
        if self.svc.last_published is None:
            self.settle(self.publish(), wait=True)
        return self.svc.last_published

    # -- snapshots -------------------------------------------------------------------------------
    def publish(self) -> int | None:
        """Cut the next version and hand it to the sink; returns its version (None: the
        health gate withheld it, serving keeps the last good one)."""
        payload = self.svc.snapshot_payload()
        if payload is None:
            return None
        self._publishing[payload.version] = self.sink.publish(payload)
        return payload.version

    def settle(self, version: int | None, wait: bool = False) -> bool:
        """True once `version` is no longer pending; a failed one makes the next one full."""
        handle = self._publishing.get(version)
        if handle is None:
            return True
        outcome = self.sink.settled(handle, wait)
        if outcome is False:
            return False
        del self._publishing[version]
        if isinstance(outcome, BaseException):
            self.svc.publish_failed(version, outcome)
        return True

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self, final: bool = False) -> bool:
        """Capture a checkpoint here; write it and then commit its offsets on a writer thread
        (the final one inline). False if the previous one is still being written."""
        writer = self._ckpt_writer
        if writer is not None and writer.is_alive():
            if not final:
                return False
            writer.join()
        pending = self.svc.capture_checkpoint()

        def write_then_commit() -> None:
            try:
                self.svc.write_checkpoint(pending)
            except CheckpointDurabilityError as e:
                log.error("%s", e)
                self.fatal = e  # the loop stops on it: training on without durability is not safe
                return
            except Exception as e:
                log.error("checkpoint write failed (%s); offsets not committed, next one retries", e)
                return
            # Only now, with the checkpoint durable, may the group offsets move.
            try:
                self.source.commit(pending.offsets, wait=final)
            except Exception as e:
                log.warning("committing group offsets failed: %s", e)

        if final:
            write_then_commit()
        else:
            self._ckpt_writer = threading.Thread(
                target=write_then_commit, name="checkpoint-writer", daemon=True
            )
            self._ckpt_writer.start()
        return True
