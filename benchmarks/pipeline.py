"""The streaming pipeline, measured in one run on one machine, as ratios.

1. `memstream eval` throughput vs the streaming job's on the same recording and
   config (the topic replayed at full speed first, so the trainer never waits).
2. Freshness p50/p99 with events paced at half the trainer's measured capacity
   (and the first leg alone: event -> its version written to the store).
3. The same pace again under a stream of /rank requests with 100 candidates:
   latency p50/p99 while snapshots are published and hot-swapped (failed
   requests counted, by status), and freshness under that load.
4. User-side reuse (UG-Sep): one rank request of 100 candidates with the user
   side computed once vs once per candidate.

    .venv/bin/python benchmarks/pipeline.py [--events 40000] [--out benchmarks/results/pipeline_cpu.md]
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _job_cfg(base: list[str], bootstrap: str, topic: str, work: Path, events: int | None, port: int):
    from stream.config import load_config

    return load_config(
        ROOT / "configs" / "default.yaml",
        [
            f'kafka.bootstrap="{bootstrap}"',
            f"kafka.topic={topic}",
            f"job.work_dir={work}",
            "job.live_display=false",
            "admin.port=0",
            f"serving.http_port={port}",
            "checkpoints.interval_s=30",
            *([f"job.max_events={events}"] if events else []),
            *base,
        ],
    )


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _rank_request(recording: Path, n: int) -> dict:
    import pyarrow.parquet as pq

    vals = pq.read_table(recording, columns=["value"]).column("value").to_pylist()[:5000]
    events = [json.loads(v) for v in vals]
    seen, cands = set(), []
    for e in events:
        if e["item_id"] not in seen:
            seen.add(e["item_id"])
            cands.append({"item_id": e["item_id"], "item_text": e.get("item_text")})
        if len(cands) == n:
            break
    u = events[-1]
    return {
        "user_id": u["user_id"],
        "user_features": u["user_features"],
        "scenario": u["scenario"],
        "candidates": cands,
    }


def _snapshot_sizes(root: Path) -> dict[str, str]:
    """Mean bytes per full / delta version / base in a store (what each publish writes)."""
    from stream.snapshots.store import SnapshotStore

    store = SnapshotStore(str(root))
    sizes: dict[str, list[int]] = {"full": [], "delta": [], "base": []}
    for v in store.versions():
        m = store.manifest(v)
        sizes[m["kind"]].append(sum(f["size"] for f in m["files"].values()))
        if store.has_base(v):  # a full copy beside a delta, for replicas that start later
            sizes["base"].append(sum(f["size"] for f in store.base_manifest(v)["files"].values()))
    return {
        f"snapshot {kind} size, mean of {len(b)} (MB)": f"{np.mean(b) / 1e6:.1f}"
        for kind, b in sizes.items()
        if b
    }


def _paced_run(
    args,
    bootstrap: str,
    topic: str,
    work: Path,
    port: int,
    rec: Path,
    rate: float,
    n_events: int,
    req: dict,
    requests: int,
) -> dict:
    """A job over a topic fed at `rate` events/s; `requests` /rank calls during it."""
    import httpx
    import ray

    from stream.ingest.kafka_io import ensure_topic
    from stream.job.driver import StreamingJob
    from stream.recordings.recording import recording_info, replay

    ensure_topic(bootstrap, topic, recording_info(rec).partitions)
    # No max_events: the job is stopped once every event is applied AND the requests are
    # done, so no request races the teardown (a deleted route answers 404).
    job = StreamingJob(_job_cfg(args.overrides, bootstrap, topic, work, None, port))
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(report=job.run().to_json()), daemon=True)
    th.start()
    while not getattr(job, "topo", None) or not job.topo.serving_url:
        if not th.is_alive():
            raise SystemExit("the paced job failed to start (see its log above)")
        time.sleep(0.5)
    feeder = threading.Thread(
        target=replay,
        args=(rec, bootstrap, topic),
        kwargs={"speed": "max", "rate": rate, "retime": True},
        daemon=True,
    )
    feeder.start()
    lat: list[float] = []
    failures: dict[int, list[str]] = {}
    versions: set[int] = set()
    if requests:
        client = httpx.Client(base_url=job.topo.serving_url, timeout=30)
        while client.post("/rank", json=req).status_code != 200:
            time.sleep(0.5)
        for _ in range(requests):
            t0 = time.perf_counter()
            r = client.post("/rank", json=req)
            lat.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                failures.setdefault(r.status_code, []).append(r.text[:300])
            else:
                versions.add(r.json()["version"])
            time.sleep(0.02)
    while ray.get(job.topo.trainer.progress.remote(), timeout=30).events_applied < n_events:
        time.sleep(0.2)
    job.request_stop()
    th.join()
    return {**out["report"], "latency_ms": lat, "failures": failures, "versions": versions}


def _leg_rows(report: dict, label: str) -> dict[str, str]:
    """One row per freshness leg of a paced run's report (where its tail comes from)."""
    return {
        f"{label} '{leg}' p50 / p99 / slowest-1% mean (s)": (
            f"{v['p50_s']:.2f} / {v['p99_s']:.2f} / {v['tail_mean_s']:.2f}"
        )
        for leg, v in (report.get("freshness_legs") or {}).items()
    }


