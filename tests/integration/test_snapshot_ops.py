"""Snapshot operations on a running job: a corrupt LATEST is refused and the refusal shows in
/metrics and /v1/serving while serving keeps answering; rollback through the authenticated
admin API moves serving to the chosen version; unpinning follows LATEST again."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
import ray

from stream.config import load_config
from stream.ingest.kafka_io import ensure_topic
from stream.job.driver import StreamingJob
from stream.recordings.recording import replay
from stream.snapshots.store import SnapshotStore

from .conftest import ROOT
from .test_job import _finish, _start, _wait

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENTS = 2000
RANK = {
    "user_id": "1m_1",
    "user_features": {"age": "1", "gender": "F"},
    "scenario": "feed",
    "candidates": [{"item_id": "Toy Story (1995)", "item_text": "Toy Story Animation"}],
}


def _fake_corrupt_version(store: SnapshotStore, root, good: int) -> int:
    """Version good+1: a copy of `good` with one byte flipped in a data file, made LATEST."""
    bad = good + 1
    src, dst = root / f"v{good:06d}", root / f"v{bad:06d}"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = bad
    (dst / "manifest.json").write_text(json.dumps(manifest))
    victim = dst / min(manifest["files"])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    store.set_latest(bad)
    return bad


def test_refusal_visible_rollback_and_unpin(ray_cluster, broker, ml1m_20k, tmp_path, serving_port):
    import pyarrow.parquet as pq

    from stream.recordings.recording import write_recording

    # Two halves, the second sent only once a version covering the first is out, so the
    # store holds at least two versions to roll back between however slow the start is
    # (a job that starts after all events are in the topic trains them in one pull).
    table = pq.read_table(ml1m_20k).slice(0, EVENTS)
    halves = [tmp_path / "first.parquet", tmp_path / "second.parquet"]
    write_recording(halves[0], table.slice(0, EVENTS // 2), 4)
    write_recording(halves[1], table.slice(EVENTS // 2), 4)
    ensure_topic(broker, "snapshot-ops", 4)
    replay(halves[0], broker, "snapshot-ops", rate=400, retime=True)
    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        [
            f'kafka.bootstrap="{broker}"',
            "kafka.topic=snapshot-ops",
            f"job.work_dir={tmp_path / 'work'}",
            "job.live_display=false",
            "snapshots.interval_s=0.5",
            "snapshots.full_every=3",
            "checkpoints.interval_s=5",
            "admin.port=0",
            f"admin.token={TOKEN}",
            f"serving.http_port={serving_port}",
            "job.progress_interval_s=0.5",
        ],
    )
    job = StreamingJob(cfg)
    th, out = _start(job)
    try:
        topo = _wait(
            lambda: getattr(job, "topo", None) and job.topo.admin_url and job.topo, 120, "topology", out
        )
        admin = httpx.Client(base_url=topo.admin_url, timeout=30)
        serving = httpx.Client(base_url=topo.serving_url, timeout=30)
        store = SnapshotStore(topo.store_uri)
        _wait(
            lambda: (
                ray.get(topo.trainer.progress.remote(), timeout=10).events_applied >= EVENTS // 2
                and store.latest_version()
            ),
            240,
            "first half applied and published",
            out,
        )
        replay(halves[1], broker, "snapshot-ops", rate=400, retime=True)
        _wait(
            lambda: ray.get(topo.trainer.progress.remote(), timeout=10).events_applied >= EVENTS,
            240,
            "all events applied",
            out,
        )
        try:
            # the version that includes every event (events applied is not yet published)
            good = _wait(
                lambda: (
                    (v := store.latest_version())
                    and v >= 2
                    and store.manifest(v)["events_applied"] >= EVENTS
                    and serving.post("/rank", json=RANK).json()["version"] == v
                    and v
                ),
                120,
                "serving latest",
            )
        except AssertionError as e:  # say where serving stands, so a failure can be diagnosed
            state = {
                "store_versions": store.versions(),
                "latest": store.latest_version(),
                "serving": admin.get("/v1/serving", headers=AUTH).json(),
                "replica": serving.get("/version").json(),
            }
            raise AssertionError(f"{e}: {json.dumps(state, default=str)[:4000]}") from None
        time.sleep(1.5)  # nothing new to publish: the store stays at `good`
        assert store.latest_version() == good

        bad = _fake_corrupt_version(store, tmp_path / "work" / "snapshots", good)
        replicas = _wait(
            lambda: (
                (r := admin.get("/v1/serving", headers=AUTH).json()["replicas"])
                and r[0].get("refusals", 0) >= 1
                and r
            ),
            60,
            "refusal in /v1/serving",
        )
        assert replicas[0]["version"] == good
        assert serving.post("/rank", json=RANK).json()["version"] == good  # still answering
        _wait(
            lambda: (
                "memstream_serving_refusals_total{" in (t := admin.get("/metrics", headers=AUTH).text)
                and any(
                    line.startswith("memstream_serving_refusals_total{") and float(line.split()[-1]) >= 1
                    for line in t.splitlines()
                )
            ),
            30,
            "refusal in /metrics",
        )

        target = good - 1
        assert admin.post("/v1/snapshots/rollback", json={"version": target}).status_code == 401
        assert (
            admin.post(
                "/v1/snapshots/rollback",
                json={"version": target},
                headers={"Authorization": "Bearer " + "x" * 32},
            ).status_code
            == 401
        )
        assert admin.post("/v1/snapshots/rollback", json={"version": bad}, headers=AUTH).status_code == 404
        r = admin.post("/v1/snapshots/rollback", json={"version": target}, headers=AUTH)
        assert r.status_code == 200 and r.json()["pinned"] == target
        _wait(lambda: serving.post("/rank", json=RANK).json()["version"] == target, 60, "serving rolled back")
        _wait(
            lambda: admin.get("/v1/serving", headers=AUTH).json()["replicas"][0]["version"] == target,
            30,
            "rollback in /v1/serving",
        )

        # Operator repairs LATEST, then unpins: serving follows LATEST again.
        store.set_latest(good)
        assert admin.delete("/v1/snapshots/pin").status_code == 401
        assert admin.delete("/v1/snapshots/pin", headers=AUTH).json() == {"pinned": None}
        _wait(lambda: serving.post("/rank", json=RANK).json()["version"] == good, 60, "serving unpinned")
    finally:
        job.request_stop()
    _finish(th, out)
