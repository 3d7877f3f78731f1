"""Soak: the streaming job for a long time at the trainer's capacity; does anything grow?

    .venv/bin/python benchmarks/soak.py --minutes 30               # the real check
    .venv/bin/python benchmarks/soak.py --minutes 5 --out /tmp/s   # a quick look

A synthetic stream sized to outlast the run is replayed at full speed into a local
broker; the job trains it with serving and the admin API off (their memory is the
serving benchmarks'). Every `--every` seconds it samples the memory of each actor
(trainer, publisher, ingest readers) and of the driver (this process), and the number
of entries of every structure that could grow with the stream (`sizes()` of the actors:
the AUC summary, the score log, hasher caches, feature candidates, history users, bank
rows, pending freshness, dedup ids, the freshness ledger, first activations, the
driver's progress samples).

Saturation: a slope measured while bounded tables are still filling measures the filling,
not a leak. So the stream's users and items (`--users`, `--items`, Zipf-distributed pools,
all seen within the first minutes) outnumber the caps the soak sets (`--history-users`
for model.history.max_users, `--bank-rows` for model.bank.capacity): both tables are full
and evicting before the fits start, and the hasher caches stop at the pools' sizes.

Memory: "RSS" is the resident set; "private" is its anonymous part (RssAnon): what a
leak grows. RSS also counts the pages of Ray's shared object store a worker has touched
(every snapshot and unit passes through it), which grow up to the store's size and are
not the process's own; the target is checked on private memory, both are printed.

After the warm-up (`--warmup` of the samples) it fits a line through each series against
events trained and prints the slope per million events: memory in MB, structures in
entries. The target: private-memory slope of each actor <= 5 MB per million events.
Tables go to benchmarks/results/soak_<machine>.md (`--results`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def _memory_mb(pid: int) -> tuple[float, float]:
    """(resident set, its private anonymous part) of a process in MB (Linux /proc;
    psutil's rss and uss where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = {
                k: float(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f) if k in ("VmRSS", "RssAnon")
            }
        return kb["VmRSS"] / 1024, kb["RssAnon"] / 1024
    except (OSError, KeyError):
        import psutil

        info = psutil.Process(pid).memory_full_info()
        return info.rss / 2**20, info.uss / 2**20


def _slope_per_million(x_events: np.ndarray, y: np.ndarray) -> float:
    if len(x_events) < 3 or np.ptp(x_events) == 0:
        return float("nan")
    return float(np.polyfit(x_events / 1e6, y, 1)[0])


