"""The reaper of a local Ray: when the driver dies without releasing it, it stops every
process of that Ray session; a released reaper stops nothing. Real processes stand in for
Ray's (a command line naming the session directory, as Ray's do)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from stream.job.reaper import session_processes

pytestmark = [pytest.mark.integration]


def _spawn(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", *argv], start_new_session=True
    )


def _reaper(driver_pid: int, session_dir: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stream.job.reaper", str(driver_pid), session_dir], start_new_session=True
    )


def _gone(p: subprocess.Popen, timeout_s: float) -> bool:
    try:
        p.wait(timeout_s)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_the_reaper_stops_the_session_when_the_driver_dies(tmp_path):
    session = str(tmp_path / "session_2026-12-02_00-00-00_000001_4242")
    raylet, agent, other = (
        _spawn(f"--session-dir={session}"),
        _spawn(f"--logs={session}/logs"),
        _spawn("unrelated"),
    )
    driver = _spawn("driver")
    try:
        time.sleep(0.5)
        assert sorted(session_processes(session)) == sorted([raylet.pid, agent.pid])
        reaper = _reaper(driver.pid, session)
        time.sleep(1.5)
        assert raylet.poll() is None and agent.poll() is None  # the driver lives: nothing happens
        driver.kill()
        driver.wait()
        assert _gone(raylet, 20) and _gone(agent, 20) and _gone(reaper, 20)
        assert other.poll() is None  # only the session's processes
    finally:
        for p in (raylet, agent, other, driver):
            p.kill()


def test_a_released_reaper_stops_nothing(tmp_path):
    import signal

    session = str(tmp_path / "session_2026-12-02_00-00-00_000002_4243")
    raylet, driver = _spawn(f"--session-dir={session}"), _spawn("driver")
    try:
        reaper = _reaper(driver.pid, session)
        time.sleep(1.0)
        reaper.send_signal(signal.SIGUSR1)  # what LocalRayReaper.release() sends
        assert _gone(reaper, 10)
        driver.kill()
        driver.wait()
        time.sleep(2)
        assert raylet.poll() is None
    finally:
        raylet.kill()
        driver.kill()
