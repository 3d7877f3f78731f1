"""The model health gate: a version with a non-finite tensor or a logloss jump is withheld,
serving keeps the last good one, and the next version that passes is full."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memory_bank.base import DeltaState, FullState, MemoryDelta
from stream.train.health import HealthGateConfig, ModelHealthGate
from tests.stream.conftest import small_service, synthetic_units


def _delta(**tables) -> DeltaState:
    return DeltaState(
        {"head.weight": torch.ones(2, 2)},
        {"embeddings": MemoryDelta({k: (np.arange(len(v)), v) for k, v in tables.items()})},
    )


def test_non_finite_tensors_are_named():
    gate = ModelHealthGate()
    assert gate.check(_delta(item_emb=torch.ones(3, 4)), 0.6).healthy
    bad = _delta(item_emb=torch.tensor([[1.0, math.nan]]))
    v = gate.check(bad, 0.6)
    assert not v.healthy and v.reason == "embeddings.item_emb is not finite"
    full = FullState({"head.weight": torch.tensor([math.inf])}, {})
    assert gate.check(full, 0.6).reason == "dense tensor head.weight is not finite"
    assert gate.summary()["versions_withheld"] == 2 and gate.summary()["withheld_in_a_row"] == 2


def test_a_logloss_jump_over_the_last_good_version_is_withheld():
    gate = ModelHealthGate(HealthGateConfig(max_logloss_increase=0.2))
    ok = _delta(item_emb=torch.ones(1, 1))
    assert gate.check(ok, 0.60).healthy and gate.check(ok, 0.70).healthy  # within 0.2 each time
    v = gate.check(ok, 0.95)
    assert not v.healthy and "rose more than 0.2 above 0.7000" in v.reason
    assert gate.check(ok, 0.75).healthy  # back within the bound of the last good one
    assert not ModelHealthGate().check(ok, math.nan).healthy
    assert (
        ModelHealthGate(HealthGateConfig(enabled=False))
        .check(_delta(x=torch.tensor([[math.nan]])), 9.0)
        .healthy
    )


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    return synthetic_units(tmp_path_factory.mktemp("rec") / "syn.parquet", events=400)


def test_a_withheld_version_is_not_handed_out_and_the_next_good_one_is_full(tmp_path, units):
    svc = small_service(tmp_path / "ck")
    svc.apply_unit(units[0])
    first = svc.snapshot_payload()
    assert isinstance(first.state, FullState)
    svc.apply_unit(units[1])
    with torch.no_grad():  # the model breaks (as one absurd label would do)
        svc.trainer.model.head.bias.fill_(math.nan)
    assert svc.snapshot_payload() is None
    health = svc.progress().health
    assert not health["healthy"] and "head.bias" in health["reason"] and health["versions_withheld"] == 1
    with torch.no_grad():
        svc.trainer.model.head.bias.zero_()
    svc.apply_unit(units[2])
    again = svc.snapshot_payload()
    # The same version number, full (the withheld delta's rows are in it), and its events
    # include those of the withheld one (freshness is measured when they go live).
    assert again.version == first.version + 1 and isinstance(again.state, FullState) and again.parent is None
    assert len(again.event_ts_ms) == units[1].events.num_rows + units[2].events.num_rows
    assert svc.progress().health["healthy"]
