"""Serving under load: `/rank` on loopback while snapshots are published every second.

Real components: a Tansu broker, local Ray, the streaming job with its Ray Serve
replica. Three phases of closed-loop load (threads, each sending the next request
when the previous answered):

1. quiet: a prefix of the recording is applied and the trainer has nothing new,
   so no version is published and serving does not swap (`--quiet-s`,
   `--clients` clients, 3 candidates a request);
2. swapping: the rest of the recording is produced at `--rate` events/s while
   the job publishes a snapshot every second and the replica hot-swaps each
   (`--swap-s`, 60 by default);
3. overload (run between 1 and 2, on the quiet model): `--overload-clients`
   clients (40; more than the replica's `serving.max_in_flight`) with `--overload-candidates` (1000) candidates each,
   for `--overload-s`: the replica sheds what is past its bound with 503 +
   Retry-After (a client waits `--backoff-ms` and sends again). Reports the 503s
   (and 504s, past `serving.request_timeout_s`), how fast a 503 came, and the
   latency of the admitted requests, which the bound keeps from piling up.

In phases 1-2 every non-200 answer or transport error is a failure; in phase 3
503/504 are the shedding being measured and anything else is a failure. Prints
p50/p99 latency per phase and writes the table into `--out`
(benchmarks/results/reliability.md).

    .venv/bin/python benchmarks/serving_load.py --swap-s 60
    .venv/bin/python benchmarks/serving_load.py --quiet-s 5 --swap-s 10 --overload-s 20 \
        --events 20000 --out benchmarks/results/serving_load_overload.md   # reduced, ~3 min
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


TITLES = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Fargo (1996)", "brand new film"]


def _requests(n: int, seed: int, candidates: int = 3) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if candidates <= len(TITLES):
            cands = [{"item_id": t, "item_text": f"{t} Drama"} for t in rng.sample(TITLES, candidates)]
        else:  # known titles and unseen ids (no text: no encoding on the fly)
            cands = [{"item_id": TITLES[j % 4] if j % 2 else f"item-{j}"} for j in range(candidates)]
        out.append(
            {
                "user_id": f"1m_{rng.randint(1, 500)}",
                "user_features": {"age": "25", "gender": "M"},
                "scenario": "feed",
                "candidates": cands,
            }
        )
    return out


SHED = (503, 504)


def _load(
    url: str,
    seconds: float,
    clients: int,
    seed: int,
    candidates: int = 3,
    shedding_ok: bool = False,
    backoff_s: float = 0.05,
) -> dict:
    """Closed-loop load. With `shedding_ok`, 503/504 are counted (not failures) and the
    client waits `backoff_s` before its next request."""
    import httpx

    reqs = _requests(64 if candidates > len(TITLES) else 512, seed, candidates)
    lat: list[float] = []
    shed_lat: list[float] = []
    shed_codes: dict[int, int] = {}
    retry_after: set[str] = set()
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
                        elif shedding_ok and r.status_code in SHED:
                            shed_lat.append(dt)
                            shed_codes[r.status_code] = shed_codes.get(r.status_code, 0) + 1
                            retry_after.add(r.headers.get("retry-after", "-"))
                        else:
                            failures.append(f"{r.status_code}: {r.text[:200]}")
                    if shedding_ok and r.status_code in SHED:
                        time.sleep(backoff_s)
                except Exception as e:
                    with lock:
                        failures.append(repr(e)[:200])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a = np.array(lat) * 1000
    b = np.array(shed_lat) * 1000
    return {
        "requests": len(lat) + len(shed_lat) + len(failures),
        "ok": len(lat),
        "shed_503": shed_codes.get(503, 0),
        "shed_504": shed_codes.get(504, 0),
        "shed_p50_ms": float(np.percentile(b, 50)) if len(b) else None,
        "retry_after": sorted(retry_after),
        "failed": len(failures),
        "failures": failures[:5],
        "p50_ms": float(np.percentile(a, 50)) if len(a) else None,
        "p99_ms": float(np.percentile(a, 99)) if len(a) else None,
        "rps": len(lat) / seconds,
        "versions_seen": len(set(versions)),
        "version_first_last": (min(versions), max(versions)) if versions else None,
    }


def run(
    quiet_s: float,
    swap_s: float,
    clients: int,
    rate: float,
    events: int,
    seed: int,
    overload_s: float = 0.0,
    overload_clients: int = 40,
    overload_candidates: int = 1000,
    backoff_s: float = 0.05,
) -> dict:
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
            overload = None
            if overload_s > 0:  # on the quiet model too: the shedding alone, no swaps
                overload = _load(
                    url,
                    overload_s,
                    overload_clients,
                    seed + 2,
                    candidates=overload_candidates,
                    shedding_ok=True,
                    backoff_s=backoff_s,
                )
                time.sleep(3.0)  # requests answered 504 finish their work and free their slots
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
                "overload": overload,
                "published": report["snapshots_published"],
                "clients": clients,
                "rate": rate,
                "overload_clients": overload_clients,
                "overload_candidates": overload_candidates,
                "backoff_ms": backoff_s * 1000,
                "max_in_flight": cfg.serving.max_in_flight,
                "request_timeout_s": cfg.serving.request_timeout_s,
                "replicas": cfg.serving.replicas,
            }
        finally:
            ray.shutdown()


def table(r: dict) -> str:
    f = lambda x: "n/a" if x is None else f"{x:.1f}"
    lines = [
        "| phase | seconds | clients x candidates | requests | 200 | 503 | 504 | failed | p50 ms (200) "
        "| p99 ms (200) | p50 ms (503/504) | req/s (200) | versions seen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    phases = [("quiet", r["clients"], 3), ("swapping", r["clients"], 3)]
    if r.get("overload"):
        phases.append(("overload", r["overload_clients"], r["overload_candidates"]))
    for name, n, cands in phases:
        p = r[name]
        lines.append(
            f"| {name} | {r[name + '_s']:.0f} | {n} x {cands} | {p['requests']} | {p['ok']} | "
            f"{p['shed_503']} | {p['shed_504']} | {p['failed']} | {f(p['p50_ms'])} | {f(p['p99_ms'])} | "
            f"{f(p['shed_p50_ms'])} | {p['rps']:.1f} | {p['versions_seen']} |"
        )
    lines.append("")
    lines.append(
        f"{r['clients']} closed-loop clients on loopback; events produced at {r['rate']:.0f}/s "
        f"during the swapping phase; snapshots published in the run: {r['published']}."
    )
    if r.get("overload"):
        o = r["overload"]
        lines.append(
            f"Overload: {r['overload_clients']} clients against {r['replicas']} replica(s) with "
            f"serving.max_in_flight={r['max_in_flight']} and serving.request_timeout_s="
            f"{r['request_timeout_s']:g}; a shed client waits {r['backoff_ms']:.0f} ms before its next "
            f"request; Retry-After values seen: {', '.join(o['retry_after']) or 'none'}."
        )
    fails = r["quiet"]["failures"] + r["swapping"]["failures"] + (r.get("overload") or {}).get("failures", [])
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
    ap.add_argument("--overload-s", type=float, default=30.0, help="0 skips the overload phase")
    ap.add_argument("--overload-clients", type=int, default=40)
    ap.add_argument("--overload-candidates", type=int, default=1000)
    ap.add_argument("--backoff-ms", type=float, default=50.0, help="a shed client's wait")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.md"))
    args = ap.parse_args(argv)
    r = run(
        args.quiet_s,
        args.swap_s,
        args.clients,
        args.rate,
        args.events,
        args.seed,
        args.overload_s,
        args.overload_clients,
        args.overload_candidates,
        args.backoff_ms / 1000,
    )
    r["quiet_s"], r["swapping_s"], r["overload_s"] = args.quiet_s, args.swap_s, args.overload_s
    text = table(r)
    print(text)
    from chaos import _write_section

    cmd = "benchmarks/serving_load.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    _write_section(
        Path(args.out),
        "## Serving under load",
        f"## Serving under load\n\nCommand: `.venv/bin/python {cmd}`\n\n{text}\n",
    )
    failed = sum(r[p]["failed"] for p in ("quiet", "swapping", "overload") if r.get(p))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
