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
    users = np.array(sorted(a.history.slots), dtype=np.int64)
    ha, hb = a.history.get(users, touch=False), b.history.get(users, touch=False)
    for f in ("item_code", "item_key", "bank_row", "signal", "mask"):
        assert torch.equal(getattr(ha, f), getattr(hb, f)), f
    assert dict(a.history.slots) == dict(b.history.slots)  # the copy mirrors the slots
    assert torch.equal(a.bank.row_key, b.bank.row_key)  # ... and the bank's rows
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
    assert len(d["bank"].tables["keys"][0]) > 0 and len(d["history"].tables["user_key"][0]) > 0
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


def test_items_whose_codes_share_an_id_row_stay_distinct_in_the_history():
    """Two items whose crc32 codes hash to one id-embedding row are still two history items:
    the distinct-items table keys them by (id row, bank row), so each reads its own bank
    vector (and both share the id row's embedding)."""
    from models.ids import crc_code, key64
    from stream.ingest.events import EventBatch

    buckets = 8
    cfg = tiny_config(**{"model.features.item_buckets": str(buckets)}).model
    torch.manual_seed(0)
    st = RankingState(cfg)
    names = [f"m{k}" for k in range(64)]
    row = {n: crc_code(n, "item") % buckets for n in names}
    p = names[0]
    q = next(n for n in names[1:] if row[n] == row[p])  # a collision of id rows
    keys = np.array([key64(p), key64(q)])
    st.bank.write_rows(keys, torch.stack([torch.ones(cfg.bank.dim), -torch.ones(cfg.bank.dim)]), 1, 0.0)
    bank_rows = st.bank.rows_of(keys)
    assert bank_rows[0] != bank_rows[1]
    user = key64("u")
    codes = np.array([crc_code(p, "item"), crc_code(q, "item")])
    st.history.append(np.array([user, user]), codes, keys, bank_rows, np.array([1, 2]), np.array([1.0, -1.0]))
    batch = EventBatch(
        event_id=np.array(["e"], dtype=object),
        ts_ms=np.array([3], dtype=np.int64),
        user_id=np.array(["u"], dtype=object),
        item_id=np.array(["other"], dtype=object),
        scenario=np.array(["feed"], dtype=object),
        item_text=np.array([None], dtype=object),
        query=np.array([None], dtype=object),
        labels={"like": np.array([1.0])},
    )
    u, _, _ = st.batch_inputs(batch)
    L = cfg.history.length
    at = u.hist_inverse[0, L - 2 :]  # the two entries' rows of the distinct-items table
    assert u.hist_mask[0, L - 2 :].all() and at[0] != at[1]
    assert u.hist_item_idx[at[0]] == u.hist_item_idx[at[1]] == row[p]
    assert torch.equal(u.hist_bank[at[0]], torch.ones(cfg.bank.dim))
    assert torch.equal(u.hist_bank[at[1]], -torch.ones(cfg.bank.dim))
