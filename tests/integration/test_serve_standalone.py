"""Serving as its own application: deployed before any job through the builder (as
`serve deploy`, a RayService or `memstream serve` do), it waits on an empty store, then
follows the store a real job writes, through hot swaps and a trainer restart, with no
failed request; the job uses it, reports it in the admin API and does not delete it.

`memstream serve` itself (its own local Ray, a subprocess as a user runs it): waits on
an empty store, serves the first version published, stops cleanly on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray

from stream.job.driver import SERVING_APP, StreamingJob

from .conftest import _free_port
from .test_job import AUTH, _finish, _start, _wait

pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]

REQUEST = {
    "user_id": "1m_1",
    "user_features": {"age": "1", "gender": "F"},
    "scenario": "feed",
    "candidates": [
        {"item_id": "Toy Story (1995)", "item_text": "Toy Story Animation Children's Comedy"},
        {"item_id": "brand new", "item_text": "a brand new film"},
    ],
}


class RankClient(threading.Thread):
    """Posts /rank back to back; every answer after the first 200 must be a 200."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=url, timeout=30)
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.versions: list[int] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                r = self.http.post("/rank", json=REQUEST)
            except httpx.HTTPError as e:
                if self.ok:
                    self.failed.append(f"{type(e).__name__}: {e}")
                continue
            if r.status_code == 200:
                self.ok += 1
                self.versions.append(r.json()["version"])
            elif self.ok:  # before the first version a 503 is the documented answer
                self.failed.append(f"{r.status_code}: {r.text[:200]}")
            time.sleep(0.02)


@pytest.mark.timeout(240)
def test_serving_deployed_first_follows_a_job_through_a_restart(
    ray_cluster, job_config, serving_port, tmp_path
):
    from ray import serve

    from stream.serving.app import build_app

    store = tmp_path / "store"
    serve.start(http_options={"host": "127.0.0.1", "port": serving_port})
    serve.run(build_app({"snapshots": str(store)}), name=SERVING_APP, route_prefix="/", blocking=False)
    client = RankClient(f"http://127.0.0.1:{serving_port}")
    try:
        empty = httpx.post(f"http://127.0.0.1:{serving_port}/rank", json=REQUEST, timeout=30)
        assert empty.status_code == 503 and "no model version" in empty.text
        client.start()

        cfg = job_config(
            **{"snapshots.uri": str(store), "checkpoints.interval_s": 1, "job.max_events": 10_000}
        )
        job = StreamingJob(cfg)
        th, out = _start(job)
        topo = _wait(
            lambda: getattr(job, "topo", None) and job.topo.admin_url and job.topo, 120, "topology", out
        )
        ckpt_dir = os.path.join(cfg.job.work_dir, "checkpoints")
        _wait(
            lambda: (
                ray.get(topo.trainer.progress.remote(), timeout=10).events_applied > 3000
                and any(p.startswith("ckpt-") for p in os.listdir(ckpt_dir))
            ),
            120,
            "a checkpoint after 3000 events",
            out,
        )
        # The admin API sees the replica it did not start (it reports to the store's ledger).
        admin = httpx.Client(base_url=topo.admin_url, timeout=30)
        replicas = _wait(
            lambda: (r := admin.get("/v1/serving", headers=AUTH).json()["replicas"]) and r, 30, "replicas"
        )
        assert all(r["replica"].startswith(f"{SERVING_APP}@") for r in replicas)
        os.kill(ray.get(topo.trainer.pid.remote()), signal.SIGKILL)
        report = _finish(th, out)
        assert report["trainer_restarts"] >= 1

        # The job is gone; its serving was not its own, so it still answers, on the last version.
        assert serve.status().applications[SERVING_APP].status == "RUNNING"
        _wait(
            lambda: client.versions and client.versions[-1] == report["snapshot_version"], 30, "last version"
        )
    finally:
        client.stop.set()
        client.join(30)
        serve.delete(SERVING_APP)  # the session's other jobs deploy their own
    assert client.failed == []
    assert client.ok > 20
    assert len(set(client.versions)) >= 3  # hot swaps, before and after the restart
    assert client.versions == sorted(client.versions)  # never back to an older version


def _publish_first_version(store: Path) -> None:
    from models.config import TrainerConfig
    from models.online import OnlineTrainer
    from stream.snapshots.store import SnapshotStore
    from tests.stream.conftest import small_model_config

    trainer = OnlineTrainer(small_model_config(), TrainerConfig(seed=0))
    meta = {"model_config": trainer.cfg.model_dump(mode="json"), "train_step": trainer.steps}
    SnapshotStore(str(store)).publish_full(1, trainer.state.full_snapshot(), meta)


@pytest.mark.timeout(180)
def test_memstream_serve_waits_for_the_store_then_serves(tmp_path):
    store, port = tmp_path / "store", _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream.cli.main", "serve", "--snapshots", str(store), "--port", str(port)]
        + ["--log-dir", str(tmp_path / "logs")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())

    threading.Thread(target=read, daemon=True).start()
    try:
        _wait(lambda: any("waiting for the first snapshot" in ln for ln in lines), 120, f"waiting: {lines}")
        assert httpx.post(f"http://127.0.0.1:{port}/rank", json=REQUEST, timeout=30).status_code == 503
        _publish_first_version(store)
        _wait(lambda: any("serving v1" in ln for ln in lines), 60, f"v1 live: {lines}")
        r = httpx.post(f"http://127.0.0.1:{port}/rank", json=REQUEST, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    # The console: what the command says, not Ray's and Serve's INFO lines (those are in the file).
    assert not [ln for ln in lines if " INFO " in ln or "(ServeController" in ln], lines
    assert (tmp_path / "logs" / "memstream.log").exists()
