"""Training throughput of the online trainer and what each component costs, in one run.

The same ML-1M prefix, decoded once up front (decoding is the ingest's job and
overlaps training in `memstream eval`), is trained by a fresh `OnlineTrainer` per
variant: the default config and the default with one component switched off.
Variants run interleaved, `--rounds` times, so machine noise lands on all of them
alike; the table gives the median events/s (wall clock and per CPU second of
this process) and each variant's ratio to the default of the same round.
The first `--warmup` batches of each run are not timed (allocator, caches).
A torch profile of the default config's steps follows the table.

    .venv/bin/python benchmarks/trainer_speed.py [--events 60000] \
        [--rounds 3] [--out benchmarks/results/trainer_speed_cpu.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: list[tuple[str, list[str]]] = [
    ("default", []),
    ("no history ridge read", ["model.history_ridge=false"]),
    ("no ordinal rating heads", ["model.rating_thresholds=[]"]),
    ("with LMN", ["model.use_lmn=true"]),
    ("with PKM", ["model.use_pkm=true"]),
    ("all three memories on", ["model.use_lmn=true", "model.use_pkm=true"]),
    # With LMN and PKM off by default this is also the "no bank / doc encoder" row.
    ("all three memories off", ["model.use_bank=false", "model.use_lmn=false", "model.use_pkm=false"]),
]


def timed_run(cfg, batches: list, warmup: int) -> tuple[float, float, int]:
    """(wall s, process CPU s, events) over batches[warmup:] of a fresh trainer."""
    from models.online import OnlineTrainer

    trainer = OnlineTrainer(cfg.model, cfg.trainer)
    for b in batches[:warmup]:
        trainer.step(b)
    w0, c0 = time.perf_counter(), time.process_time()
    for b in batches[warmup:]:
        trainer.step(b)
    return time.perf_counter() - w0, time.process_time() - c0, sum(len(b) for b in batches[warmup:])


def profile_default(cfg, batches: list, warmup: int, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    from models.online import OnlineTrainer

    trainer = OnlineTrainer(cfg.model, cfg.trainer)
    for b in batches[:warmup]:
        trainer.step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[warmup : warmup + steps]:
            trainer.step(b)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recording", default="runs/ml1m.parquet", help="built if missing (ML-1M)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--events", type=int, default=60_000, help="prefix of the stream each variant trains on")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10, help="untimed batches at the start of each run")
    ap.add_argument("--profile-steps", type=int, default=20, help="default-config steps profiled (0: none)")
    ap.add_argument("--only", default=None, help="comma-separated variant numbers (0 = default, always run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trainer_speed_cpu.md"))
    args = ap.parse_args(argv)

    from stream.config import load_config
    from stream.train.evaluate import iter_event_batches

    rec = Path(args.recording)
    if not rec.exists():
        from stream.recordings.data.movielens import build_ml1m_recording

        build_ml1m_recording(rec)
    wanted = sorted(
        {0} | ({int(k) for k in args.only.split(",")} if args.only else set(range(len(VARIANTS))))
    )
    cfgs = {k: load_config(args.config, VARIANTS[k][1]) for k in wanted}
    bs = cfgs[0].trainer.batch_size
    t0 = time.perf_counter()
    batches = list(iter_event_batches(rec, bs, args.events))
    decode_s = time.perf_counter() - t0
    if len(batches) <= args.warmup:
        raise SystemExit(
            f"--events {args.events} gives {len(batches)} batches, not more than --warmup {args.warmup}"
        )

    runs: dict[int, list[tuple[float, float, int]]] = {k: [] for k in wanted}
    for r in range(args.rounds):
        for k in wanted:
            runs[k].append(timed_run(cfgs[k], batches, args.warmup))
            wall, cpu, n = runs[k][-1]
            print(
                f"[speed] round {r + 1} {VARIANTS[k][0]}: {n / wall:,.0f} ev/s ({n / cpu:,.0f} per CPU s)",
                file=sys.stderr,
                flush=True,
            )

    cmd = (
        "`.venv/bin/python benchmarks/trainer_speed.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`"
    )
    lines = [
        "# Online trainer throughput and the cost of each component",
        "",
        f"Command: {cmd}  ",
        (
            f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, device {cfgs[0].trainer.device}, "
            f"torch threads {cfgs[0].trainer.threads}; batch {bs}; {args.events:,} ML-1M events per run, the first "
            f"{args.warmup} batches untimed; {args.rounds} interleaved rounds, medians. Decoding the prefix "
            f"(not in the timings): {args.events / decode_s:,.0f} ev/s."
        ),
        "",
        "| variant | --set | events/s (wall) | rounds' range | events/s per CPU s | ms per batch | wall vs default |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = [n / w for w, _, n in runs[0]]
    for k in wanted:
        eps = [n / w for w, _, n in runs[k]]
        cps = [n / c for _, c, n in runs[k]]
        ratio = statistics.median(e / b for e, b in zip(eps, base))
        lines.append(
            f"| {VARIANTS[k][0]} | {' '.join(VARIANTS[k][1]) or '-'} | {statistics.median(eps):,.0f} | "
            f"{min(eps):,.0f}-{max(eps):,.0f} | {statistics.median(cps):,.0f} | {1000 * bs / statistics.median(eps):.1f} | {ratio:.2f} |"
        )
    if args.profile_steps:
        lines += [
            "",
            f"Torch profile, default config, {args.profile_steps} steps after {args.warmup} warm-up:",
            "",
            "```",
            profile_default(cfgs[0], batches, args.warmup, args.profile_steps),
            "```",
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
