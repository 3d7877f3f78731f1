"""`memstream run`: the driver of the streaming job. It owns the topology.

  [embedded only] local broker <- replay of a recording (ML-1M by default)
  N IngestActors (static partition assignment) -> TrainerActor (GPU if any)
      -> PublisherActor -> snapshot store -> Serve replicas (hot swap)
  admin API (this process), live display, report + plots at the end.

The job runs until SIGTERM/Ctrl-C, `--duration`, `--max-events`, or (replays)
the end of the topic. Stopping is graceful: the trainer publishes a last
snapshot, writes a final checkpoint and commits the group offsets. If the
trainer actor dies, Ray restarts it, it restores its newest checkpoint, and the
driver starts its loop again; readers are sought back to the checkpoint offsets.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream.config import MemstreamConfig
from stream.errors import MemstreamError

log = logging.getLogger(__name__)


class JobError(MemstreamError):
    pass


def init_local_ray(worker_niceness: int = 0, **kwargs: Any) -> None:
    """Start a local Ray (or join `address=`) with the workers at `worker_niceness`.

    The one place memstream starts Ray: the job, the benchmarks and the tests all come
    through here so the trainer actor runs at the same priority as an eval process."""
    import ray

    kwargs.setdefault("include_dashboard", False)
    if kwargs.get("address") is None:
        kwargs["_system_config"] = {"worker_niceness": worker_niceness}
    ray.init(**kwargs)


@dataclass
class Topology:
    bootstrap: str
    topic: str
    partitions: int
    work_dir: Path
    store_uri: str
    publisher_name: str
    namespace: str
    trainer: Any = None
    publisher: Any = None
    readers: list = field(default_factory=list)
    reader_partitions: list[list[int]] = field(default_factory=list)
    serving_url: str | None = None
    admin_url: str | None = None
    admin_token: str | None = None


def assign_partitions(partitions: int, actors: int) -> list[list[int]]:
    """Round-robin static assignment; never more actors than partitions."""
    actors = max(1, min(actors, partitions))
    return [list(range(i, partitions, actors)) for i in range(actors)]


def _publisher_name(work_dir: Path) -> str:
    """One publisher per work dir (its snapshot lineage), also across driver restarts."""
    import hashlib

    digest = hashlib.sha1(str(work_dir.resolve()).encode()).hexdigest()[:10]
    return f"memstream-publisher-{work_dir.resolve().name}-{digest}"


def resolve_device(cfg: MemstreamConfig, cluster_gpus: float) -> tuple[str, float]:
    """(torch device for the trainer, GPUs to request for its actor)."""
    dev = cfg.trainer.device
    if dev == "auto":
        dev = "cuda" if cluster_gpus >= 1 else "cpu"
    if dev.startswith("cuda") and cluster_gpus < 1:
        raise JobError(f"trainer.device={dev!r} but the Ray cluster has no GPU; use cpu or auto")
    return dev, (1.0 if dev.startswith("cuda") else 0.0)


# -- the admin API's view of the job --------------------------------------------------------


class DriverJobView:
    def __init__(self, topo: Topology, metrics: "JobMetrics"):
        self.t = topo
        self.metrics = metrics

    def _get(self, ref, timeout: float = 15.0):
        import ray

        return ray.get(ref, timeout=timeout)

    def bank_item(self, item_id):
        return self._get(self.t.trainer.bank_item.remote(item_id))

    def bank_neighbors(self, item_id, k):
        return self._get(self.t.trainer.bank_neighbors.remote(item_id, k))

    def bank_stats(self):
        return self._get(self.t.trainer.memory_stats.remote("bank"))

    def pkm_stats(self):
        return self._get(self.t.trainer.memory_stats.remote("pkm"))

    def lmn_stats(self):
        return self._get(self.t.trainer.memory_stats.remote("lmn"))

    def user_history(self, user_id, limit):
        return self._get(self.t.trainer.user_history.remote(user_id, limit))

    def snapshots(self):
        return self._get(self.t.publisher.snapshots.remote())

    def rollback(self, version):
        from stream.admin.app import NotFound
        from stream.snapshots.store import SnapshotError

        try:
            return self._get(self.t.publisher.pin.remote(version))
        except Exception as e:  # ray wraps the actor's exception
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, SnapshotError) or "Snapshot" in type(cause).__name__:
                raise NotFound(f"version {version} cannot be served: {cause}") from None
            raise

    def unpin(self):
        return self._get(self.t.publisher.pin.remote(None))

    def serving(self):
        return self._get(self.t.publisher.serving_state.remote())

    def ingest_lag(self):
        import ray

        ends: dict[int, int] = {}
        for r in self.t.readers:
            ends.update(ray.get(r.end_offsets.remote(), timeout=15))
        nxt = self._get(self.t.trainer.progress.remote())["next_offsets"]
        per = {p: max(0, e - int(nxt.get(p, 0))) for p, e in sorted(ends.items())}
        return {"topic": self.t.topic, "total": sum(per.values()),
                "partitions": {str(p): {"end": ends[p], "next": int(nxt.get(p, 0)), "lag": lag}
                               for p, lag in per.items()}}

    def metrics_text(self):
        return self.metrics.render()


class JobMetrics:
    """Prometheus gauges the supervision loop keeps current."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        g = lambda name, doc, labels=(): Gauge(name, doc, labels, registry=self.registry)  # noqa: E731
        self.events_applied = g("memstream_events_trained_total", "events trained in this lineage")
        self.events_dlq = g("memstream_events_dlq_total", "events dead-lettered in this lineage")
        self.auc = g("memstream_auc", "prequential AUC (cumulative)", ("task",))
        self.auc_window = g("memstream_auc_window", "prequential AUC over the metrics window", ("task",))
        self.throughput = g("memstream_throughput_events_per_second", "trained events per second")
        self.lag = g("memstream_ingest_lag_events", "end offset minus next offset, all partitions")
        self.snapshot_version = g("memstream_snapshot_version", "last published snapshot version")
        self.serving_version = g("memstream_serving_version", "version live on a replica", ("replica",))
        self.serving_refusals = g("memstream_serving_refusals_total", "snapshot versions refused", ("replica",))
        self.freshness = g("memstream_freshness_seconds", "event Kafka time to live in serving", ("quantile",))
        self.trainer_restarts = g("memstream_trainer_restarts_total", "trainer actor restarts seen")

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# -- the driver -----------------------------------------------------------------------------


