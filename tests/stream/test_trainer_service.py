"""TrainerService snapshot lineage: a publish that never landed is not chained onto."""

import numpy as np
import pytest

from memory_bank.base import FullState
from stream.messages import IngestUnit
from tests.stream.conftest import small_service, synthetic_units


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    return synthetic_units(tmp_path_factory.mktemp("rec") / "syn.parquet", events=600)


def test_failed_publish_makes_the_next_snapshot_full(tmp_path, units):
    svc = small_service(tmp_path / "ck")
    svc.apply_unit(units[0])
    first = svc.snapshot_payload()
    assert isinstance(first.state, FullState) and first.parent is None
    svc.apply_unit(units[1])
    second = svc.snapshot_payload()
    assert second.parent == first.version and not isinstance(second.state, FullState)
    assert not svc.republish

    svc.publish_failed(second.version, RuntimeError("store unreachable"))
    assert svc.republish and svc.progress().publish_failures == 1
    third = svc.snapshot_payload()  # no new events needed: the failed content is re-sent whole
    assert isinstance(third.state, FullState) and third.parent is None
    assert third.version == second.version + 1 and not svc.republish
    svc.apply_unit(units[2])
    fourth = svc.snapshot_payload()
    assert fourth.parent == third.version and not isinstance(fourth.state, FullState)


def test_every_kth_delta_carries_a_base(tmp_path, units):
    svc = small_service(tmp_path / "ck")
    svc.full_every = 2
    kinds = []
    for u in units[:4]:
        svc.apply_unit(u)
        p = svc.snapshot_payload()
        kinds.append((p.version, type(p.state).__name__, p.base is not None))
    # v1 is full (a start); v3 is a delta whose full copy rides along, as is v5's later
    assert kinds == [
        (1, "FullState", False),
        (2, "DeltaState", False),
        (3, "DeltaState", True),
        (4, "DeltaState", False),
    ]


def test_units_from_several_readers_train_as_one_stream_in_timestamp_order(tmp_path, units):
    """Two readers' results applied together, in either order, equal the same events applied
    as one unit in (Kafka timestamp, partition, offset) order."""
    from stream.ingest.events import EventBatch

    merged = EventBatch.concat([EventBatch.from_arrow(u.events) for u in units[:2]])
    by_reader = []
    for parity in (0, 1):  # reader A has the even partitions, reader B the odd ones
        pick = np.flatnonzero(merged.kafka_partition % 2 == parity)
        part = merged.take(pick)
        by_reader.append(
            IngestUnit(
                events=part.to_arrow(),
                rejects=(),
                next_offsets={
                    int(p): int(part.kafka_offset[part.kafka_partition == p].max()) + 1
                    for p in np.unique(part.kafka_partition)
                },
            )
        )
    assert all(u.events.num_rows for u in by_reader)
    a, b = small_service(tmp_path / "a" / "ck"), small_service(tmp_path / "b" / "ck")
    c = small_service(tmp_path / "c" / "ck")
    assert a.apply_units(by_reader) == len(merged)
    assert c.apply_units(by_reader[::-1]) == len(merged)
    key = np.lexsort((merged.kafka_offset, merged.kafka_partition, merged.kafka_ts_ms))
    assert len(np.unique(merged.kafka_ts_ms)) < len(merged)  # tied timestamps: what the tie-break is for
    in_order = IngestUnit(
        events=merged.take(key).to_arrow(),
        rejects=(),
        next_offsets={p: o for u in by_reader for p, o in u.next_offsets.items()},
    )
    b.apply_unit(in_order)
    assert a.next_offsets == b.next_offsets and a.lineage == b.lineage
    assert a.trainer.metrics.summary()["auc.like"] == b.trainer.metrics.summary()["auc.like"]
    assert a.trainer.metrics.summary() == c.trainer.metrics.summary()


