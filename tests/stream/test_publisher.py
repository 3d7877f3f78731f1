"""SnapshotPublisher: deltas go live, bases are written beside them and listed."""

import numpy as np
import pytest
import torch

from memory_bank.base import DeltaState, FullState, MemoryDelta
from stream.snapshots.publisher import SnapshotPublisher
from stream.snapshots.store import SnapshotError


def _full():
    return FullState({"w": torch.zeros(2, 2)}, {"pkm": ({"values": torch.zeros(4, 2)}, {"n": 4})})


def _delta():
    d = MemoryDelta(tables={"values": (np.array([1]), torch.ones(1, 2))})
    return DeltaState({"w": torch.ones(2, 2)}, {"pkm": d})


def test_base_is_listed_and_counted_and_a_failed_one_is_counted(tmp_path):
    pub = SnapshotPublisher(str(tmp_path), keep_versions=10)
    no_events = np.empty(0, np.int64)
    pub.publish(1, None, _full(), {"train_step": 1}, no_events)
    pub.publish(2, 1, _delta(), {"train_step": 2}, no_events)
    assert pub.publish_base(2, _full(), {"train_step": 2})["kind"] == "base"
    listed = {s["version"]: s for s in pub.snapshots()}
    assert listed[2]["kind"] == "delta" and listed[2]["base"] and not listed[1]["base"]
    assert pub.store.latest_version() == 2 and pub.bases_written == 1
    with pytest.raises(SnapshotError):
        pub.publish_base(9, _full(), {})  # no such version
    assert pub.base_failures == 1


def test_sizes_report_the_written_delays_and_they_stop_at_the_ledger_bound(tmp_path):
    pub = SnapshotPublisher(str(tmp_path), keep_versions=5)
    pub.ledger._max = 1_000  # the ledger's max_samples (2M in a job)
    pub.publish(1, None, _full(), {}, np.empty(0, np.int64))
    ts = np.full(300, 1_700_000_000_000, np.int64)
    for v in range(2, 12):  # 3,000 events written, none activated (serving off)
        pub.publish(v, v - 1, _delta(), {}, ts)
    assert pub.sizes()["freshness_written_samples"] == 1_200  # stops past 1,000: one version over


def test_a_publisher_owning_its_process_fixes_the_malloc_threshold(tmp_path):
    import sys

    from stream.snapshots.publisher import return_freed_buffers

    if sys.platform.startswith("linux"):
        assert return_freed_buffers()  # glibc: mallopt took it
    SnapshotPublisher(str(tmp_path), keep_versions=5, owns_process=True)
