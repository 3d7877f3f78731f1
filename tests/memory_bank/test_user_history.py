"""UserHistoryStore: ring buffers of integer entries on the device, keyed by user key.

The tests speak in string ids and map them as the batches do (models.ids: the user's and
the item's key64, the item's crc32 code); `_items` reads a view back as item names.
"""

from collections import OrderedDict, deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_bank import history
from memory_bank.history import HistoryCapacityError, HistoryConfig, UserHistoryStore
from models.ids import crc_code, key64

NAMES = {key64(f"{p}{k}"): f"{p}{k}" for p in ("i", "") for k in range(50)}
NAMES.update({key64(x): x for x in "abcdefghijklmnopqrstuvwxyz"})


@pytest.fixture(autouse=True, scope="module", params=[1, history.INITIAL_ROWS], ids=["grown", "preallocated"])
def initial_rows(request):
    """Every test twice: tables that start at one row (and grow on every new power of two of
    users, in appends, imports and deltas alike), and at the default first allocation."""
    default, history.INITIAL_ROWS = history.INITIAL_ROWS, request.param
    yield request.param
    history.INITIAL_ROWS = default


def _keys(users):
    return np.array([key64(u) for u in users], dtype=np.int64)


def _append(store, events, bank_rows=None, summary=None):
    """events: list of (user, item, ts, signal)."""
    u, i, t, s = zip(*events)
    rows = np.full(len(u), -1, np.int64) if bank_rows is None else np.asarray(bank_rows, np.int64)
    codes = np.array([crc_code(x, "item") for x in i])
    store.append(_keys(u), codes, _keys(i), rows, np.asarray(t), np.asarray(s), summary=summary)


def _items(view):
    """(B, L) item names, None where padded."""
    keys, mask = view.item_key.cpu().numpy(), view.mask.cpu().numpy()
    return [[NAMES[k] if m else None for k, m in zip(kr, mr)] for kr, mr in zip(keys.tolist(), mask.tolist())]


def test_order_most_recent_last_with_several_events_per_user_in_one_batch():
    h = UserHistoryStore(HistoryConfig(length=4, max_users=10))
    _append(h, [("u1", "a", 1, 1.0), ("u2", "x", 2, 5.0), ("u1", "b", 3, 2.0)], bank_rows=[7, 8, 9])
    _append(h, [("u1", "c", 4, 3.0), ("u1", "d", 5, 4.0), ("u1", "e", 6, 0.5)])  # wraps the ring
    v = h.get(_keys(["u1", "u2", "nobody"]))
    assert _items(v) == [["b", "c", "d", "e"], [None, None, None, "x"], [None] * 4]
    assert v.ts_ms.tolist() == [[3, 4, 5, 6], [0, 0, 0, 2], [0] * 4]
    assert v.signal.dtype == torch.float32 and v.signal[0].tolist() == [2.0, 3.0, 4.0, 0.5]
    assert v.mask.tolist() == [[True] * 4, [False, False, False, True], [False] * 4]
    assert v.bank_row.tolist() == [[9, -1, -1, -1], [-1, -1, -1, 8], [-1] * 4]
    assert v.item_code[1, 3] == crc_code("x", "item") and v.item_code[2].tolist() == [-1] * 4
    assert v.ts_ms.dtype == torch.int64 and v.mask.dtype == torch.bool


def test_more_than_L_events_of_one_user_in_one_batch_keeps_the_last_L():
    h = UserHistoryStore(HistoryConfig(length=3, max_users=4))
    _append(h, [("u", f"i{k}", k, float(k)) for k in range(8)])
    assert _items(h.get(_keys(["u"]))) == [["i5", "i6", "i7"]]


