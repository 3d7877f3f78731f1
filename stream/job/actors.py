"""Ray actors of the streaming job. Actors own state; the driver (stream/job/driver.py) owns topology.

IngestActor     a PartitionReader: Kafka -> decoded columnar units (CPU)
TrainerActor    a TrainerService driven by a TrainerLoop (stream/train/): pulls units
                from the readers, trains, checkpoints, hands snapshots to the publisher
                (GPU when the cluster has one)
PublisherActor  a SnapshotPublisher: writes snapshots, keeps the serving ledger

Each is a thin shell over a plain class that is tested without Ray; the Ray-specific
parts are the two ports the loop talks to: RayReaders (one `next_batch` request
outstanding per reader, `ray.wait` on whichever answers first, so readers fetch and
decode while the trainer trains, and a slow trainer simply stops asking: the readers'
buffers are bounded) and RayPublisher. All three restart after a crash (max_restarts);
the trainer then restores its newest checkpoint and seeks the readers back to its
offsets (the driver budgets those restarts).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from stream.ingest.reader import ReaderNotSought
from stream.snapshots.store import state_from_wire, state_to_wire

log = logging.getLogger(__name__)


def _id_memo_entries() -> int:
    """Entries of this process's id memos (models/ids.py: the string -> integer hashes)."""
    from models.ids import default_encoder

    enc = default_encoder()
    return sum(len(m.cache) for m in (enc.user, enc.item, enc.cat, enc.key)) + len(enc._words)


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=4, num_cpus=0.25)
class IngestActor:
    def __init__(self, kafka_cfg: dict[str, Any], bootstrap: str, partitions: list[int]):
        from stream.ingest.reader import KafkaConfig, PartitionReader

        self.reader = PartitionReader(KafkaConfig.model_validate(kafka_cfg), bootstrap, partitions)

    def seek(self, offsets: dict[int, int], epoch: str) -> str:
        epoch = self.reader.seek(offsets, epoch)
        self.reader.start()
        return epoch

    def next_batch(self, max_events: int, timeout_s: float, epoch: str):
        return self.reader.next_batch(max_events, timeout_s, epoch)

    def commit(self, offsets: dict[int, int]) -> None:
        self.reader.commit(offsets)

    def end_offsets(self) -> dict[int, int]:
        return self.reader.end_offsets()

    def stats(self) -> dict[str, Any]:
        return self.reader.stats()

    def pid(self) -> int:
        return os.getpid()

    def sizes(self) -> dict[str, int]:
        st = self.reader.stats()
        return {
            "pid": os.getpid(),
            "dedup_ids": st["dedup_ids"],
            "buffered": st["buffered"],
            "reject_categories": len(st["reject_categories"]),
            "id_memos": _id_memo_entries(),  # ids become integers here, memoised
        }

    def close(self) -> None:
        self.reader.close()


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=8, num_cpus=0.25)
class PublisherActor:
    def __init__(self, uri: str, keep_versions: int):
        from stream.snapshots.publisher import SnapshotPublisher

        self.pub = SnapshotPublisher(uri, keep_versions, owns_process=True)

    def publish(self, version, parent, state, meta, event_ts_ms, event_trained_s=None) -> dict[str, Any]:
        return self.pub.publish(version, parent, state_from_wire(state), meta, event_ts_ms, event_trained_s)

    def publish_base(self, version, state, meta) -> dict[str, Any]:
        return self.pub.publish_base(version, state_from_wire(state), meta)

    def latest_version(self) -> int | None:
        return self.pub.latest_version()

    def changed_since(self, since: int):
        return self.pub.changed_since(since)

    def sizes(self) -> dict[str, int]:
        return {"pid": os.getpid(), **self.pub.sizes()}

    def report_serving(self, replica_id: str, event) -> None:
        self.pub.report_serving(replica_id, event)

    def serving_state(self) -> list[dict[str, Any]]:
        return self.pub.serving_state()

    def freshness(self) -> dict[str, Any]:
        return self.pub.freshness()

    def freshness_samples(self):
        return self.pub.freshness_samples()

    def snapshots(self) -> list[dict[str, Any]]:
        return self.pub.snapshots()

    def pin(self, version: int | None) -> dict[str, Any]:
        return self.pub.pin(version)

    def stats(self) -> dict[str, Any]:
        return {
            "published": self.pub.published,
            "bases_written": self.pub.bases_written,
            "base_failures": self.pub.base_failures,
        }