def _poisoned(unit: IngestUnit, row: int) -> IngestUnit:
    """The unit with one event's rating at 1e300: finite in JSON, infinite in float32."""
    from stream.ingest.events import EventBatch

    b = EventBatch.from_arrow(unit.events)
    b.labels["rating"] = b.labels["rating"].copy()
    b.labels["rating"][row] = 1e300
    return IngestUnit(events=b.to_arrow(), rejects=unit.rejects, next_offsets=unit.next_offsets)


def test_a_poison_event_is_isolated_dead_lettered_and_the_rest_trained(tmp_path, units):
    from stream.ingest.events import EventBatch

    svc = small_service(tmp_path / "ck")
    bad_unit = _poisoned(units[0], 37)
    trained = svc.apply_unit(bad_unit)
    n = units[0].events.num_rows
    assert trained == n - 1 and svc.trainer.events_applied == n - 1
    assert svc.rejects_applied == {"poison": 1}
    (letter,) = svc.take_poisoned()
    b = EventBatch.from_arrow(bad_unit.events)
    assert (letter.partition, letter.offset) == (int(b.kafka_partition[37]), int(b.kafka_offset[37]))
    assert letter.event["event_id"] == b.event_id[37] and letter.event["labels"]["rating"] == 1e300
    assert "non-finite" in letter.error and svc.take_poisoned() == []
    # Every offset is applied once (trained or dead-lettered), and the offsets move past all.
    assert sum(v[0] for v in svc.lineage.values()) == n
    assert svc.next_offsets == bad_unit.next_offsets
    # The model is healthy after it: the next unit trains with finite scores.
    svc.apply_unit(units[1])
    assert np.isfinite(svc.trainer.metrics.summary()["logloss.like"])


def test_a_trainer_that_cannot_train_at_all_raises(tmp_path, units, monkeypatch):
    from models.online import PoisonBatchError
    from stream.train.service import TrainerFault

    svc = small_service(tmp_path / "ck")

    def broken(batch):
        raise PoisonBatchError("RuntimeError: a bug, not the data")

    monkeypatch.setattr(svc.trainer, "step", broken)
    with pytest.raises(TrainerFault, match="not of the data"):
        svc.apply_unit(units[0])


def test_events_consumed_counts_from_the_first_offset_dead_lettered_or_trained(tmp_path, units):
    """A partition whose first message was dead-lettered: consumed still covers it."""
    from stream.ingest.events import EventBatch
    from stream.messages import DeadLettered

    first = units[0]
    b_offsets = dict(first.next_offsets)
    b = EventBatch.from_arrow(first.events)
    p0 = int(b.kafka_partition[0])
    low = int(b.kafka_offset[b.kafka_partition == p0].min())
    # The unit's first message on p0 (offset low) is a reject; its events start after it.
    keep = ~((b.kafka_partition == p0) & (b.kafka_offset == low))
    unit = IngestUnit(
        events=b.take(np.flatnonzero(keep)).to_arrow(),
        rejects=(DeadLettered(p0, low, "invalid_json"),),
        next_offsets=b_offsets,
    )
    svc = small_service(tmp_path / "ck")
    svc.apply_unit(unit)
    p = svc.progress()
    assert p.events_consumed == p.events_applied + p.events_dlq == first.events.num_rows


def test_live_units_train_in_the_ramps_micro_batches(tmp_path, units):
    """The live path splits units as eval does (TrainerConfig.micro_batch_size): steps of 16
    until 128 events, 32 until 256, then 64; a unit's split goes on where the last one ended."""
    svc = small_service(tmp_path / "ck", min_batch_size=16, batch_ramp_events=256)
    steps = []
    for u in units[:4]:  # 100 events each
        svc.apply_unit(u)
        steps.append(svc.trainer.steps)
    # sizes by events applied before each step, cut at the unit's end: 16 x 6 + 4 | 16, 16
    # (-> 132), 32, 32, 4 | 32, 32 (-> 264), 36 | 64, 36
    assert svc.trainer.events_applied == 400
    assert steps == [7, 12, 15, 17]
