"""What `memstream run` shows while it runs: a rich Live panel, or a log line every ~10 s
when there is no terminal to draw on (`--no-live`, `ray job submit`)."""

from __future__ import annotations

import logging
import math
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