class RayReaders:
    """The ingest actors as the trainer loop's UnitSource.

    One `next_batch` request stays outstanding per reader; a poll waits on whichever
    answers first, then takes what the others have within a moment (training one
    reader's result alone would run its partitions ahead of the others' in event time).
    Each seek carries a fresh epoch token, so answers to an older seek are never used.
    """

    def __init__(self, readers: list, pull: int):
        self.readers = readers
        self.pull = pull
        self.epochs: list[str] = []
        self.inflight: dict = {}  # request ref -> reader index

    def _seek(self, i: int, offsets: dict[int, int], timeout_s: float = 120.0) -> str:
        epoch = uuid.uuid4().hex
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(self.readers[i].seek.remote(dict(offsets), epoch), timeout=30)
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # the actor is restarting

    def _ask(self, i: int) -> None:
        self.inflight[self.readers[i].next_batch.remote(self.pull, 0.5, self.epochs[i])] = i

    def seek_all(self, offsets: dict[int, int]) -> None:
        self.epochs = [self._seek(i, offsets) for i in range(len(self.readers))]
        self.inflight = {}
        for i in range(len(self.readers)):
            self._ask(i)

    def poll(self, timeout_s: float, offsets: dict[int, int]) -> list:
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout_s)
        if ready and len(self.inflight) > 1:
            rest = [r for r in self.inflight if r not in ready]
            ready += ray.wait(rest, num_returns=len(rest), timeout=0.05)[0]
        units = []
        for ref in ready:
            i = self.inflight.pop(ref)
            try:
                unit = ray.get(ref)
            except (RayActorError, ReaderNotSought):
                # ReaderNotSought: our request reached its restarted incarnation (queued
                # while it restarted) instead of failing; seek it all the same.
                log.warning("ingest actor %d died; seeking its restart to our offsets", i)
                self.epochs[i] = self._seek(i, offsets)
                unit = None
            if unit is not None:
                units.append(unit)
            self._ask(i)
        return units

    def commit(self, offsets: dict[int, int], wait: bool) -> None:
        refs = [r.commit.remote(offsets) for r in self.readers]
        if wait:
            ray.get(refs, timeout=30)


class RayPublisher:
    """The publisher actor as the trainer loop's SnapshotSink (bases shipped from a thread)."""

    def __init__(self, publisher):
        self.publisher = publisher
        self._base_writer: threading.Thread | None = None

    def publish(self, p):
        ref = self.publisher.publish.remote(
            p.version, p.parent, state_to_wire(p.state), p.meta, p.event_ts_ms, p.event_trained_s
        )
        if p.base is not None:
            self._write_base(p.version, p.base, p.meta, after=ref)
        return ref

    def settled(self, ref, wait: bool):
        if not ray.wait([ref], timeout=None if wait else 0)[0]:
            return False
        try:
            ray.get(ref)
        except Exception as e:
            return e
        return True

    def _write_base(self, version: int, base, meta: dict[str, Any], after) -> None:
        """Hand a base (full copy) to the publisher from a thread once the delta `after`
        (the version itself) is stored: shipping ~100 MB would otherwise stall training,
        and a base can only sit beside a written version. Skipped if the last one is still
        on its way (the next base comes K versions later; chains just stay longer)."""
        if self._base_writer is not None and self._base_writer.is_alive():
            log.warning("base for version %d skipped: the previous base is still being written", version)
            return

        def ship() -> None:
            try:
                ray.get(after)  # the publisher runs calls concurrently: the delta must be first
                ray.get(self.publisher.publish_base.remote(version, state_to_wire(base), meta))
            except Exception as e:
                log.warning("base for version %d was not written: %s", version, e)

        self._base_writer = threading.Thread(target=ship, name="base-writer", daemon=True)
        self._base_writer.start()

    def drain(self) -> None:
        if self._base_writer is not None:
            self._base_writer.join(timeout=120)


