"""TrainerLoop without Ray: a fake source of ingest units and a fake snapshot sink around a
real TrainerService (real trainer, real checkpoints on disk)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from memory_bank.base import DeltaState, FullState
from stream.messages import DeadLettered, IngestUnit
from stream.recordings.data.synthetic import build_synthetic_recording
from stream.train.checkpoints import CheckpointManager
from stream.train.evaluate import iter_event_batches
from stream.train.loop import TrainerLoop
from tests.stream.conftest import small_service

pytestmark = pytest.mark.timeout(180)  # a loop that never reaches max_events fails, not hangs


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    """Six units of 100 events (partitions 0-3); the last also covers a dead-lettered message."""
    path = tmp_path_factory.mktemp("rec") / "syn.parquet"
    build_synthetic_recording(path, events=600, users=40, items=200, seed=5)
    out = []
    for i, b in enumerate(iter_event_batches(path, batch_size=100)):
        nxt = {
            int(p): int(b.kafka_offset[b.kafka_partition == p].max()) + 1
            for p in np.unique(b.kafka_partition)
        }
        rejects = ()
        if i == 5:  # a message after the last event on partition 0, sent to the DLQ
            rejects = (DeadLettered(0, nxt[0], "invalid_json"),)
            nxt[0] += 1
        out.append(IngestUnit(events=b.to_arrow(), rejects=rejects, next_offsets=nxt))
    return out


class FakeSource:
    """Hands out the units in order, once each; records seeks and commits."""

    def __init__(self, units, checkpoints: CheckpointManager):
        self.units = list(units)
        self.checkpoints = checkpoints
        self.seeks: list[dict[int, int]] = []
        self.commits: list[tuple[dict[int, int], bool, int | None]] = []

    def seek_all(self, offsets):
        self.seeks.append(dict(offsets))
        # Deliver only what lies at or past the sought offsets (a reader after a seek).
        self.units = [u for u in self.units if any(o > offsets.get(p, 0) for p, o in u.next_offsets.items())]

    def poll(self, timeout_s, offsets):
        return [self.units.pop(0)] if self.units else []

    def commit(self, offsets, wait):
        latest = self.checkpoints.latest()  # what is durable when the commit is made
        self.commits.append((dict(offsets), wait, None if latest is None else latest.seq))


class FakeSink:
    """Stores every payload; the versions in `fail` are refused."""

    def __init__(self, fail=()):
        self.payloads = []
        self.fail = set(fail)

    def publish(self, payload):
        self.payloads.append(payload)
        return payload.version

    def settled(self, version, wait):
        return RuntimeError("store refused the write") if version in self.fail else True

    def drain(self):
        pass


def _loop(svc, source, sink, snapshot_every=2.0, checkpoint_every=1e9):
    clock = itertools.count(0.0, 1.0)  # one second per look at the clock
    return TrainerLoop(
        svc,
        source,
        sink,
        snapshot_interval_s=snapshot_every,
        checkpoint_interval_s=checkpoint_every,
        clock=lambda: next(clock),
    )


def test_trains_everything_then_publishes_and_checkpoints_it(tmp_path, units):
    svc = small_service(tmp_path / "ck")
    source, sink = FakeSource(units, svc.checkpoints), FakeSink()
    total = sum(u.events.num_rows + len(u.rejects) for u in units)
    progress = _loop(svc, source, sink).run(max_events=total)
    assert progress.events_applied == total - 1 and progress.rejects_applied == {"invalid_json": 1}
    assert progress.events_consumed == total  # from the Kafka positions, not from the counters
    assert progress.next_offsets == {p: max(u.next_offsets.get(p, 0) for u in units) for p in range(4)}
    # Versions: the starting state (full), deltas at the cadence, and a last one.
    kinds = [type(p.state) for p in sink.payloads]
    assert kinds[0] is FullState and all(k is DeltaState for k in kinds[1:]) and len(kinds) >= 3
    assert sink.payloads[-1].meta["offsets"] == {str(p): o for p, o in progress.next_offsets.items()}
    assert sum(len(p.event_ts_ms) for p in sink.payloads) == total - 1  # every trained event in one version
    # The final checkpoint covers everything, and the commit came after it was durable.
    ckpt = svc.checkpoints.latest()
    assert {int(p): o for p, o in ckpt.meta["offsets"].items()} == progress.next_offsets
    assert source.commits == [(progress.next_offsets, True, ckpt.seq)]


def test_a_failed_publish_makes_the_next_version_full(tmp_path, units):
    svc = small_service(tmp_path / "ck")
    sink = FakeSink(fail={2})
    total = sum(u.events.num_rows + len(u.rejects) for u in units)
    _loop(svc, FakeSource(units, svc.checkpoints), sink, snapshot_every=1.0).run(max_events=total)
    kinds = {p.version: (type(p.state), p.parent) for p in sink.payloads}
    assert kinds[2][0] is DeltaState and kinds[3] == (FullState, None)
    assert svc.publish_failures == 1


def test_a_restarted_loop_resumes_from_the_checkpoint_offsets(tmp_path, units):
    first = small_service(tmp_path / "ck")
    half = sum(u.events.num_rows + len(u.rejects) for u in units[:3])
    _loop(first, FakeSource(units, first.checkpoints), FakeSink()).run(max_events=half)

    again = small_service(tmp_path / "ck")  # a new incarnation restores the newest checkpoint
    assert again.restored_from is not None and again.next_offsets == first.next_offsets
    source = FakeSource(units, again.checkpoints)
    total = sum(u.events.num_rows + len(u.rejects) for u in units)
    progress = _loop(again, source, FakeSink()).run(max_events=total)
    assert source.seeks[0] == first.next_offsets  # the readers were sent to the checkpoint
    assert progress.events_applied + sum(progress.rejects_applied.values()) == total
    assert progress.events_consumed == total  # the lineage's start survived the restart
    assert progress.duplicates_dropped == 0


def test_stop_ends_the_loop_with_a_final_checkpoint(tmp_path, units):
    svc = small_service(tmp_path / "ck")
    source = FakeSource(units, svc.checkpoints)
    loop = _loop(svc, source, FakeSink())
    polls = source.poll

    def poll_then_stop(timeout_s, offsets):
        loop.stop.set()  # as request_stop does from another thread
        return polls(timeout_s, offsets)

    source.poll = poll_then_stop
    progress = loop.run()
    assert progress.events_applied == units[0].events.num_rows  # the one unit polled
    assert svc.checkpoints.latest().meta["events_applied"] == progress.events_applied


def test_poison_events_reach_the_dead_letter_port(tmp_path, units):
    from stream.ingest.events import EventBatch

    b = EventBatch.from_arrow(units[1].events)
    b.labels["rating"] = b.labels["rating"].copy()
    b.labels["rating"][3] = 1e300  # inf in float32: the step of any batch holding it is poisoned
    poisoned_units = [units[0], IngestUnit(b.to_arrow(), units[1].rejects, units[1].next_offsets)]
    svc = small_service(tmp_path / "ck")
    letters = []
    loop = _loop(svc, FakeSource(poisoned_units, svc.checkpoints), FakeSink())
    loop.dead_letter = letters.extend
    total = sum(u.events.num_rows + len(u.rejects) for u in poisoned_units)
    progress = loop.run(max_events=total)
    assert [(x.partition, x.offset) for x in letters] == [(int(b.kafka_partition[3]), int(b.kafka_offset[3]))]
    assert progress.rejects_applied == {"poison": 1} and progress.events_applied == total - 1


def test_checkpoints_that_keep_failing_stop_the_loop(tmp_path, units, monkeypatch):
    from models.online import OnlineTrainer
    from stream.train.checkpoints import CheckpointDurabilityError

    def disk_full(directory, tensors, meta):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(OnlineTrainer, "write_state", staticmethod(disk_full))
    svc = small_service(tmp_path / "ck")
    loop = _loop(svc, FakeSource(units, svc.checkpoints), FakeSink(), checkpoint_every=1.0)
    with pytest.raises(CheckpointDurabilityError, match="in a row"):
        loop.run()  # no max_events: only the failing checkpoints end it
    h = svc.checkpoints.health()
    assert h["saves"] == 0 and h["consecutive_failures"] >= h["max_consecutive_failures"]
    assert svc.progress().checkpoints["save_failures"] == h["save_failures"]
