"""A short chaos run (benchmarks/chaos.py): trainer and ingest SIGKILLs, a broker outage and a
whole-job restart while events are produced; nothing lost, nothing applied twice."""

from __future__ import annotations

import sys

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_short_chaos_run_loses_nothing_applies_nothing_twice(ray_cluster, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chaos import ChaosPlan, run_chaos, table

    plan = ChaosPlan(
        events=4000,
        seed=5,
        rate=100.0,
        trainer_kills=2,
        ingest_kills=1,
        outage_s=4.0,
        checkpoint_interval_s=1.0,
    )
    r = run_chaos(plan, tmp_path / "data", keep_dir=tmp_path / "run")
    print(table(r))
    assert all("skipped" not in f for f in r.faults), r.faults
    assert r.lost == 0 and r.applied_twice == 0 and r.lineage_exact, table(r)
    assert r.applied == r.produced == r.scored
    assert r.trainer_restarts >= 2
