"""`memstream eval`'s reader: prefetching changes nothing but when batches are decoded."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from stream.train.evaluate import iter_event_batches, prefetch


def test_prefetch_yields_the_same_batches_in_order(ml1m_20k):
    plain = list(iter_event_batches(ml1m_20k, 500, 3000))
    ahead = list(prefetch(iter_event_batches(ml1m_20k, 500, 3000), depth=2))
    assert [len(b) for b in ahead] == [len(b) for b in plain] == [500] * 6
    for a, b in zip(ahead, plain):
        assert a.event_id.tolist() == b.event_id.tolist()
        np.testing.assert_array_equal(a.ts_ms, b.ts_ms)


def test_prefetch_raises_the_readers_error_after_the_good_batches():
    def broken():
        yield "first"
        raise OSError("recording truncated")

    it = prefetch(broken())
    assert next(it) == "first"
    with pytest.raises(OSError, match="truncated"):
        next(it)


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    it = prefetch(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not any(t.name == "eval-prefetch" and t.is_alive() for t in threading.enumerate())
