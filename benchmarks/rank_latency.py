"""What one `/rank` request costs the serving model, by history window and candidate count.

In process, no HTTP and no Ray: a trainer with the given config (and each `--lengths`
value of model.history.length) trains on a prefix of ML-1M, publishes one full snapshot,
and a ServedModel loaded from it ranks requests of the prefix's most active users (their
history windows full) with N candidates each. The user side is computed once per request
and the candidate side once per candidate (models/ranker.py), so what grows with L is
the per-candidate read of the user's L history items (cosine features, attention).

    .venv/bin/python benchmarks/rank_latency.py --recording /tmp/mv/ml1m.parquet \\
        --lengths 50,200 --candidates 1,100,1000 --out benchmarks/results/rank_latency_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def served_after(cfg, batches: list):
    """A ServedModel loaded from a full snapshot of a trainer that trained on `batches`."""
    from models.online import OnlineTrainer
    from stream.serving.model import ServedModel
    from stream.snapshots.store import SnapshotStore

    trainer = OnlineTrainer(cfg.model, cfg.trainer)
    for b in batches:
        trainer.step(b)
    store = SnapshotStore(tempfile.mkdtemp(prefix="rank_latency_"))
    meta = {"model_config": trainer.cfg.model_dump(mode="json"), "train_step": trainer.steps}
    store.publish_full(1, trainer.state.full_snapshot(), meta)
    return ServedModel(store.load_chain())


def requests_for(batches: list, users: int, n: int) -> tuple[list, int]:
    """`users` requests, one per most active user of the prefix, each with the prefix's
    first `n` distinct items (with their text) as candidates; and the fewest events any of
    those users had in the prefix."""
    from stream.serving.model import RankRequest

    top = Counter(u for b in batches for u in b.user_id).most_common(users)
    active = [u for u, _ in top]
    items: dict[str, str] = {}
    for b in batches:
        for item, text in zip(b.item_id, b.item_text):
            items.setdefault(item, text)
            if len(items) >= n:
                break
        if len(items) >= n:
            break
    cands = [{"item_id": i, "item_text": t} for i, t in items.items()]
    return [RankRequest(user_id=u, candidates=cands) for u in active], min(c for _, c in top)


def time_requests(served, reqs: list, rounds: int) -> list[float]:
    """Wall ms of every request over `rounds` passes (the first pass untimed)."""
    for r in reqs:
        served.rank(r)
    out = []
    for _ in range(rounds):
        for r in reqs:
            t0 = time.perf_counter()
            served.rank(r)
            out.append(1000 * (time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recording", default="runs/ml1m.parquet", help="built if missing (ML-1M)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--events", type=int, default=60_000, help="prefix the trainer learns before serving")
    ap.add_argument("--lengths", default="50,200", help="model.history.length values")
    ap.add_argument("--candidates", default="1,100,1000", help="candidates per request")
    ap.add_argument("--users", type=int, default=20, help="requests per pass (one per user)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from stream.config import load_config
    from stream.train.evaluate import iter_event_batches

    rec = Path(args.recording)
    if not rec.exists():
        from stream.recordings.data.movielens import build_ml1m_recording

        build_ml1m_recording(rec)
    lengths = [int(x) for x in args.lengths.split(",")]
    counts = [int(x) for x in args.candidates.split(",")]
    rows: dict[tuple[int, int], list[float]] = {}
    fewest = 0
    for L in lengths:
        cfg = load_config(args.config, [f"model.history.length={L}"])
        torch.set_num_threads(cfg.trainer.threads)
        batches = list(iter_event_batches(rec, cfg.trainer.batch_size, args.events))
        served = served_after(cfg, batches)
        for n in counts:
            reqs, fewest = requests_for(batches, args.users, n)
            rows[(L, n)] = time_requests(served, reqs, args.rounds)
            print(
                f"[rank_latency] L={L} N={n}: p50 {statistics.median(rows[(L, n)]):.1f} ms", file=sys.stderr
            )

    cmd = (
        "`.venv/bin/python benchmarks/rank_latency.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
        + "`"
    )
    lines = [
        "# Serving: one rank request's cost by history window and candidate count",
        "",
        f"Command: {cmd}  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, device cpu, torch threads "
        f"{torch.get_num_threads()}; the model trained on the first {args.events:,} ML-1M events, then "
        f"{args.users} users (the most active: at least {fewest:,} events each) x {args.rounds} passes "
        "per cell, in process.",
        "",
        "| model.history.length | candidates | p50 ms | p90 ms | max ms | p50 vs the first L |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in counts:
        base = statistics.median(rows[(lengths[0], n)])
        for L in lengths:
            t = sorted(rows[(L, n)])
            p50 = statistics.median(t)
            lines.append(
                f"| {L} | {n} | {p50:.1f} | {t[int(0.9 * (len(t) - 1))]:.1f} | {t[-1]:.1f} | {p50 / base:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