def _busy(report: dict) -> str:
    """Trainer seconds spent training / its uptime, of a paced run (is it keeping up?)."""
    train_s = (report.get("trainer_busy") or {}).get("train_s", float("nan"))
    return f"{train_s:.1f} / {report.get('trainer_uptime_s') or float('nan'):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=40_000, help="events for the throughput runs")
    ap.add_argument("--fresh-seconds", type=float, default=40.0, help="length of the paced run")
    ap.add_argument("--requests", type=int, default=300, help="rank requests for the latency table")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_cpu.md"))
    args = ap.parse_args()

    import ray

    from infra.broker import LocalBroker, free_port
    from stream.config import load_config
    from stream.job.driver import StreamingJob, init_local_ray
    from stream.recordings.data.movielens import build_ml1m_recording
    from stream.recordings.recording import replay
    from stream.train.evaluate import run_eval

    tmp = Path(tempfile.mkdtemp(prefix="memstream-pipeline-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # ~2 GB of topics, snapshots, checkpoints
    rec = tmp / "ml1m.parquet"
    build_ml1m_recording(rec, limit=args.events)
    rows: dict[str, str] = {}

    # 1a. eval
    cfg = load_config(ROOT / "configs" / "default.yaml", args.overrides)
    ev = run_eval(cfg, rec, progress=False).to_json()
    rows["eval throughput (events/s)"] = f"{ev['throughput_eps']:,.0f}"
    rows["eval AUC like"] = f"{ev['auc.like']:.4f}"

    port = free_port()
    with LocalBroker(state_dir=tmp / "broker") as broker:
        init_local_ray(num_cpus=4, namespace="memstream-bench", log_to_driver=False)
        try:
            # 1b. streaming job over the same events, topic filled first
            replay(rec, broker.bootstrap, "bench-max", "max", retime=True)
            job = StreamingJob(
                _job_cfg(args.overrides, broker.bootstrap, "bench-max", tmp / "w1", args.events, port)
            )
            rep = job.run().to_json()
            rows["streaming throughput (events/s)"] = f"{rep['throughput_eps']:,.0f}"
            ratio = rep["throughput_eps"] / ev["throughput_eps"]
            rows["streaming / eval throughput"] = f"{ratio:.2f}"
            rows["streaming AUC like"] = f"{rep['auc.like']:.4f}"
            rows["|AUC streaming - eval|"] = f"{abs(rep['auc.like'] - ev['auc.like']):.4f}"
            busy = rep.get("trainer_busy") or {}
            for k, v in busy.items():
                rows[f"trainer time in {k[:-2]} (s, streaming run)"] = f"{v:.1f}"
            rows["eval wall time (s, decode + train)"] = f"{ev['duration_s']:.1f}"
            rows.update(_snapshot_sizes(tmp / "w1" / "snapshots"))

            # 2. paced at half capacity, no request load: freshness
            # 3. the same pace under a stream of /rank requests: latency during swaps
            rate = max(50.0, 0.5 * rep["throughput_eps"])
            n_paced = min(int(rate * args.fresh_seconds), args.events)  # the feeder sends `events` at most
            req = _rank_request(rec, 100)
            rows["paced rate (events/s, half capacity)"] = f"{rate:,.0f}"
            quiet = _paced_run(
                args, broker.bootstrap, "bench-paced", tmp / "w2", port, rec, rate, n_paced, req, requests=0
            )
            rows["freshness p50 / p99 (s)"] = (
                f"{quiet['freshness_p50_s']:.2f} / {quiet['freshness_p99_s']:.2f}"
            )
            rows["freshness after serving went live, p50 / p99 (s)"] = (
                f"{quiet.get('freshness_steady_p50_s') or float('nan'):.2f} / "
                f"{quiet.get('freshness_steady_p99_s') or float('nan'):.2f}"
            )
            rows["event -> version written p50 / p99 (s)"] = (
                f"{quiet.get('written_p50_s') or float('nan'):.2f} / {quiet.get('written_p99_s') or float('nan'):.2f}"
            )
            rows.update(_leg_rows(quiet, "freshness leg"))
            rows["trainer busy training / wall (paced run, s)"] = _busy(quiet)
            loaded = _paced_run(
                args,
                broker.bootstrap,
                "bench-paced-load",
                tmp / "w3",
                port,
                rec,
                rate,
                n_paced,
                req,
                requests=args.requests,
            )
            lat, failures = loaded["latency_ms"], loaded["failures"]
            rows["under /rank load: freshness p50 / p99 (s)"] = (
                f"{loaded['freshness_p50_s']:.2f} / {loaded['freshness_p99_s']:.2f}"
            )
            rows["under /rank load: after serving went live, p50 / p99 (s)"] = (
                f"{loaded.get('freshness_steady_p50_s') or float('nan'):.2f} / "
                f"{loaded.get('freshness_steady_p99_s') or float('nan'):.2f}"
            )
            rows.update(_leg_rows(loaded, "under /rank load: leg"))
            rows["under /rank load: trainer busy training / wall (s)"] = _busy(loaded)
            rows["serving /rank 100 candidates p50 (ms)"] = f"{_pct(lat, 50):.1f}"
            rows["serving /rank 100 candidates p99 (ms)"] = f"{_pct(lat, 99):.1f}"
            rows["rank requests failed / sent"] = f"{sum(len(v) for v in failures.values())} / {len(lat)}"
            for code, bodies in failures.items():
                rows[f"first failure, HTTP {code}"] = bodies[0].replace("|", "/").replace("\n", " ")
            rows["model versions seen by the requests"] = f"{len(loaded['versions'])}"

            # 4. UG-Sep: user side once vs per candidate, in process on the last snapshot
            from stream.serving.model import RankRequest, ServedModel
            from stream.snapshots.store import SnapshotStore

            served = ServedModel(SnapshotStore(str(tmp / "w3" / "snapshots")).load_chain())
            rq = RankRequest.model_validate(req)

            def timed(reuse: bool) -> float:
                ts = []
                for _ in range(15):
                    t0 = time.perf_counter()
                    served.rank(rq, reuse_user_side=reuse)
                    ts.append(time.perf_counter() - t0)
                return statistics.median(ts[3:]) * 1000

            once, each = timed(True), timed(False)
            rows["rank 100 candidates, user side once (ms)"] = f"{once:.1f}"
            rows["rank 100 candidates, user side per candidate (ms)"] = f"{each:.1f}"
            rows["user-side reuse speedup"] = f"{each / once:.1f}x"
        finally:
            try:
                from ray import serve

                serve.shutdown()
            finally:
                ray.shutdown()

    lines = [
        "# Pipeline benchmark (CPU)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
        "one run, shared machine: compare ratios, not absolute times.",
        f"Command: `.venv/bin/python benchmarks/pipeline.py --events {args.events}"
        + "".join(f" --set {o}" for o in args.overrides)
        + "`",
        f"Recording: first {args.events:,} ML-1M events; default config (configs/default.yaml).",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows.items()],
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
