"""Snapshots carry the trainer's state to serving exactly: full + deltas == a fresh full."""

import numpy as np
import pytest
import torch

from models.config import TrainerConfig
from models.online import OnlineTrainer
from stream.recordings.data.synthetic import build_synthetic_recording
from stream.serving.model import RankRequest, ServedModel
from stream.snapshots.store import SnapshotStore
from stream.train.evaluate import iter_event_batches
from tests.stream.conftest import small_model_config


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "syn.parquet"
    build_synthetic_recording(path, events=1500, users=60, items=300, seed=3)
    return list(iter_event_batches(path, batch_size=128))


def _requests(batch, n=3):
    out = []
    for i in range(n):
        out.append(
            RankRequest(
                user_id=batch.user_id[i],
                user_features={k: v[i] for k, v in batch.user_cat.items() if v[i] is not None},
                candidates=[{"item_id": batch.item_id[j], "item_text": batch.item_text[j]} for j in range(8)]
                + [{"item_id": "never-seen-item", "item_text": "brand new words"}],
            )
        )
    return out


def snapshot_meta(trainer) -> dict:
    return {"model_config": trainer.cfg.model_dump(mode="json"), "train_step": trainer.steps}


def _publish_full(trainer, store, version, batch) -> None:
    """Train on `batch`, publish a full `version`; the delta chain starts there."""
    trainer.step(batch)
    store.publish_full(version, trainer.state.full_snapshot(), snapshot_meta(trainer))
    trainer.state.start_delta_chain()


def _publish_delta(trainer, store, version, batch) -> None:
    """Train on `batch`, publish `version` as a delta on `version - 1`."""
    trainer.step(batch)
    store.publish_delta(version, version - 1, trainer.state.take_delta(), snapshot_meta(trainer))


def _assert_same_like(model, other, requests) -> None:
    for req in requests:
        np.testing.assert_array_equal(model.rank(req)["scores"]["like"], other.rank(req)["scores"]["like"])


def test_full_plus_deltas_equals_fresh_full(tmp_path, batches):
    trainer = OnlineTrainer(small_model_config(), TrainerConfig(seed=1))
    store = SnapshotStore(str(tmp_path / "snaps"))
    _publish_full(trainer, store, 1, batches[0])
    version = 1
    for b in batches[1:]:
        version += 1
        _publish_delta(trainer, store, version, b)
    chained = ServedModel(store.load_chain())
    assert chained.version == version
    store.publish_full(version + 1, trainer.state.full_snapshot(), snapshot_meta(trainer))
    fresh = ServedModel(store.load_chain(version + 1))
    for req in _requests(batches[-1]):
        a, b = chained.rank(req), fresh.rank(req)
        np.testing.assert_array_equal(a["scores"]["like"], b["scores"]["like"])
        np.testing.assert_array_equal(a["scores"]["rating"], b["scores"]["rating"])


def _served_after(tmp_path, batches, seed: int, steps: int = 4) -> ServedModel:
    """A serving copy of a trainer after `steps` batches (one full snapshot)."""
    trainer = OnlineTrainer(small_model_config(), TrainerConfig(seed=seed))
    for b in batches[:steps]:
        trainer.step(b)
    store = SnapshotStore(str(tmp_path / "snaps"))
    store.publish_full(1, trainer.state.full_snapshot(), snapshot_meta(trainer))
    return ServedModel(store.load_chain())


def test_user_side_reuse_matches_per_candidate(tmp_path, batches):
    served = _served_after(tmp_path, batches, seed=2)
    for req in _requests(batches[4]):
        a = served.rank(req, reuse_user_side=True)["scores"]["like"]
        b = served.rank(req, reuse_user_side=False)["scores"]["like"]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert all(0.0 < s < 1.0 for s in a)


