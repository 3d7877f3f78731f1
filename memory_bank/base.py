"""What every stateful component shares: one shape of API, and the containers of its state.

A component (the item bank, the LMN and PKM memories, the user-history store, the
feature builder's counters, the id tables) is `Stateful`: it can say how it is doing
(`stats`), hand over all of its state (`export_state`) or the rows changed since it
last did (`take_delta`), and take either back (`import_state`, `apply_delta`).
`models.state.RankingState.components()` lists them; snapshots, checkpoints, serving
copies and the admin API are loops over that dict, so a new memory is one new file
plus one line there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class MemoryDelta:
    """Rows changed since the previous `take_delta()` of one component.

    tables[name] = (rows (M,) int64, values (M, ...) cpu tensor), row-aligned;
    ids[name] = the string key of each row where rows are keyed by id (the bank);
    tombstones = ids evicted since the previous delta (serving must drop them).
    """

    tables: dict[str, tuple[np.ndarray, torch.Tensor]] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)
    tombstones: list[str] = field(default_factory=list)

    def num_rows(self) -> int:
        return sum(len(rows) for rows, _ in self.tables.values())

    def is_empty(self) -> bool:
        return self.num_rows() == 0 and not self.tombstones


@runtime_checkable
class Stateful(Protocol):
    """The API every component of the model's state has (docs/CONTRACTS.md)."""

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable numbers about the component (admin API, reports)."""
        ...

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """All of the state: tensors (for safetensors) and JSON-able meta; bit-exact round trip."""
        ...

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...

    def take_delta(self) -> MemoryDelta:
        """The rows changed since the previous call (clears the tracking)."""
        ...

    def apply_delta(self, delta: MemoryDelta) -> None:
        """Apply a `take_delta` of the trainer's copy to this (serving) copy."""
        ...


@dataclass
class FullState:
    """All of a model's state: dense tensors and each component's export_state."""

    dense: dict[str, torch.Tensor]
    memories: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]


@dataclass
class DeltaState:
    """What changed since the previous version: dense tensors (whole) and each component's delta."""

    dense: dict[str, torch.Tensor]
    memories: dict[str, MemoryDelta]
