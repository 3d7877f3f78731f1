"""ItemMemoryBank through the calls production makes on it.

Training (models/online.py, models/state.py): `lookup_history` + `vectors_of_rows` for the
history entries (item keys and the bank rows they stored, validated on the device),
`read_targets` / `rows_of` + the `bank` rows + `missing` for the targets
(`RankingState.target_vectors`), `plan_write` before the step and `commit_write` after it for the encoded targets (`write_rows`: both),
`evict_expired` with a TTL. Snapshots and checkpoints: `take_delta` / `apply_delta`,
`export_state` / `import_state`. Admin (stream/admin/app.py): `lookup`, `neighbors`, `stats`.
Serving (stream/serving/model.py): `rows_of` for cold candidates, plus the same history read.

The tests name items by string and use their key64 keys, as the batches carry them.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_bank.base import index_tensors
from memory_bank.lemur import BankCapacityError, BankConfig, ItemMemoryBank, UnknownItemError
from models.ids import key64


def _k(names):
    """item names (any shape) -> their keys, int64 of the same shape; None -> -1."""
    a = np.asarray(names, dtype=object)
    return np.array([-1 if x is None else key64(x) for x in a.ravel().tolist()], dtype=np.int64).reshape(
        a.shape
    )


def _history(bank, item_names, mask, stored_rows=None):
    """The history read of RankingState.model_inputs over entries of `item_names` (B, L) that
    stored `stored_rows` (default: the items' rows now, as if appended now). Returns
    (vectors (B, L, dim), hit (B, L) bool numpy)."""
    keys = _k(item_names)
    mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    if stored_rows is None:
        stored_rows = bank.rows_of(keys.ravel()).reshape(keys.shape)
    rows = bank.lookup_history(torch.from_numpy(keys), torch.as_tensor(stored_rows), mask)  # (B, L)
    vectors = bank.vectors_of_rows(rows.reshape(-1), mask.reshape(-1))  # (B*L, dim)
    return vectors.view(*rows.shape, -1), (rows >= 0).numpy()


def _bank(**kw):
    torch.manual_seed(0)
    return ItemMemoryBank(BankConfig(dim=4, capacity=kw.pop("capacity", 8), **kw))


def _vec(*rows):
    return torch.tensor([[float(r)] * 4 for r in rows])


def _live(bank):
    """The names of the items the bank holds."""
    return {bank.name_of(k) for k in bank.rows}


def _write(bank, names, vectors, step, now_s):
    return bank.write_rows(_k(names), vectors, step=step, now_s=now_s, item_ids=names)


def _freed(delta):
    rows, keys = delta.tables["freed"]
    return rows.tolist(), keys.tolist()


def _written_keys(delta):
    return delta.tables["keys"][1].tolist()


def test_dedup_last_writer_wins():
    b = _bank()
    n = _write(b, ["a", "b", "a", "a"], _vec(1, 2, 3, 4), step=7, now_s=100.0)
    assert n == 2 and len(b) == 2
    vec, hit = _history(b, [["a", "b"]], np.ones((1, 2), bool))
    assert vec[0, :, 0].tolist() == [4.0, 2.0] and hit.all()
    info = b.lookup(key64("a"))
    assert info["write_step"] == 7 and info["write_time"] == 100.0 and info["row"] == 0
    assert info["item_id"] == "a" and info["item_key"] == key64("a")
    assert b.row_key[:2].tolist() == [key64("a"), key64("b")] and b.row_key[2:].eq(-1).all()


def test_history_read_padding_misses_and_missing_gets_gradient():
    b = _bank()
    _write(b, ["a"], _vec(5), step=1, now_s=0.0)
    ids = [["a", "zz", None], ["zz", "a", "a"]]
    mask = np.array([[True, True, False], [True, True, True]])
    keys = torch.from_numpy(_k(ids))
    stored = torch.tensor([[0, -1, -1], [-1, 0, 0]])
    rows = b.lookup_history(keys, stored, torch.from_numpy(mask))
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
    assert cov["window"] == pytest.approx(6 / 10)
    assert b.lookup(key64("a"))["hits"] == 6


def test_a_row_reused_after_eviction_reads_as_a_miss_from_an_old_entry():
    """An entry keeps the row its item had when appended; once the item is evicted and its
    row given to another item, the entry misses (the row's key is not the entry's) rather
    than reading the other item's vector."""
    b = _bank(capacity=2)
    _write(b, ["a", "b"], _vec(1, 2), step=1, now_s=0.0)
    old_row = b.rows[key64("a")]
    b.read_targets(_k(["b"]))  # a is the least recently used
    _write(b, ["c"], _vec(3), step=2, now_s=1.0)  # evicts a; c takes its row
    assert b.rows[key64("c")] == old_row and key64("a") not in b.rows
    vec, hit = _history(b, [["a", "c"]], np.ones((1, 2), bool), stored_rows=[[old_row, old_row]])
    assert hit.tolist() == [[False, True]]
    assert torch.equal(vec[0, 0], b.missing.detach()) and vec[0, 1, 0] == 3.0


def test_the_models_history_read_of_distinct_rows():
    """model_inputs reads each distinct (item, bank row) once: vectors_of_rows on the unique
    rows, padding marked not real (zeros), misses the learned `missing` vector."""
    b = _bank()
    _write(b, ["a", "b"], _vec(1, 2), step=1, now_s=0.0)
    rows = torch.tensor([-1, -1, 0, 1])  # padding, miss, a, b
    real = torch.tensor([False, True, True, True])
    vec = b.vectors_of_rows(rows, real)
    assert torch.equal(vec[0], torch.zeros(4)) and torch.equal(vec[1], b.missing.detach())
    assert vec[2:, 0].tolist() == [1.0, 2.0]
    assert b.stats()["coverage"]["lookups"] == 0  # the rows' lookup is what counts, not this


def test_target_read_is_read_only_and_the_trainers_read_refreshes_recency():
    """Targets are read through rows_of (RankingState.target_vectors; serving's cold-start
    check): no coverage, no hits, the LRU order not touched. The trainer reads its targets
    with read_targets, which refreshes their recency (history reads do not: see the class)."""
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
    _write(b, ["a", "b"], torch.ones(2, cfg.bank.dim), step=1, now_s=0.0)
    b.read_targets(_k(["b"]))  # b recent, a least recently used
    _history(b, [["a"]], np.ones((1, 1), bool))  # a history read: not a use
    before = b.export_state()
    assert b.rows_of(_k(["a", "zz", "b"])).tolist() == [0, -1, 1]
    vec = state.target_vectors(_k(["a", "zz"]))
    assert torch.equal(vec[0], b.bank[0]) and torch.equal(vec[1], b.missing.detach())
    after = b.export_state()
    assert before[1] == after[1] and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    _write(b, ["c"], torch.ones(1, cfg.bank.dim), step=2, now_s=1.0)  # reading a kept nothing
    assert _live(b) == {"b", "c"}


def test_lru_eviction_frees_rows_in_the_delta_and_spares_the_batch():
    b = _bank(capacity=3)
    _write(b, ["a", "b", "c"], _vec(1, 2, 3), step=1, now_s=0.0)
    b.take_delta()
    b.read_targets(_k(["a", "c"]))  # b is now least recently used
    _write(b, ["d", "a"], _vec(4, 5), step=2, now_s=1.0)
    assert _live(b) == {"a", "c", "d"}
    d = b.take_delta()
    assert _freed(d) == ([1], [key64("b")]) and sorted(_written_keys(d)) == sorted(_k(["a", "d"]).tolist())
    assert d.tables["bank"][0].tolist() == [0, 1]  # d took b's row
    assert b.stats()["evictions"] == {"lru": 1, "ttl": 0, "total": 1}
    assert b.lookup(key64("b")) is None and key64("b") not in b.names  # the name went with the row
    _write(b, ["e"], _vec(6), step=3, now_s=2.0)  # evicts c (LRU), not a free row
    b._evict(np.array([b.rows[key64("e")]]), "lru")  # one free row, two new ids: a free row + one victim
    _write(b, ["f", "g"], _vec(7, 8), step=4, now_s=3.0)
    assert len(b.rows) == 3 and {"f", "g"} <= _live(b) and len(b.free) == 0
    with pytest.raises(BankCapacityError, match="capacity"):
        _write(b, ["x", "y", "z", "w"], _vec(1, 2, 3, 4), step=3, now_s=2.0)


def test_ttl_eviction_frees_rows():
    b = _bank(ttl_s=10.0)
    _write(b, ["old", "new"], _vec(1, 2), step=1, now_s=0.0)
    _write(b, ["new"], _vec(3), step=2, now_s=8.0)
    assert b.evict_expired(now_s=9.0) == []
    assert b.evict_expired(now_s=12.0) == [key64("old")]
    d = b.take_delta()
    assert _freed(d) == ([0], [key64("old")]) and _written_keys(d) == [key64("new")]
    assert b.stats()["evictions"]["ttl"] == 1 and len(b) == 1


def test_delta_makes_a_serving_copy_that_mirrors_the_rows():
    """The serving copy holds each item at the trainer's row (so a row a history entry
    stored means the same there), with its key in row_key: the same history reads."""
    cfg = BankConfig(dim=4, capacity=5)
    train, serve = ItemMemoryBank(cfg), ItemMemoryBank(cfg)
    rng = np.random.default_rng(0)
    items = [f"i{k}" for k in range(9)]
    for step in range(12):
        ids = [items[j] for j in rng.integers(0, 9, 3)]
        _write(train, ids, torch.randn(3, 4), step=step, now_s=float(step))
        train.read_targets(_k([items[j] for j in rng.integers(0, 9, 4)]))
        if step % 3 == 2:
            serve.apply_delta(train.take_delta())
    serve.apply_delta(train.take_delta())
    assert train.rows == serve.rows and np.array_equal(train.keys, serve.keys)
    assert torch.equal(train.row_key, serve.row_key)
    live = np.flatnonzero(train.keys >= 0)
    assert torch.equal(train.bank[live], serve.bank[live])
    assert torch.equal(train.stamps[live], serve.stamps[live])
    q = [items]
    m = np.ones((1, 9), bool)
    stored = train.rows_of(_k(items))[None, :]
    (vec_t, hit_t), (vec_s, hit_s) = _history(train, q, m, stored), _history(serve, q, m, stored)
    assert np.array_equal(hit_t, hit_s) and torch.equal(vec_t[0, hit_t[0]], vec_s[0, hit_s[0]])


def test_an_older_delta_or_state_is_refused_with_a_clear_error():
    from memory_bank.base import MemoryDelta
    from memory_bank.lemur import BankStateError

    b = _bank()
    _write(b, ["a"], _vec(1), step=1, now_s=0.0)
    d = b.take_delta()
    old = MemoryDelta({k: v for k, v in d.tables.items() if k != "keys"})
    with pytest.raises(BankStateError, match="older release"):
        _bank().apply_delta(old)
    tensors, meta = b.export_state()
    del tensors["live_keys"]
    with pytest.raises(BankStateError, match="older release"):
        _bank().import_state(tensors, meta)


def test_export_import_bit_exact(through_files, same_tensors):
    b = _bank(capacity=4, ttl_s=50.0)
    _write(b, ["a", "b", "c", "d"], torch.randn(4, 4), step=1, now_s=1.0)
    _write(b, ["e"], torch.randn(1, 4), step=2, now_s=2.0)
    _history(b, [["a", "e", "q"]], np.ones((1, 3), bool))
    b.record_staleness(_k(["a"]), torch.randn(1, 4))
    tensors, meta = through_files(b.export_state())
    c = ItemMemoryBank(b.cfg)
    c.import_state(tensors, meta)
    same_tensors(b.export_state()[0], c.export_state()[0])
    assert b.export_state()[1] == c.export_state()[1]
    assert b.stats() == c.stats() and b.names == c.names
    for name in ("row_key", "hits", "coverage_total", "coverage_recent"):
        assert torch.equal(getattr(b, name), getattr(c, name)), name
    assert tensors["vectors"].shape == (4, 4)  # live rows only
    for x in (b, c):  # continues identically, eviction choice included
        _write(x, ["f", "g"], _vec(1, 2), step=3, now_s=3.0)
    assert b.rows == c.rows
    db, dc = b.take_delta(), c.take_delta()
    for name, (rows, vals) in db.tables.items():
        assert np.array_equal(rows, dc.tables[name][0]) and torch.equal(vals, dc.tables[name][1]), name


def test_lookup_neighbors_staleness_and_age():
    b = _bank(capacity=6)
    base = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1.0, 0, 0], [-1.0, 0, 0, 0]])
    _write(b, ["a", "a2", "b", "neg"], base, step=10, now_s=100.0)
    nn_ = b.neighbors(key64("a"), k=2)
    assert [x for x, _ in nn_] == ["a2", "b"] and nn_[0][1] == pytest.approx(0.9939, abs=1e-3)
    with pytest.raises(UnknownItemError):
        b.neighbors(key64("nope"))
    b.write_rows(_k(["c"]), _vec(1), step=11, now_s=100.0)  # the index is rebuilt; no name given
    assert str(key64("c")) in [x for x, _ in b.neighbors(key64("a"), k=5)]  # shown by its key
    mean = b.record_staleness(_k(["a", "zz"]), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    assert mean.shape == () and float(mean) == pytest.approx(1.0)  # a device tensor: not read back
    b.record_staleness(_k(["b"]), torch.tensor([[1.0, 0, 0, 0]]))
    s = b.stats(now_s=110.0)
    assert s["staleness_cos"]["window"] == pytest.approx(0.5) and s["staleness_cos"]["samples"] == 2
    assert s["size"] == 5 and s["age"]["steps_max"] == 1 and s["age"]["s_p50"] == pytest.approx(10.0)
    info = b.lookup(key64("a"), now_s=104.0)
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
    last: dict[int, torch.Tensor] = {}  # what each present key must read back
    appended: dict[int, int] = {}  # key -> the row a history entry stored when it was written
    now = 0.0
    for step, (op, ks) in enumerate(ops):
        keys = _k([f"i{k}" for k in ks])
        now += 1.0
        if op == "write" and len(set(ks)) <= cfg.capacity:
            vecs = torch.randn(len(keys), 2)
            bank.write_rows(keys, vecs, step=step, now_s=now)
            for k, v, r in zip(keys.tolist(), vecs, bank.rows_of(keys).tolist()):
                last[k] = v
                appended[k] = r
        elif op == "read":
            stored = torch.tensor([[appended.get(k, -1) for k in keys.tolist()]])
            rows = bank.lookup_history(
                torch.from_numpy(keys)[None, :], stored, torch.ones(1, len(keys), dtype=torch.bool)
            )
            vec = bank.vectors_of_rows(rows[0], torch.ones(len(keys), dtype=torch.bool))
            for j, k in enumerate(keys.tolist()):
                # a hit iff the item is still at the row the entry stored
                assert bool(rows[0, j] >= 0) == (bank.rows.get(k, -2) == appended.get(k, -3))
                if rows[0, j] >= 0:
                    assert torch.equal(vec[j], last[k])
        elif op == "expire":
            for k in bank.evict_expired(now):
                assert k not in bank.rows
        else:
            serve.apply_delta(bank.take_delta())
        live = {r for r in range(cfg.capacity) if bank.keys[r] >= 0}
        assert len(bank.rows) <= cfg.capacity and set(bank.rows.values()) == live
        assert all(bank.keys[r] == k and bank.row_key[r] == k for k, r in bank.rows.items())
        assert sorted(bank.free) == sorted(set(range(cfg.capacity)) - live)
    serve.apply_delta(bank.take_delta())
    assert serve.rows == bank.rows and torch.equal(serve.row_key, bank.row_key)
    for k, r in bank.rows.items():
        assert torch.equal(serve.bank[r], bank.bank[r]) and torch.equal(bank.bank[r], last[k])


def test_mark_changed_reships_live_rows_and_frees_the_others():
    """A restarted trainer re-marks the rows the versions after its checkpoint changed: a
    serving copy that followed those versions ends up holding what the trainer holds."""
    cfg = BankConfig(dim=4, capacity=3)
    trainer, serve = ItemMemoryBank(cfg), ItemMemoryBank(cfg)
    _write(trainer, ["a", "b"], _vec(1, 2), step=1, now_s=0.0)
    serve.apply_delta(trainer.take_delta())
    checkpoint = trainer.export_state()
    _write(trainer, ["c"], _vec(3), step=2, now_s=1.0)  # published after the checkpoint ...
    _write(trainer, ["a"], _vec(9), step=2, now_s=1.0)
    serve.apply_delta(trainer.take_delta())
    restarted = ItemMemoryBank(cfg)
    restarted.import_state(*checkpoint)  # ... then the trainer restarts from the checkpoint
    restarted.mark_changed(np.array([0, 2]))  # the rows those versions changed
    serve.apply_delta(restarted.take_delta())
    assert serve.rows == restarted.rows and torch.equal(serve.row_key, restarted.row_key)
    assert serve.bank[0, 0] == 1.0 and key64("c") not in serve.rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 11), min_size=1, max_size=6), min_size=1, max_size=8))