@ray.remote(
    max_restarts=-1,
    max_task_retries=0,
    concurrency_groups={"train": 1, "query": 2},
)
class TrainerActor:
    """A thin shell: a TrainerService driven by a TrainerLoop over Ray handles."""

    def __init__(
        self,
        cfg: dict[str, Any],
        work_dir: str,
        publisher_name: str,
        namespace: str,
        predictions: str | None = None,
    ):
        from models.online import OnlineTrainer
        from stream.config import config_from_dict
        from stream.train.checkpoints import CheckpointManager
        from stream.train.health import ModelHealthGate
        from stream.train.loop import TrainerLoop
        from stream.train.service import TrainerService

        self.cfg = config_from_dict(cfg, "job config")
        ck = self.cfg.checkpoints
        publisher = ray.get_actor(publisher_name, namespace=namespace)
        latest = ray.get(publisher.latest_version.remote())
        self.svc = TrainerService(
            OnlineTrainer(self.cfg.model, self.cfg.trainer),
            CheckpointManager.from_config(ck, Path(work_dir) / "checkpoints"),
            full_every=self.cfg.snapshots.full_every,
            first_version=(latest or 0) + 1,
            gate=ModelHealthGate(self.cfg.snapshots.health),
        )
        if self.svc.resume_from is not None:  # restored: go on with the store's delta chain
            since = self.svc.resume_from
            self.svc.resume_chain(ray.get(publisher.changed_since.remote(since)))
        if predictions:  # every incarnation (a restart runs this again) opens its own file
            self.svc.open_predictions(predictions)
        self.loop = TrainerLoop(
            self.svc,
            source=RayReaders([], 0),
            sink=RayPublisher(publisher),
            snapshot_interval_s=self.cfg.snapshots.interval_s,
            checkpoint_interval_s=ck.interval_s,
            dead_letter=self._dead_letter,
        )
        from stream.ingest.dlq import PoisonDeadLetters

        k = self.cfg.kafka
        # Once each across restarts: a restored trainer skips what its replay re-finds.
        self._dlq = PoisonDeadLetters(
            k.bootstrap,
            k.dlq(),
            k.topic,
            resumed_at_s=self.svc.restored_captured_at,
            floor=dict(self.svc.next_offsets),
            **k.client_options,
        )

    @ray.method(concurrency_group="train")
    def run(self, readers: list, max_events: int | None = None):
        """Train until stopped or `max_events` messages (trained + rejected) are applied."""
        cfg = self.cfg
        self.loop.source = RayReaders(
            readers, pull=max(cfg.trainer.batch_size * 4, cfg.kafka.max_poll_records)
        )
        self.loop.stop.clear()
        return self.loop.run(max_events)

    def _dead_letter(self, poisoned) -> None:
        """Poison events to the dead-letter topic, with the category, the error and the source."""
        self._dlq(poisoned)

    @ray.method(concurrency_group="train")
    def publish_start_state(self) -> int | None:
        """Publish the state this trainer starts from (fresh or restored) and wait until it
        is stored, so serving replicas find a version the moment they start; waiting for
        the first events would put the whole start-up into their freshness."""
        return self.loop.publish_start()

    # -- control and queries -------------------------------------------------------------------
    @ray.method(concurrency_group="query")
    def request_stop(self) -> None:
        self.loop.stop.set()

    @ray.method(concurrency_group="query")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="query")
    def progress(self):
        return self.svc.progress()

    @ray.method(concurrency_group="query")
    def stats(self) -> dict[str, Any]:
        return self.svc.stats()

    @ray.method(concurrency_group="query")
    def final_report(self):
        """Progress plus the full metrics (AUC of the last 20%) and memory stats."""
        from stream.messages import TrainerFinal, finite_or_none

        with self.svc.lock:
            t = self.svc.trainer
            return TrainerFinal(
                progress=self.svc.progress(),
                memories=finite_or_none(t.state.stats()),
                auc_last20_like=finite_or_none(t.metrics.auc_last(0.2)) if t.metrics.keep_log else None,
            )

    @ray.method(concurrency_group="query")
    def bank_item(self, item_id: str):
        from stream.admin import app

        with self.svc.lock:
            return app.bank_item(self.svc.trainer.bank, item_id)

    @ray.method(concurrency_group="query")
    def bank_neighbors(self, item_id: str, k: int):
        from stream.admin import app

        with self.svc.lock:
            return app.bank_neighbors(self.svc.trainer.bank, item_id, k)

    @ray.method(concurrency_group="query")
    def sizes(self) -> dict[str, int]:
        """Entries of every structure that could grow with the stream (benchmarks/soak.py)."""
        with self.svc.lock:
            t, svc = self.svc.trainer, self.svc
            f, m = t.features, t.metrics
            return {
                "pid": os.getpid(),
                "auc_summary": len(m.auc.uniq) + m.auc._pending_n,
                "score_log": sum(len(x) for x in m._log_s) if m.keep_log else 0,
                "hasher_caches": _id_memo_entries(),
                "feature_candidates": len(f.sightings),
                "history_users": len(t.history.slots),
                "bank_rows": 0 if t.bank is None else len(t.bank),
                "pending_freshness": sum(len(x) for x in svc._pending_ts),
                "poison_pending": len(svc._poisoned),
                "lineage_partitions": len(svc.lineage),
            }

    @ray.method(concurrency_group="query")
    def health(self) -> dict[str, Any]:
        """The health gate's last verdict (why a version was withheld, if one was)."""
        with self.svc.lock:
            return self.svc.gate.summary()

    @ray.method(concurrency_group="query")
    def memory_stats(self, name: str) -> dict[str, Any] | None:
        """A component's stats; {"enabled": False} for a memory the config switched off
        (`model.use_<name>`); None for a name the model does not know."""
        with self.svc.lock:
            t = self.svc.trainer
            comp = t.state.components().get(name)
            if comp is not None:
                return {"enabled": True, **comp.stats()}
            return {"enabled": False} if getattr(t.cfg, f"use_{name}", None) is False else None

    @ray.method(concurrency_group="query")
    def user_history(self, user_id: str, limit: int):
        from stream.admin import app

        with self.svc.lock:
            return app.user_history(self.svc.trainer.history, self.svc.trainer.bank, user_id, limit)