def run(args) -> tuple[str, bool]:
    import ray

    from infra.broker import LocalBroker
    from stream.config import load_config
    from stream.job.driver import StreamingJob, init_local_ray
    from stream.recordings.data.synthetic import build_synthetic_recording
    from stream.recordings.recording import replay

    work = Path(args.out or tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    # A soak starts from an empty broker and job: the state of an earlier run in the same work
    # dir would resume at its offsets and run out of stream (the recording is kept: it is
    # rebuilt only when its parameters change).
    for stale in (work / "broker", work / "job"):
        if stale.exists():
            print(f"[soak] removing {stale} (an earlier run's state)", file=sys.stderr)
            shutil.rmtree(stale)
    events = int(args.rate_guess * args.minutes * 60 * 1.5)  # enough to outlast the run
    rec = work / f"syn_{events}_{args.users}u_{args.items}i.parquet"
    if not rec.exists():
        print(f"[soak] building a synthetic stream of {events:,} events", file=sys.stderr)
        build_synthetic_recording(rec, events=events, users=args.users, items=args.items, seed=0)
    init_local_ray(num_cpus=4, namespace="memstream-soak", logging_level="WARNING", log_to_driver=False)
    series: dict[str, list[float]] = {}
    xs: list[float] = []
    try:
        with LocalBroker(state_dir=work / "broker") as broker:
            topic = "soak"
            from stream.ingest.kafka_io import ensure_topic
            from stream.recordings.recording import recording_info

            ensure_topic(broker.bootstrap, topic, recording_info(rec).partitions)
            stop = threading.Event()
            th_replay = threading.Thread(
                target=lambda: replay(rec, broker.bootstrap, topic, "max", stop=stop),
                daemon=True,
                name="replay",
            )
            th_replay.start()
            cfg = load_config(
                ROOT / "configs" / "default.yaml",
                [
                    f'kafka.bootstrap="{broker.bootstrap}"',
                    f"kafka.topic={topic}",
                    f"job.work_dir={work / 'job'}",
                    "job.live_display=false",
                    f"job.duration_s={args.minutes * 60}",
                    "serving.enabled=false",
                    "admin.enabled=false",
                    "checkpoints.interval_s=30",
                    # Caps below the stream's users and items: full before the fits start.
                    f"model.history.max_users={args.history_users}",
                    f"model.bank.capacity={args.bank_rows}",
                ],
            )
            job = StreamingJob(cfg)
            out: dict = {}
            th = threading.Thread(
                target=lambda: out.update(report=job.run().to_json()), daemon=True, name="job"
            )
            th.start()
            while getattr(job, "topo", None) is None or job.topo.trainer is None:
                time.sleep(1)
            topo = job.topo
            time.sleep(5)
            while th.is_alive():
                try:
                    prog = ray.get(topo.trainer.progress.remote(), timeout=10)
                    sizes = {
                        "trainer": ray.get(topo.trainer.sizes.remote(), timeout=10),
                        "publisher": ray.get(topo.publisher.sizes.remote(), timeout=10),
                    }
                    for i, r in enumerate(topo.readers):
                        sizes[f"reader{i}"] = ray.get(r.sizes.remote(), timeout=10)
                except Exception as e:
                    print(f"[soak] sample skipped: {e}", file=sys.stderr)
                    time.sleep(args.every)
                    continue
                xs.append(prog.events_applied)
                for actor, sz in sizes.items():
                    rss, private = _memory_mb(sz.pop("pid"))
                    series.setdefault(f"{actor} RSS (MB)", []).append(rss)
                    series.setdefault(f"{actor} private (MB)", []).append(private)
                    for k, v in sz.items():
                        series.setdefault(f"{actor}.{k}", []).append(float(v))
                rss, private = _memory_mb(os.getpid())
                series.setdefault("driver RSS (MB)", []).append(rss)
                series.setdefault("driver private (MB)", []).append(private)
                series.setdefault("driver.progress_samples", []).append(float(len(job.samples)))
                print(
                    f"[soak] {prog.events_applied:,} events, trainer RSS "
                    f"{series['trainer RSS (MB)'][-1]:.0f} MB",
                    file=sys.stderr,
                )
                th.join(args.every)
            stop.set()
            th_replay.join(30)
            if "report" not in out:
                raise RuntimeError("the job ended without a report")
            report = out["report"]
    finally:
        ray.shutdown()
    # Every sample, for a look at a series' shape (a step inside the fit window and a
    # steady climb give the same slope).
    (work / "series.json").write_text(json.dumps({"events_applied": xs, **series}))
    x = np.asarray(xs)
    first = int(len(x) * args.warmup)
    after = x >= x[first] if len(x) else x.astype(bool)
    cmd = " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"# Soak ({args.minutes:.0f} min, {platform.machine()}, {os.cpu_count()} cores)",
        "",
        f"Command: `.venv/bin/python benchmarks/soak.py {cmd}`. The job trained "
        f"{report['events_trained']:,} events at {report['throughput_eps'] or 0:,.0f} ev/s; samples every "
        f"{args.every:g} s, slopes fitted after the first {args.warmup:.0%} of the samples "
        f"({int(x[first]) if len(x) else 0:,} events). Stream: {args.users:,} users, {args.items:,} items; "
        f"caps: model.history.max_users={args.history_users:,}, model.bank.capacity={args.bank_rows:,}.",
        "",
        "| series | start | at warm-up end | end | min-max after warm-up | slope per million events |",
        "|---|---|---|---|---|---|",
    ]
    ok = True
    for name, ys in series.items():
        y = np.asarray(ys)
        slope = _slope_per_million(x[after], y[after])
        flag = ""
        if name.endswith("private (MB)") and not name.startswith("driver") and slope > 5:
            ok, flag = False, " (over 5 MB)"
        lo, hi = (y[after].min(), y[after].max()) if after.any() else (np.nan, np.nan)
        lines.append(
            f"| {name} | {y[0]:,.1f} | {y[first]:,.1f} | {y[-1]:,.1f} | {lo:,.1f}-{hi:,.1f} | {slope:,.2f}{flag} |"
        )
    lines += [
        "",
        "Target (private-memory slope of each actor <= 5 MB per million events): "
        f"{'met' if ok else 'NOT met'}.",
    ]
    return "\n".join(lines), ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=1 / 3, help="fraction of the samples left out of the fits")
    p.add_argument("--rate-guess", type=float, default=3000.0, help="events/s, to size the stream")
    p.add_argument("--users", type=int, default=40_000, help="the stream's user pool (Zipf)")
    p.add_argument("--items", type=int, default=10_000, help="the stream's item pool (Zipf)")
    p.add_argument("--history-users", type=int, default=20_000, help="model.history.max_users for the soak")
    p.add_argument("--bank-rows", type=int, default=4_000, help="model.bank.capacity for the soak")
    p.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    p.add_argument("--results", default=None, help="write the table here too")
    args = p.parse_args()
    table, ok = run(args)
    print(table)
    if args.results:
        Path(args.results).write_text(table + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
