"""The job's report: progress samples over the run, the final RunReport, and its plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream.messages import RunReport, StreamingStats, TrainerFinal, TrainerProgress


@dataclass(frozen=True)
class JobSample:
    """One look at the job by the supervision loop."""

    t: float  # seconds since the job started
    progress: TrainerProgress
    lag: int | None  # end offsets minus the trainer's next offsets, all partitions
    freshness: dict[str, Any]  # the publisher's freshness summary


def redacted(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config for reports: Kafka client options (credentials) and the admin token masked."""
    cfg["kafka"]["client_options"] = dict.fromkeys(cfg["kafka"]["client_options"], "***")
    if cfg["admin"].get("token"):
        cfg["admin"]["token"] = "***"
    return cfg


def run_report(
    final: TrainerFinal,
    fresh: dict[str, Any],
    pub_stats: dict[str, Any],
    serving: list[dict[str, Any]],
    last_version: int | None,
    trainer_restarts: int,
    duration_s: float,
    config: dict[str, Any],
) -> RunReport:
    p = final.progress
    streaming = StreamingStats(
        events_consumed=p.events_consumed,
        duplicates_dropped=p.duplicates_dropped,
        trainer_busy=p.busy,
        trainer_uptime_s=p.uptime_s,
        publish_failures=p.publish_failures,
        freshness_p50_s=fresh.get("p50_s"),
        freshness_p99_s=fresh.get("p99_s"),
        freshness_samples=fresh.get("count"),
        freshness_steady_p50_s=fresh.get("steady_p50_s"),
        freshness_steady_p99_s=fresh.get("steady_p99_s"),
        written_p50_s=fresh.get("written_p50_s"),
        written_p99_s=fresh.get("written_p99_s"),
        freshness_legs=fresh.get("legs"),
        snapshots_published=pub_stats["published"],
        snapshot_bases_written=pub_stats["bases_written"],
        snapshot_base_failures=pub_stats["base_failures"],
        snapshot_version=last_version,
        versions_withheld=p.health.get("versions_withheld", 0),
        checkpoint_saves=p.checkpoints.get("saves", 0),
        checkpoint_failures=p.checkpoints.get("save_failures", 0),
        checkpoints_quarantined=p.checkpoints.get("quarantined", 0),
        last_durable_offsets=(p.checkpoints.get("last_durable") or {}).get("offsets"),
        serving_version=max((r.get("version") or 0 for r in serving), default=None),
        serving=serving,
        trainer_restarts=trainer_restarts,
        restored_from_checkpoint=p.restored_from,
        predictions=p.predictions,
    )
    return RunReport.from_metrics(
        p.metrics,
        final.auc_last20_like,
        events_trained=p.events_applied,
        events_dlq=p.events_dlq,
        dlq_categories=p.rejects_applied,
        steps=p.steps,
        duration_s=duration_s,
        throughput_eps=p.throughput_eps,
        offsets=p.next_offsets,
        memories=final.memories,
        config=config,
        streaming=streaming,
        slices=p.slices,
    )


def write_plots(stem: Path, samples: list[JobSample], freshness_samples: Any) -> None:
    """`<stem>.png`: prequential AUC, training throughput, freshness histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return
    t = np.array([x.t for x in samples])
    ev = np.array([x.progress.events_applied for x in samples], dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    metric = lambda key: np.array(
        [np.nan if x.progress.metrics.get(key) is None else x.progress.metrics[key] for x in samples]
    )
    axes[0].plot(ev, metric("auc.like"), label="cumulative")
    axes[0].plot(ev, metric("window.auc.like"), label="window", alpha=0.7)
    axes[0].set(xlabel="events trained", ylabel="AUC (like)", title="prequential AUC")
    axes[0].legend()
    rate = np.diff(ev) / np.maximum(np.diff(t), 1e-9) if len(t) > 1 else np.zeros(0)
    axes[1].plot(t[1:], rate)
    axes[1].set(xlabel="seconds", ylabel="events/s", title="training throughput")
    if len(freshness_samples):
        axes[2].hist(freshness_samples, bins=50)
    axes[2].set(xlabel="seconds", ylabel="events", title="freshness (Kafka time -> live in serving)")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=90)
    plt.close(fig)
