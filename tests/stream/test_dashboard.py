"""infra/grafana/memstream.json queries only metrics the job exports, and shows the ones
infra/PRODUCTION.md tells operators to watch. The exported names come from the real
registry, rendered as /metrics renders it, not from a list kept by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

from stream.job.metrics import JobMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "memstream.json"
PRODUCTION = ROOT / "infra" / "PRODUCTION.md"
METRIC = re.compile(r"\bmemstream_[a-z0-9_]+\b")
# Listed metrics the dashboard may leave out, each with the reason.
NOT_ON_DASHBOARD: dict[str, str] = {}


def exported() -> set[str]:
    text = JobMetrics().render().decode()  # the body of the admin app's /metrics
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def production_listed() -> set[str]:
    text = PRODUCTION.read_text()
    section = text[text.index("## What to watch") :]
    section = section[: section.index("\n## ", 1)]
    return set(METRIC.findall(section))


def test_dashboard_is_a_grafana_dashboard_over_a_prometheus_variable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${" + var["name"] + "}", p["title"]
            assert p["targets"], p["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_queried_metric_is_exported():
    names = exported()
    assert "memstream_events_trained_total" in names and len(names) >= 15
    queried = {m for q in dashboard_queries() for m in METRIC.findall(q)}
    assert queried, "no PromQL found"
    assert queried <= names, f"the dashboard queries metrics the job does not export: {queried - names}"


def test_every_listed_metric_is_exported_and_on_the_dashboard():
    listed = production_listed()
    assert len(listed) >= 8
    assert listed <= exported(), f"PRODUCTION.md lists metrics nobody exports: {listed - exported()}"
    queried = {m for q in dashboard_queries() for m in METRIC.findall(q)}
    missing = listed - queried - set(NOT_ON_DASHBOARD)
    assert not missing, f"listed in PRODUCTION.md but not on the dashboard: {missing}"
