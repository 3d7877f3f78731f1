"""The streaming job end to end: real broker, real local Ray, real model, ML-1M prefix."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from stream.job.driver import StreamingJob
from stream.snapshots.store import SnapshotStore

from .conftest import EVENTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _start(job: StreamingJob) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target():
        try:
            out["report"] = job.run().to_json()
        except BaseException as e:
            out["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, out


def _wait(pred, timeout: float, what: str, out: dict | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out and "error" in out:
            raise out["error"]
        try:
            v = pred()
            if v:
                return v
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _finish(th, out, timeout=600):
    th.join(timeout)
    assert not th.is_alive(), "job did not finish"
    if "error" in out:
        raise out["error"]
    return out["report"]


def test_end_to_end_report_serving_admin(ray_cluster, job_config, ml1m_20k, tmp_path):
    cfg = job_config()
    predictions = tmp_path / "predictions.parquet"
    job = StreamingJob(cfg, predictions=str(predictions))
    th, out = _start(job)
    topo = _wait(lambda: getattr(job, "topo", None) and job.topo.admin_url and job.topo, 120, "topology", out)
    admin = httpx.Client(base_url=topo.admin_url, timeout=30)
    assert admin.get("/healthz").status_code == 200
    assert admin.get("/v1/bank/stats").status_code == 401
    assert admin.get("/v1/bank/stats", headers={"Authorization": "Bearer nope"}).status_code == 401
    # serving answers once a version is live
    serving = httpx.Client(base_url=topo.serving_url, timeout=30)
    req = {
        "user_id": "1m_1",
        "user_features": {"age": "1", "gender": "F"},
        "scenario": "feed",
        "candidates": [
            {"item_id": "Toy Story (1995)", "item_text": "Toy Story Animation Children's Comedy"},
            {"item_id": "brand new", "item_text": "a brand new film"},
        ],
    }
    ranked = _wait(
        lambda: (r := serving.post("/rank", json=req)).status_code == 200 and r.json(), 180, "serving"
    )
    assert ranked["version"] >= 1 and len(ranked["scores"]["like"]) == 2
    assert all(0 < s < 1 for s in ranked["scores"]["like"])
    assert serving.post("/rank", json={"user_id": "u", "candidates": []}).status_code == 422
    # admin while training
    item = _wait(
        lambda: (
            (r := admin.get("/v1/bank/items/Toy Story (1995)", headers=AUTH)).status_code == 200 and r.json()
        ),
        120,
        "bank row for Toy Story",
    )
    assert item["item_id"] == "Toy Story (1995)" and item["present"] is True
    assert item["write_step"] >= 0 and item["hits"] >= 0 and len(item["values"]) == 8 and item["norm"] > 0
    nb = admin.get("/v1/bank/items/Toy Story (1995)/neighbors", params={"k": 3}, headers=AUTH)
    assert nb.status_code == 200
    neighbors = nb.json()["neighbors"]
    assert len(neighbors) == 3 and "Toy Story (1995)" not in [n["item_id"] for n in neighbors]
    cosines = [n["cosine"] for n in neighbors]
    assert cosines == sorted(cosines, reverse=True) and all(-1.001 <= c <= 1.001 for c in cosines)
    assert admin.get("/v1/bank/items/no-such-item", headers=AUTH).status_code == 404
    assert (
        admin.get("/v1/bank/items/Toy Story (1995)/neighbors", params={"k": 0}, headers=AUTH).status_code
        == 422
    )
    # The user of the stream's first event has a history once that event is trained (the
    # store keeps every user of this prefix): wait for it, then its answer is fixed in shape.
    first_user = json.loads(pq.read_table(ml1m_20k, columns=["value"]).column("value")[0].as_py())["user_id"]
    hist_path = f"/v1/users/{first_user}/history"
    hist = _wait(
        lambda: (r := admin.get(hist_path, headers=AUTH)).status_code == 200 and r.json(),
        120,
        f"history of {first_user}",
    )
    assert hist["user_id"] == first_user and 1 <= len(hist["items"]) == min(hist["length"], 50)
    ts = [it["ts_ms"] for it in hist["items"]]
    assert ts == sorted(ts, reverse=True)  # most recent first
    one = admin.get(hist_path, params={"limit": 1}, headers=AUTH)
    assert one.status_code == 200 and len(one.json()["items"]) == 1
    assert admin.get("/v1/users/no-such-user/history", headers=AUTH).status_code == 404
    assert admin.get(hist_path, params={"limit": "x"}, headers=AUTH).status_code == 422
    for path in (
        "/v1/pkm/stats",
        "/v1/lmn/stats",
        "/v1/snapshots",
        "/v1/serving",
        "/v1/ingest/lag",
        "/metrics",
    ):
        assert admin.get(path, headers=AUTH).status_code == 200, path
    # The gauges are set from the driver's progress samples (every job.progress_interval_s,
    # later when a sample waits on a busy trainer or reader): wait for one taken after
    # training began, as a scraper would see at its next scrape.
    slice_gauge = 'memstream_slice_events{bucket="0",slice="item_evidence"}'
    metrics_text = _wait(
        lambda: slice_gauge in (t := admin.get("/metrics", headers=AUTH).text) and t, 120, "slice gauges", out
    )
    assert "memstream_events_trained_total" in metrics_text
    report = _finish(th, out)

    assert report["events_consumed"] == report["events_trained"] + report["events_dlq"] == EVENTS
    assert report["snapshots_published"] >= 2
    assert report["serving_version"] == report["snapshot_version"]
    # Every 5th version carried a base (full_every=5): a replica starting now loads the
    # newest base and the deltas after it, not the chain back to version 1.
    assert report["snapshot_bases_written"] >= 1 and report["snapshot_base_failures"] == 0
    chain = SnapshotStore(os.path.join(cfg.job.work_dir, "snapshots")).load_chain()
    assert chain.from_base and chain.versions[0] > 1 and chain.versions[-1] == report["snapshot_version"]
    assert report["auc.like"] > 0.6
    assert report["freshness_p50_s"] is not None and report["freshness_p99_s"] >= report["freshness_p50_s"]
    assert report["throughput_eps"] > 0
    # The trainer's per-event predictions: closed at the end (readable), one row per event
    # trained, and the same slices as the report.
    assert report["predictions"] == {
        "path": str(predictions),
        "rows": report["events_trained"],
        "error": None,
    }
    rows = pq.read_table(predictions)
    assert rows.num_rows == report["events_trained"] and rows["seq"].to_pylist() == list(range(rows.num_rows))
    item_evidence = rows["item_evidence"].to_numpy()
    liked = rows.filter(pc.is_valid(rows["label.like"]))
    assert report["slices"]["item_evidence"]["0"]["n"] == int((liked["item_evidence"].to_numpy() == 0).sum())
    assert sum(v["n"] for v in report["slices"]["user_history"].values()) == liked.num_rows
    assert (item_evidence >= 0).all() and report["slices"]["user_history"]["long"]["auc.like"] is not None


def test_trainer_killed_resumes_from_checkpoint_then_job_restart(ray_cluster, job_config):
    cfg = job_config(**{"checkpoints.interval_s": 1, "serving.enabled": "false"})
    job = StreamingJob(cfg)
    th, out = _start(job)
    topo = _wait(lambda: getattr(job, "topo", None), 120, "topology", out)
    ckpt_dir = cfg.job.work_dir + "/checkpoints"
    _wait(
        lambda: (
            ray.get(topo.trainer.progress.remote(), timeout=10).events_applied > 4000
            and os.path.isdir(ckpt_dir)
            and any(p.startswith("ckpt-") for p in os.listdir(ckpt_dir))
        ),
        300,
        "a checkpoint after 4000 events",
    )
    os.kill(ray.get(topo.trainer.pid.remote()), signal.SIGKILL)
    report = _finish(th, out)
    assert report["trainer_restarts"] >= 1
    assert report["restored_from_checkpoint"] is not None
    assert report["events_trained"] + report["events_dlq"] == EVENTS
    # Every event was scored (and trained) exactly once in the final lineage.
    assert report["offsets"] and sum(report["offsets"].values()) == EVENTS

    # A whole new job on the same work dir: restores, finds nothing left, applies nothing twice.
    again = StreamingJob(cfg)
    report2 = again.run().to_json()
    assert report2["restored_from_checkpoint"] is not None
    assert report2["events_trained"] == report["events_trained"]
    assert report2["events_dlq"] == report["events_dlq"] and report2["offsets"] == report["offsets"]
