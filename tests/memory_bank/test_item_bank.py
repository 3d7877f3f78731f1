"""ItemMemoryBank through the calls production makes on it.

Training (models/online.py, models/state.py): `lookup_history` + `vectors_of_rows` for the
history items, `rows_of` + the `bank` rows + `missing` for the targets
(`RankingState.target_vectors`), `record_staleness` then `write_rows` for the encoded targets,
`evict_expired` with a TTL. Snapshots and checkpoints: `take_delta` / `apply_delta`,
`export_state` / `import_state`. Admin (stream/job/actors.py): `lookup`, `neighbors`, `stats`.
Serving (stream/serving/model.py): `rows_of` for cold candidates, plus the same history read.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_bank.lemur import BankCapacityError, BankConfig, ItemMemoryBank, UnknownItemError


def _obj(xs):
    return np.asarray(xs, dtype=object)


def _history(bank, item_ids, mask):
    """The history read of RankingState.model_inputs: rows of the (B, L) ids (counted toward
    coverage), then their vectors. Returns (vectors (B, L, dim), hit (B, L) bool numpy)."""
    mask = np.asarray(mask, dtype=bool)
    rows = bank.lookup_history(item_ids, mask)  # (B, L)
    vectors = bank.vectors_of_rows(rows.reshape(-1), mask.reshape(-1))  # (B*L, dim)
    return vectors.view(*rows.shape, -1), rows >= 0


def _bank(**kw):
    torch.manual_seed(0)
    return ItemMemoryBank(BankConfig(dim=4, capacity=kw.pop("capacity", 8), **kw))


def _vec(*rows):
    return torch.tensor([[float(r)] * 4 for r in rows])


def test_dedup_last_writer_wins():
    b = _bank()
    n = b.write_rows(_obj(["a", "b", "a", "a"]), _vec(1, 2, 3, 4), step=7, now_s=100.0)
    assert n == 2 and len(b) == 2
    vec, hit = _history(b, _obj([["a", "b"]]), np.ones((1, 2), bool))
    assert vec[0, :, 0].tolist() == [4.0, 2.0] and hit.all()
    info = b.lookup("a")
    assert info["write_step"] == 7 and info["write_time"] == 100.0 and info["row"] == 0


def test_history_read_padding_misses_and_missing_gets_gradient():
    b = _bank()
    b.write_rows(_obj(["a"]), _vec(5), step=1, now_s=0.0)
    ids = _obj([["a", "zz", None], ["zz", "a", "a"]])
    mask = np.array([[True, True, False], [True, True, True]])
    rows = b.lookup_history(ids, mask)
    assert rows.tolist() == [[0, -1, -1], [-1, 0, 0]]  # -1 at misses and padding
    vec, hit = _history(b, ids, mask)
    assert vec.shape == (2, 3, 4)
    assert hit.tolist() == [[True, False, False], [False, True, True]]
    assert torch.equal(vec[0, 2], torch.zeros(4))  # padding
    assert torch.equal(vec[0, 1], b.missing.detach())  # unknown -> missing
    vec.sum().backward()
    assert torch.equal(b.missing.grad, torch.full((4,), 2.0))  # two misses, padding not counted
    assert not b.bank.requires_grad
    cov = b.stats()["coverage"]
    assert cov["lookups"] == 10 and cov["cumulative"] == pytest.approx(6 / 10)  # two lookups of 5
    assert b.lookup("a")["hits"] == 6


def test_the_models_history_read_of_distinct_rows():
    """model_inputs reads each distinct (item, bank row) once: vectors_of_rows on the unique
    rows, padding marked not real (zeros), misses the learned `missing` vector."""
    b = _bank()
    b.write_rows(_obj(["a", "b"]), _vec(1, 2), step=1, now_s=0.0)
    rows = np.array([-1, -1, 0, 1])  # padding, miss, a, b
    real = np.array([False, True, True, True])
    vec = b.vectors_of_rows(rows, real)
    assert torch.equal(vec[0], torch.zeros(4)) and torch.equal(vec[1], b.missing.detach())
    assert vec[2:, 0].tolist() == [1.0, 2.0]
    assert b.stats()["coverage"]["lookups"] == 0  # the rows' lookup is what counts, not this


def test_target_read_is_read_only():
    """Targets are read through rows_of (RankingState.target_vectors; serving's cold-start
    check): no coverage, no hits, and the LRU order is not touched."""
    from models.state import RankingState
    from stream.config import load_config

    cfg = load_config(
        None,
        [
            "model.use_lmn=false",
            "model.use_pkm=false",
            "model.bank.capacity=2",
            "model.history.max_users=8",
            "model.features.user_buckets=64",
            "model.features.item_buckets=64",
            "model.features.cat_buckets=64",
            "model.features.text_buckets=64",
            "model.features.affinity_buckets=64",
            "model.encoder.vocab_buckets=64",
        ],
    ).model
    torch.manual_seed(0)
    state = RankingState(cfg)
    b = state.bank
    b.write_rows(_obj(["a", "b"]), torch.ones(2, cfg.bank.dim), step=1, now_s=0.0)
    _history(b, _obj([["b"]]), np.ones((1, 1), bool))  # b recent, a least recently used
    before = b.export_state()
    assert b.rows_of(_obj(["a", "zz", "b"])).tolist() == [0, -1, 1]
    vec = state.target_vectors(_obj(["a", "zz"]))
    assert torch.equal(vec[0], b.bank[0]) and torch.equal(vec[1], b.missing.detach())
    after = b.export_state()
    assert before[1] == after[1] and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    b.write_rows(_obj(["c"]), torch.ones(1, cfg.bank.dim), step=2, now_s=1.0)  # reading a kept nothing
    assert set(b.rows) == {"b", "c"}


def test_lru_eviction_emits_tombstones_and_spares_the_batch():
    b = _bank(capacity=3)
    b.write_rows(_obj(["a", "b", "c"]), _vec(1, 2, 3), step=1, now_s=0.0)
    b.take_delta()
    b.lookup_history(_obj([["a", "c"]]), np.ones((1, 2), bool))  # b is now least recently used
    b.write_rows(_obj(["d", "a"]), _vec(4, 5), step=2, now_s=1.0)
    assert set(b.rows) == {"a", "c", "d"}
    d = b.take_delta()
    assert d.tombstones == ["b"] and sorted(d.ids["bank"]) == ["a", "d"]
    assert b.stats()["evictions"] == {"lru": 1, "ttl": 0, "total": 1}
    assert b.lookup("b") is None
    b.write_rows(_obj(["e"]), _vec(6), step=3, now_s=2.0)  # evicts c (LRU), not a free row
    b._evict(np.array([b.rows["e"]]), "lru")  # one free row, two new ids: a free row + one victim
    b.write_rows(_obj(["f", "g"]), _vec(7, 8), step=4, now_s=3.0)
    assert len(b.rows) == 3 and {"f", "g"} <= set(b.rows) and len(b.free) == 0
    with pytest.raises(BankCapacityError, match="capacity"):
        b.write_rows(_obj(["x", "y", "z", "w"]), _vec(1, 2, 3, 4), step=3, now_s=2.0)


def test_ttl_eviction_emits_tombstones():
    b = _bank(ttl_s=10.0)
    b.write_rows(_obj(["old", "new"]), _vec(1, 2), step=1, now_s=0.0)
    b.write_rows(_obj(["new"]), _vec(3), step=2, now_s=8.0)
    assert b.evict_expired(now_s=9.0) == []
    assert b.evict_expired(now_s=12.0) == ["old"]
    d = b.take_delta()
    assert d.tombstones == ["old"] and d.ids["bank"] == ["new"]
    assert b.stats()["evictions"]["ttl"] == 1 and len(b) == 1


def test_delta_makes_a_serving_copy_equal():
    cfg = BankConfig(dim=4, capacity=5)
    train, serve = ItemMemoryBank(cfg), ItemMemoryBank(cfg)
    rng = np.random.default_rng(0)
    items = [f"i{k}" for k in range(9)]
    for step in range(12):
        ids = _obj([items[j] for j in rng.integers(0, 9, 3)])
        train.write_rows(ids, torch.randn(3, 4), step=step, now_s=float(step))
        train.lookup_history(_obj([[items[j] for j in rng.integers(0, 9, 4)]]), np.ones((1, 4), bool))
        if step % 3 == 2:
            serve.apply_delta(train.take_delta())
    serve.apply_delta(train.take_delta())
    assert train.rows == serve.rows
    live = np.flatnonzero(train.row_ids != None)
    assert torch.equal(train.bank[live], serve.bank[live])
    assert torch.equal(train.stamps[live], serve.stamps[live])
    q = _obj([items])
    m = np.ones((1, 9), bool)
    (vec_t, hit_t), (vec_s, hit_s) = _history(train, q, m), _history(serve, q, m)
    assert np.array_equal(hit_t, hit_s) and torch.equal(vec_t[0, hit_t[0]], vec_s[0, hit_s[0]])


def test_export_import_bit_exact(through_files, same_tensors):
    b = _bank(capacity=4, ttl_s=50.0)
    b.write_rows(_obj(["a", "b", "c", "d", "e"][:4]), torch.randn(4, 4), step=1, now_s=1.0)
    b.write_rows(_obj(["e"]), torch.randn(1, 4), step=2, now_s=2.0)
    _history(b, _obj([["a", "e", "q"]]), np.ones((1, 3), bool))
    b.record_staleness(_obj(["a"]), torch.randn(1, 4))
    tensors, meta = through_files(b.export_state())
    c = ItemMemoryBank(b.cfg)
    c.import_state(tensors, meta)
    same_tensors(b.export_state()[0], c.export_state()[0])
    assert b.export_state()[1] == c.export_state()[1]
    assert b.stats() == c.stats()
    assert tensors["vectors"].shape == (4, 4)  # live rows only
    for x in (b, c):  # continues identically, eviction choice included
        x.write_rows(_obj(["f", "g"]), _vec(1, 2), step=3, now_s=3.0)
    assert b.rows == c.rows and b.take_delta().tombstones == c.take_delta().tombstones


def test_lookup_neighbors_staleness_and_age():
    b = _bank(capacity=6)
    base = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1.0, 0, 0], [-1.0, 0, 0, 0]])
    b.write_rows(_obj(["a", "a2", "b", "neg"]), base, step=10, now_s=100.0)
    nn_ = b.neighbors("a", k=2)
    assert [x for x, _ in nn_] == ["a2", "b"] and nn_[0][1] == pytest.approx(0.9939, abs=1e-3)
    with pytest.raises(UnknownItemError):
        b.neighbors("nope")
    b.write_rows(_obj(["c"]), _vec(1), step=11, now_s=100.0)  # the index is rebuilt
    assert "c" in [x for x, _ in b.neighbors("a", k=5)]
    assert b.record_staleness(
        _obj(["a", "zz"]), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    ) == pytest.approx(1.0)
    b.record_staleness(_obj(["b"]), torch.tensor([[1.0, 0, 0, 0]]))
    s = b.stats(now_s=110.0)
    assert s["staleness_cos"]["window"] == pytest.approx(0.5) and s["staleness_cos"]["samples"] == 2
    assert s["size"] == 5 and s["age"]["steps_max"] == 1 and s["age"]["s_p50"] == pytest.approx(10.0)
    info = b.lookup("a", now_s=104.0)
    assert info["age_s"] == 4.0 and info["norm"] == pytest.approx(1.0) and len(info["values"]) == 4
    import json

    json.dumps(s)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="capacity"):
        BankConfig(capacity=0)
    with pytest.raises(ValueError, match="ttl_s"):
        BankConfig(ttl_s=-1)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["write", "read", "expire", "delta"]),
            st.lists(st.integers(0, 9), min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_random_operations_keep_the_bank_consistent(ops):
    cfg = BankConfig(dim=2, capacity=4, ttl_s=5.0)
    bank, serve = ItemMemoryBank(cfg), ItemMemoryBank(cfg)
    last: dict[str, torch.Tensor] = {}  # what each present id must read back
    now = 0.0
    for step, (op, keys) in enumerate(ops):
        ids = _obj([f"i{k}" for k in keys])
        now += 1.0
        if op == "write" and len(set(keys)) <= cfg.capacity:
            vecs = torch.randn(len(keys), 2)
            bank.write_rows(ids, vecs, step=step, now_s=now)
            for item, v in zip(ids.tolist(), vecs):
                last[item] = v
        elif op == "read":
            vec, hit = _history(bank, ids[None, :], np.ones((1, len(ids)), bool))
            for j, item in enumerate(ids.tolist()):
                assert bool(hit[0, j]) == (item in bank.rows)
                if item in bank.rows:
                    assert torch.equal(vec[0, j], last[item])
        elif op == "expire":
            for item in bank.evict_expired(now):
                assert item not in bank.rows
        else:
            serve.apply_delta(bank.take_delta())
        live = {r for r in range(cfg.capacity) if bank.row_ids[r] is not None}
        assert len(bank.rows) <= cfg.capacity and set(bank.rows.values()) == live
        assert all(bank.row_ids[r] == item for item, r in bank.rows.items())
        assert sorted(bank.free) == sorted(set(range(cfg.capacity)) - live)
    serve.apply_delta(bank.take_delta())
    assert serve.rows == bank.rows
    for item, r in bank.rows.items():
        assert torch.equal(serve.bank[r], bank.bank[r]) and torch.equal(bank.bank[r], last[item])