def test_a_candidates_score_does_not_depend_on_its_place_in_the_request(tmp_path, batches):
    """A request's rows are candidates, not events: none of them counts as an earlier event
    of the user for the others (the counters, the decayed rates, the word tables). Before,
    the k-th candidate read its user as having k more events, and the same item scored
    lower the later it came."""
    served = _served_after(tmp_path, batches, seed=5)
    b = batches[4]
    cand = [{"item_id": b.item_id[j], "item_text": b.item_text[j]} for j in range(6)]
    user = {
        "user_id": b.user_id[0],
        "user_features": {k: v[0] for k, v in b.user_cat.items() if v[0] is not None},
    }
    rows = [cand[0], *cand[1:], cand[0], cand[0]]  # the first item again, twice, at the end
    like = np.asarray(served.rank(RankRequest(**user, candidates=rows))["scores"]["like"])
    np.testing.assert_allclose(like[-2:], like[0], rtol=1e-6)
    backwards = served.rank(RankRequest(**user, candidates=rows[::-1]))["scores"]["like"]
    np.testing.assert_allclose(backwards[::-1], like, rtol=1e-6)
    alone = served.rank(RankRequest(**user, candidates=[cand[3]]))["scores"]["like"]
    np.testing.assert_allclose(alone, like[3:4], rtol=1e-6)


