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
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream.config import MemstreamConfig
from stream.errors import MemstreamError
from stream.job.display import ConsoleLog, LiveDisplay
from stream.job.metrics import JobMetrics
from stream.job.report import JobSample, redacted, run_report, write_plots
from stream.job.view import DriverJobView
from stream.messages import RunReport

log = logging.getLogger(__name__)


_MAX_SAMPLES = 10_000  # progress samples the driver keeps for the plots
SERVING_APP = "memstream"  # the Serve application name, also `memstream serve`'s default


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


def resolve_device(cfg: MemstreamConfig, cluster_gpus: float) -> tuple[str, float]:
    """(torch device for the trainer, GPUs to request for its actor)."""
    dev = cfg.trainer.device
    if dev == "auto":
        dev = "cuda" if cluster_gpus >= 1 else "cpu"
    if dev.startswith("cuda") and cluster_gpus < 1:
        raise JobError(f"trainer.device={dev!r} but the Ray cluster has no GPU; use cpu or auto")
    return dev, (1.0 if dev.startswith("cuda") else 0.0)


# -- the driver -----------------------------------------------------------------------------


class StreamingJob:
    def __init__(
        self,
        cfg: MemstreamConfig,
        report_path: str | None = None,
        console: ConsoleLog | None = None,
        predictions: str | None = None,
    ):
        self.cfg = cfg
        self.report_path = report_path
        # Per-event predictions, written by the trainer actor on its own filesystem: made
        # absolute here, since the actor's working directory need not be the driver's.
        self.predictions = str(Path(predictions).resolve()) if predictions else None
        self.console = console or ConsoleLog(None, quiet=False)
        self.work_dir = Path(cfg.job.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = JobMetrics()
        self._stop = threading.Event()
        self._broker = None
        self._replay_thread: threading.Thread | None = None
        self._replay_stop = threading.Event()
        self._replay_error: BaseException | None = None
        self.replay_done = threading.Event()
        self.samples: list[JobSample] = []  # progress over time (plots)
        self.trainer_restarts = 0
        self._restart_times: list[float] = []  # monotonic times of the restarts in the window
        self._admin = None
        self._started_ray = False
        self._started_serving = False
        self._reaper = None  # stream.job.reaper.LocalRayReaper of a local Ray this job started
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

        for name, configured in (
            ("checkpoints", self.cfg.checkpoints.dir),
            ("snapshots", self.cfg.snapshots.uri),
        ):
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
                replay(
                    recording,
                    bootstrap,
                    self.cfg.kafka.topic,
                    speed,
                    rate=job.replay_rate,
                    retime=True,
                    stop=self._replay_stop,
                    **self.cfg.kafka.client_options,
                )
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

            count, _ = ensure_topic(
                bootstrap, self.cfg.kafka.topic, recording_info(recording).partitions, **opts
            )
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
            init_local_ray(
                cfg.job.worker_niceness,
                address=cfg.job.ray_address,
                namespace=cfg.job.namespace,
                **self.console.ray_init_options(),
            )
            self.console.after_ray_init(ray._private.worker._global_node.get_session_dir_path())
            self._started_ray = cfg.job.ray_address is None
            if self._started_ray:  # ours: stopped with the driver, even one that is killed
                from stream.job.reaper import LocalRayReaper

                self._reaper = LocalRayReaper(ray._private.worker._global_node.get_session_dir_path())
        gpus = ray.cluster_resources().get("GPU", 0.0)
        device, num_gpus = resolve_device(cfg, gpus)
        raw = cfg.model_dump(mode="json")
        raw["trainer"]["device"] = device
        raw["trainer"]["keep_score_log"] = cfg.job.score_log  # grows with the stream
        raw["kafka"]["bootstrap"] = bootstrap

        from stream.serving.follower import normalize_store_uri, serving_ledger_name

        store_uri = normalize_store_uri(cfg.snapshots.uri or str(self.work_dir / "snapshots"))
        topo = Topology(
            bootstrap,
            cfg.kafka.topic,
            partitions,
            self.work_dir,
            store_uri,
            # One publisher per store (its lineage), also across driver restarts; serving
            # replicas report to it by the same name, whoever started them.
            publisher_name=serving_ledger_name(store_uri),
            namespace=cfg.job.namespace,
        )

        from stream.job.actors import IngestActor, PublisherActor, TrainerActor

        topo.publisher = PublisherActor.options(
            name=topo.publisher_name, namespace=topo.namespace, get_if_exists=True
        ).remote(store_uri, cfg.snapshots.keep_versions)
        topo.trainer = TrainerActor.options(num_gpus=num_gpus, num_cpus=1).remote(
            raw, str(self.work_dir.resolve()), topo.publisher_name, topo.namespace, self.predictions
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
        """Deploy the serving app (stream/serving/app.py's builder) unless one of that name
        runs already (`memstream serve`, a RayService): then the job leaves it alone, neither
        replaced now nor deleted at the end; its replicas report here if they follow this
        store."""
        from ray import serve

        from stream.serving.app import build_app

        sc = self.cfg.serving
        url = f"http://{sc.http_host}:{sc.http_port}{sc.route_prefix.rstrip('/')}"
        serve.start(
            http_options={"host": sc.http_host, "port": sc.http_port},
            logging_config=self.console.serve_logging(),
        )
        if SERVING_APP in serve.status().applications:
            log.warning(
                "a Serve application %r runs already (not started by this job): using it as it "
                "is; the job will not stop it",
                SERVING_APP,
            )
            return url
        args = {"snapshots": topo.store_uri, "serving": sc.model_dump(), "namespace": topo.namespace}
        serve.run(build_app(args), name=SERVING_APP, route_prefix=sc.route_prefix, blocking=False)
        self.console.adopt_ray_loggers()  # serve.start gave Serve's logger its own handler
        self._started_serving = True
        return url

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

    def run(self) -> RunReport:
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
            Path(self.report_path).write_text(json.dumps(report.to_json(), indent=1))
            write_plots(Path(self.report_path).with_suffix(""), self.samples, self.freshness_samples)
        return report

    def _supervise(self, topo: Topology, t_start: float) -> RunReport:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        job = self.cfg.job
        max_events = self.max_events
        run_ref = topo.trainer.run.remote(topo.readers, max_events)
        display = LiveDisplay(enabled=job.live_display)
        last_lag_check = 0.0
        lag = None
        with display:
            while True:
                done, _ = ray.wait([run_ref], timeout=job.progress_interval_s)
                if done:
                    try:
                        ray.get(run_ref)
                        break
                    except (RayActorError, RayTaskError) as e:
                        if self._stop.is_set():
                            raise JobError(f"trainer failed while stopping: {e}") from e
                        if "CheckpointDurabilityError" in str(e):  # a restart would not help
                            raise JobError(f"checkpoints cannot be written: {str(e)[-1500:]}") from e
                        self.trainer_restarts += 1
                        wait_s = self._restart_allowed(e)
                        log.warning(
                            "trainer actor died (%s); restarting from its checkpoint in %.1f s",
                            type(e).__name__,
                            wait_s,
                        )
                        self._stop.wait(wait_s)
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
                sample = JobSample(t=now - t_start, progress=prog, lag=lag, freshness=fresh)
                self.samples.append(sample)
                if len(self.samples) > _MAX_SAMPLES:  # a long job: every other one goes, evenly
                    self.samples = self.samples[::2]
                try:
                    serving = ray.get(topo.publisher.serving_state.remote(), timeout=5)
                except Exception:
                    serving = None
                self.metrics.update(sample, serving, self.trainer_restarts)
                display.update(sample, topo, serving)
                if self._replay_error is not None:
                    self._stop.set()
                stop = self._stop.is_set()
                stop |= job.duration_s is not None and now - t_start >= job.duration_s
                stop |= job.stop_at_end and self.replay_done.is_set() and lag == 0
                if stop:
                    topo.trainer.request_stop.remote()
                    ray.get(run_ref)
                    break
        if self._replay_error is not None:
            raise JobError(f"replay into the local broker failed: {self._replay_error}")
        return self._final_report(topo, t_start)

    def _final_report(self, topo: Topology, t_start: float) -> RunReport:
        import ray

        final = ray.get(topo.trainer.final_report.remote(), timeout=60)
        last_version = final.progress.snapshot_version
        serving = self._wait_serving(topo, last_version)
        fresh = ray.get(topo.publisher.freshness.remote(), timeout=10)
        pub_stats = ray.get(topo.publisher.stats.remote(), timeout=10)
        self.freshness_samples = ray.get(topo.publisher.freshness_samples.remote(), timeout=30)
        return run_report(
            final,
            fresh,
            pub_stats,
            serving,
            last_version,
            self.trainer_restarts,
            time.time() - t_start,
            redacted(self.cfg.model_dump(mode="json")),
        )

    def _restart_allowed(self, error: BaseException) -> float:
        """The backoff before restarting the trainer, or JobError past the restart budget."""
        job = self.cfg.job
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < job.restart_window_s] + [now]
        n = len(self._restart_times)
        if n > job.max_trainer_restarts:
            raise JobError(
                f"the trainer failed {n} times within {job.restart_window_s:.0f} s "
                f"(job.max_trainer_restarts={job.max_trainer_restarts}); stopping. Last error: "
                f"{type(error).__name__}: {str(error)[-1500:]}"
            ) from error
        return min(60.0, job.restart_backoff_s * 2 ** (n - 1))

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

                if self._started_serving:  # never serving that others started
                    serve.delete(SERVING_APP)
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
            # No serve.shutdown(): the local Ray goes as a whole, and Serve's controller,
            # killed half-way through its graceful shutdown, only fills the console.
            ray.shutdown()
        if self._reaper is not None:
            self._reaper.release()
            self._reaper = None
        if self._broker is not None:
            # The embedded replay first: a producer left sending into a stopped broker
            # only retries and complains at exit.
            self._replay_stop.set()
            if self._replay_thread is not None:
                self._replay_thread.join(timeout=30)
            self._broker.stop()


def run_main(args) -> int:
    """`memstream run` (see stream/cli/main.py for the flags)."""
    from stream.config import load_config

    overrides = list(args.overrides)
    flags = {
        "kafka.bootstrap": args.bootstrap,
        "kafka.topic": args.topic,
        "job.max_events": args.max_events,
        "job.duration_s": args.duration,
        "job.work_dir": args.work_dir,
        "job.ray_address": args.ray_address,
        "job.replay_rate": args.replay_rate,
    }
    for key, value in flags.items():
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # JSON is YAML: strings stay strings
    if args.no_live:
        overrides.append("job.live_display=false")
    from stream.job.preflight import check_config_file, check_job

    check_config_file(args.config)
    cfg = load_config(args.config, overrides)
    # The live panel owns the console: logs go to <work_dir>/logs, warnings still show.
    console = ConsoleLog(
        Path(cfg.job.work_dir) / "logs", quiet=cfg.job.live_display and not getattr(args, "verbose", False)
    )
    console.install()
    check_job(cfg)  # seconds, before Ray: a wrong broker or topic is one line, not a minute
    report = StreamingJob(cfg, args.report, console, args.predictions).run().to_json()
    keys = (
        "events_consumed",
        "events_trained",
        "events_dlq",
        "throughput_eps",
        "auc.like",
        "freshness_p50_s",
        "freshness_p99_s",
        "snapshots_published",
        "serving_version",
        "duration_s",
    )
    print(json.dumps({k: report.get(k) for k in keys}))
    return 0