def test_lru_eviction_frees_the_slot_in_the_delta_and_get_counts_as_use():
    h = UserHistoryStore(HistoryConfig(length=2, max_users=2))
    _append(h, [("a", "x", 1, 0.0), ("b", "y", 2, 0.0)])
    h.get(_keys(["a"]))  # a is now more recent than b
    h.get(_keys(["b"]), touch=False)  # a look, not a use
    _append(h, [("c", "z", 3, 0.0)])
    assert set(h.slots) == set(_keys(["a", "c"]).tolist())
    delta = h.take_delta()
    freed_slots, freed_keys = delta.tables["freed"]
    assert freed_slots.tolist() == [1] and freed_keys.tolist() == [key64("b")]  # b's slot, now c's
    assert sorted(delta.tables["user_key"][1].tolist()) == sorted(_keys(["a", "c"]).tolist())
    assert not h.get(_keys(["b"])).mask.any()
    with pytest.raises(HistoryCapacityError, match="max_users"):
        _append(h, [("d", "i1", 1, 0.0), ("e", "i1", 1, 0.0), ("f", "i1", 1, 0.0)])
    with pytest.raises(HistoryCapacityError, match="max_users"):  # a, c known + one new > 2
        _append(h, [("a", "i1", 1, 0.0), ("c", "i1", 1, 0.0), ("g", "i1", 1, 0.0)])


def _same_views(a, b):
    for f in ("item_code", "item_key", "bank_row", "ts_ms", "signal", "mask"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_delta_makes_a_serving_copy_that_mirrors_the_slots(through_files):
    """The serving copy holds each user in the trainer's slot, with the same raw ring rows:
    a bank row an entry stored means the same on both (the bank mirrors its rows too)."""
    cfg = HistoryConfig(length=3, max_users=3)
    train, serve = UserHistoryStore(cfg), UserHistoryStore(cfg)
    rng = np.random.default_rng(0)
    users = [f"u{k}" for k in range(5)]
    for step in range(6):
        ev = [(users[rng.integers(5)], f"i{rng.integers(9)}", step * 10 + j, float(j)) for j in range(3)]
        _append(train, ev, bank_rows=rng.integers(-1, 4, size=3))
        if step % 2:
            serve.apply_delta(train.take_delta())
    serve.apply_delta(train.take_delta())
    assert train.take_delta().is_empty()
    q = _keys(users)
    _same_views(train.get(q, touch=False), serve.get(q, touch=False))
    assert dict(train.slots) == dict(serve.slots)  # same slot for each user
    live = torch.tensor(sorted(train.slots.values()))
    for name in train.ring:
        assert torch.equal(train.ring[name][live], serve.ring[name][live]), name


def test_export_import_round_trip_bit_exact(through_files, same_tensors):
    cfg = HistoryConfig(length=3, max_users=3, summary_dim=2)
    h = UserHistoryStore(cfg)
    _append(
        h,
        [("a", "x", 1, 1.0), ("b", "y", 2, 2.0), ("a", "z", 3, 3.0), ("c", "w", 4, 4.0)],
        [1, 2, 3, -1],
        summary=torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]]),
    )
    _append(h, [("d", "v", 5, 5.0)])  # evicts b
    tensors, meta = through_files(h.export_state())
    g = UserHistoryStore(cfg)
    g.import_state(tensors, meta)
    same_tensors(h.export_state()[0], g.export_state()[0])
    assert h.export_state()[1] == g.export_state()[1]
    # Continues identically (LRU order, free list and pending freed slots included).
    for s in (h, g):
        _append(s, [("e", "q", 6, 0.0), ("a", "r", 7, 0.0)])
    assert list(h.slots.items()) == list(g.slots.items())
    _same_views(h.get(_keys("abcde")), g.get(_keys("abcde")))
    dh, dg = h.take_delta(), g.take_delta()
    assert dh.tables.keys() == dg.tables.keys()
    for name, (rows, vals) in dh.tables.items():
        assert np.array_equal(rows, dg.tables[name][0]) and torch.equal(vals, dg.tables[name][1]), name


