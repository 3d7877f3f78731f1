import json
import logging

import pytest
from pydantic import ValidationError

from stream.train.checkpoints import (
    MANIFEST,
    QUARANTINE,
    CheckpointConfig,
    CheckpointDurabilityError,
    CheckpointError,
    CheckpointManager,
)
from tests.stream.conftest import small_service


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


# -- damage, quarantine, numbering (the probe: a restart past a truncated manifest, then every
# later save collided with the damaged directory's number and failed) ----------------------------


def _two(tmp_path, **kw):
    m = CheckpointManager(tmp_path, keep=3, **kw)
    c1 = m.save(_writer(b"first"), {"offsets": {"0": 10}, "events_applied": 1})
    c2 = m.save(_writer(b"second"), {"offsets": {"0": 20}, "events_applied": 2})
    return c1, c2


def _ckpt_names(d):
    return sorted(p.name for p in d.glob("ckpt-*"))


def test_truncated_manifest_is_quarantined_logged_and_numbering_moves_past_it(tmp_path, caplog):
    c1, c2 = _two(tmp_path)
    mf = c2.path / MANIFEST
    mf.write_bytes(mf.read_bytes()[:40])  # a torn write of the manifest
    m = CheckpointManager(tmp_path, keep=3)  # a restart
    with caplog.at_level(logging.WARNING, logger="stream.train.checkpoints"):
        restored = m.latest()
    assert restored.seq == 1 and restored.meta["events_applied"] == 1
    # Out of the ckpt-* namespace, kept under quarantine/ with the reason in its name.
    assert _ckpt_names(tmp_path) == ["ckpt-00000001"]
    (q,) = (tmp_path / QUARANTINE).iterdir()
    assert q.name.startswith("ckpt-00000002-manifest-unparseable-")
    assert m.quarantined == 1 and m.fallbacks == 1
    assert m.quarantine_record() == [(2, "manifest-unparseable")]
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(c2.path) in text and "manifest-unparseable" in text and str(q) in text
    assert "fallback" in text and "newest usable is 1" in text
    # The next save gets a fresh number (not 2, the damaged one's) and is what restores next.
    c3 = m.save(_writer(b"third"), {"offsets": {"0": 30}, "events_applied": 3})
    assert c3.seq == 3 and m.saves == 1 and m.consecutive_failures == 0
    assert CheckpointManager(tmp_path).latest().seq == 3


