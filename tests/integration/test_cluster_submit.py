"""The README's cluster path, as a new user meets it: `ray start --head`, then `ray job
submit` from a fresh shell (no activated virtualenv: PATH has no memstream, no python),
a short `memstream run` against the real broker, joining that cluster.

The head is this test's own: free ports, its own temp dir, started with `--block` in its
own session so stopping it (SIGTERM: ray stops what that command started) touches no
other Ray on the machine; `ray stop` would stop them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from stream.job.reaper import stop_session
from stream.recordings.recording import replay

from .conftest import _free_port

pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the venv memstream is installed in (not on PATH)


def _fresh_shell_env() -> dict[str, str]:
    """What a new terminal has: HOME, a system PATH, and the README's one export."""
    return {"HOME": os.environ["HOME"], "PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": "token"}


@pytest.fixture()
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="mray-", dir="/tmp")  # short: Ray's socket paths are bounded
    gcs, dashboard, agent, client = (_free_port() for _ in range(4))
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats"]
        + [f"--port={gcs}", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}"]
        + [f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--num-cpus=3"],
        env=_fresh_shell_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 60
        while True:
            assert head.poll() is None, "ray start --head exited"
            try:
                if httpx.get(f"{url}/api/version", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the head's dashboard did not come up"
            time.sleep(0.5)
        yield url
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        session = Path(temp_dir) / "session_latest"
        if session.exists():
            stop_session(str(session.resolve()))  # anything that outlived it


@pytest.mark.timeout(150)
def test_ray_job_submit_from_a_fresh_shell_runs_the_job(ray_head, broker, ml1m_20k, tmp_path):
    replay(ml1m_20k, broker, "cluster-submit", "max", retime=True)
    report = tmp_path / "report.json"
    # Exactly the README's command: the entrypoint names the venv's memstream by path
    # (the shell that runs it has the head's PATH, not an activated venv).
    entrypoint = [str(VENV_BIN / "memstream"), "run", "--ray-address", "auto", "--no-live"]
    entrypoint += ["--bootstrap", broker, "--topic", "cluster-submit", "--max-events", "2000"]
    entrypoint += ["--work-dir", str(tmp_path / "work"), "--report", str(report)]
    entrypoint += ["--set", "admin.enabled=false", "--set", "serving.enabled=false"]
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_head,
            "--working-dir",
            ".",
            "--",
            *entrypoint,
        ],
        cwd=ROOT,
        env=_fresh_shell_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "succeeded" in out
    assert report.exists(), out[-3000:]
    assert time.monotonic() - t0 < 90