def test_a_planned_write_changes_nothing_until_committed_and_knows_the_rows_after(writes):
    """plan_write is what a training step does before it runs (its commit comes after the
    step succeeded): the plan alone leaves the bank as it was; the commit puts each key at
    its planned row; rows_after gives, for any batch of keys, rows_of after the commit,
    LRU evictions included (capacity 6, up to 12 distinct items)."""
    b = _bank(capacity=6)
    everyone = _k([f"i{n}" for n in range(12)])
    for step, names in enumerate(writes, 1):
        keys = _k([f"i{n}" for n in names])
        b.read_targets(keys[::2])  # some LRU use between writes
        host = (dict(b.rows), list(b.free), b.keys.copy(), b.last_access.copy())
        device = [t.clone() for t in (b.bank, b.row_key, b.stamps, b.staleness_sum)]
        plan = b.plan_write(keys)
        assert (dict(b.rows), list(b.free)) == host[:2]
        assert np.array_equal(b.keys, host[2]) and np.array_equal(b.last_access, host[3])
        assert all(torch.equal(t, d) for t, d in zip((b.bank, b.row_key, b.stamps, b.staleness_sum), device))
        expect = plan.rows_after(everyone, b.rows_of(everyone))
        index = index_tensors(plan.index_arrays(), b.bank.device)
        b.commit_write(plan, index, _vec(*range(len(keys))), step=step, now_s=float(step))
        assert np.array_equal(b.rows_of(keys), plan.rows)
        assert np.array_equal(b.rows_of(everyone), expect)
        assert np.array_equal(b.row_key.numpy(), b.keys)  # device mirror of the host's keys
        assert len(b.rows) + len(b.free) == 6
