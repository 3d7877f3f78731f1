"""Prequential quality on a MovieLens stream: the model, its ablations, River's LR.

Every row sees the identical stream: the recording's rows in file (event-time)
order, decoded by stream.ingest.events.decode_batch, test-then-train. The model rows
run `memstream eval` in-process (stream.train.evaluate.run_eval) with `--set`
overrides; the peer is River's LogisticRegression with SGD(0.05) (the tuned peer the
team compares against; River's default SGD(0.01) learns too slowly for a one-pass
stream) on one-hot user id, item id, user features and genres (the words of item_text
when it names no genres), predict_proba_one then learn_one per event. AUC is computed by the same exact function for all rows
(models.metrics.auc_exact on the per-event scores).

    .venv/bin/python benchmarks/quality.py                   # full stream -> results/quality_ml1m.md
    .venv/bin/python benchmarks/quality.py --max-events 100000 --out /tmp/q.md
    .venv/bin/python benchmarks/quality.py --recording runs/ml100k.parquet \
        --out benchmarks/results/quality_ml100k.md     # the second real stream (ML-100K)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.metrics import auc_exact, logloss_from_logits
from stream.config import load_config
from stream.train.evaluate import iter_event_batches, run_eval

ABLATIONS: list[tuple[str, list[str]]] = [
    ("default (bank)", []),
    ("no bank / doc encoder (all three off)", ["model.use_bank=false"]),
    ("with LMN", ["model.use_lmn=true"]),
    ("with PKM", ["model.use_pkm=true"]),
    ("all three memories on", ["model.use_lmn=true", "model.use_pkm=true"]),
    ("no history ridge read", ["model.history_ridge=false"]),
    ("no ordinal rating heads", ["model.rating_thresholds=[]"]),
    ("default, history length 100 (quality vs speed)", ["model.history.length=100"]),
]

_GENRES = re.compile(r"Genres:\s*(.*?)\.?\s*$")


def river_features(batch, i: int) -> dict[str, float]:
    """One-hot user id, item id, each categorical user feature, and the genres of item_text."""
    x = {f"user={batch.user_id[i]}": 1.0, f"item={batch.item_id[i]}": 1.0}
    for name, col in batch.user_cat.items():
        if col[i] is not None:
            x[f"{name}={col[i]}"] = 1.0
    for name, col in batch.user_num.items():
        if not math.isnan(col[i]):
            x[name] = float(col[i])
    text = batch.item_text[i]
    m = _GENRES.search(text) if text else None
    if m:
        for g in m.group(1).split(","):
            if g.strip():
                x[f"genre={g.strip()}"] = 1.0
    elif text:  # no genres (the stress streams): the words carry the content
        for w in _WORDS.findall(text.lower()):
            x[f"word={w}"] = 1.0
    return x


_WORDS = re.compile(r"\w+")
RIVER_LR = 0.05


def run_river(
    recording: str, max_events: int | None, batch_size: int = 256, history_length: int | None = None
) -> dict:
    """River's LR over the stream, test-then-train per event. With `history_length` (the
    model's L), also the like slices by item / user evidence (models/slices.py, the same
    evidence definition and AUC as the model's report) under "slices"."""
    from river import linear_model, optim

    from models.slices import EvidenceSlices

    model = linear_model.LogisticRegression(optimizer=optim.SGD(RIVER_LR))
    slices = EvidenceSlices(history_length) if history_length is not None else None
    scores: list[float] = []
    labels: list[float] = []
    t0 = time.perf_counter()
    for batch in iter_event_batches(recording, batch_size, max_events):
        like = batch.labels["like"]
        batch_p = np.full(len(batch), 0.5)
        for i in range(len(batch)):
            if math.isnan(like[i]):
                continue
            x = river_features(batch, i)
            p = model.predict_proba_one(x).get(True, 0.5)
            batch_p[i] = p
            scores.append(p)
            labels.append(like[i])
            model.learn_one(x, bool(like[i] > 0.5))
        if slices is not None:
            slices.update(_logit(batch_p), like, batch.user_id, batch.item_id)
    dur = time.perf_counter() - t0
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    n = len(y)
    tail = int(n * 0.8)
    out = {
        "events": n,
        "auc.like": auc_exact(s, y),
        "auc_last20.like": auc_exact(s[tail:], y[tail:]),
        "logloss.like": float(logloss_from_logits(_logit(s), y).mean()),
        "rmse.rating": None,
        "throughput_eps": n / dur,
        "duration_s": dur,
    }
    if slices is not None:
        out["slices"] = slices.summary()
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def run_model_row(args, rec: Path, k: int) -> dict:
    name, sets = ABLATIONS[k]
    cfg = load_config(args.config, args.overrides + sets)
    print(f"[quality] {name} ...", file=sys.stderr, flush=True)
    rep = run_eval(cfg, rec, args.max_events, progress=False).to_json()
    print(f"[quality] {name}: auc {rep['auc.like']:.4f} ({rep['throughput_eps']:.0f} ev/s)", file=sys.stderr)
    return rep


def run_river_row(rec: Path, max_events: int | None) -> dict:
    print(f"[quality] river LogisticRegression SGD({RIVER_LR}) ...", file=sys.stderr, flush=True)
    rep = run_river(str(rec), max_events)
    print(f"[quality] river: auc {rep['auc.like']:.4f}", file=sys.stderr)
    return rep


