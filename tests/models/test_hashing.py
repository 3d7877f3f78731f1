"""Stable hashing of ids: the vectorised memo path equals the one-by-one path."""

import zlib

import numpy as np

from models.ids import IdEncoder


def _crc_bucket(s, salt: bytes, buckets: int) -> int:
    text = "\x00<none>" if s is None else s
    return zlib.crc32(text.encode("utf-8", "surrogatepass"), zlib.crc32(salt)) % buckets


def test_many_equals_crc32_of_each_id_with_misses_padding_and_a_full_memo():
    h = IdEncoder(memo_size=3).item  # a tiny memo: it is cleared mid-batch
    xs = np.array([["a", None, "b"], ["a", "ünï", None], ["c", "d", "e"]], dtype=object)
    want = np.array([[_crc_bucket(x, b"item", 1000) for x in row] for row in xs])
    for _ in range(2):  # first all misses, then memo hits
        got = h.many(xs.ravel()).reshape(xs.shape) % 1000
        assert got.dtype == np.int64 and got.shape == (3, 3)
        np.testing.assert_array_equal(got, want)
    assert h.many([None])[0] % 1000 == _crc_bucket(None, b"item", 1000)
    assert h.many(xs[:, :0].ravel()).shape == (0,)
