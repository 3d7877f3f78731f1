"""The job's Prometheus metrics (served at the admin API's /metrics), kept current by the
driver's supervision loop from each progress sample."""

from __future__ import annotations

from typing import Any

from stream.job.report import JobSample


class JobMetrics:
    """Prometheus gauges the supervision loop keeps current."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        g = lambda name, doc, labels=(): Gauge(name, doc, labels, registry=self.registry)
        self.events_applied = g("memstream_events_trained_total", "events trained in this lineage")
        self.events_dlq = g("memstream_events_dlq_total", "events dead-lettered in this lineage")
        self.events_dlq_category = g(
            "memstream_events_dlq_category_total",
            "events dead-lettered in this lineage, by reject category (REJECT_CATEGORIES, poison)",
            ("category",),
        )
        self.auc = g("memstream_auc", "prequential AUC (cumulative)", ("task",))
        self.auc_window = g("memstream_auc_window", "prequential AUC over the metrics window", ("task",))
        self.throughput = g("memstream_throughput_events_per_second", "trained events per second")
        self.lag = g("memstream_ingest_lag_events", "end offset minus next offset, all partitions")
        self.snapshot_version = g("memstream_snapshot_version", "last published snapshot version")
        self.serving_version = g("memstream_serving_version", "version live on a replica", ("replica",))
        self.serving_refusals = g(
            "memstream_serving_refusals_total", "snapshot versions refused", ("replica",)
        )
        self.freshness = g(
            "memstream_freshness_seconds", "event Kafka time to live in serving", ("quantile",)
        )
        self.trainer_restarts = g("memstream_trainer_restarts_total", "trainer actor restarts seen")
        self.model_healthy = g(
            "memstream_model_healthy", "1 if the last version passed the health gate, else 0"
        )
        self.checkpoint_saves = g(
            "memstream_checkpoint_saves_total", "checkpoints written by this trainer incarnation"
        )
        self.checkpoint_failures = g("memstream_checkpoint_failures_total", "checkpoint saves that failed")
        self.versions_withheld = g(
            "memstream_versions_withheld_total", "versions the health gate kept from serving"
        )
        # The like metrics per slice (models/slices.py): slice = item_evidence, user_evidence
        # or user_history; bucket = 0, 1-4, 5-49, 50+ (earlier events) or short, long.
        per_slice = ("slice", "bucket")
        self.slice_auc = g("memstream_slice_auc", "prequential like AUC of a slice (cumulative)", per_slice)
        self.slice_logloss = g("memstream_slice_logloss", "prequential like logloss of a slice", per_slice)
        self.slice_events = g("memstream_slice_events", "like events scored in a slice", per_slice)
        # The memories (RankingState.usage): memory = pkm or lmn; the bank has its own two.
        self.memory_slot_usage = g(
            "memstream_memory_slot_usage", "fraction of slots read in the last usage window", ("memory",)
        )
        self.memory_kl_uniform = g(
            "memstream_memory_kl_uniform", "KL of the slot reads from uniform, last window", ("memory",)
        )
        self.bank_coverage = g("memstream_bank_coverage", "history lookups the bank answered, recent")
        self.bank_fill = g("memstream_bank_fill", "bank rows in use / capacity")

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def update(self, s: JobSample, serving: list[dict[str, Any]] | None, trainer_restarts: int) -> None:
        """Set every gauge from one sample (and the replicas' states, when they were read)."""
        p, m = s.progress, s.progress.metrics
        self.events_applied.set(p.events_applied)
        self.events_dlq.set(p.events_dlq)
        for category, count in p.rejects_applied.items():
            self.events_dlq_category.labels(category).set(count)
        if m.get("auc.like") is not None:
            self.auc.labels("like").set(m["auc.like"])
        if m.get("window.auc.like") is not None:
            self.auc_window.labels("like").set(m["window.auc.like"])
        if p.throughput_eps is not None:
            self.throughput.set(p.throughput_eps)
        if s.lag is not None:
            self.lag.set(s.lag)
        if p.snapshot_version is not None:
            self.snapshot_version.set(p.snapshot_version)
        for q in ("p50_s", "p99_s"):
            if s.freshness.get(q) is not None:
                self.freshness.labels(q[:-2]).set(s.freshness[q])
        self.trainer_restarts.set(trainer_restarts)
        self.checkpoint_saves.set(p.checkpoints.get("saves", 0))
        self.checkpoint_failures.set(p.checkpoints.get("save_failures", 0))
        self.model_healthy.set(1 if p.health.get("healthy", True) else 0)
        self.versions_withheld.set(p.health.get("versions_withheld", 0))
        for name, buckets in p.slices.items():
            for bucket, v in buckets.items():
                self.slice_events.labels(name, bucket).set(v["n"])
                # An undefined value (one class so far) is left out rather than set to a number.
                for gauge, key in ((self.slice_auc, "auc.like"), (self.slice_logloss, "logloss.like")):
                    if v[key] is not None:
                        gauge.labels(name, bucket).set(v[key])
        for name, u in p.memory_usage.items():
            if name == "bank":
                for gauge, key in ((self.bank_coverage, "coverage"), (self.bank_fill, "fill")):
                    if u.get(key) is not None:
                        gauge.set(u[key])
                continue
            for gauge, key in (
                (self.memory_slot_usage, "slot_usage"),
                (self.memory_kl_uniform, "kl_uniform"),
            ):
                if u.get(key) is not None:
                    gauge.labels(name).set(u[key])
        for r in serving or []:
            if r.get("version") is not None:
                self.serving_version.labels(r["replica"]).set(r["version"])
            self.serving_refusals.labels(r["replica"]).set(r.get("refusals", 0))
