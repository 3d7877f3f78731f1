"""The console of `memstream run` as a user sees it (a subprocess, its output captured).

With the live display: no Ray or Serve INFO line and no forwarded worker output on the
console; those are in <work_dir>/logs/memstream.log. `--verbose` brings them back.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from stream.recordings.recording import replay

from .conftest import _free_port

pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]

# Ray's and Serve's INFO formats ("INFO 2026-... serve 123 -- ...", "... INFO worker.py:..."),
# and worker output forwarded by log_to_driver ("(TrainerActor pid=123) ...").
RAY_NOISE = re.compile(r"\bINFO\b|\((?:\w+ )?pid=\d+|\(raylet\)|\(ServeController|\(ServeReplica")


@pytest.fixture()
def short_run(broker, ml1m_20k, tmp_path, request):
    topic = f"console-{request.node.name}"[:100]
    replay(ml1m_20k, broker, topic, "max", retime=True)

    def run(*extra: str) -> tuple[int, list[str], Path]:
        work = tmp_path / "work"
        proc = subprocess.run(
            [sys.executable, "-m", "stream.cli.main", "run", "--bootstrap", broker, "--topic", topic]
            + ["--max-events", "3000", "--work-dir", str(work)]
            + ["--set", "admin.port=0", "--set", f"serving.http_port={_free_port()}"]
            + ["--set", "snapshots.interval_s=0.5", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=150,
        )
        return proc.returncode, (proc.stdout + proc.stderr).splitlines(), work

    return run


@pytest.mark.timeout(180)
def test_live_run_prints_no_ray_or_serve_info(short_run):
    code, lines, work = short_run()
    assert code == 0, "\n".join(lines[-40:])
    noise = [ln for ln in lines if RAY_NOISE.search(ln)]
    assert noise == [], noise
    assert any(ln.startswith('{"events_consumed": ') for ln in lines), lines[-5:]  # the summary, own line
    log = (work / "logs" / "memstream.log").read_text()
    assert "Application 'memstream' is ready" in log  # Serve's INFO: in the file instead
    assert (work / "logs" / "ray").is_symlink()  # the workers' own log files, at hand


@pytest.mark.timeout(180)
def test_verbose_brings_the_logs_back(short_run):
    code, lines, _ = short_run("--verbose")
    assert code == 0, "\n".join(lines[-40:])
    assert [ln for ln in lines if RAY_NOISE.search(ln)]
    assert any("Application 'memstream' is ready" in ln for ln in lines)