def test_serving_scores_an_event_as_the_trainer_scores_it(tmp_path, batches):
    """Train/serve parity: from the same state, a rank request for an event's user and item
    gets the score the trainer gives that event alone (eval mode, bank rows read as serving
    reads them): counters, word tables, history, bank and model read the same on both sides."""
    trainer = OnlineTrainer(small_model_config(), TrainerConfig(seed=6))
    for b in batches[:4]:
        trainer.step(b)
    store = SnapshotStore(str(tmp_path / "snaps"))
    store.publish_full(1, trainer.state.full_snapshot(), snapshot_meta(trainer))
    served = ServedModel(store.load_chain())
    trainer.model.eval()
    b = batches[4]
    for j in range(8):
        one = b.take(np.array([j]))
        with torch.no_grad():
            u, c = trainer.inputs(one)
            want = torch.sigmoid(trainer.model(u, c)[0].like_logit).numpy()
        feats = {k: v[0] for k, v in one.user_cat.items() if v[0] is not None}
        feats |= {k: float(v[0]) for k, v in one.user_num.items() if np.isfinite(v[0])}
        req = RankRequest(
            user_id=one.user_id[0],
            user_features=feats,
            scenario=one.scenario[0],
            candidates=[{"item_id": one.item_id[0], "item_text": one.item_text[0]}],
        )
        got = served.rank(req)["scores"]["like"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_follower_refuses_corrupt_version_and_keeps_serving(tmp_path, batches):
    from stream.serving.follower import SnapshotFollower

    trainer = OnlineTrainer(small_model_config(), TrainerConfig(seed=4))
    store = SnapshotStore(str(tmp_path / "snaps"))
    trainer.step(batches[0])
    store.publish_full(1, trainer.state.full_snapshot(), snapshot_meta(trainer))
    trainer.state.start_delta_chain()
    follower = SnapshotFollower(store, build=ServedModel)
    assert follower.poll() and follower.version == 1
    req = _requests(batches[1], n=1)[0]
    before = follower.live.rank(req)

    trainer.step(batches[1])
    store.publish_delta(2, 1, trainer.state.take_delta(), snapshot_meta(trainer))
    victim = next(p for p in (tmp_path / "snaps" / "v000002").iterdir() if p.name.startswith("delta."))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert not follower.poll()  # refused
    assert follower.version == 1 and follower.refusals and follower.refusals[0]["version"] == 2
    assert "sha256" in follower.refusals[0]["reason"]
    assert follower.live.rank(req) == before  # the old version keeps answering

    trainer.step(batches[2])  # the next full snapshot recovers the replica
    store.publish_full(3, trainer.state.full_snapshot(), snapshot_meta(trainer))
    assert follower.poll() and follower.version == 3
    # a delta on top of it is applied incrementally (live/standby swap)
    trainer.state.start_delta_chain()
    trainer.step(batches[3])
    store.publish_delta(4, 3, trainer.state.take_delta(), snapshot_meta(trainer))
    assert follower.poll() and follower.version == 4
    fresh = ServedModel(store.load_chain(4))
    np.testing.assert_array_equal(
        follower.live.rank(req)["scores"]["like"], fresh.rank(req)["scores"]["like"]
    )


def test_follower_behind_by_several_deltas_catches_up_without_reloading(tmp_path, batches):
    from stream.serving.follower import SnapshotFollower

    trainer = OnlineTrainer(small_model_config(), TrainerConfig(seed=5))
    store = SnapshotStore(str(tmp_path / "snaps"))
    _publish_full(trainer, store, 1, batches[0])
    builds = []
    follower = SnapshotFollower(store, build=lambda chain: builds.append(chain.version) or ServedModel(chain))
    assert follower.poll() and builds == [1, 1]  # live + standby
    version = 1
    for lag in (3, 1, 4):  # the replica misses `lag - 1` versions between polls
        for _ in range(lag):
            version += 1
            _publish_delta(trainer, store, version, batches[version - 1])
        assert follower.poll() and follower.version == version
    assert builds == [1, 1]  # every catch-up went by deltas
    _assert_same_like(follower.live, ServedModel(store.load_chain(version)), _requests(batches[version]))
    # and the standby (the previous live copy) lands on the same state at the next swap
    _publish_delta(trainer, store, version + 1, batches[version])
    assert follower.poll() and builds == [1, 1]
    _assert_same_like(follower.live, ServedModel(store.load_chain(version + 1)), _requests(batches[version]))

    # A new full version is loaded into the standby in place (no model built), and the
    # other copy takes it at the next swap, before the delta that follows it.
    version += 1
    for v, full in ((version + 1, True), (version + 2, False), (version + 3, False)):
        batch = batches[v % len(batches)]
        if full:
            _publish_full(trainer, store, v, batch)
        else:
            _publish_delta(trainer, store, v, batch)
        assert follower.poll() and follower.version == v
        _assert_same_like(follower.live, ServedModel(store.load_chain(v)), _requests(batch))
    assert builds == [1, 1]


def test_a_replica_starting_from_a_base_serves_what_the_chain_serves(tmp_path, batches):
    """A base written beside delta v (its full copy) loads to the same model as the chain
    up to v, and a replica starting later reads the base + newer deltas only."""
    trainer = OnlineTrainer(small_model_config(), TrainerConfig(seed=1))
    store = SnapshotStore(str(tmp_path / "snaps"))
    _publish_full(trainer, store, 1, batches[0])
    for version in (2, 3):
        _publish_delta(trainer, store, version, batches[version - 1])
    store.publish_base(3, trainer.state.full_snapshot(), snapshot_meta(trainer))
    _publish_delta(trainer, store, 4, batches[3])

    from_base = store.load_chain(4)
    assert from_base.versions == [3, 4] and from_base.from_base
    assert store.latest_version() == 4  # a base never moves LATEST
    _assert_same_like(ServedModel(from_base), _served_through_chain(store, 4), _requests(batches[3]))


def _served_through_chain(store, version):
    """The model of `version` loaded by walking every delta back to the full (bases hidden)."""
    from unittest import mock

    with mock.patch.object(SnapshotStore, "has_base", return_value=False):
        chain = store.load_chain(version)
    assert chain.versions[0] == 1 and not chain.from_base
    return ServedModel(chain)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_rank_request_refuses_non_finite_features_by_name(number):
    from pydantic import ValidationError

    raw = f'{{"user_id": "u", "user_features": {{"age": {number}}}, "candidates": [{{"item_id": "a"}}]}}'
    with pytest.raises(ValidationError) as e:
        RankRequest.model_validate_json(raw)
    (err,) = e.value.errors(include_url=False)
    assert err["loc"] == ("user_features",) and "user_features.age must be finite" in err["msg"]
    assert RankRequest.model_validate_json(raw.replace(number, "1.5")).user_features == {"age": 1.5}
