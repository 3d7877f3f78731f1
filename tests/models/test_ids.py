"""Ids become integers at decode time (models.ids): the same rows as the model's hashers."""

import json
import re
import zlib

import numpy as np

from models.ids import MAX_WORDS, NO_CODE, EventCodes, IdEncoder, crc_code, key64
from stream.ingest.events import EventBatch, decode_batch


def _raw(i: int, **extra) -> bytes:
    ev = {
        "event_id": f"e{i}",
        "ts_ms": 1_700_000_000_000 + i,
        "user_id": f"u{i % 3}",
        "item_id": f"i{i % 4}",
        "scenario": "feed" if i % 2 else "search",
        "labels": {"like": 1.0},
        "user_features": {"age": 3.0, **({"gender": "F"} if i % 2 else {})},
        "item_text": "Toy Story (1995) Animation|Children's" if i % 3 else None,
        **extra,
    }
    return json.dumps(ev).encode()


def _rows(xs, salt: str, buckets: int) -> np.ndarray:
    """The table rows the model's hashers gave: crc32(salt ++ id) % buckets."""
    return np.array([crc_code(x, salt) % buckets for x in xs], dtype=np.int64)


def test_codes_give_the_hashers_rows():
    batch = decode_batch([_raw(i) for i in range(12)]).batch
    c = batch.codes
    assert c is not None and len(c) == 12
    assert (c.user % 1000 == _rows(batch.user_id, "user", 1000)).all()
    assert (c.item % 77 == _rows(batch.item_id, "item", 77)).all()
    scen = np.array([f"scenario={s}" for s in batch.scenario], dtype=object)
    assert (c.scenario % 500 == _rows(scen, "cat", 500)).all()
    for row, text in zip(c.words, batch.item_text):  # the lowercased [a-z0-9'] runs, salted "word"
        want = [crc_code(w, "word") % (4096 - 1) for w in re.findall(r"[a-z0-9']+", (text or "").lower())][
            :MAX_WORDS
        ]
        assert (row[row >= 0] % (4096 - 1)).tolist() == want
        assert (row[len(want) :] == NO_CODE).all()
    assert c.words[0, 0] == zlib.crc32(b"toy", zlib.crc32(b"word")) or not batch.item_text[0]
    g = c.user_cat["gender"]
    present = np.array([v is not None for v in batch.user_cat["gender"]])
    assert (g[~present] == NO_CODE).all()
    assert (g[present] % 300 == _rows(["gender=F"] * present.sum(), "cat", 300)).all()
    assert len(set(c.item_key.tolist())) == len(set(batch.item_id.tolist()))
    assert (c.item_key >= 0).all() and c.item_key[0] == key64(batch.item_id[0])


def test_codes_cross_arrow_and_follow_take_and_concat():
    batch = decode_batch([_raw(i) for i in range(9)]).batch
    back = EventBatch.from_arrow(batch.to_arrow())
    for name in EventCodes.COLUMNS:
        assert (getattr(back.codes, name) == getattr(batch.codes, name)).all(), name
    assert back.codes.user_cat.keys() == batch.codes.user_cat.keys()
    part = batch.take(np.array([4, 1]))
    assert (part.codes.item_key == batch.codes.item_key[[4, 1]]).all()
    # A batch built without codes (a serving request) gets them on demand; concat fills a
    # categorical feature one part lacks with NO_CODE.
    plain = EventBatch.from_events([])
    both = EventBatch.concat([batch, decode_batch([_raw(20, user_features={})]).batch, plain])
    assert len(both.codes) == 10 and both.codes.user_cat["gender"][-1] == NO_CODE
    assert EventBatch.empty().id_codes().words.shape == (0, MAX_WORDS)


def test_encoder_memo_is_bounded():
    enc = IdEncoder(memo_size=4)
    ids = [f"x{i}" for i in range(10)]
    codes = enc.encode(ids, ids, ["s"] * 10, [None] * 10, {})
    assert len(enc.key.cache) <= 4
    assert (codes.item_key == [key64(s) for s in ids]).all()