def test_damage_left_in_place_still_does_not_collide(tmp_path):
    # Even without a restore (nothing quarantined), the damaged directory's number is skipped.
    _, c2 = _two(tmp_path)
    (c2.path / MANIFEST).write_text('{"seq": 2, "fil')
    m = CheckpointManager(tmp_path)
    assert m.save(_writer(b"third"), {"events_applied": 3}).seq == 3


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "state.bin").unlink(), "file-missing"),
        (lambda p: (p / "state.bin").write_bytes(b"secons"), "sha256-mismatch"),
        (lambda p: (p / "sub" / "x.json").write_text("{} "), "size-mismatch"),
        (lambda p: (p / MANIFEST).unlink(), "manifest-missing"),
        (lambda p: (p / MANIFEST).write_text("[1, 2]"), "manifest-invalid"),
    ],
)
def test_damaged_newest_falls_back_and_is_quarantined(tmp_path, caplog, damage, reason):
    _, c2 = _two(tmp_path)
    damage(c2.path)
    m = CheckpointManager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stream.train.checkpoints"):
        assert m.latest().seq == 1
    assert not c2.path.exists()
    assert [p.name.split("-")[1] for p in (tmp_path / QUARANTINE).iterdir()] == ["00000002"]
    assert m.quarantine_record() == [(2, reason)]
    assert any(reason in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert m.save(_writer(b"third"), {"events_applied": 3}).seq == 3
    assert m.latest().seq == 3 and m.quarantined == 1  # nothing more to quarantine


def test_read_only_latest_skips_damage_without_moving_or_counting(tmp_path, caplog):
    _, c2 = _two(tmp_path)
    (c2.path / "state.bin").write_bytes(b"secons")
    m = CheckpointManager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stream.train.checkpoints"):
        assert m.latest(quarantine=False).seq == 1
    assert c2.path.is_dir() and not (tmp_path / QUARANTINE).exists()
    assert m.quarantined == 0 and m.fallbacks == 0 and m.last_durable is None
    assert "fallback" in caplog.text  # still said
    assert m.latest().seq == 1 and m.quarantined == 1  # the restore path does move it


def test_all_damaged_restores_nothing_and_says_so(tmp_path, caplog):
    c1, c2 = _two(tmp_path)
    for c in (c1, c2):
        (c.path / "state.bin").unlink()
    m = CheckpointManager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stream.train.checkpoints"):
        assert m.latest() is None
    assert m.quarantined == 2 and _ckpt_names(tmp_path) == []
    assert any(
        r.levelno == logging.ERROR and "no usable checkpoint" in r.getMessage() for r in caplog.records
    )
    assert m.save(_writer(b"x"), {}).seq == 3


def test_numbering_skips_half_written_and_stray_entries(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(_writer(b"one"), {"events_applied": 1})
    (tmp_path / ".tmp-ckpt-00000009-deadbeef").mkdir()  # a save killed mid-write
    (tmp_path / ".tmp-ckpt-00000009-deadbeef" / "state.bin").write_bytes(b"half")
    (tmp_path / "ckpt-00000017").mkdir()  # a stray directory without a manifest
    (tmp_path / "ckpt-00000021").write_text("not a dir")  # a stray file
    (tmp_path / "ckpt-00000030.partial").mkdir()  # anything named ckpt-<digits>...
    assert m.next_seq() == 31
    c = m.save(_writer(b"two"), {"events_applied": 2})
    assert c.seq == 31 and not list(tmp_path.glob(".tmp-*"))
    # The restore quarantines the ones without a manifest (older than the newest, too).
    m2 = CheckpointManager(tmp_path)
    assert m2.latest().seq == 31
    assert sorted(r for _, r in m2.quarantine_record()) == ["manifest-missing", "not-a-directory"]
    assert m2.next_seq() == 32  # the quarantined numbers stay taken


def test_quarantine_on_disk_is_bounded(tmp_path):
    m = CheckpointManager(tmp_path, keep=10, quarantine_keep=2)
    for i in range(4):
        c = m.save(_writer(bytes([i])), {"events_applied": i})
        (c.path / "state.bin").write_bytes(b"zz")
        assert m.latest() is None or m.latest().seq < c.seq
    assert m.quarantined == 4
    assert sorted(p.name[:13] for p in (tmp_path / QUARANTINE).iterdir()) == [
        "ckpt-00000003",
        "ckpt-00000004",
    ]
    assert m.next_seq() == 5


# -- retention -----------------------------------------------------------------------------------


def test_retention_keeps_newest_complete_and_never_the_just_saved(tmp_path):
    m = CheckpointManager(tmp_path, keep=1)
    for i in range(3):
        c = m.save(_writer(bytes([i])), {"events_applied": i})
        assert _ckpt_names(tmp_path) == [c.path.name]
    (tmp_path / "ckpt-00000004").mkdir()  # a stray: not complete, not counted, not deleted
    c = m.save(_writer(b"x"), {"events_applied": 9})
    assert c.seq == 5 and _ckpt_names(tmp_path) == ["ckpt-00000004", "ckpt-00000005"]
    assert not list(tmp_path.glob(".del-*")) and m.latest().seq == 5


def test_retention_failure_does_not_fail_a_durable_save(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep=1)
    m.save(_writer(b"a"), {})
    monkeypatch.setattr(m, "_complete", lambda: 1 / 0)
    c = m.save(_writer(b"b"), {"offsets": {"0": 5}})
    assert c.seq == 2 and m.saves == 2 and m.save_failures == 0


# -- save failures, counters, health ---------------------------------------------------------------


def _failing(d):
    (d / "state.bin").write_bytes(b"half")
    raise OSError(28, "No space left on device")


def test_repeated_save_failures_raise_durability_error_at_the_bound(tmp_path):
    m = CheckpointManager(tmp_path, max_consecutive_failures=3)
    m.save(_writer(b"ok"), {"offsets": {"0": 7}, "events_applied": 1})
    for n in (1, 2):
        with pytest.raises(OSError) as ei:
            m.save(_failing, {"offsets": {"0": 9}})
        assert not isinstance(ei.value, CheckpointError)
        assert m.consecutive_failures == n and m.save_failures == n
    with pytest.raises(CheckpointDurabilityError) as ei:
        m.save(_failing, {"offsets": {"0": 9}})
    msg = str(ei.value)
    assert "3 checkpoint saves in a row failed" in msg and "No space left on device" in msg
    assert "disk space" in msg and "permissions" in msg and str(tmp_path) in msg
    assert "checkpoint is 1" in msg and isinstance(ei.value.__cause__, OSError)
    assert isinstance(ei.value, CheckpointError)
    assert (m.saves, m.save_failures, m.consecutive_failures) == (1, 3, 3)
    assert m.last_error == "OSError: [Errno 28] No space left on device"
    assert m.last_durable["seq"] == 1 and m.last_durable["offsets"] == {"0": 7}
    with pytest.raises(CheckpointDurabilityError):  # still past the bound
        m.save(_failing, {})
    assert not list(tmp_path.glob(".tmp-*")) and m.latest().seq == 1
    # A save that works again resets the run of failures.
    c = m.save(_writer(b"back"), {"offsets": {"0": 11}})
    assert c.seq == 2 and m.consecutive_failures == 0 and m.save_failures == 4 and m.saves == 2
    assert m.last_durable["offsets"] == {"0": 11}


def test_health_is_json_safe(tmp_path):
    _, c2 = _two(tmp_path)
    (c2.path / "state.bin").unlink()
    m = CheckpointManager(tmp_path, max_consecutive_failures=2)
    assert m.latest().seq == 1
    with pytest.raises(OSError):
        m.save(_failing, {})
    h = json.loads(json.dumps(m.health()))
    assert h["saves"] == 0 and h["save_failures"] == 1 and h["consecutive_failures"] == 1
    assert h["max_consecutive_failures"] == 2 and "No space" in h["last_error"]
    assert h["last_durable"]["seq"] == 1 and h["last_durable"]["offsets"] == {"0": 10}  # from the restore
    assert h["quarantined"] == 1 and h["fallbacks"] == 1
    assert [(r["seq"], r["reason"]) for r in h["quarantine_record"]] == [(2, "file-missing")]
    m.save(_writer(b"z"), {"offsets": {"0": 30}, "events_applied": 3})
    h = json.loads(json.dumps(m.health()))
    assert h["last_durable"]["seq"] == 3 and h["consecutive_failures"] == 0 and h["saves"] == 1


def test_config_bounds_and_from_config(tmp_path):
    with pytest.raises(ValidationError):
        CheckpointConfig(max_consecutive_failures=0)
    with pytest.raises(CheckpointError):
        CheckpointManager(tmp_path, max_consecutive_failures=0)
    cfg = CheckpointConfig(keep=2, max_consecutive_failures=7)
    m = CheckpointManager.from_config(cfg, tmp_path / "default")
    assert m.dir == tmp_path / "default" and m.keep == 2 and m.max_consecutive_failures == 7
    assert (
        CheckpointManager.from_config(CheckpointConfig(dir=str(tmp_path / "x")), tmp_path).dir
        == tmp_path / "x"
    )


def test_service_restart_past_a_truncated_manifest_checkpoints_again(tmp_path, caplog):
    """The probe's scenario end to end: the restarted service restores the older checkpoint and
    its next checkpoints are durable under fresh numbers."""
    svc = small_service(tmp_path / "ck")
    svc.checkpoint()
    svc.checkpoint()
    newest = svc.checkpoints.latest(quarantine=False)
    mf = newest.path / MANIFEST
    mf.write_bytes(mf.read_bytes()[: len(mf.read_bytes()) // 2])
    with caplog.at_level(logging.WARNING, logger="stream.train.checkpoints"):
        svc2 = small_service(tmp_path / "ck")
    assert svc2.restored_from == newest.seq - 1 and "quarantined" in caplog.text
    for _ in range(3):
        svc2.checkpoint()
    assert svc2.checkpoint_failures == 0 and svc2.checkpoints.consecutive_failures == 0
    assert svc2.checkpoints.latest().seq == newest.seq + 3
