"""`memstream eval`: the online trainer over a recording, no broker, one report.

Reads the recording's rows in file order (= the stream's order), decodes them with
the same decoder the Kafka ingest uses (bad events are counted as rejects, never
trained on), and runs `OnlineTrainer.step` on micro-batches of `trainer.batch_size`
events: each batch is scored before it is learned (progressive validation), so
the report's AUC/logloss/RMSE are prequential numbers on the whole stream, and
its `slices` the like AUC/logloss by item and user evidence (models/slices.py).
`--predictions F.parquet` also writes every scored event (stream/train/predictions.py).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# Only the standard library at import time: `memstream` imports this module to
# register the subcommand's arguments, and must not pay for torch to do so.
if TYPE_CHECKING:
    from models.online import OnlineTrainer
    from stream.config import MemstreamConfig
    from stream.ingest.event_format import EventFormat
    from stream.ingest.events import EventBatch, EventLimits
    from stream.messages import RunReport


def iter_event_batches(
    recording: str | Path,
    batch_size: int,
    max_events: int | None = None,
    limits: EventLimits | None = None,
    rejects: Counter | None = None,
    event_format: EventFormat | None = None,
) -> Iterator[EventBatch]:
    """Decoded micro-batches of `batch_size` valid events in file order (last one may be short).

    `event_format` (kafka.event_format) decodes a recording of a team's own format: a
    recording keeps the raw Kafka values, so the mapping runs here as in the readers."""
    import numpy as np

    from stream.ingest.events import EventBatch, EventLimits, decode_batch
    from stream.recordings.recording import iter_recording

    limits = limits or EventLimits()
    mapping = event_format.mapping() if event_format is not None else None
    pending: list[EventBatch] = []
    n_pending = 0
    emitted = 0
    for rb in iter_recording(recording, batch_rows=batch_size):
        if max_events is not None:
            rb = rb.slice(0, max(0, max_events - emitted - n_pending))
            if rb.num_rows == 0:
                break
        res = decode_batch(
            rb.column("value").to_pylist(),
            limits,
            kafka_partition=rb.column("partition").to_numpy(zero_copy_only=False),
            kafka_offset=rb.column("offset").to_numpy(zero_copy_only=False),
            kafka_ts_ms=rb.column("timestamp_ms").to_numpy(zero_copy_only=False),
            mapping=mapping,
            topic=rb.column("topic")[0].as_py() if mapping is not None and rb.num_rows else "",
        )
        if rejects is not None:
            rejects.update(r.category for r in res.rejects)
        pending.append(res.batch)
        n_pending += len(res.batch)
        while n_pending >= batch_size:
            merged = EventBatch.concat(pending)
            yield merged.take(np.arange(batch_size))
            emitted += batch_size
            rest = merged.take(np.arange(batch_size, len(merged)))
            pending, n_pending = [rest], len(rest)
    if n_pending:
        yield EventBatch.concat(pending)


def prefetch(batches: Iterator[EventBatch], depth: int = 4) -> Iterator[EventBatch]:
    """The same batches, read and decoded by a background thread `depth` batches ahead.

    Decoding (JSON validation of every event) is ~20 us per event, ~7% of a CPU training
    step, and the trainer's torch ops release the GIL: a second thread overlaps the two,
    as the streaming job's ingest actors do. An error in the reader is raised here.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def read() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:
            q.put(e)

    reader = threading.Thread(target=read, name="eval-prefetch", daemon=True)
    reader.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join(timeout=5)


def build_report(
    trainer: OnlineTrainer,
    cfg: MemstreamConfig,
    duration_s: float,
    rejects: Counter,
    next_offsets: dict[int, int],
) -> RunReport:
    from stream.messages import RunReport, finite_or_none

    m = trainer.metrics
    return RunReport.from_metrics(
        m.summary(),
        m.auc_last(0.2) if m.keep_log else None,
        events_trained=trainer.events_applied,
        events_dlq=sum(rejects.values()),
        dlq_categories=dict(sorted(rejects.items())),
        steps=trainer.steps,
        duration_s=duration_s,
        throughput_eps=trainer.events_applied / duration_s if duration_s > 0 else None,
        offsets=dict(sorted(next_offsets.items())),
        memories=finite_or_none(trainer.state.stats()),
        config=cfg.model_dump(mode="json"),
        streaming=None,
        slices=finite_or_none(m.slice_summary()),
    )


