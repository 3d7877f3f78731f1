"""Hostile input: valid events mixed (about 1 in `ratio`) with messages the job must dead-letter.

`hostile_mix` takes valid (key, value) messages (an ML-1M or synthetic
recording) and, after every `ratio` valid ones, inserts one hostile message
drawn (seeded) from `KINDS`. Every message carries the reject category
stream.ingest.events.decode_one / the reader's dedup must give it (`expected`; None =
must be trained), so a test can check the dead-letter topic message by message.

Kinds that are valid on purpose (`null_key`, `unicode_ids`) are in the mix too:
a decoder that rejects too much fails the test as surely as one that lets
poison through.

Duplicates (`duplicate_event_id`) re-send an earlier *valid* message unchanged
(same key, so the same partition) at least `dup_min_gap` messages later, so it
lands in another poll than the original: that is what the reader's cross-batch
dedup (stream/ingest/reader.py RecentIds) must catch.

`produce` writes the mix to a topic with a producer that can send values up
to `max_request_bytes` (the 10 MB kind), keyed like the recordings.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from stream.errors import MemstreamError

TEN_MB = 10 * 1024 * 1024


class HostileError(MemstreamError):
    pass


@dataclass(frozen=True)
class HostileMessage:
    key: bytes | None
    value: bytes | None
    expected: str | None  # reject category; None = a valid event that must be trained
    kind: str


def _event(rng: random.Random, n: int, now_ms: int) -> dict[str, Any]:
    """A valid event of a user of its own (its key), unique id, then broken by the caller."""
    return {
        "event_id": f"hostile-{n}",
        "ts_ms": now_ms - rng.randint(0, 3_600_000),
        "user_id": f"hostile-user-{n % 50}",
        "item_id": f"hostile-item-{rng.randint(0, 99)}",
        "labels": {"like": float(rng.random() < 0.5)},
        "user_features": {"age": str(rng.randint(1, 56))},
    }


def _dumps(d: Any) -> bytes:
    return json.dumps(d, separators=(",", ":"), allow_nan=True).encode()


def _with(d: dict, **kw) -> dict:
    out = dict(d)
    out.update(kw)
    return out


def _without(d: dict, name: str) -> dict:
    return {k: v for k, v in d.items() if k != name}


# kind -> (expected category, builder(event dict, rng, now_ms, limits_bytes) -> (key?, value)).
# A builder returns the value; the key is the event's user id unless the kind says otherwise.
Builder = Callable[[dict, random.Random, int, int], bytes | None]

KINDS: dict[str, tuple[str | None, Builder]] = {
    "invalid_utf8": ("invalid_utf8", lambda e, r, now, mx: _dumps(e).replace(b'"like"', b'"l\xffike"')),
    "truncated_json": ("invalid_json", lambda e, r, now, mx: _dumps(e)[: r.randint(1, 20)]),
    "bom_json": ("invalid_json", lambda e, r, now, mx: b"\xef\xbb\xbf" + _dumps(e)),
    "whitespace_only": ("invalid_json", lambda e, r, now, mx: b"   \n"),
    "lone_surrogate": (
        "invalid_json",
        lambda e, r, now, mx: _dumps(e).replace(b'"hostile-', b'"\\ud800-', 1),
    ),
    "ts_as_string": ("wrong_type", lambda e, r, now, mx: _dumps(_with(e, ts_ms=str(e["ts_ms"])))),
    "ts_as_float": ("wrong_type", lambda e, r, now, mx: _dumps(_with(e, ts_ms=e["ts_ms"] + 0.5))),
    "id_as_number": ("wrong_type", lambda e, r, now, mx: _dumps(_with(e, event_id=12345))),
    "label_bool": ("wrong_type", lambda e, r, now, mx: _dumps(_with(e, labels={"like": True}))),
    "label_null": ("wrong_type", lambda e, r, now, mx: _dumps(_with(e, labels={"like": None}))),
    "labels_not_object": ("wrong_type", lambda e, r, now, mx: _dumps(_with(e, labels=[1.0, 0.0]))),
    "feature_inf": ("wrong_type", lambda e, r, now, mx: _dumps(e).replace(b'"age":', b'"x":1e999,"age":')),
    "missing_event_id": ("missing_field", lambda e, r, now, mx: _dumps(_without(e, "event_id"))),
    "missing_user_id": ("missing_field", lambda e, r, now, mx: _dumps(_without(e, "user_id"))),
    "empty_event_id": ("missing_field", lambda e, r, now, mx: _dumps(_with(e, event_id=""))),
    "no_labels": ("missing_field", lambda e, r, now, mx: _dumps(_with(e, labels={}))),
    "label_nan": ("non_finite_label", lambda e, r, now, mx: _dumps(_with(e, labels={"like": float("nan")}))),
    "label_infinity": (
        "non_finite_label",
        lambda e, r, now, mx: _dumps(_with(e, labels={"like": float("-inf")})),
    ),
    "label_1e999": (
        "non_finite_label",
        lambda e, r, now, mx: _dumps(e).replace(b'"like":', b'"like":1e999,"x":'),
    ),
    # Finite, so they pass the finite check; outside the default specs (like: binary,
    # rating: 1..5). One rating of 1e6 ruins the model for the rest of the stream;
    # -1e300 overflows float32 in the trainer.
    "rating_1e6": (
        "label_out_of_range",
        lambda e, r, now, mx: _dumps(_with(e, labels={"like": 1.0, "rating": 1e6})),
    ),
    "rating_neg_1e300": (
        "label_out_of_range",
        lambda e, r, now, mx: _dumps(_with(e, labels={"rating": -1e300})),
    ),
    "like_7": ("label_out_of_range", lambda e, r, now, mx: _dumps(_with(e, labels={"like": 7.0}))),
    "like_1e38": ("label_out_of_range", lambda e, r, now, mx: _dumps(_with(e, labels={"like": 1e38}))),
    # Duplicate keys: last-wins would keep a valid-looking event (a second event_id
    # bypasses dedup and tracing; the first like, 7, hidden behind a valid one).
    "duplicate_event_id_key": (
        "invalid_json",
        lambda e, r, now, mx: _dumps(e).replace(
            b'"ts_ms":', b'"event_id":"dup-%d","ts_ms":' % r.randint(0, 10**9), 1
        ),
    ),
    "duplicate_label_key": (
        "invalid_json",
        lambda e, r, now, mx: _dumps(e).replace(b'"labels":{', b'"labels":{"like":7.0,', 1),
    ),
    "negative_ts": ("bad_timestamp", lambda e, r, now, mx: _dumps(_with(e, ts_ms=-r.randint(1, 10**12)))),
    "far_future_ts": ("bad_timestamp", lambda e, r, now, mx: _dumps(_with(e, ts_ms=now + 10 * 86_400_000))),
    "int64_overflow_ts": ("bad_timestamp", lambda e, r, now, mx: _dumps(_with(e, ts_ms=10**30))),
    "just_too_large": ("too_large", lambda e, r, now, mx: _dumps(_with(e, item_text="x" * (mx + 1)))),
    "ten_mb": ("too_large", lambda e, r, now, mx: _dumps(_with(e, item_text="y" * TEN_MB))),
    "deeply_nested": (
        "invalid_json",
        lambda e, r, now, mx: _dumps(e)[:-1] + b',"deep":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    ),
    "unknown_field": ("unknown_field", lambda e, r, now, mx: _dumps(_with(e, surprise={"a": 1}))),
    "not_an_object_list": ("not_an_object", lambda e, r, now, mx: b"[1,2,3]"),
    "not_an_object_null": ("not_an_object", lambda e, r, now, mx: b"null"),
    "empty_value": ("empty", lambda e, r, now, mx: b""),
    "tombstone": ("empty", lambda e, r, now, mx: None),
    "huge_id": ("limit_exceeded", lambda e, r, now, mx: _dumps(_with(e, item_id="i" * 5000))),
    "too_many_labels": (
        "limit_exceeded",
        lambda e, r, now, mx: _dumps(_with(e, labels={f"t{i}": 1.0 for i in range(40)})),
    ),
    # Valid on purpose: must be trained, not dead-lettered.
    "null_key": (None, lambda e, r, now, mx: _dumps(e)),
    "unicode_ids": (None, lambda e, r, now, mx: _dumps(_with(e, item_id="Amélie (2001) 東京 🎬"))),
}
NO_KEY_KINDS = {"null_key"}
DUPLICATE = "duplicate_event_id"


def hostile_mix(
    valid: Sequence[tuple[bytes | None, bytes]],
    *,
    seed: int,
    now_ms: int,
    ratio: int = 10,
    kinds: Iterable[str] | None = None,
    max_message_bytes: int = 64 * 1024,
    dup_share: float = 0.15,
    dup_min_gap: int = 1000,
) -> list[HostileMessage]:
    """`valid` interleaved with one hostile message after every `ratio` valid ones.

    `kinds` limits the hostile kinds (default all; `ten_mb` is dropped by callers
    whose broker refuses it). A share `dup_share` of the hostile slots re-sends an
    earlier valid message at least `dup_min_gap` positions back (when there is one).
    Every kind appears at least once when there are enough slots: the first slots
    go through the kinds in order, the rest are drawn at random.
    """
    names = list(kinds) if kinds is not None else list(KINDS)
    unknown = [k for k in names if k not in KINDS]
    if unknown:
        raise HostileError(f"unknown hostile kinds {unknown}; known: {sorted(KINDS)}")
    if ratio < 1:
        raise HostileError(f"ratio must be >= 1, got {ratio}")
    rng = random.Random(seed)
    out: list[HostileMessage] = []
    valid_positions: list[int] = []  # positions in `out` of valid messages (dup sources)
    slot = 0
    for i, (key, value) in enumerate(valid):
        valid_positions.append(len(out))
        out.append(HostileMessage(key, value, None, "valid"))
        if (i + 1) % ratio:
            continue
        pos = len(out)
        sources = [p for p in valid_positions if p <= pos - dup_min_gap]
        if sources and slot >= len(names) and rng.random() < dup_share:
            src = out[rng.choice(sources[-5000:])]
            out.append(HostileMessage(src.key, src.value, DUPLICATE, "duplicate_event_id"))
            slot += 1
            continue
        kind = names[slot] if slot < len(names) else rng.choice(names)
        slot += 1
        expected, build = KINDS[kind]
        ev = _event(rng, pos, now_ms)
        value = build(ev, rng, now_ms, max_message_bytes)
        hkey = None if kind in NO_KEY_KINDS else ev["user_id"].encode()
        out.append(HostileMessage(hkey, value, expected, kind))
    return out


def produce(
    messages: Sequence[HostileMessage],
    bootstrap: str,
    topic: str,
    *,
    partitions: int,
    max_request_bytes: int = 16 * 1024 * 1024,
    **client_options: Any,
) -> dict[str, Any]:
    """Send the messages in order (keyed; the topic is created with `partitions`).

    Returns {"sent": n, "positions": [(partition, offset) of each message]}.
    Raises HostileError if any send fails, naming the kind and the broker's error:
    a test must know exactly what reached the topic.
    """
    from kafka import KafkaProducer

    from stream.ingest.kafka_io import ensure_topic

    ensure_topic(bootstrap, topic, partitions, **client_options)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_request_size=max_request_bytes,
        **client_options,
    )
    futures = []
    try:
        for m in messages:
            futures.append((m, producer.send(topic, key=m.key, value=m.value)))
        producer.flush(timeout=120)
        failed = []
        positions: list[tuple[int, int]] = []
        for m, f in futures:
            try:
                md = f.get(timeout=60)
                positions.append((md.partition, md.offset))
            except Exception as e:  # reported below with the kind
                failed.append((m.kind, repr(e)[:300]))
    finally:
        producer.close(timeout=30)
    if failed:
        raise HostileError(f"{len(failed)} hostile-mix sends to {topic!r} failed; first: {failed[0]}")
    return {"sent": len(messages), "positions": positions}


def expected_counts(messages: Sequence[HostileMessage]) -> dict[str, int]:
    """Reject category -> how many messages must be dead-lettered with it."""
    counts: dict[str, int] = {}
    for m in messages:
        if m.expected is not None:
            counts[m.expected] = counts.get(m.expected, 0) + 1
    return counts
