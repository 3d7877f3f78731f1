"""The driver's restart budget (pure logic: no Ray is started)."""

from __future__ import annotations

import pytest

from stream.config import load_config
from stream.job.driver import JobError, StreamingJob


def test_restarts_back_off_then_stop_the_job_past_the_budget(tmp_path):
    cfg = load_config(
        None,
        [
            f"job.work_dir={tmp_path}",
            "job.max_trainer_restarts=3",
            "job.restart_backoff_s=0.5",
            "job.restart_window_s=600",
        ],
    )
    job = StreamingJob(cfg)
    err = RuntimeError("Cholesky failed")
    assert [job._restart_allowed(err) for _ in range(3)] == [0.5, 1.0, 2.0]
    with pytest.raises(JobError, match=r"failed 4 times within 600 s .*max_trainer_restarts=3.*Cholesky"):
        job._restart_allowed(err)


def test_restarts_outside_the_window_do_not_count(tmp_path, monkeypatch):
    cfg = load_config(
        None, [f"job.work_dir={tmp_path}", "job.max_trainer_restarts=1", "job.restart_window_s=10"]
    )
    job = StreamingJob(cfg)
    clock = iter([100.0, 200.0, 300.0])
    monkeypatch.setattr("stream.job.driver.time.monotonic", lambda: next(clock))
    for _ in range(3):  # one per window: never over the budget
        assert job._restart_allowed(RuntimeError("x")) == cfg.job.restart_backoff_s
