"""Hostile messages decode to the category the generator promises; cross-batch dedup rule."""

from __future__ import annotations

import json
import time

import pytest

from stream.ingest.events import REJECT_CATEGORIES, Event, EventLimits, decode_one
from stream.ingest.reader import RecentIds
from stream.recordings.data.hostile import DUPLICATE, KINDS, HostileError, hostile_mix

NOW = int(time.time() * 1000)


def _valid(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        ev = {
            "event_id": f"v{i}",
            "ts_ms": NOW - 1000,
            "user_id": f"u{i % 7}",
            "item_id": f"i{i % 13}",
            "labels": {"like": float(i % 2)},
        }
        out.append((f"u{i % 7}".encode(), json.dumps(ev).encode()))
    return out


def test_every_kind_decodes_to_its_promised_category():
    mix = hostile_mix(_valid(20 * len(KINDS)), seed=3, now_ms=NOW, ratio=10, dup_share=0.0)
    seen = set()
    for m in mix:
        _, rej = decode_one(m.value, EventLimits(), NOW)
        got = None if rej is None else rej.category
        assert got == m.expected, (m.kind, rej)
        seen.add(m.kind)
    assert set(KINDS) <= seen  # every kind appeared at least once
    assert {c for c, _ in KINDS.values() if c} | {DUPLICATE} <= set(REJECT_CATEGORIES)


@pytest.mark.parametrize(
    "kind, category, fragment",
    [
        ("rating_1e6", "label_out_of_range", "labels.rating: 1000000.0 is not in [1, 5]"),
        ("rating_neg_1e300", "label_out_of_range", "labels.rating: -1e+300 is not in [1, 5]"),
        ("like_7", "label_out_of_range", "labels.like: 7.0 is not in {0, 1}"),
        ("like_1e38", "label_out_of_range", "labels.like: 1e+38 is not in {0, 1}"),
        ("duplicate_event_id_key", "invalid_json", "duplicate key 'event_id'"),
        ("duplicate_label_key", "invalid_json", "labels: duplicate key 'like'"),
    ],
)
def test_label_ranges_and_duplicate_keys_kinds(kind, category, fragment):
    """A finite but absurd label, or a repeated key (last one wins: a valid-looking event
    with its first event_id or label hidden), is dead-lettered with the reason naming it."""
    mix = hostile_mix(_valid(30), seed=5, now_ms=NOW, ratio=10, kinds=[kind], dup_share=0.0)
    bad = [m for m in mix if m.kind == kind]
    assert len(bad) == 3 and all(m.expected == category for m in bad)
    for m in bad:
        _, rej = decode_one(m.value, EventLimits(), NOW)
        assert rej is not None and rej.category == category and fragment in rej.reason, (kind, rej)
        if category == "invalid_json":  # alone, pydantic keeps the last key: a valid event
            assert Event.model_validate_json(m.value).labels["like"] in (0.0, 1.0)


def test_mix_is_seeded_and_duplicates_resend_earlier_valid_messages():
    valid = _valid(3000)
    a = hostile_mix(valid, seed=7, now_ms=NOW, dup_min_gap=200, kinds=["unknown_field"])
    b = hostile_mix(valid, seed=7, now_ms=NOW, dup_min_gap=200, kinds=["unknown_field"])
    assert a == b
    dups = [(i, m) for i, m in enumerate(a) if m.expected == DUPLICATE]
    assert dups
    for i, m in dups:
        first = next(j for j, o in enumerate(a) if o.value == m.value)
        assert a[first].expected is None and i - first >= 200 and a[first].key == m.key
    assert sum(m.expected is not None for m in a) == 300  # 1 in 10
    with pytest.raises(HostileError, match="unknown hostile kinds"):
        hostile_mix(valid, seed=1, now_ms=NOW, kinds=["nope"])


def test_recent_ids_rule_survives_reseeks():
    w = RecentIds(window=100)
    assert not w.is_duplicate("a", 10)
    assert w.is_duplicate("a", 50)  # repeat within the window
    assert not w.is_duplicate("a", 10)  # re-read of the original after a seek back
    assert w.is_duplicate("a", 50)  # and the repeat is still a repeat
    assert not w.is_duplicate("a", 111)  # further than the window: not caught (documented)
    # seek back before everything: same answers as the first pass
    w2 = RecentIds(window=100)
    first = [w2.is_duplicate(x, o) for o, x in enumerate("abcabcxyz")]
    again = [w2.is_duplicate(x, o) for o, x in enumerate("abcabcxyz")]
    assert first == again == [False] * 3 + [True] * 3 + [False] * 3


def test_recent_ids_memory_is_bounded():
    w = RecentIds(window=1000)
    for off in range(50_000):
        w.is_duplicate(f"id{off}", off)
    assert len(w) <= 2 * 1000 + 1
    assert not RecentIds(window=0).is_duplicate("x", 5)


@pytest.mark.parametrize(
    "extra",
    [
        {"item_text": "a film"},
        {},  # no item_text: no word in the batch made the causal word counters raise IndexError
        {"labels": {"click": 1.0}},  # a task the model does not know
        {"labels": {"rating": 3.0}},
        {"user_features": {"score": 2.5, "age": "25"}, "query": "q"},
    ],
)
def test_small_and_unusual_valid_batches_train(extra):
    """Low traffic gives one-event units; BatchNorm query norms raised ValueError on them
    and the trainer crash-looped (found by the chaos run). Valid events without the
    optional fields must train too, alone in a batch."""
    from models.online import OnlineTrainer
    from stream.config import load_config
    from stream.ingest.events import decode_batch

    cfg = load_config("configs/default.yaml", [])
    trainer = OnlineTrainer(cfg.model, cfg.trainer)
    for n in (4, 1, 1):
        raws = []
        for i in range(n):
            ev = {
                "event_id": f"v{i}",
                "ts_ms": NOW - 1000,
                "user_id": f"u{i % 3}",
                "item_id": f"i{i}",
                "labels": {"like": 1.0},
                **extra,
            }
            raws.append(json.dumps(ev).encode())
        batch = decode_batch(raws, EventLimits(), now_ms=NOW).batch
        assert len(batch) == n
        trainer.step(batch)
    assert trainer.events_applied == 6