def run_eval(
    cfg: MemstreamConfig,
    recording: str | Path,
    max_events: int | None = None,
    progress: bool = True,
    limits: EventLimits | None = None,
    predictions: str | Path | None = None,
) -> RunReport:
    """Train/evaluate one pass over the recording; returns its report. With `predictions`,
    every scored event is written there (replacing the file), closed even on an error."""
    import numpy as np

    from models.online import OnlineTrainer
    from stream.recordings.recording import recording_info
    from stream.train.predictions import PredictionWriter

    trainer = OnlineTrainer(cfg.model, cfg.trainer)
    total = recording_info(recording).rows
    total = min(total, max_events) if max_events is not None else total
    rejects: Counter = Counter()
    batches = prefetch(
        iter_event_batches(
            recording, cfg.trainer.batch_size, max_events, limits, rejects, cfg.kafka.event_format
        )
    )
    next_offsets: dict[int, int] = {}  # partition -> one past the last offset trained

    def note(batch: EventBatch) -> None:
        for p in np.unique(batch.kafka_partition).tolist():
            top = int(batch.kafka_offset[batch.kafka_partition == p].max()) + 1
            next_offsets[int(p)] = max(top, next_offsets.get(int(p), 0))

    fc = cfg.model.features
    writer = None
    if predictions is not None:
        writer = PredictionWriter(
            predictions, fc.like_task, fc.rating_task, history_length=cfg.model.history.length
        )

    def train(batch: EventBatch) -> None:
        for _, mb in trainer.micro_batches(batch):  # smaller steps at the stream's start
            result = trainer.step(mb)
            if writer is not None:
                writer.write(mb, result, trainer.events_applied - result.events)
            note(mb)

    try:
        duration = _train_all(trainer, batches, train, total, progress)
    finally:
        if writer is not None:
            writer.close()
    return build_report(trainer, cfg, duration, rejects, next_offsets)


def _train_all(
    trainer: OnlineTrainer, batches: Iterator[EventBatch], train, total: int, progress: bool
) -> float:
    """Run `train` on every batch (under a progress bar if asked); returns the seconds."""
    t0 = time.perf_counter()
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        cols = [
            TextColumn("eval"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*cols, refresh_per_second=2) as bar:
            task = bar.add_task("eval", total=total, info="")

            def show() -> None:
                s = trainer.metrics.summary()
                eps = trainer.events_applied / max(time.perf_counter() - t0, 1e-9)
                info = f"auc {s['auc.like']:.4f} window {s['window.auc.like']:.4f}  {eps:,.0f} ev/s"
                bar.update(task, completed=trainer.events_applied, info=info)

            for i, batch in enumerate(batches):
                train(batch)
                if i % 20 == 0:
                    show()
            show()
    else:
        for batch in batches:
            train(batch)
    return time.perf_counter() - t0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--recording", required=True, help="Parquet recording (memstream data / record)")
    p.add_argument("--report", required=True, help="where to write the JSON report")
    p.add_argument("--max-events", type=int, default=None, help="stop after this many valid events")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.use_pkm=false (repeatable)",
    )
    p.add_argument(
        "--predictions",
        default=None,
        metavar="F.parquet",
        help="also write every scored event (labels, scores, item/user evidence) to this Parquet file",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def eval_main(args: argparse.Namespace) -> int:
    from stream.config import load_config

    cfg = load_config(args.config, args.overrides)
    report = run_eval(
        cfg, args.recording, args.max_events, progress=not args.no_progress, predictions=args.predictions
    ).to_json()
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    keys = ("events_trained", "throughput_eps", "auc.like", "auc_last20.like", "logloss.like", "rmse.rating")
    print(json.dumps({k: report[k] for k in keys}))
    print(format_slices(report["slices"]))
    return 0


def format_slices(slices: dict) -> str:
    """The report's slices as a short table: one row per slice bucket."""

    def num(x: float | None) -> str:
        return "   -  " if x is None else f"{x:.4f}"

    lines = [f"{'slice':<15} {'bucket':<6} {'n':>9} {'auc.like':>8} {'logloss':>8}"]
    for name, buckets in slices.items():
        for bucket, v in buckets.items():
            lines.append(
                f"{name:<15} {bucket:<6} {v['n']:>9} {num(v['auc.like']):>8} {num(v['logloss.like']):>8}"
            )
    return "\n".join(lines)
