"""Publisher memory in one process: what grows while it writes versions?

    .venv/bin/python benchmarks/publisher_memory.py --versions 1000

The soak (benchmarks/soak.py) showed the publisher actor's private memory growing
~19 MB per million events although every structure its `sizes()` reports was flat.
This drives the plain `SnapshotPublisher` (what the PublisherActor wraps) the way the
actor is driven, without Ray or a broker: real payloads are cut from a real
`OnlineTrainer` (the soak's config) on a synthetic stream, then replayed as versions
with the soak's shape (one delta per version, ~4,000 new event timestamps each, a
base every `full_every` versions written from another thread, as RayPublisher ships
them), each call on a pool of 8 threads like the actor's `max_concurrency=8`.

Every `--every` versions it samples RssAnon (/proc/self/status), tracemalloc's
Python-heap total, pyarrow's pool (bytes_allocated, max_memory) and the pool's
backend; at the end it prints the slope per million events (250 versions = 1M events
at the soak's 4,000 events per version) and what `malloc_trim(0)` gives back: memory
a trim returns was retained by the allocator, not leaked.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return float(line.split()[1]) / 1024
    return float("nan")


def _malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def cut_payloads(work: Path, events_per_version: int, versions: int):
    """(full state, [delta payloads], base) cut from a real trainer on a synthetic stream."""
    from models.online import OnlineTrainer
    from stream.config import load_config
    from stream.messages import IngestUnit
    from stream.recordings.data.synthetic import build_synthetic_recording
    from stream.train.checkpoints import CheckpointManager
    from stream.train.evaluate import iter_event_batches
    from stream.train.service import TrainerService

    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        ["model.history.max_users=20000", "model.bank.capacity=4000"],
    )
    rec = work / "syn.parquet"
    build_synthetic_recording(rec, events=events_per_version * versions, users=40_000, items=10_000, seed=0)
    svc = TrainerService(
        OnlineTrainer(cfg.model, cfg.trainer),
        CheckpointManager(work / "ck"),
        full_every=1_000_000,
        first_version=1,
    )
    payloads = [svc.snapshot_payload()]  # v1: full
    for b in iter_event_batches(rec, batch_size=events_per_version):
        nxt = {
            int(p): int(b.kafka_offset[b.kafka_partition == p].max()) + 1
            for p in np.unique(b.kafka_partition)
        }
        svc.apply_unit(IngestUnit(events=b.to_arrow(), rejects=(), next_offsets=nxt))
        payloads.append(svc.snapshot_payload())
    base = svc.trainer.state.full_snapshot()
    return payloads[0], payloads[1:], base


def _cut_on_the_wire(work: Path, events_per_version: int):
    """`cut_payloads` with numpy arrays in place of tensors (what crosses a process)."""
    from stream.snapshots.store import state_to_wire

    full, deltas, base = cut_payloads(work, events_per_version, versions=6)
    for p in (full, *deltas):
        p.state = state_to_wire(p.state)
    return full, deltas, state_to_wire(base)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", type=int, default=1000, help="delta versions to publish")
    p.add_argument("--events-per-version", type=int, default=4000)
    p.add_argument(
        "--full-every", type=int, default=20, help="a base every K versions (snapshots.full_every)"
    )
    p.add_argument("--keep-versions", type=int, default=50)
    p.add_argument("--every", type=int, default=50, help="versions between samples")
    p.add_argument("--warmup", type=float, default=0.3, help="fraction of the samples left out of the fits")
    p.add_argument("--trim-every", type=int, default=0, help="malloc_trim(0) every N versions (0: never)")
    p.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="the publisher as before its fix: glibc's dynamic mmap threshold",
    )
    p.add_argument("--tracemalloc", action="store_true", help="also the top growing Python allocation sites")
    args = p.parse_args()

    import pyarrow as pa

    from stream.snapshots.publisher import SnapshotPublisher
    from stream.snapshots.store import state_from_wire

    work = Path(tempfile.mkdtemp(prefix="pubmem-"))
    # Cut in a child process: the trainer's own memory (and its mallopt settings, see
    # models/online.py keep_freed_memory_mapped) must not be in what is measured here.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        full, deltas, base = ex.submit(_cut_on_the_wire, work, args.events_per_version).result()
    print(
        f"[pubmem] payloads: 1 full, {len(deltas)} deltas, 1 base; arrow pool {pa.default_memory_pool().backend_name}",
        file=sys.stderr,
    )
    pub = SnapshotPublisher(
        str(work / "snapshots"), keep_versions=args.keep_versions, owns_process=not args.glibc_defaults
    )
    pool = ThreadPoolExecutor(8)  # the actor's max_concurrency
    pub.publish(1, None, state_from_wire(full.state), full.meta, full.event_ts_ms)
    wire_base = base
    if args.tracemalloc:
        tracemalloc.start(10)
    first_snap = None
    xs, ys, py, arrow = [], [], [], []
    base_job = None
    rng = np.random.default_rng(0)
    t0 = time.time()
    for v in range(2, args.versions + 2):
        d = deltas[v % len(deltas)]
        now_ms = int(time.time() * 1000)
        ts = now_ms - rng.integers(0, 2000, args.events_per_version)
        trained = np.full(args.events_per_version, time.time())
        meta = dict(d.meta, cut_at=time.time())
        pool.submit(pub.publish, v, v - 1, state_from_wire(d.state), meta, ts, trained).result()
        if (v - 1) % args.full_every == 0 and (base_job is None or base_job.done()):
            base_job = pool.submit(pub.publish_base, v, state_from_wire(wire_base), meta)
        if args.trim_every and v % args.trim_every == 0:
            _malloc_trim()
        if v % args.every == 0:
            if base_job is not None:
                base_job.result()
            gc.collect()
            xs.append((v - 1) * args.events_per_version)
            ys.append(_rss_anon_mb())
            arrow.append(pa.default_memory_pool().bytes_allocated() / 2**20)
            if args.tracemalloc:
                snap = tracemalloc.take_snapshot()
                py.append(sum(s.size for s in snap.statistics("filename")) / 2**20)
                if first_snap is None and len(xs) > int(args.versions / args.every * args.warmup):
                    first_snap = snap
            print(
                f"[pubmem] v{v} {xs[-1]:,} events: RssAnon {ys[-1]:.1f} MB, arrow pool {arrow[-1]:.1f} MB"
                + (f", python heap {py[-1]:.1f} MB" if py else "")
                + f", sizes {pub.sizes()} ({time.time() - t0:.0f} s)",
                file=sys.stderr,
            )
    if base_job is not None:
        base_job.result()
    x, y = np.asarray(xs) / 1e6, np.asarray(ys)
    w = int(len(x) * args.warmup)
    slope = float(np.polyfit(x[w:], y[w:], 1)[0])
    arrow_slope = float(np.polyfit(x[w:], np.asarray(arrow)[w:], 1)[0])
    before = _rss_anon_mb()
    trimmed = _malloc_trim()
    after = _rss_anon_mb()
    print(
        f"RssAnon slope after the warm-up: {slope:.2f} MB per million events ({y[w]:.1f} -> {y[-1]:.1f} MB)"
    )
    print(
        f"arrow pool slope: {arrow_slope:.2f} MB per million events; max_memory "
        f"{pa.default_memory_pool().max_memory() / 2**20:.1f} MB"
    )
    if py:
        print(f"python heap (tracemalloc): {py[w]:.1f} -> {py[-1]:.1f} MB")
    print(
        f"malloc_trim(0) ({'released' if trimmed else 'nothing released'}): RssAnon {before:.1f} -> {after:.1f} MB"
    )
    if first_snap is not None:
        for stat in tracemalloc.take_snapshot().compare_to(first_snap, "lineno")[:10]:
            print("  ", stat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
