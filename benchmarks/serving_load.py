"""Serving under load: `/rank` on loopback while snapshots are published every second.

Real components: a Tansu broker, local Ray, the streaming job with its Ray Serve
replica. Two phases of the same closed-loop load (`--clients` threads, each
sending the next request when the previous answered):

1. quiet: a prefix of the recording is applied and the trainer has nothing new,
   so no version is published and serving does not swap (`--quiet-s`);
2. swapping: the rest of the recording is produced at `--rate` events/s while
   the job publishes a snapshot every second and the replica hot-swaps each
   (`--swap-s`, 60 by default).

Every non-200 answer or transport error is a failure. Prints p50/p99 latency per
phase, versions seen, and writes the table into benchmarks/results/reliability.md.

    .venv/bin/python benchmarks/serving_load.py --swap-s 60
"""

from __future__ import annotations

import argparse
import atexit
import random
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _requests(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    titles = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Fargo (1996)", "brand new film"]
    return [
        {
            "user_id": f"1m_{rng.randint(1, 500)}",
            "user_features": {"age": "25", "gender": "M"},
            "scenario": "feed",
            "candidates": [{"item_id": t, "item_text": f"{t} Drama"} for t in rng.sample(titles, 3)],
        }
        for _ in range(n)
    ]


def _load(url: str, seconds: float, clients: int, seed: int) -> dict:
    import httpx

    reqs = _requests(512, seed)
    lat: list[float] = []
    versions: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            k = i
            while time.monotonic() < stop_at:
                body = reqs[k % len(reqs)]
                k += clients
                t0 = time.perf_counter()
                try:
                    r = c.post("/rank", json=body)
                    dt = time.perf_counter() - t0
                    with lock:
                        if r.status_code == 200:
                            lat.append(dt)
                            versions.append(int(r.json()["version"]))
                        else:
                            failures.append(f"{r.status_code}: {r.text[:200]}")
                except Exception as e:
                    with lock:
                        failures.append(repr(e)[:200])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a = np.array(lat) * 1000
    return {
        "requests": len(lat) + len(failures),
        "failed": len(failures),
        "failures": failures[:5],
        "p50_ms": float(np.percentile(a, 50)) if len(a) else None,
        "p99_ms": float(np.percentile(a, 99)) if len(a) else None,
        "rps": len(lat) / seconds,
        "versions_seen": len(set(versions)),
        "version_first_last": (min(versions), max(versions)) if versions else None,
    }


def run(quiet_s: float, swap_s: float, clients: int, rate: float, events: int, seed: int) -> dict:
    import httpx
    import ray
    from chaos import _join, _recording, _run_thread

    from infra.broker import LocalBroker
    from stream.config import load_config
    from stream.ingest.kafka_io import ensure_topic
    from stream.job.driver import StreamingJob, init_local_ray
    from stream.recordings.recording import recording_info, replay

    work = Path(tempfile.mkdtemp(prefix="serving-load-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # ~2 GB of topics and snapshots
    recording = _recording(events, ROOT / ".memstream" / "data")
    info = recording_info(recording)
    prefix_rows = min(5000, info.rows // 4)
    # The two halves as recordings of their own: prefix at max speed, rest paced.
    import pyarrow.parquet as pq

    from stream.recordings.recording import write_recording

    table = pq.read_table(recording)
    head, tail = work / "head.parquet", work / "tail.parquet"
    write_recording(head, table.slice(0, prefix_rows), info.partitions)
    tail_rows = min(info.rows - prefix_rows, int(rate * swap_s * 1.5))
    write_recording(tail, table.slice(prefix_rows, tail_rows), info.partitions)

    with LocalBroker(state_dir=work / "broker") as broker:
        init_local_ray(num_cpus=4, namespace="memstream-load", logging_level="WARNING", log_to_driver=False)
        try:
            topic = "serving-load"
            ensure_topic(broker.bootstrap, topic, info.partitions)
            replay(head, broker.bootstrap, topic, "max", retime=True)
            port = 18000 + seed % 1000
            cfg = load_config(
                ROOT / "configs" / "default.yaml",
                [
                    f'kafka.bootstrap="{broker.bootstrap}"',
                    f"kafka.topic={topic}",
                    f"job.work_dir={work / 'job'}",
                    "job.live_display=false",
                    f"job.max_events={prefix_rows + tail_rows}",
                    "snapshots.interval_s=1",
                    "snapshots.full_every=10",
                    "checkpoints.interval_s=10",
                    "admin.enabled=false",
                    f"serving.http_port={port}",
                ],
            )
            job = StreamingJob(cfg)
            th, out = _run_thread(job)
            deadline = time.time() + 300
            url = None
            while time.time() < deadline:
                topo = getattr(job, "topo", None)
                if topo is not None and topo.serving_url:
                    url = topo.serving_url
                    try:
                        if httpx.post(url + "/rank", json=_requests(1, 0)[0], timeout=10).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass  # the proxy is still starting
                time.sleep(0.5)
            else:
                raise TimeoutError("serving did not answer within 300 s")
            # wait until the prefix is applied and its last version is live: no more swaps
            import ray as _ray

            while True:
                p = _ray.get(job.topo.trainer.progress.remote(), timeout=10)
                if p.events_applied >= prefix_rows:
                    break
                time.sleep(0.5)
            time.sleep(3.0)
            v0 = httpx.post(url + "/rank", json=_requests(1, 0)[0], timeout=10).json()["version"]
            quiet = _load(url, quiet_s, clients, seed)
            v1 = httpx.post(url + "/rank", json=_requests(1, 0)[0], timeout=10).json()["version"]
            quiet["swaps"] = v1 - v0
            producer = threading.Thread(
                target=replay,
                args=(tail, broker.bootstrap, topic),
                kwargs={"rate": rate, "retime": True},
                daemon=True,
            )
            producer.start()
            time.sleep(2.0)  # the first paced events are applied and published
            swapping = _load(url, swap_s, clients, seed + 1)
            producer.join(600)
            job.request_stop()
            report = _join(th, out, 600)
            return {
                "quiet": quiet,
                "swapping": swapping,
                "published": report["snapshots_published"],
                "clients": clients,
                "rate": rate,
            }
        finally:
            ray.shutdown()


def table(r: dict) -> str:
    f = lambda x: "n/a" if x is None else f"{x:.1f}"
    lines = [
        "| phase | seconds | requests | failed | p50 ms | p99 ms | req/s | versions seen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("quiet", "swapping"):
        p = r[name]
        lines.append(
            f"| {name} | {r[name + '_s']:.0f} | {p['requests']} | {p['failed']} | {f(p['p50_ms'])} | "
            f"{f(p['p99_ms'])} | {p['rps']:.1f} | {p['versions_seen']} |"
        )
    lines.append("")
    lines.append(
        f"{r['clients']} closed-loop clients on loopback; events produced at {r['rate']:.0f}/s "
        f"during the swapping phase; snapshots published in the run: {r['published']}."
    )
    fails = r["quiet"]["failures"] + r["swapping"]["failures"]
    if fails:
        lines.append(f"First failures: {fails}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quiet-s", type=float, default=15.0)
    ap.add_argument("--swap-s", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.md"))
    args = ap.parse_args(argv)
    r = run(args.quiet_s, args.swap_s, args.clients, args.rate, args.events, args.seed)
    r["quiet_s"], r["swapping_s"] = args.quiet_s, args.swap_s
    text = table(r)
    print(text)
    from chaos import _write_section

    cmd = "benchmarks/serving_load.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    _write_section(
        Path(args.out),
        "## Serving under load",
        f"## Serving under load\n\nCommand: `.venv/bin/python {cmd}`\n\n{text}\n",
    )
    return 0 if r["quiet"]["failed"] == 0 and r["swapping"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