def run_parallel(args, rec: Path, wanted: list[int], with_river: bool) -> dict[str, dict]:
    """Each row in its own process (this script with --only k --json), `--jobs` at a time.

    Rows then share the CPU: their events/s are lower than a row run alone.
    """
    import subprocess
    import tempfile

    todo = [str(k) for k in wanted] + (["r"] if with_river else [])
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        running: list[tuple[str, subprocess.Popen, Path]] = []
        while todo or running:
            while todo and len(running) < args.jobs:
                k = todo.pop(0)
                js = Path(tmp) / f"{k}.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--recording",
                    str(rec),
                    "--config",
                    args.config,
                    "--only",
                    k,
                    "--json",
                    str(js),
                    "--out",
                    str(Path(tmp) / f"{k}.md"),
                ]
                cmd += ["--max-events", str(args.max_events)] if args.max_events else []
                for o in args.overrides:
                    cmd += ["--set", o]
                running.append((k, subprocess.Popen(cmd, stdout=subprocess.DEVNULL), js))
            time.sleep(1.0)
            for item in list(running):
                k, proc, js = item
                if proc.poll() is not None:
                    running.remove(item)
                    if proc.returncode != 0:
                        raise RuntimeError(f"row {k} failed with exit code {proc.returncode}")
                    out[k] = json.loads(js.read_text())[0]["report"]
    return out


def fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--recording",
        default="runs/ml1m.parquet",
        help="built if missing: ML-100K when its name contains ml100k, else ML-1M",
    )
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--max-events", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_ml1m.md"))
    ap.add_argument("--json", default=None, help="also write all reports as JSON here")
    ap.add_argument("--only", default=None, help="comma-separated row numbers to run (0-based; river = r)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every model row")
    ap.add_argument("--jobs", type=int, default=1, help="rows run in parallel processes")
    ap.add_argument(
        "--assemble",
        default=None,
        metavar="DIR",
        help="no runs: build the table from DIR/<row>.json reports (row = 0.., r)",
    )
    args = ap.parse_args(argv)

    rec = Path(args.recording)
    if not rec.exists():
        from stream.recordings.data.movielens import build_movielens_recording

        build_movielens_recording("ml-100k" if "ml100k" in rec.name else "ml-1m", rec)
    only = None if args.only is None else set(args.only.split(","))
    wanted = [k for k in range(len(ABLATIONS)) if only is None or str(k) in only]
    with_river = only is None or "r" in only
    reports: dict[str, dict] = {}
    if args.assemble:
        # Rows computed earlier (by --json runs of this script or `memstream eval --report`):
        # DIR/<row>.json; rows without a file are left out of the table.
        for k in [str(k) for k in wanted] + (["r"] if with_river else []):
            f = Path(args.assemble) / f"{k}.json"
            if f.exists():
                data = json.loads(f.read_text())
                reports[k] = data[0]["report"] if isinstance(data, list) else data
        wanted = [k for k in wanted if str(k) in reports]
        with_river = with_river and "r" in reports
    elif args.jobs > 1:
        reports = run_parallel(args, rec, wanted, with_river)
    else:
        for k in wanted:
            reports[str(k)] = run_model_row(args, rec, k)
        if with_river:
            reports["r"] = run_river_row(rec, args.max_events)
    rows: list[tuple[str, list[str], dict]] = [
        (ABLATIONS[k][0], ABLATIONS[k][1], reports[str(k)]) for k in wanted
    ]
    if with_river:
        rows.append((f"River LogisticRegression, SGD({RIVER_LR}) (peer)", [], reports["r"]))

    cmd = (
        "`.venv/bin/python benchmarks/quality.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`"
    )
    lines = [
        f"# Prequential quality on the {rec.stem} stream",
        "",
        f"Command: {cmd}  ",
        f"Recording: {rec} (event-time order), events per row: see table; test-then-train, like = rating >= 4.  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; torch threads = trainer.threads.  ",
        (
            "AUC is exact (ties 1/2), same function for every row; events/s is wall-clock of the whole loop "
            "(decode + features + forward + backward + memory updates) and depends on machine load."
        ),
        "",
        (
            "| row | --set | events | AUC like | AUC last 20% | logloss like | RMSE rating | events/s "
            "| bank coverage | PKM slot usage (KL) | LMN slot usage |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sets, r in rows:
        pkm = (
            "-"
            if r.get("pkm.slot_usage") is None
            else f"{r['pkm.slot_usage']:.3f} ({r['pkm.kl_uniform']:.2f})"
        )
        lines.append(
            f"| {name} | {' '.join(sets) or '-'} | {r['events']} | {fmt(r['auc.like'])} | "
            f"{fmt(r['auc_last20.like'])} | {fmt(r['logloss.like'])} | {fmt(r.get('rmse.rating'))} | "
            f"{fmt(r['throughput_eps'], 0)} | {fmt(r.get('bank.coverage'), 3)} | {pkm} | "
            f"{fmt(r.get('lmn.slot_usage'), 3)} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(
            json.dumps([{"row": n, "set": s, "report": r} for n, s, r in rows], indent=1, default=float)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
