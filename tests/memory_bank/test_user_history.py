from collections import OrderedDict, deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_bank.history import HistoryCapacityError, HistoryConfig, UserHistoryStore


def _obj(xs):
    return np.asarray(xs, dtype=object)


def _append(store, events):
    """events: list of (user, item, ts, signal)."""
    u, i, t, s = zip(*events)
    store.append(_obj(u), _obj(i), np.asarray(t), np.asarray(s))


def test_order_most_recent_last_with_several_events_per_user_in_one_batch():
    h = UserHistoryStore(HistoryConfig(length=4, max_users=10))
    _append(h, [("u1", "a", 1, 1.0), ("u2", "x", 2, 5.0), ("u1", "b", 3, 2.0)])
    _append(h, [("u1", "c", 4, 3.0), ("u1", "d", 5, 4.0), ("u1", "e", 6, 0.5)])  # wraps the ring
    v = h.get(_obj(["u1", "u2", "nobody"]))
    assert v.item_ids.tolist() == [["b", "c", "d", "e"], [None, None, None, "x"], [None] * 4]
    assert v.ts_ms.tolist() == [[3, 4, 5, 6], [0, 0, 0, 2], [0] * 4]
    assert v.signal.dtype == np.float32 and v.signal[0].tolist() == [2.0, 3.0, 4.0, 0.5]
    assert v.mask.tolist() == [[True] * 4, [False, False, False, True], [False] * 4]
    assert v.ts_ms.dtype == np.int64 and v.mask.dtype == bool


def test_more_than_L_events_of_one_user_in_one_batch_keeps_the_last_L():
    h = UserHistoryStore(HistoryConfig(length=3, max_users=4))
    _append(h, [("u", f"i{k}", k, float(k)) for k in range(8)])
    assert h.get(_obj(["u"])).item_ids.tolist() == [["i5", "i6", "i7"]]


def test_lru_eviction_emits_tombstones_and_get_counts_as_use():
    h = UserHistoryStore(HistoryConfig(length=2, max_users=2))
    _append(h, [("a", "x", 1, 0.0), ("b", "y", 2, 0.0)])
    h.get(_obj(["a"]))  # a is now more recent than b
    _append(h, [("c", "z", 3, 0.0)])
    assert set(h.slots) == {"a", "c"}
    delta = h.take_delta()
    assert delta.tombstones == ["b"]
    assert sorted(delta.ids["users"]) == ["a", "c"]  # b's change is dropped with b
    assert not h.get(_obj(["b"])).mask.any()
    with pytest.raises(HistoryCapacityError, match="max_users"):
        _append(h, [("d", "1", 1, 0.0), ("e", "1", 1, 0.0), ("f", "1", 1, 0.0)])
    with pytest.raises(HistoryCapacityError, match="max_users"):  # a, c known + one new > 2
        _append(h, [("a", "1", 1, 0.0), ("c", "1", 1, 0.0), ("g", "1", 1, 0.0)])


def test_delta_makes_a_serving_copy_equal(through_files):
    cfg = HistoryConfig(length=3, max_users=3)
    train, serve = UserHistoryStore(cfg), UserHistoryStore(cfg)
    rng = np.random.default_rng(0)
    users = [f"u{k}" for k in range(5)]
    for step in range(6):
        ev = [(users[rng.integers(5)], f"i{rng.integers(9)}", step * 10 + j, float(j)) for j in range(3)]
        _append(train, ev)
        if step % 2:
            serve.apply_delta(train.take_delta())
    serve.apply_delta(train.take_delta())
    assert train.take_delta().is_empty()
    q = _obj(users)
    a, b = train.get(q), serve.get(q)
    for f in ("item_ids", "ts_ms", "signal", "mask"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert set(train.slots) == set(serve.slots)


def test_export_import_round_trip(through_files, same_tensors):
    cfg = HistoryConfig(length=3, max_users=3)
    h = UserHistoryStore(cfg)
    _append(h, [("a", "x", 1, 1.0), ("b", "y", 2, 2.0), ("a", "z", 3, 3.0), ("c", "w", 4, 4.0)])
    _append(h, [("d", "v", 5, 5.0)])  # evicts b
    tensors, meta = through_files(h.export_state())
    g = UserHistoryStore(cfg)
    g.import_state(tensors, meta)
    same_tensors(h.export_state()[0], g.export_state()[0])
    assert h.export_state()[1] == g.export_state()[1]
    # Continues identically (LRU order included).
    for s in (h, g):
        _append(s, [("e", "q", 6, 0.0), ("a", "r", 7, 0.0)])
    assert list(h.slots.items()) == list(g.slots.items())
    assert np.array_equal(h.get(_obj(list("abcde"))).item_ids, g.get(_obj(list("abcde"))).item_ids)


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
            ev.append((f"u{u}", f"i{i}", t, float(i)))
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
    users = [f"u{k}" for k in range(6)]
    want = [[None] * (L - len(ref.get(u, []))) + list(ref.get(u, [])) for u in users]
    assert serve.get(_obj(users)).item_ids.tolist() == want  # (reads touch the LRU: serve first)
    assert h.get(_obj(users)).item_ids.tolist() == want


def test_long_term_summary_covers_every_event_not_only_the_last_L():
    """The summary (the LMN memory loss's long-term target) is the mean over ALL a user's
    events, also those the L-window no longer holds; it goes through export/import and
    is cleared with an evicted user."""
    cfg = HistoryConfig(length=2, max_users=2, summary_dim=3)
    h = UserHistoryStore(cfg)
    _append(h, [("a", "x", 1, 1.0), ("a", "y", 2, 1.0), ("a", "z", 3, 1.0), ("b", "w", 4, 0.0)])
    h.add_summary(_obj(["a", "a", "a", "b"]), np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [2, 2, 2]]))
    assert h.get(_obj(["a"])).item_ids.tolist() == [["y", "z"]]  # the window lost x ...
    mean, n = h.summary(_obj(["a", "b", "nobody"]))
    np.testing.assert_allclose(mean, [[1 / 3, 1 / 3, 1 / 3], [2, 2, 2], [0, 0, 0]])  # ... the summary did not
    assert n.tolist() == [3, 1, 0]
    copy = UserHistoryStore(cfg)
    copy.import_state(*h.export_state())
    np.testing.assert_array_equal(copy.summary(_obj(["a", "b"]))[0], h.summary(_obj(["a", "b"]))[0])
    h.get(_obj(["a"]))  # b is now the least recently used
    _append(h, [("c", "v", 5, 0.0)])  # evicts b
    _append(h, [("b", "u", 6, 0.0)])  # b comes back (evicting a): no summary of its past left
    assert h.summary(_obj(["b"]))[1].tolist() == [0]


def test_no_summary_unless_configured():
    h = UserHistoryStore(HistoryConfig(length=2, max_users=2))
    _append(h, [("a", "x", 1, 1.0)])
    h.add_summary(_obj(["a"]), np.zeros((1, 0)))
    mean, n = h.summary(_obj(["a"]))
    assert mean.shape == (1, 0) and n.tolist() == [0]