def test_an_older_state_is_refused_with_a_clear_error():
    h = UserHistoryStore(HistoryConfig(length=2, max_users=2))
    tensors, meta = h.export_state()
    del tensors["lru_users"]
    with pytest.raises(ValueError, match="older release"):
        UserHistoryStore(HistoryConfig(length=2, max_users=2)).import_state(tensors, meta)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="length"):
        HistoryConfig(length=0)
    with pytest.raises(ValueError, match="max_users"):
        HistoryConfig(max_users=0)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 5), st.integers(0, 20)), min_size=1, max_size=8),
        min_size=1,
        max_size=8,
    )
)
def test_matches_a_reference_of_deques(batches):
    L, U = 3, 4
    h = UserHistoryStore(HistoryConfig(length=L, max_users=U))
    serve = UserHistoryStore(HistoryConfig(length=L, max_users=U))
    ref: OrderedDict[str, deque] = OrderedDict()
    t = 0
    for batch in batches:
        ev = []
        for u, i in batch:
            t += 1
            ev.append((f"{u}", f"i{i}", t, float(i)))
        users_in_batch = list(dict.fromkeys(e[0] for e in ev))
        if len(users_in_batch) > U:
            continue
        for u, _, _, _ in ev:  # known users are touched in event order, then new ones get slots
            if u in ref:
                ref.move_to_end(u)
        for u in users_in_batch:
            if u not in ref:
                if len(ref) == U:
                    ref.popitem(last=False)
                ref[u] = deque(maxlen=L)
        for u, i, _, _ in ev:
            ref[u].append(i)
        _append(h, ev)
        if len(batch) % 2:
            serve.apply_delta(h.take_delta())
    serve.apply_delta(h.take_delta())
    users = [f"{k}" for k in range(6)]
    want = [[None] * (L - len(ref.get(u, []))) + list(ref.get(u, [])) for u in users]
    assert _items(serve.get(_keys(users))) == want
    assert _items(h.get(_keys(users))) == want


def test_long_term_summary_covers_every_event_not_only_the_last_L():
    """The summary (the LMN memory loss's long-term target) is the mean over ALL a user's
    events, also those the L-window no longer holds; it goes through export/import and
    is cleared with an evicted user."""
    cfg = HistoryConfig(length=2, max_users=2, summary_dim=3)
    h = UserHistoryStore(cfg)
    vectors = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [2, 2, 2]])
    _append(
        h, [("a", "x", 1, 1.0), ("a", "y", 2, 1.0), ("a", "z", 3, 1.0), ("b", "w", 4, 0.0)], summary=vectors
    )
    assert _items(h.get(_keys(["a"]))) == [["y", "z"]]  # the window lost x ...
    mean, n = h.summary(_keys(["a", "b", "nobody"]))
    np.testing.assert_allclose(mean, [[1 / 3, 1 / 3, 1 / 3], [2, 2, 2], [0, 0, 0]])  # ... the summary did not
    assert n.tolist() == [3, 1, 0]
    copy = UserHistoryStore(cfg)
    copy.import_state(*h.export_state())
    assert torch.equal(copy.summary(_keys("ab"))[0], h.summary(_keys("ab"))[0])
    h.get(_keys(["a"]))  # b is now the least recently used
    _append(h, [("c", "v", 5, 0.0)])  # evicts b
    _append(h, [("b", "u", 6, 0.0)])  # b comes back (evicting a): no summary of its past left
    assert h.summary(_keys(["b"]))[1].tolist() == [0]


def test_no_summary_unless_configured():
    h = UserHistoryStore(HistoryConfig(length=2, max_users=2))
    _append(h, [("a", "x", 1, 1.0)], summary=torch.zeros((1, 0)))
    mean, n = h.summary(_keys(["a"]))
    assert mean.shape == (1, 0) and n.tolist() == [0]


def test_mark_changed_reships_live_slots_and_frees_the_others():
    cfg = HistoryConfig(length=2, max_users=3)
    trainer, serve = UserHistoryStore(cfg), UserHistoryStore(cfg)
    _append(trainer, [("a", "x", 1, 1.0)])
    serve.apply_delta(trainer.take_delta())
    checkpoint = trainer.export_state()
    _append(trainer, [("a", "y", 2, 2.0), ("b", "z", 3, 3.0)])  # published after the checkpoint
    serve.apply_delta(trainer.take_delta())
    restarted = UserHistoryStore(cfg)
    restarted.import_state(*checkpoint)
    restarted.mark_changed(np.array([0, 1]))  # the slots those versions changed
    serve.apply_delta(restarted.take_delta())
    assert dict(serve.slots) == dict(restarted.slots) == {key64("a"): 0}
    _same_views(serve.get(_keys("ab"), touch=False), restarted.get(_keys("ab"), touch=False))


