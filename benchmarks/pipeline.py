"""The streaming pipeline, measured in one run on one machine, as ratios.

1. `memstream eval` throughput vs the streaming job's on the same recording and
   config (the topic replayed at full speed first, so the trainer never waits).
2. Freshness p50/p99 with events paced at half the trainer's measured capacity.
3. Serving p50/p99 latency of /rank with 100 candidates, while snapshots are
   published and hot-swapped (failed requests counted).
4. User-side reuse (UG-Sep): one rank request of 100 candidates with the user
   side computed once vs once per candidate.

    .venv/bin/python benchmarks/pipeline.py [--events 40000] [--out benchmarks/results/pipeline_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _job_cfg(base: list[str], bootstrap: str, topic: str, work: Path, events: int, port: int):
    from stream.config import load_config

    return load_config(ROOT / "configs" / "default.yaml", base + [
        f'kafka.bootstrap="{bootstrap}"', f"kafka.topic={topic}", f"job.work_dir={work}",
        f"job.max_events={events}", "job.live_display=false", "admin.port=0",
        f"serving.http_port={port}", "snapshots.interval_s=1.0", "checkpoints.interval_s=30",
    ])


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
    return {"user_id": u["user_id"], "user_features": u["user_features"], "scenario": u["scenario"],
            "candidates": cands}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=40_000, help="events for the throughput runs")
    ap.add_argument("--fresh-seconds", type=float, default=40.0, help="length of the paced run")
    ap.add_argument("--requests", type=int, default=300, help="rank requests for the latency table")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_cpu.md"))
    args = ap.parse_args()

    import httpx
    import ray

    from infra.broker import LocalBroker, free_port
    from stream.config import load_config
    from stream.data.ml1m import build_ml1m_recording
    from stream.evaluate import run_eval
    from stream.job import StreamingJob, init_local_ray
    from stream.recording import replay

    tmp = Path(tempfile.mkdtemp(prefix="memstream-pipeline-"))
    rec = tmp / "ml1m.parquet"
    build_ml1m_recording(rec, limit=args.events)
    rows: dict[str, str] = {}

    # 1a. eval
    cfg = load_config(ROOT / "configs" / "default.yaml", args.overrides)
    ev = run_eval(cfg, rec, progress=False)
    rows["eval throughput (events/s)"] = f"{ev['throughput_eps']:,.0f}"
    rows["eval AUC like"] = f"{ev['auc.like']:.4f}"

    port = free_port()
    with LocalBroker(state_dir=tmp / "broker") as broker:
        init_local_ray(num_cpus=4, namespace="memstream-bench", log_to_driver=False)
        try:
            # 1b. streaming job over the same events, topic filled first
            replay(rec, broker.bootstrap, "bench-max", "max", retime=True)
            job = StreamingJob(_job_cfg(args.overrides, broker.bootstrap, "bench-max", tmp / "w1",
                                        args.events, port))
            rep = job.run()
            rows["streaming throughput (events/s)"] = f"{rep['throughput_eps']:,.0f}"
            ratio = rep["throughput_eps"] / ev["throughput_eps"]
            rows["streaming / eval throughput"] = f"{ratio:.2f}"
            rows["streaming AUC like"] = f"{rep['auc.like']:.4f}"
            rows["|AUC streaming - eval|"] = f"{abs(rep['auc.like'] - ev['auc.like']):.4f}"
            busy = rep.get("trainer_busy") or {}
            for k, v in busy.items():
                rows[f"trainer time in {k[:-2]} (s, streaming run)"] = f"{v:.1f}"
            rows["eval wall time (s, decode + train)"] = f"{ev['duration_s']:.1f}"

            # 2 + 3. paced at half capacity: freshness, and serving latency during swaps
            rate = max(50.0, 0.5 * rep["throughput_eps"])
            n_paced = min(int(rate * args.fresh_seconds), args.events)  # the feeder sends `events` at most
            from stream.kafka_io import ensure_topic
            from stream.recording import recording_info

            ensure_topic(broker.bootstrap, "bench-paced", recording_info(rec).partitions)
            job2 = StreamingJob(_job_cfg(args.overrides, broker.bootstrap, "bench-paced", tmp / "w2",
                                         n_paced, port))
            out: dict = {}
            th = threading.Thread(target=lambda: out.update(report=job2.run()), daemon=True)
            th.start()
            while not getattr(job2, "topo", None) or not job2.topo.serving_url:
                if not th.is_alive():
                    raise SystemExit("the paced job failed to start (see its log above)")
                time.sleep(0.5)
            feeder = threading.Thread(
                target=replay, args=(rec, broker.bootstrap, "bench-paced"),
                kwargs={"speed": "max", "rate": rate, "retime": True}, daemon=True)
            feeder.start()
            client = httpx.Client(base_url=job2.topo.serving_url, timeout=30)
            req = _rank_request(rec, 100)
            while client.post("/rank", json=req).status_code != 200:
                time.sleep(0.5)
            lat, failed, versions, failures = [], 0, set(), {}
            for _ in range(args.requests):
                t0 = time.perf_counter()
                r = client.post("/rank", json=req)
                lat.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    failed += 1
                    failures.setdefault(r.status_code, r.text[:300])
                else:
                    versions.add(r.json()["version"])
                time.sleep(0.02)
            th.join()
            rep2 = out["report"]
            rows["paced rate (events/s, half capacity)"] = f"{rate:,.0f}"
            rows["freshness p50 (s)"] = f"{rep2['freshness_p50_s']:.2f}"
            rows["freshness p99 (s)"] = f"{rep2['freshness_p99_s']:.2f}"
            rows["event -> version written p50 / p99 (s)"] = (
                f"{rep2.get('written_p50_s') or float('nan'):.2f} / {rep2.get('written_p99_s') or float('nan'):.2f}")
            rows["trainer time in train / wall (paced run)"] = (
                f"{(rep2.get('trainer_busy') or {}).get('train_s', float('nan')):.1f} / "
                f"{rep2.get('trainer_uptime_s') or float('nan'):.1f} s")
            rows["serving /rank 100 candidates p50 (ms)"] = f"{_pct(lat, 50):.1f}"
            rows["serving /rank 100 candidates p99 (ms)"] = f"{_pct(lat, 99):.1f}"
            rows["rank requests failed / sent"] = f"{failed} / {len(lat)}"
            for code, body in failures.items():
                rows[f"first failure, HTTP {code}"] = body.replace("|", "/").replace("\n", " ")
            rows["model versions seen by the requests"] = f"{len(versions)}"

            # 4. UG-Sep: user side once vs per candidate, in process on the last snapshot
            from stream.servable import RankRequest, ServedModel
            from stream.snapshots import SnapshotStore

            served = ServedModel(SnapshotStore(str(tmp / "w2" / "snapshots")).load_chain())
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
        + "".join(f" --set {o}" for o in args.overrides) + "`",
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
