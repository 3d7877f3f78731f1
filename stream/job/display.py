"""What `memstream run` shows while it runs: a rich Live panel, or a log line every ~10 s
when there is no terminal to draw on (`--no-live`, `ray job submit`); and `ConsoleLog`,
what of the logs reaches the console.

With the live panel the console is the panel's: every log line (the driver's, kafka's,
the Ray workers' output and Serve's, forwarded to the driver) goes to
<work_dir>/logs/memstream.log, and only warnings and errors reach the console, one line
each. `--verbose` (or no panel) prints the logs as before. Kafka clients' reconnect
warnings never reach the console: a broker that is down is one preflight error
(stream/job/preflight.py), not a stream of retries.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream.job.report import JobSample

if TYPE_CHECKING:
    from stream.job.driver import Topology

log = logging.getLogger("stream.job.driver")


def fmt(x: Any, nd: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


class LiveDisplay:
    """events/s, lag, AUC, the trainer's snapshot version, freshness."""

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
            if not self._live.console.is_terminal:  # the last frame ends without a newline there
                self._live.console.line()

    def _rate(self, s: JobSample) -> float | None:
        rate = None
        if self._last is not None and s.t > self._last[0]:
            rate = (s.progress.events_applied - self._last[1]) / (s.t - self._last[0])
        return rate

    def update(self, s: JobSample, topo: Topology, serving: list[dict[str, Any]] | None = None) -> None:
        p, m, f = s.progress, s.progress.metrics, s.freshness
        if self._live is None:
            if self._last is None or s.t - self._last[0] >= 10:
                rate = self._rate(s)
                self._last = (s.t, p.events_applied)
                log.info(
                    "%d events trained, %s ev/s, lag %s, AUC %s, trainer v%s, serving %s, freshness p50/p99 %s/%s s",
                    p.events_applied,
                    "-" if rate is None else f"{rate:,.0f}",
                    s.lag,
                    fmt(m.get("auc.like")),
                    p.snapshot_version,
                    _replica_versions(serving),
                    fmt(f.get("p50_s"), 2),
                    fmt(f.get("p99_s"), 2),
                )
            return
        from rich.table import Table

        rate = self._rate(s)
        self._last = (s.t, p.events_applied)
        tab = Table(title=f"memstream  {topo.topic} on {topo.bootstrap}", show_header=False)
        rows = [
            ("elapsed", f"{s.t:.0f} s"),
            ("events trained", f"{p.events_applied:,}"),
            ("dead-lettered", f"{p.events_dlq:,}"),
            ("events/s", "-" if rate is None else f"{rate:,.0f}"),
            ("lag", "-" if s.lag is None else f"{s.lag:,}"),
            ("AUC like (cum / window)", f"{fmt(m.get('auc.like'))} / {fmt(m.get('window.auc.like'))}"),
            ("trainer's snapshot version", str(p.snapshot_version)),
            ("serving replicas' versions", _replica_versions(serving)),
            ("freshness p50 / p99", f"{fmt(f.get('p50_s'), 2)} s / {fmt(f.get('p99_s'), 2)} s"),
            ("serving", topo.serving_url or "-"),
            ("admin", topo.admin_url or "-"),
        ]
        for k, v in rows:
            tab.add_row(k, v)
        self._live.update(tab)


def _replica_versions(serving: list[dict[str, Any]] | None) -> str:
    """Each replica's live version ("v37 v37"), not the trainer's: the two differ while a
    version is on its way, and a replica that refuses versions stays behind."""
    if not serving:
        return "-"
    return " ".join(f"v{r['version']}" if r.get("version") is not None else "loading" for r in serving)


# -- where the logs go ---------------------------------------------------------------------

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A forwarded worker line a user may have to act on: Python logging, Ray's and Serve's
# formats all carry the level name as a word.
_WORKER_ALERT = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b")


class _OneLine(logging.Formatter):
    """`memstream: WARNING <logger>: <first line>`; the traceback stays in the log file."""

    def format(self, record: logging.LogRecord) -> str:
        first = record.getMessage().strip().splitlines() or [""]
        return f"memstream: {record.levelname} {record.name}: {first[0]}"


class _ConsoleFilter(logging.Filter):
    def __init__(self, quiet: bool):
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "kafka" or record.name.startswith("kafka."):
            # The client's reconnects and timeouts: the log file's. What they mean for the
            # job is memstream's own line (a preflight error, the reader's warning).
            return not self.quiet and record.levelno >= logging.WARNING
        if not self.quiet:
            return True
        if record.name == "ray" or record.name.startswith("ray."):
            # Ray's and Serve's driver-side warnings are about Ray ("token authentication is
            # enabled", "connecting to existing Serve app"), not the job: the file's. What
            # goes wrong in the job reaches memstream's own loggers, or the workers' lines.
            return record.levelno >= logging.ERROR
        return record.levelno >= logging.WARNING


