"""SnapshotFollower's live/standby swap under requests still running on the old live copy."""

from __future__ import annotations

import threading
import time

from stream.serving.follower import ServingDrainTimeout, SnapshotFollower
from stream.snapshots.store import SnapshotError


class _Store:
    """Version 1 full, then deltas with parent = previous version."""

    def __init__(self):
        self.latest = 1

    def latest_version(self):
        return self.latest

    def pinned_version(self):
        return None

    def manifest(self, v):
        return {"kind": "full" if v == 1 else "delta", "parent": v - 1 if v > 1 else None}

    def load_delta(self, v):
        return f"delta-{v}"

    def load_chain(self, v):
        return [v]


class _SlowModel:
    """Records any mutation that happens while a rank call is reading it."""

    def __init__(self, chain):
        self.version = chain[-1]
        self.reading = 0
        self.torn = 0

    def apply_delta(self, delta, version):
        if self.reading:
            self.torn += 1
        self.version = version

    def rank(self, request):
        self.reading += 1
        seen = self.version
        time.sleep(0.3)
        self.reading -= 1
        return {"version": seen, "same": seen == self.version}


def test_delta_waits_for_requests_on_the_standby():
    store = _Store()
    f = SnapshotFollower(store, build=_SlowModel)
    assert f.poll() and f.version == 1
    results = []

    def request():
        with f.serving() as m:
            results.append(m.rank({}))

    t = threading.Thread(target=request)
    t.start()
    time.sleep(0.05)  # the request holds version 1 (now live)
    store.latest = 2
    assert f.poll() and f.version == 2  # swap: the request's copy becomes the standby
    store.latest = 3
    t0 = time.monotonic()
    assert f.poll() and f.version == 3  # must wait for the request before mutating it
    assert time.monotonic() - t0 >= 0.15
    t.join()
    assert results == [{"version": 1, "same": True}]
    assert f.live.torn == 0 and f._standby.torn == 0
    assert f.in_flight(f.live) == 0


def test_stuck_request_delays_the_delta_without_refusing_it():
    store = _Store()
    f = SnapshotFollower(store, build=_SlowModel)
    f.drain_timeout_s = 0.1
    f.poll()
    store.latest = 2
    with f.serving() as held:  # a request stuck on version 1
        f.poll()
        store.latest = 3
        assert not f.poll() and f.version == 2  # not applied under the request
        assert 3 not in f.refused_versions and not f.refusals
    assert f.poll() and f.version == 3  # released: applied on the next poll
    assert held.version in (1, 3)
    assert not issubclass(ServingDrainTimeout, SnapshotError)  # never counted as a corrupt version


def test_serving_before_first_version_is_none():
    f = SnapshotFollower(_Store(), build=_SlowModel)
    with f.serving() as m:
        assert m is None


def test_a_standby_that_fails_half_way_is_rebuilt_not_reused():
    class Flaky(_SlowModel):
        def apply_delta(self, delta, version):
            if version == 3:
                self.version = "torn"  # half applied
                raise ValueError("cannot apply")
            super().apply_delta(delta, version)

    store, built = _Store(), []
    f = SnapshotFollower(store, build=lambda chain: built.append(chain) or Flaky(chain))
    assert f.poll() and len(built) == 2
    store.latest = 2
    assert f.poll() and f.version == 2
    store.latest = 3
    assert not f.poll() and f.version == 2 and f.refusals[-1]["version"] == 3  # refused, 2 serves
    store.latest = 4
    assert f.poll() and f.version == 4  # chain loaded into two fresh copies, not the torn one
    assert len(built) == 4 and f._standby.version == 4
