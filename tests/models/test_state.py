"""RankingState: the components, one delta tracker, snapshots as loops over components,
and a serving copy that is the state alone."""

from __future__ import annotations

import numpy as np
import torch

from memory_bank.base import Stateful
from models.online import OnlineTrainer
from models.state import EMBEDDINGS, ENCODER_WORDS, RankingState
from stream.train.evaluate import iter_event_batches
from tests.models.conftest import tiny_config


def _trained(path, n_events: int) -> OnlineTrainer:
    cfg = tiny_config()
    t = OnlineTrainer(cfg.model, cfg.trainer)
    for b in iter_event_batches(path, 64, n_events):
        t.step(b)
    return t


def _copy_of(t: OnlineTrainer) -> RankingState:
    served = RankingState(t.cfg)
    served.load_full(t.state.full_snapshot())
    return served


def _assert_same(a: RankingState, b: RankingState) -> None:
    """What a prediction reads is identical (usage statistics may differ: deltas do not
    carry them)."""
    fa, fb = a.full_snapshot(), b.full_snapshot()
    read = {
        EMBEDDINGS: None,
        "features": None,
        "bank": {"vectors", "live_rows"},
        "pkm": {"values"},
        "lmn": {"memory.values", "values"},
    }
    for name, keys in read.items():
        ta, tb = fa.memories[name][0], fb.memories[name][0]
        for k in ta if keys is None else keys & set(ta):
            assert torch.equal(ta[k], tb[k]), f"{name}.{k}"
    users = np.array(sorted(a.history.slots), dtype=object)
    ha, hb = a.history.get(users), b.history.get(users)
    assert np.array_equal(ha.item_ids, hb.item_ids) and np.array_equal(ha.signal, hb.signal)
    for k in fa.dense:
        assert torch.equal(fa.dense[k], fb.dense[k]), k


def test_components_are_stateful_and_named_once(ml1m_20k):
    t = _trained(ml1m_20k, 128)
    comps = t.state.components()
    assert list(comps) == [EMBEDDINGS, "history", "features", "bank", "lmn", "pkm"]
    assert all(isinstance(c, Stateful) for c in comps.values())
    # Every row-sparse table is tracked once, and the optimizer trains exactly those.
    tracked = [w for o in t.state.tracker.owners() for w in t.state.tracker.tables(o).values()]
    in_opt = [p for g in t.opt_sparse.param_groups for p in g["params"]]
    assert [id(p) for p in tracked] == [id(p) for p in in_opt]
    assert set(t.state.tracker.tables(EMBEDDINGS)) == {*t.model.tables.keys(), ENCODER_WORDS}
    # The dense part leaves out every tracked table.
    dense = t.state.dense_state()
    assert "head.weight" in dense and "bank.missing" in dense
    assert not any(k.startswith("tables.") for k in dense)
    assert "encoder.tok.weight" not in dense and "pkm.values" not in dense


def test_delta_carries_the_rows_that_changed(ml1m_20k):
    t = _trained(ml1m_20k, 256)
    d = t.state.take_delta().memories
    emb = d[EMBEDDINGS].tables
    rows, vals = emb["item_emb"]
    assert 0 < len(rows) < t.model.tables["item_emb"].weight.shape[0]
    assert torch.equal(vals, t.model.tables["item_emb"].weight.detach()[torch.from_numpy(rows)])
    words, _ = emb[ENCODER_WORDS]
    assert 0 < len(words) < t.encoder.tok.weight.shape[0]  # only the words of the texts seen
    assert d["pkm"].tables["values"][0].size > 0 and d["lmn"].tables["values"][0].size > 0
    assert len(d["bank"].ids["bank"]) > 0 and len(d["history"].ids["users"]) > 0
    again = t.state.take_delta().memories  # the tracking was cleared
    assert all(r.size == 0 for r, _ in again[EMBEDDINGS].tables.values())
    assert again["pkm"].tables["values"][0].size == 0


def test_full_snapshot_has_no_side_effect_on_the_next_delta(ml1m_20k):
    t = _trained(ml1m_20k, 256)
    t.state.full_snapshot()
    d = t.state.take_delta().memories
    assert d[EMBEDDINGS].tables["item_emb"][0].size > 0  # still there after the full
    t.step(next(iter(iter_event_batches(ml1m_20k, 64, 64))))
    t.state.start_delta_chain()
    d = t.state.take_delta().memories
    assert all(r.size == 0 for r, _ in d[EMBEDDINGS].tables.values())


def test_serving_copy_follows_full_then_deltas(ml1m_20k):
    cfg = tiny_config()
    t = OnlineTrainer(cfg.model, cfg.trainer)
    batches = list(iter_event_batches(ml1m_20k, 64, 640))
    for b in batches[:5]:
        t.step(b)
    served = _copy_of(t)
    t.state.start_delta_chain()
    _assert_same(t.state, served)
    for b in batches[5:]:
        t.step(b)
        served.apply_delta(t.state.take_delta())
    _assert_same(t.state, served)
    # The copy is the state alone: nothing of the trainer's.
    assert not any(hasattr(served, a) for a in ("opt_dense", "opt_sparse", "metrics", "rng"))


def test_a_state_of_another_model_is_refused(ml1m_20k):
    import pytest

    from models.state import RankingStateError

    t = _trained(ml1m_20k, 64)
    other = RankingState(tiny_config(**{"model.use_pkm": "false"}).model)
    with pytest.raises(RankingStateError, match="dense tensors do not fit|components"):
        other.load_full(t.state.full_snapshot())
    assert np.isfinite(t.step(next(iter(iter_event_batches(ml1m_20k, 64, 64)))).loss)
