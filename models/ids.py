"""Strings -> integers, once, where events are decoded (`EventCodes`).

The trainer's step never hashes a string: the ingest actors (and the eval reader) turn
every id of an event into integers as they decode it, and the batch carries them as
int64 columns (`EventBatch.codes`). Two kinds of integer per id:

- a *code*: crc32 of the salted UTF-8 bytes (salt ++ text), the hash the model's tables
  have always used: the table row is `code % buckets` (an op on the device, where the
  bucket counts of the model's config are known). Salts keep equal values of different
  fields apart: "user", "item", "cat" (categorical user features as "<name>=<value>", the
  scenario as "scenario=<s>"), "word" (the words of item_text);
- a *key*: 63 bits of blake2b, an identity with negligible collisions (crc32 collides for
  a few tens of thousands of ids): the item bank's rows and the users' history slots are
  keyed by it, and history entries store it.

Everything here is a pure function of the event (no config, no state but bounded memos),
so any process computes the same integers; `models.features` derives table rows from
them. `-1` marks an absent value (a missing categorical feature, padding words).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

NO_CODE = -1  # an absent value: a missing categorical feature, a padding word
MAX_WORDS = 32  # words of item_text carried as codes (FeatureConfig.max_text_tokens <= this)
NONE_TEXT = "\x00<none>"  # what an absent id hashes as (no real id is this string)
_KEY_MASK = (1 << 63) - 1
_WORD = re.compile(r"[a-z0-9']+")  # the feature words of item_text (lowercased)


def crc_code(text: str | None, salt: str) -> int:
    """crc32 of salt ++ text (UTF-8; lone surrogates kept); None hashes as NONE_TEXT."""
    s = NONE_TEXT if text is None else text
    return zlib.crc32(s.encode("utf-8", "surrogatepass"), zlib.crc32(salt.encode()))


def key64(text: str) -> int:
    """A 63-bit identity of `text` (blake2b), >= 0."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _KEY_MASK


class _Memo:
    """A bounded str -> int memo of one hash: ids repeat constantly in a stream."""

    def __init__(self, fn, size: int = 1 << 20) -> None:
        self.fn, self.size, self.cache = fn, size, {}

    def many(self, xs: Sequence) -> np.ndarray:
        """(n,) strings (or None) -> (n,) int64; the memo answers repeats in C (map)."""
        xs = list(xs)
        out = list(map(self.cache.get, xs))
        if None in out:
            cache, fn = self.cache, self.fn
            for i, h in enumerate(out):
                if h is None:
                    if len(cache) >= self.size:
                        cache.clear()
                    out[i] = cache[xs[i]] = fn(xs[i])
        return np.fromiter(out, dtype=np.int64, count=len(out))


class IdEncoder:
    """Event columns -> EventCodes, memoised per process (one per ingest reader)."""

    def __init__(self, memo_size: int = 1 << 20) -> None:
        self.user = _Memo(lambda s: crc_code(s, "user"), memo_size)
        self.item = _Memo(lambda s: crc_code(s, "item"), memo_size)
        self.cat = _Memo(lambda s: crc_code(s, "cat"), memo_size)
        self.key = _Memo(lambda s: NO_CODE if s is None else key64(s), memo_size)
        self._words: dict[str | None, np.ndarray] = {}
        self._words_size = 1 << 16

    def words_of(self, text: str | None) -> np.ndarray:
        """(MAX_WORDS,) int64: crc32 ("word") of the first words of `text`, NO_CODE padded."""
        row = self._words.get(text)
        if row is None:
            if len(self._words) >= self._words_size:
                self._words.clear()
            row = np.full(MAX_WORDS, NO_CODE, dtype=np.int64)
            if text:
                words = _WORD.findall(text.lower())[:MAX_WORDS]
                row[: len(words)] = [crc_code(w, "word") for w in words]
            self._words[text] = row
        return row

    def encode(
        self,
        user_id: Sequence,
        item_id: Sequence,
        scenario: Sequence,
        item_text: Sequence,
        user_cat: dict[str, Sequence],
    ) -> EventCodes:
        n = len(user_id)
        words = np.full((n, MAX_WORDS), NO_CODE, dtype=np.int64)
        for i, t in enumerate(item_text):
            if t:
                words[i] = self.words_of(t)
        cat = {}
        for name, vals in user_cat.items():
            vals = list(vals)
            present = np.fromiter((v is not None for v in vals), dtype=bool, count=n)
            codes = self.cat.many([f"{name}={v}" if v is not None else None for v in vals])
            cat[name] = np.where(present, codes, NO_CODE)
        return EventCodes(
            user=self.user.many(user_id),
            user_key=self.key.many(user_id),
            item=self.item.many(item_id),
            item_key=self.key.many(item_id),
            scenario=self.cat.many([f"scenario={s}" for s in scenario]),
            words=words,
            user_cat=cat,
        )


@dataclass(frozen=True)
class EventCodes:
    """The integer columns of a batch of n events (row-aligned with its string columns)."""

    user: np.ndarray  # (n,) int64 crc32 "user": the user table row is user % user_buckets
    user_key: np.ndarray  # (n,) int64 63-bit key of the user id: the history slot's identity
    item: np.ndarray  # (n,) int64 crc32 "item": the item table row
    item_key: np.ndarray  # (n,) int64 63-bit key of the item id: bank row, history entries
    scenario: np.ndarray  # (n,) int64 crc32 "cat" of "scenario=<s>"
    words: np.ndarray  # (n, MAX_WORDS) int64 crc32 "word" of each word of item_text, -1 padded
    user_cat: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,) crc32 "cat", -1 missing

    COLUMNS = ("user", "user_key", "item", "item_key", "scenario", "words")

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray) -> EventCodes:
        return EventCodes(
            **{c: getattr(self, c)[idx] for c in self.COLUMNS},
            user_cat={k: v[idx] for k, v in self.user_cat.items()},
        )

    @classmethod
    def concat(cls, parts: Sequence[EventCodes]) -> EventCodes:
        """Row-wise; a categorical feature absent from a part is missing (-1) there."""
        names = sorted({k for p in parts for k in p.user_cat})
        return cls(
            **{c: np.concatenate([getattr(p, c) for p in parts]) for c in cls.COLUMNS},
            user_cat={
                k: np.concatenate([p.user_cat.get(k, np.full(len(p), NO_CODE, np.int64)) for p in parts])
                for k in names
            },
        )


_DEFAULT_ENCODER = IdEncoder()


def default_encoder() -> IdEncoder:
    """The process's shared IdEncoder (its memos serve every batch decoded here)."""
    return _DEFAULT_ENCODER