class ConsoleLog:
    """The logging of one `memstream run` (or `memstream serve`): a log file in `log_dir`
    always, and the console either quiet (warnings and errors, one line each) or verbose
    (everything, as Ray and Serve print it)."""

    def __init__(self, log_dir: Path | None, quiet: bool):
        self.log_dir = log_dir
        self.quiet = quiet
        self.log_file = log_dir / "memstream.log" if log_dir is not None else None
        self._worker_log = logging.getLogger("memstream.workers")

    def install(self) -> None:
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        for h in list(root.handlers):  # a second install (tests) replaces the first
            if getattr(h, "_memstream", False):
                root.removeHandler(h)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(_OneLine() if self.quiet else logging.Formatter(_LOG_FORMAT))
        console.addFilter(_ConsoleFilter(self.quiet))
        handlers: list[logging.Handler] = [console]
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            to_file = logging.FileHandler(self.log_file, encoding="utf-8")
            to_file.setFormatter(logging.Formatter(_LOG_FORMAT))
            handlers.append(to_file)
        for h in handlers:
            h._memstream = True  # type: ignore[attr-defined]
            root.addHandler(h)
        # Their INFO lines (per connection, per task) are for the file when quiet; kafka-python
        # 3's event-loop timing ("Task ran for 0.25s") is the client on a busy CPU: never.
        logging.getLogger("kafka").setLevel(logging.INFO if self.log_file else logging.WARNING)
        logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)

    def adopt_ray_loggers(self) -> None:
        """Quiet: Ray's and Serve's driver-side loggers print to stderr through their own
        handlers (added when ray is imported, again by serve.start); through ours instead.
        Called before ray.init and after serve.start."""
        if not self.quiet:
            return
        for name in ("ray", "ray.serve"):
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
            lg.propagate = True

    def ray_init_options(self) -> dict[str, Any]:
        """`ray.init` options: the driver's Ray logger at WARNING, worker output forwarded
        (routed by `route_worker_output` once Ray is up)."""
        self.adopt_ray_loggers()
        return {"log_to_driver": True, "logging_level": logging.WARNING}

    def serve_logging(self) -> dict[str, Any]:
        """Serve's `logging_config`: its components and replicas log INFO to their own files
        (in the Ray session's logs/serve); their console output is routed with the rest.
        Called once ray.serve is imported (its logger gets its stream handler then)."""
        self.adopt_ray_loggers()
        return {"log_level": "INFO", "enable_access_log": not self.quiet}

    def after_ray_init(self, session_dir: str | None) -> None:
        """Once Ray is up: worker output routed, the session's logs linked."""
        self.route_worker_output()
        self.link_ray_session(session_dir)

    def route_worker_output(self) -> None:
        """Quiet: the workers' forwarded stdout/stderr (Ray's `log_to_driver` stream) goes to
        the log file, the lines that carry a warning or error to the console too.

        Ray prints that stream from a dispatcher in its private ray_logging module; when
        the module changes shape, worker output is not forwarded at all (it stays in the
        Ray session's log files), which is quiet too."""
        if not self.quiet:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        try:
            dispatcher.remove_handler("ray_print_logs")
        except Exception:
            return
        dispatcher.add_handler("memstream_worker_logs", self._worker_lines)
        # Errors the raylet pushes to the driver (a worker killed for memory, an actor
        # died) are printed by the same module's print_to_stdstream: routed the same way.
        import ray._private.worker as ray_worker

        if hasattr(ray_worker, "print_to_stdstream"):
            ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: self._worker_lines(data)

    def _worker_lines(self, batch: dict[str, Any]) -> None:
        who = batch.get("actor_name") or batch.get("task_name") or f"pid={batch.get('pid')}"
        for line in batch.get("lines", []):
            alert = batch.get("pid") == "raylet" or _WORKER_ALERT.search(line) is not None
            record = self._worker_log.makeRecord(
                self._worker_log.name,
                logging.WARNING if alert else logging.INFO,
                __file__,
                0,
                "(%s) %s",
                (who, line),
                None,
            )
            self._worker_log.handle(record)

    def link_ray_session(self, session_dir: str | None) -> None:
        """<log_dir>/ray -> the Ray session's logs (every worker's and Serve's log files)."""
        if self.log_dir is None or not session_dir:
            return
        link = self.log_dir / "ray"
        try:
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(session_dir) / "logs", target_is_directory=True)
        except OSError:
            pass
