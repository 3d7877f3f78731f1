"""A trainer restart goes on with the store's delta chain (TrainerService.resume_chain):
no full version unless the chain needs one, and the version after the restart, loaded by
a replica that was on the store's latest, equals the restarted trainer's state.

The hard case is covered: versions published after the checkpoint and before the crash
(their events are trained again after it), with LRU evictions in the history and the
bank on both sides, so the restart's delta must re-ship or free what they changed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_bank.base import DeltaState, FullState
from models.config import ModelConfig, TrainerConfig
from models.online import OnlineTrainer
from models.state import RankingState
from stream.messages import IngestUnit
from stream.recordings.data.synthetic import build_synthetic_recording
from stream.snapshots.publisher import SnapshotPublisher
from stream.train.checkpoints import CheckpointManager
from stream.train.evaluate import iter_event_batches
from stream.train.service import CHAIN_MARKS, TrainerService
from tests.stream.conftest import small_model_config

pytestmark = pytest.mark.timeout(300)


def _evicting_config() -> ModelConfig:
    """The small test model with a history and a bank too small for the stream's users and
    items: evictions (freed rows and slots) happen before and after the checkpoint."""
    cfg = small_model_config()
    return cfg.model_copy(
        update={
            "history": cfg.history.model_copy(update={"max_users": 100}),
            "bank": cfg.bank.model_copy(update={"capacity": 64}),
        }
    )


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> list[IngestUnit]:
    path = tmp_path_factory.mktemp("rec") / "syn.parquet"
    build_synthetic_recording(path, events=1400, users=160, items=400, seed=11)
    out = []
    for b in iter_event_batches(path, batch_size=100):
        nxt = {
            int(p): int(b.kafka_offset[b.kafka_partition == p].max()) + 1
            for p in np.unique(b.kafka_partition)
        }
        out.append(IngestUnit(events=b.to_arrow(), rejects=(), next_offsets=nxt))
    return out


def _service(cfg: ModelConfig, ckpt_dir, pub: SnapshotPublisher) -> TrainerService:
    """As TrainerActor builds it: the first version after the store's latest, and on a
    restore the stored chain's changes handed to resume_chain."""
    svc = TrainerService(
        OnlineTrainer(cfg, TrainerConfig(seed=0, batch_size=64)),
        CheckpointManager(ckpt_dir),
        full_every=1000,
        first_version=(pub.latest_version() or 0) + 1,
    )
    if svc.resume_from is not None:
        svc.resume_chain(pub.changed_since(svc.resume_from))
    return svc


def _publish(svc: TrainerService, pub: SnapshotPublisher) -> FullState | DeltaState:
    p = svc.snapshot_payload()
    pub.publish(p.version, p.parent, p.state, p.meta, p.event_ts_ms, p.event_trained_s)
    return p.state


def _kinds(pub: SnapshotPublisher) -> list[str]:
    return [s["kind"] for s in reversed(pub.snapshots())]


def _replica(cfg: ModelConfig, pub: SnapshotPublisher) -> RankingState:
    """A serving copy of the store's latest version (full + deltas, as a replica loads it)."""
    chain = pub.store.load_chain()
    state = RankingState(cfg)
    state.load_full(chain.full)
    for d in chain.deltas:
        state.apply_delta(d)
    return state


def _assert_same_state(trainer: RankingState, replica: RankingState) -> None:
    """Everything a prediction reads, compared as serving keys it (users and items by id)."""
    for name, t in trainer.dense_state().items():
        assert torch.equal(t, replica.dense_state()[name]), f"dense.{name}"
    for owner in trainer.tracker.owners():
        for table, w in trainer.tracker.tables(owner).items():
            assert torch.equal(w, replica.tracker.tables(owner)[table]), f"{owner}.{table}"
    ft, fr = trainer.features.export_state(), replica.features.export_state()
    for k, v in ft[0].items():
        assert torch.equal(v, fr[0][k]), f"features.{k}"
    assert (ft[1]["cat_slots"], ft[1]["num_slots"]) == (fr[1]["cat_slots"], fr[1]["num_slots"])
    users = sorted(trainer.history.slots)
    assert dict(trainer.history.slots) == dict(replica.history.slots), "history slots by user"
    ht, hr = (
        trainer.history.get(np.array(users, dtype=np.int64), touch=False),
        replica.history.get(np.array(users, dtype=np.int64), touch=False),
    )
    for f in ("item_code", "item_key", "bank_row", "ts_ms", "signal", "mask"):
        assert torch.equal(getattr(ht, f), getattr(hr, f)), f"history.{f}"
    assert trainer.bank.rows == replica.bank.rows, "bank rows by item"
    assert torch.equal(trainer.bank.row_key, replica.bank.row_key), "bank row keys"
    live = torch.tensor(sorted(trainer.bank.rows.values()), dtype=torch.int64)
    assert torch.equal(trainer.bank.bank[live], replica.bank.bank[live])


