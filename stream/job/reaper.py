"""Tear down a local Ray the job started, even when its driver is killed.

`ray.init()` without an address starts a local cluster (GCS, raylet, agents, workers)
that a normal shutdown stops; a driver killed with SIGKILL (or OOM-killed) leaves some of
those processes running. The job therefore starts this reaper beside a local Ray it owns:
a separate process, in its own session, that waits for the driver to die and then stops
every process whose command line names that Ray session's directory. A driver that shuts
down normally tells the reaper to go first (`LocalRayReaper.release()`).

    python -m stream.job.reaper DRIVER_PID SESSION_DIR   (started by the job, not by hand)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def session_processes(session_dir: str) -> list[int]:
    """Pids of processes whose command line names `session_dir` (this process excluded).
    Linux (/proc): where Ray runs here and in the project's images."""
    name = Path(session_dir).name.encode()  # session_<date>_<pid>: unique per local cluster
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if name in cmd:
            out.append(int(entry.name))
    return out


def stop_session(session_dir: str, grace_s: float = 5.0) -> int:
    """SIGTERM every process of the session, SIGKILL what is left after `grace_s`; returns
    how many there were."""
    pids = found = session_processes(session_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (pids := session_processes(session_dir)):
            time.sleep(0.2)
        if not pids:
            break
    return len(found)


class LocalRayReaper:
    """Started by the driver right after it started a local Ray."""

    def __init__(self, session_dir: str):
        self.session_dir = session_dir
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "stream.job.reaper", str(os.getpid()), session_dir],
            start_new_session=True,  # not in the driver's process group: a Ctrl-C or kill of it spares us
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def release(self) -> None:
        """The driver shut Ray down itself: the reaper has nothing to do."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGUSR1)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def _watch(driver_pid: int, session_dir: str, poll_s: float = 1.0) -> int:
    released = False

    def on_release(*_):
        nonlocal released
        released = True

    signal.signal(signal.SIGUSR1, on_release)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while not released:
        try:
            os.kill(driver_pid, 0)
        except ProcessLookupError:
            break  # the driver is gone without releasing us
        except PermissionError:
            pass
        time.sleep(poll_s)
    if not released:
        stop_session(session_dir)
    return 0


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1]), sys.argv[2]))