def test_a_planned_append_changes_nothing_until_committed():
    """plan_append is what a training step does before it runs (its commit comes after the
    step succeeded): the batch's read (touch_slots) moves its known users in the LRU, the
    plan changes nothing more, even when it evicts; its commit is `append`."""
    h = UserHistoryStore(HistoryConfig(length=3, max_users=3))
    twin = UserHistoryStore(HistoryConfig(length=3, max_users=3))
    first = [("a", "i1", 1, 1.0), ("b", "i2", 2, 0.0), ("c", "i3", 3, 1.0)]
    _append(h, first)
    _append(twin, first)
    users = _keys(["c", "d", "d", "e"])  # c known; d, e new: a and b (oldest) make room
    slots = h.touch_slots(users)
    before = (list(h.slots.items()), list(h.free), h.slot_user.copy(), [t.clone() for t in h.ring.values()])
    plan = h.plan_append(users, slots)
    assert (list(h.slots.items()), list(h.free)) == before[:2] and np.array_equal(h.slot_user, before[2])
    assert all(torch.equal(t, d) for t, d in zip(h.ring.values(), before[3]))
    assert plan.evict == 2 and sorted(plan.new_slots.tolist()) == sorted([h.slots[key64(x)] for x in "ab"])
    events = [("c", "i4", 4, 0.0), ("d", "i5", 5, 1.0), ("d", "i6", 6, 1.0), ("e", "i7", 7, 0.0)]
    codes = np.array([crc_code(x[1], "item") for x in events])
    cols = {
        "item_code": torch.from_numpy(codes),
        "item_key": torch.from_numpy(_keys([x[1] for x in events])),
        "bank_row": torch.full((4,), -1, dtype=torch.int64),
        "ts_ms": torch.tensor([x[2] for x in events]),
        "signal": torch.tensor([x[3] for x in events]),
    }
    index = [torch.from_numpy(a) for a in plan.index_arrays()]
    h.commit_append(plan, index, cols)
    _append(twin, events)
    assert list(h.slots.items()) == list(twin.slots.items()) and h.free == twin.free
    assert all(torch.equal(h.ring[k], twin.ring[k]) for k in h.ring) and torch.equal(h.count, twin.count)
    want = [[None, "i3", "i4"], [None, "i5", "i6"], [None, None, "i7"], [None, None, None]]
    assert _items(h.get(_keys(["c", "d", "e", "a"]))) == want  # a was evicted


def test_tables_grow_with_the_users_seen_not_with_max_users(initial_rows):
    """Rows double from INITIAL_ROWS as new users take the lowest free slots, up to
    max_users; unknown users still read empty histories and zero summaries after a growth."""
    cfg = HistoryConfig(length=2, max_users=5000, summary_dim=1)
    h = UserHistoryStore(cfg)
    assert h.rows == min(initial_rows, 5000)
    for n in (1, 3, 5, 9):
        _append(h, [(f"u{k}", "x", k, 1.0) for k in range(n)], summary=torch.ones(n, 1))
        assert h.rows == max(initial_rows, 1 << (n - 1).bit_length())
        assert all(t.shape[0] == h.rows + 1 for t in (*h.ring.values(), h.count, h.summary_sum))
    view = h.get(_keys(["u0", "u8", "nobody"]), touch=False)
    assert _items(view) == [["x", "x"], [None, "x"], [None, None]]  # u0: one event per append
    mean, n_events = h.summary(_keys(["u0", "nobody"]))
    assert mean.tolist() == [[1.0], [0.0]] and n_events.tolist() == [4.0, 0.0]
    assert h.stats()["users"] == 9


def test_rows_stop_at_max_users_and_eviction_reuses_them():
    h = UserHistoryStore(HistoryConfig(length=1, max_users=3))
    for k in range(6):
        _append(h, [(f"u{k}", "x", k, 0.0)])
    assert h.rows == 3 and h.ring["item_key"].shape == (4, 1)
    assert sorted(h.slots.values()) == [0, 1, 2] and h.evictions == 3