def test_a_restart_publishes_a_delta_on_the_latest_version_that_serving_loads_exactly(tmp_path, units):
    cfg = _evicting_config()
    pub = SnapshotPublisher(str(tmp_path / "snapshots"), keep_versions=50)
    ck = tmp_path / "ck"
    first = _service(cfg, ck, pub)
    for u in units[:4]:
        first.apply_unit(u)
        _publish(first, pub)
    first.checkpoint()  # cut right after v4: its marks are empty
    first.apply_unit(units[4])  # trained, never published before the next checkpoint
    first.checkpoint()  # cut after v4 still: its marks are what units[4] changed
    for u in units[5:9]:  # published after the checkpoint, then the trainer dies
        first.apply_unit(u)
        _publish(first, pub)
    assert _kinds(pub) == ["full"] + ["delta"] * 7
    assert first.trainer.history.evictions and sum(first.trainer.bank.evictions.values())

    second = _service(cfg, ck, pub)  # restored at units[:5], the store is at v8 (units[:9])
    assert second.resumed_chain == {
        "since": 4,
        "resumed": True,
        "latest": 8,
        "rows": second.resumed_chain["rows"],
    }
    assert second.resumed_chain["rows"] > 0
    # Only one of the four units the store has past the checkpoint is trained again
    # before the first version: serving must lose what units[6:9] changed (re-marked).
    second.apply_unit(units[5])
    state = _publish(second, pub)
    assert isinstance(state, DeltaState)
    assert _kinds(pub) == ["full"] + ["delta"] * 8  # the restart wrote no full version
    assert pub.snapshots()[0]["parent"] == 8
    _assert_same_state(second.trainer.state, _replica(cfg, pub))

    for u in units[6:12]:  # the rest again, exactly once, then new ones: the chain goes on
        second.apply_unit(u)
    _publish(second, pub)
    assert _kinds(pub) == ["full"] + ["delta"] * 9
    _assert_same_state(second.trainer.state, _replica(cfg, pub))


def test_a_restart_right_after_the_checkpoint_resumes_with_no_versions_between(tmp_path, units):
    cfg = _evicting_config()
    pub = SnapshotPublisher(str(tmp_path / "snapshots"), keep_versions=50)
    first = _service(cfg, tmp_path / "ck", pub)
    for u in units[:3]:
        first.apply_unit(u)
        _publish(first, pub)
    first.apply_unit(units[3])
    first.checkpoint()
    second = _service(cfg, tmp_path / "ck", pub)
    assert second.resumed_chain["resumed"] and second.resumed_chain["latest"] == 3
    state = _publish(second, pub)  # only the checkpoint's own marks: units[3]
    assert isinstance(state, DeltaState)
    _assert_same_state(second.trainer.state, _replica(cfg, pub))


def test_the_restart_goes_full_when_the_chain_is_broken(tmp_path, units):
    """A full version after the checkpoint's (a failed publish re-sent whole): the rows it
    changed are not listed anywhere, so only a full version is right."""
    cfg = _evicting_config()
    pub = SnapshotPublisher(str(tmp_path / "snapshots"), keep_versions=50)
    first = _service(cfg, tmp_path / "ck", pub)
    first.apply_unit(units[0])
    _publish(first, pub)
    first.checkpoint()
    first.apply_unit(units[1])
    first.publish_failed(2, RuntimeError("store unreachable"))  # the chain restarts full
    _publish(first, pub)
    second = _service(cfg, tmp_path / "ck", pub)
    assert second.resumed_chain["resumed"] is False
    assert "version 2 is full" in second.resumed_chain["reason"]
    second.apply_unit(units[1])
    assert isinstance(_publish(second, pub), FullState)
    _assert_same_state(second.trainer.state, _replica(cfg, pub))


def test_a_checkpoint_without_chain_marks_restarts_full(tmp_path, units):
    """Checkpoints written before the marks were kept: restored as before, first version full."""
    cfg = _evicting_config()
    pub = SnapshotPublisher(str(tmp_path / "snapshots"), keep_versions=50)
    first = _service(cfg, tmp_path / "ck", pub)
    first.apply_unit(units[0])
    _publish(first, pub)
    ckpt = CheckpointManager(tmp_path / "ck").save(
        lambda d: OnlineTrainer.write_state(d / "state", *first.trainer.capture_state()),
        {k: v for k, v in first.capture_checkpoint().meta.items() if k != "delta_chain"},
    )
    assert not (ckpt.path / CHAIN_MARKS).exists()
    second = _service(cfg, tmp_path / "ck", pub)
    assert second.resume_from is None and second.resumed_chain is None
    assert second.restored_from == ckpt.seq
    assert isinstance(_publish(second, pub), FullState)
