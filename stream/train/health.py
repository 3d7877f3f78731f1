"""The model health gate: a version goes to serving only if it looks like a working model.

Before a version is published the trainer checks it (`ModelHealthGate.check`):
  - finite: every tensor it ships is finite (the dense tensors, and the changed rows of a
    delta or every table of a full version): a NaN in the weights would reach every
    replica at once;
  - no loss jump: the windowed logloss has not risen more than `max_logloss_increase` above
    the value it had at the last version that passed: one event that wrecks the model
    (a rating of 1e6) shows there first.
A version that fails is not published; serving keeps the last good one, the job's metrics
and log say so, and the admin API (`/v1/trainer/health`) shows why. The next version that
passes is a full one (the withheld delta's rows are in it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from memory_bank.base import DeltaState, FullState


class HealthGateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    check_finite: bool = True
    # Absolute rise of the windowed logloss (nats) over its value at the last good version
    # past which a version is withheld; None: no loss check.
    max_logloss_increase: float | None = Field(0.25, gt=0)


@dataclass(frozen=True)
class HealthVerdict:
    healthy: bool
    reason: str | None  # why not, naming the tensor or the numbers
    window_logloss: float | None
    checked_at: float  # wall time


class ModelHealthGate:
    def __init__(self, cfg: HealthGateConfig | None = None):
        self.cfg = cfg or HealthGateConfig()
        self.last_good_logloss: float | None = None
        self.last: HealthVerdict | None = None
        self.withheld = 0  # versions not published since the start
        self.withheld_in_a_row = 0

    def check(self, state: FullState | DeltaState, window_logloss: float | None) -> HealthVerdict:
        reason = None
        if self.cfg.enabled and self.cfg.check_finite:
            reason = _first_non_finite(state)
        wl = window_logloss if window_logloss is not None and math.isfinite(window_logloss) else None
        if reason is None and self.cfg.enabled and window_logloss is not None and wl is None:
            reason = f"windowed logloss is {window_logloss}"
        bound = self.cfg.max_logloss_increase
        if reason is None and self.cfg.enabled and bound is not None and wl is not None:
            if self.last_good_logloss is not None and wl > self.last_good_logloss + bound:
                reason = (
                    f"windowed logloss {wl:.4f} rose more than {bound} above {self.last_good_logloss:.4f}, "
                    "its value at the last published version"
                )
        verdict = HealthVerdict(reason is None, reason, wl, time.time())
        self.last = verdict
        if verdict.healthy:
            self.withheld_in_a_row = 0
            if wl is not None:
                self.last_good_logloss = wl
        else:
            self.withheld += 1
            self.withheld_in_a_row += 1
        return verdict

    def summary(self) -> dict[str, Any]:
        v = self.last
        return {
            "healthy": True if v is None else v.healthy,
            "reason": None if v is None else v.reason,
            "window_logloss": None if v is None else v.window_logloss,
            "last_good_logloss": self.last_good_logloss,
            "checked_at": None if v is None else v.checked_at,
            "versions_withheld": self.withheld,
            "withheld_in_a_row": self.withheld_in_a_row,
        }


def _first_non_finite(state: FullState | DeltaState) -> str | None:
    """The name of the first shipped float tensor with a NaN or an infinity, or None."""

    def bad(t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.numel() > 0 and not bool(torch.isfinite(t).all())

    for name, t in state.dense.items():
        if bad(t):
            return f"dense tensor {name} is not finite"
    for comp, mem in state.memories.items():
        tables = mem[0] if isinstance(state, FullState) else {k: v for k, (_, v) in mem.tables.items()}
        for name, t in tables.items():
            if isinstance(t, torch.Tensor) and bad(t):
                return f"{comp}.{name} is not finite"
    return None
