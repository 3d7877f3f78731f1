import pytest

from stream.train.checkpoints import CheckpointManager


def _writer(payload: bytes):
    def write(d):
        (d / "state.bin").write_bytes(payload)
        (d / "sub").mkdir()
        (d / "sub" / "x.json").write_text("{}")

    return write


def test_save_latest_and_retention(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    assert m.latest() is None
    for i in range(4):
        m.save(_writer(bytes([i]) * 10), {"offsets": {"0": i * 10}, "events_applied": i})
    assert [c.seq for c in m.list()] == [3, 4]
    latest = m.latest()
    assert latest.meta["offsets"] == {"0": 30} and (latest.path / "state.bin").read_bytes() == b"\x03" * 10


def test_crash_during_write_leaves_previous(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(_writer(b"ok"), {"events_applied": 1})

    def crash(d):
        (d / "state.bin").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        m.save(crash, {"events_applied": 2})
    assert m.latest().meta["events_applied"] == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupt_newest_falls_back(tmp_path):
    m = CheckpointManager(tmp_path, keep=3)
    m.save(_writer(b"first"), {"events_applied": 1})
    c2 = m.save(_writer(b"second"), {"events_applied": 2})
    (c2.path / "state.bin").write_bytes(b"secons")
    assert m.latest().meta["events_applied"] == 1