class StreamingJob:
    def __init__(self, cfg: MemstreamConfig, report_path: str | None = None):
        self.cfg = cfg
        self.report_path = report_path
        self.work_dir = Path(cfg.job.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = JobMetrics()
        self._stop = threading.Event()
        self._broker = None
        self._replay_thread: threading.Thread | None = None
        self._replay_stop = threading.Event()
        self._replay_error: BaseException | None = None
        self.replay_done = threading.Event()
        self.samples: list[dict[str, Any]] = []  # progress over time (report, plots)
        self.trainer_restarts = 0
        self._admin = None
        self._started_ray = False
        self.max_events = cfg.job.max_events
        self.freshness_samples: Any = []

    # ---- set-up ------------------------------------------------------------------------------
    def _embedded_broker(self) -> str:
        from infra.broker import LocalBroker

        self._broker = LocalBroker(state_dir=self.work_dir / "broker").start()
        log.info("embedded broker at %s", self._broker.bootstrap)
        return self._broker.bootstrap

    def _fresh_embedded_state(self) -> None:
        """The embedded broker keeps topics in memory: a new one starts empty, so the
        offsets in an earlier embedded run's checkpoints mean nothing. Start clean."""
        import shutil

        for name, configured in (("checkpoints", self.cfg.checkpoints.dir), ("snapshots", self.cfg.snapshots.uri)):
            path = self.work_dir / name
            if not configured and path.exists():
                log.info("embedded run: removing the previous run's %s in %s", name, path)
                shutil.rmtree(path)

    def _ensure_recording(self) -> Path:
        path = Path(self.cfg.job.recording)
        if not path.exists():
            from stream.recordings.data.movielens import build_ml1m_recording

            log.info("building the ML-1M recording at %s", path)
            path.parent.mkdir(parents=True, exist_ok=True)
            build_ml1m_recording(path, topic=self.cfg.kafka.topic)
        return path

    def _start_replay(self, bootstrap: str, recording: Path) -> None:
        from stream.recordings.recording import replay

        job = self.cfg.job
        speed: str | float = job.replay_speed if job.replay_speed == "max" else float(job.replay_speed)

        def run() -> None:
            try:
                replay(recording, bootstrap, self.cfg.kafka.topic, speed, rate=job.replay_rate,
                       retime=True, stop=self._replay_stop, **self.cfg.kafka.client_options)
            except BaseException as e:  # surfaced by the supervision loop
                self._replay_error = e
            finally:
                self.replay_done.set()

        self._replay_thread = threading.Thread(target=run, name="replay", daemon=True)
        self._replay_thread.start()

    def _partitions(self, bootstrap: str, recording: Path | None) -> int:
        from stream.ingest.kafka_io import ensure_topic, topic_partition_count

        opts = self.cfg.kafka.client_options
        if recording is not None:
            from stream.recordings.recording import recording_info

            count, _ = ensure_topic(bootstrap, self.cfg.kafka.topic, recording_info(recording).partitions, **opts)
            return count
        count = topic_partition_count(bootstrap, self.cfg.kafka.topic, **opts)
        if not count:
            raise JobError(
                f"topic {self.cfg.kafka.topic!r} does not exist on {bootstrap}: create it "
                "(infra/create_topics.sh) or point kafka.topic at an existing one"
            )
        return count

    def build(self) -> Topology:
        import ray

        cfg = self.cfg
        recording = None
        bootstrap = cfg.kafka.bootstrap
        if bootstrap is None:
            self._fresh_embedded_state()
            bootstrap = self._embedded_broker()
            recording = self._ensure_recording()
            if self.max_events is None:  # a replay ends: stop when all of it is applied
                from stream.recordings.recording import recording_info

                self.max_events = recording_info(recording).rows
        partitions = self._partitions(bootstrap, recording)

        if not ray.is_initialized():
            init_local_ray(cfg.job.worker_niceness, address=cfg.job.ray_address,
                           namespace=cfg.job.namespace, log_to_driver=True,
                           logging_level=logging.WARNING)
            self._started_ray = cfg.job.ray_address is None
        gpus = ray.cluster_resources().get("GPU", 0.0)
        device, num_gpus = resolve_device(cfg, gpus)
        raw = cfg.model_dump(mode="json")
        raw["trainer"]["device"] = device
        raw["kafka"]["bootstrap"] = bootstrap

        store_uri = cfg.snapshots.uri or str((self.work_dir / "snapshots").resolve())
        topo = Topology(bootstrap, cfg.kafka.topic, partitions, self.work_dir, store_uri,
                        publisher_name=_publisher_name(self.work_dir),
                        namespace=cfg.job.namespace)

        from stream.job.actors import IngestActor, PublisherActor, TrainerActor

        topo.publisher = PublisherActor.options(
            name=topo.publisher_name, namespace=topo.namespace, get_if_exists=True
        ).remote(
            store_uri, cfg.snapshots.keep_versions
        )
        topo.trainer = TrainerActor.options(num_gpus=num_gpus, num_cpus=1).remote(
            raw, str(self.work_dir.resolve()), topo.publisher_name, topo.namespace
        )
        topo.reader_partitions = assign_partitions(partitions, cfg.kafka.ingest_actors)
        kafka_raw = raw["kafka"]
        topo.readers = [IngestActor.remote(kafka_raw, bootstrap, ps) for ps in topo.reader_partitions]
        ray.get(topo.trainer.progress.remote())  # constructed (checkpoint restored)
        if cfg.serving.enabled:
            start_version = ray.get(topo.trainer.publish_start_state.remote(), timeout=300)
            topo.serving_url = self._start_serving(topo)
            # Serving has started once its replicas answer with that version: a feed that
            # began earlier would have its first events wait on replicas still loading.
            state = self._wait_serving(topo, start_version, 120.0, cfg.serving.replicas)
            if sum((r.get("version") or 0) >= start_version for r in state) < cfg.serving.replicas:
                log.warning("serving replicas not live on version %s after 120 s; going on", start_version)
        if cfg.admin.enabled:
            self._start_admin(topo)
        if recording is not None:
            # Once the job is up, as a topic a running job follows: a paced replay started
            # earlier would queue the whole start-up (Ray, Serve) into its events' freshness.
            self._start_replay(bootstrap, recording)
        return topo

    def _start_serving(self, topo: Topology) -> str:
        from ray import serve

        from stream.serving.app import build_serving_app

        sc = self.cfg.serving
        serve.start(http_options={"host": sc.http_host, "port": sc.http_port})
        app = build_serving_app(topo.store_uri, sc, topo.publisher_name, topo.namespace)
        serve.run(app, name="memstream", route_prefix=sc.route_prefix, blocking=False)
        return f"http://{sc.http_host}:{sc.http_port}{sc.route_prefix.rstrip('/')}"

    def _start_admin(self, topo: Topology) -> None:
        from stream.admin.app import AdminServer, create_app, resolve_token

        ac = self.cfg.admin
        token = resolve_token(ac, self.work_dir)
        app = create_app(DriverJobView(topo, self.metrics), ac, token)
        self._admin = AdminServer(app, ac.host, ac.port)
        port = self._admin.start()
        topo.admin_url, topo.admin_token = f"http://{ac.host}:{port}", token

    # ---- running -----------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        if self._stop.is_set() and threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt  # second Ctrl-C: stop waiting
        self._stop.set()

    def run(self) -> dict[str, Any]:
        import ray

        prev = {}
        if threading.current_thread() is threading.main_thread():  # tests run jobs in threads
            prev = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        t_start = time.time()
        topo = None
        try:
            topo = self.build()
            self.topo = topo
            report = self._supervise(topo, t_start)
        finally:
            for s, h in prev.items():
                signal.signal(s, h)
            self._teardown(topo)
        if self.report_path:
            Path(self.report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.report_path).write_text(json.dumps(report, indent=1, default=_json_default))
            self._plots(Path(self.report_path).with_suffix(""))
        return report

    def _supervise(self, topo: Topology, t_start: float) -> dict[str, Any]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        job = self.cfg.job
        max_events = self.max_events
        run_ref = topo.trainer.run.remote(topo.readers, max_events)
        display = _LiveDisplay(enabled=job.live_display)
        last_lag_check = 0.0
        lag = None
        result = None
        with display:
            while True:
                done, _ = ray.wait([run_ref], timeout=job.progress_interval_s)
                if done:
                    try:
                        result = ray.get(run_ref)
                        break
                    except (RayActorError, RayTaskError) as e:
                        if self._stop.is_set():
                            raise JobError(f"trainer failed while stopping: {e}") from e
                        self.trainer_restarts += 1
                        log.warning("trainer actor died (%s); restarting from its checkpoint", type(e).__name__)
                        if not isinstance(e, RayActorError):
                            # run() raised but the actor lives on, its model holding part of
                            # the failed unit: retrying on it would apply those events twice.
                            # Kill it so Ray restarts it from its last checkpoint.
                            log.warning("trainer run() raised: %s", str(e)[-2000:])
                            ray.kill(topo.trainer, no_restart=False)
                        self._wait_trainer(topo)
                        run_ref = topo.trainer.run.remote(topo.readers, max_events)
                        continue
                try:
                    prog = ray.get(topo.trainer.progress.remote(), timeout=10)
                except (RayActorError, GetTimeoutError):
                    continue
                now = time.time()
                if now - last_lag_check >= 2.0:
                    try:
                        lag = DriverJobView(topo, self.metrics).ingest_lag()["total"]
                    except Exception:
                        lag = None
                    last_lag_check = now
                fresh = ray.get(topo.publisher.freshness.remote(), timeout=10)
                sample = {"t": now - t_start, "lag": lag, "freshness": fresh, **prog}
                self.samples.append(sample)
                self._update_metrics(topo, sample)
                display.update(sample, topo)
                if self._replay_error is not None:
                    self._stop.set()
                stop = self._stop.is_set()
                stop |= job.duration_s is not None and now - t_start >= job.duration_s
                stop |= job.stop_at_end and self.replay_done.is_set() and lag == 0
                if stop:
                    topo.trainer.request_stop.remote()
                    result = ray.get(run_ref)
                    break
        if self._replay_error is not None:
            raise JobError(f"replay into the local broker failed: {self._replay_error}")
        return self._final_report(topo, result, t_start)

    def _wait_trainer(self, topo: Topology, timeout_s: float = 300.0) -> None:
        import ray

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                ray.get(topo.trainer.progress.remote(), timeout=30)
                return
            except Exception:
                time.sleep(1.0)
        raise JobError("the trainer actor did not come back within 5 minutes")

    def _update_metrics(self, topo: Topology, s: dict[str, Any]) -> None:
        m = self.metrics
        m.events_applied.set(s["events_applied"])
        m.events_dlq.set(sum(s["rejects_applied"].values()))
        auc = s["metrics"].get("auc.like")
        if auc is not None:
            m.auc.labels("like").set(auc)
        wauc = s["metrics"].get("window.auc.like")
        if wauc is not None:
            m.auc_window.labels("like").set(wauc)
        if s.get("throughput_eps") is not None:
            m.throughput.set(s["throughput_eps"])
        if s.get("lag") is not None:
            m.lag.set(s["lag"])
        if s.get("snapshot_version") is not None:
            m.snapshot_version.set(s["snapshot_version"])
        for q in ("p50_s", "p99_s"):
            if s["freshness"].get(q) is not None:
                m.freshness.labels(q[:-2]).set(s["freshness"][q])
        m.trainer_restarts.set(self.trainer_restarts)
        try:
            import ray

            for r in ray.get(topo.publisher.serving_state.remote(), timeout=5):
                if r.get("version") is not None:
                    m.serving_version.labels(r["replica"]).set(r["version"])
                m.serving_refusals.labels(r["replica"]).set(r.get("refusals", 0))
        except Exception:
            pass

    def _final_report(self, topo: Topology, result: dict[str, Any], t_start: float) -> dict[str, Any]:
        import ray

        final = ray.get(topo.trainer.final_report.remote(), timeout=60)
        last_version = final.get("snapshot_version")
        serving = self._wait_serving(topo, last_version)
        fresh = ray.get(topo.publisher.freshness.remote(), timeout=10)
        pub_stats = ray.get(topo.publisher.stats.remote(), timeout=10)
        self.freshness_samples = ray.get(topo.publisher.freshness_samples.remote(), timeout=30)
        stats = final.get("stats", {})
        dlq = sum(final["rejects_applied"].values())
        trained = final["events_applied"]
        m = final["metrics"]
        return {
            "events_consumed": trained + dlq,
            "events_trained": trained,
            "events_dlq": dlq,
            "dlq_categories": final["rejects_applied"],
            "duplicates_dropped": final["duplicates_dropped"],
            "throughput_eps": final.get("throughput_eps"),
            "trainer_busy": final.get("busy"),
            "trainer_uptime_s": final.get("uptime_s"),
            "publish_failures": final.get("publish_failures"),
            "auc.like": m.get("auc.like"),
            "auc_last20.like": final.get("auc_last20.like"),
            "logloss.like": m.get("logloss.like"),
            "rmse.rating": m.get("rmse.rating"),
            "freshness_p50_s": fresh.get("p50_s"),
            "freshness_p99_s": fresh.get("p99_s"),
            "freshness_samples": fresh.get("count"),
            # events produced after serving went live (the start-up transient left out)
            "freshness_steady_p50_s": fresh.get("steady_p50_s"),
            "freshness_steady_p99_s": fresh.get("steady_p99_s"),
            # event -> its version in the store (the trainer's part of freshness)
            "written_p50_s": fresh.get("written_p50_s"),
            "written_p99_s": fresh.get("written_p99_s"),
            # where each event's freshness went (train / tick / write / swap): p50, p99,
            # and the mean over the slowest 1% of events
            "freshness_legs": fresh.get("legs"),
            "snapshots_published": pub_stats["published"],
            "snapshot_bases_written": pub_stats["bases_written"],
            "snapshot_base_failures": pub_stats["base_failures"],
            "snapshot_version": last_version,
            "serving_version": max((r.get("version") or 0 for r in serving), default=None),
            "serving": serving,
            "trainer_restarts": self.trainer_restarts,
            "restored_from_checkpoint": final.get("restored_from"),
            "offsets": final["next_offsets"],
            "bank": stats.get("bank"),
            "pkm": stats.get("pkm"),
            "lmn": stats.get("lmn"),
            "duration_s": time.time() - t_start,
            "config": _redacted(self.cfg.model_dump(mode="json")),
        }

    def _wait_serving(self, topo: Topology, version: int | None, timeout_s: float = 20.0, replicas: int = 1):
        """Replica states once at least `replicas` of them run `version` or newer (or at the
        deadline, as they are)."""
        import ray

        deadline = time.time() + timeout_s
        state = []
        while True:
            state = ray.get(topo.publisher.serving_state.remote(), timeout=10)
            if version is None or not self.cfg.serving.enabled:
                return state
            live = [r for r in state if (r.get("version") or 0) >= version]
            if len(live) >= replicas and len(live) == len(state):
                return state
            if time.time() > deadline:
                return state
            time.sleep(0.2)

    def _teardown(self, topo: Topology | None) -> None:
        import ray

        if self._admin is not None:
            self._admin.stop()
        if topo is not None and ray.is_initialized():
            try:
                from ray import serve

                if self.cfg.serving.enabled:
                    serve.delete("memstream")
            except Exception as e:
                log.warning("serve shutdown: %s", e)
            for r in topo.readers:
                try:
                    ray.get(r.close.remote(), timeout=15)
                except Exception:
                    pass
            for a in [*topo.readers, topo.trainer, topo.publisher]:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:
                    pass
        if self._started_ray and ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
        if self._broker is not None:
            # The embedded replay first: a producer left sending into a stopped broker
            # only retries and complains at exit.
            self._replay_stop.set()
            if self._replay_thread is not None:
                self._replay_thread.join(timeout=30)
            self._broker.stop()

    # ---- plots -------------------------------------------------------------------------------
    def _plots(self, stem: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        s = self.samples
        if not s:
            return
        t = np.array([x["t"] for x in s])
        ev = np.array([x["events_applied"] for x in s], dtype=float)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        auc = np.array([np.nan if x["metrics"].get("auc.like") is None else x["metrics"]["auc.like"] for x in s])
        wauc = np.array([np.nan if x["metrics"].get("window.auc.like") is None
                         else x["metrics"]["window.auc.like"] for x in s])
        axes[0].plot(ev, auc, label="cumulative")
        axes[0].plot(ev, wauc, label="window", alpha=0.7)
        axes[0].set(xlabel="events trained", ylabel="AUC (like)", title="prequential AUC")
        axes[0].legend()
        rate = np.diff(ev) / np.maximum(np.diff(t), 1e-9) if len(t) > 1 else np.zeros(0)
        axes[1].plot(t[1:], rate)
        axes[1].set(xlabel="seconds", ylabel="events/s", title="training throughput")
        fs = self.freshness_samples
        if len(fs):
            axes[2].hist(fs, bins=50)
        axes[2].set(xlabel="seconds", ylabel="events", title="freshness (Kafka time -> live in serving)")
        fig.tight_layout()
        fig.savefig(f"{stem}.png", dpi=90)
        plt.close(fig)


class _LiveDisplay:
    """rich Live panel: events/s, lag, AUC, snapshot/serving version, freshness."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._live = None
        self._last: tuple[float, int] | None = None

    def __enter__(self):
        if self.enabled:
            from rich.live import Live

            self._live = Live(refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, s: dict[str, Any], topo: Topology) -> None:
        if self._live is None:
            # No live panel (--no-live, `ray job submit`): a log line every ~10 s instead.
            if self._last is None or s["t"] - self._last[0] >= 10:
                rate = None
                if self._last is not None:
                    rate = (s["events_applied"] - self._last[1]) / (s["t"] - self._last[0])
                self._last = (s["t"], s["events_applied"])
                f, m = s["freshness"], s["metrics"]
                log.info("%d events trained, %s ev/s, lag %s, AUC %s, snapshot v%s, freshness p50/p99 %s/%s s",
                         s["events_applied"], "-" if rate is None else f"{rate:,.0f}", s.get("lag"),
                         _fmt(m.get("auc.like")), s.get("snapshot_version"),
                         _fmt(f.get("p50_s"), 2), _fmt(f.get("p99_s"), 2))
            return
        from rich.table import Table

        rate = None
        if self._last is not None and s["t"] > self._last[0]:
            rate = (s["events_applied"] - self._last[1]) / (s["t"] - self._last[0])
        self._last = (s["t"], s["events_applied"])
        f = s["freshness"]
        m = s["metrics"]
        tab = Table(title=f"memstream  {topo.topic} on {topo.bootstrap}", show_header=False)
        rows = [
            ("elapsed", f"{s['t']:.0f} s"),
            ("events trained", f"{s['events_applied']:,}"),
            ("dead-lettered", f"{sum(s['rejects_applied'].values()):,}"),
            ("events/s", "-" if rate is None else f"{rate:,.0f}"),
            ("lag", "-" if s.get("lag") is None else f"{s['lag']:,}"),
            ("AUC like (cum / window)", f"{_fmt(m.get('auc.like'))} / {_fmt(m.get('window.auc.like'))}"),
            ("snapshot version", str(s.get("snapshot_version"))),
            ("freshness p50 / p99", f"{_fmt(f.get('p50_s'), 2)} s / {_fmt(f.get('p99_s'), 2)} s"),
            ("serving", topo.serving_url or "-"),
            ("admin", topo.admin_url or "-"),
        ]
        for k, v in rows:
            tab.add_row(k, v)
        self._live.update(tab)


def _redacted(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config for reports: Kafka client options (credentials) and the admin token masked."""
    cfg["kafka"]["client_options"] = {k: "***" for k in cfg["kafka"]["client_options"]}
    if cfg["admin"].get("token"):
        cfg["admin"]["token"] = "***"
    return cfg


def _fmt(x: Any, nd: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run_main(args) -> int:
    """`memstream run` (see stream/cli/main.py for the flags)."""
    from stream.config import load_config

    overrides = list(args.overrides)
    flags = {
        "kafka.bootstrap": args.bootstrap, "kafka.topic": args.topic,
        "job.max_events": args.max_events, "job.duration_s": args.duration,
        "job.work_dir": args.work_dir, "job.ray_address": args.ray_address,
        "job.replay_rate": args.replay_rate,
    }
    for key, value in flags.items():
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # JSON is YAML: strings stay strings
    if args.no_live:
        overrides.append("job.live_display=false")
    cfg = load_config(args.config, overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # per-connection INFO lines drown the job's
    # kafka-python 3's own event-loop timing ("Task ran for 0.25s ... blocking the event
    # loop"): the client's internals on a busy CPU, nothing a user of the job can act on.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    report = StreamingJob(cfg, args.report).run()
    keys = ("events_consumed", "events_trained", "events_dlq", "throughput_eps", "auc.like",
            "freshness_p50_s", "freshness_p99_s", "snapshots_published", "serving_version", "duration_s")
    print(json.dumps({k: report.get(k) for k in keys}, default=_json_default))
    return 0
