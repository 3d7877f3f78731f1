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


def index_block(arrays: list[np.ndarray], rows: int) -> np.ndarray:
    """Index arrays, each at most `rows` long, as the columns of one (rows, k) int64 block,
    zero-padded (0 is a valid index: a padded entry is never used). A write planned on the
    host before a step crosses to the device this way, inside the step's one staged copy;
    `index_columns` takes the arrays back out there by their host-known lengths."""
    block = np.zeros((rows, len(arrays)), dtype=np.int64)
    for j, a in enumerate(arrays):
        if len(a) > rows:
            raise ValueError(
                f"index_block: array {j} has {len(a)} entries, more than the block's {rows} rows"
            )
        block[: len(a), j] = a
    return block


def index_columns(block: torch.Tensor, arrays: list[np.ndarray]) -> list[torch.Tensor]:
    """The device copies of `arrays` from their `index_block` (slices: no sync)."""
    return [block[: len(a), j] for j, a in enumerate(arrays)]


def index_tensors(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Index arrays on `device` in one copy of their own (for calls outside a training
    step, whose indices ride in the batch's staged copy instead)."""
    block = torch.from_numpy(index_block(arrays, max([len(a) for a in arrays] + [1])))
    return index_columns(block.to(device), arrays)


@dataclass
class MemoryDelta:
    """Rows changed since the previous `take_delta()` of one component.

    tables[name] = (rows (M,) int64, values (M, ...) cpu tensor), row-aligned; the components
    keyed by integer keys (the item bank, the user histories) ship their keys as tables too,
    and the rows they freed as a "freed" table (serving mirrors their row numbers, so
    evictions need no string tombstones);
    ids[name] = strings a component ships beside its tables (the feature layout).
    """

    tables: dict[str, tuple[np.ndarray, torch.Tensor]] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)

    def num_rows(self) -> int:
        return sum(len(rows) for rows, _ in self.tables.values())

    def is_empty(self) -> bool:
        return self.num_rows() == 0


class RowChanges:
    """What a component whose rows hold integer keys (the item bank, the user histories)
    changed since its last delta: rows written (`dirty`) and rows freed, with the key each
    held (-1 unknown). A serving copy mirrors the trainer's row numbers, so the delta ships
    rows, and the freed ones as a "freed" table: (rows (F,), keys (F,) int64)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.dirty = np.zeros(n, dtype=bool)  # (N,) written since the last take
        self.freed: dict[int, int] = {}  # row -> key it held, freed since the last take

    def free(self, rows: np.ndarray, keys: np.ndarray) -> None:
        self.dirty[rows] = False
        self.freed.update(zip(np.asarray(rows).tolist(), np.asarray(keys).tolist()))

    def _freed_array(self) -> np.ndarray:
        return np.asarray(list(self.freed.items()), dtype=np.int64).reshape(-1, 2)  # (F, [row, key])

    def take(self) -> tuple[np.ndarray, tuple[np.ndarray, torch.Tensor]]:
        """(rows written (M,), the "freed" table) since the previous take; clears both."""
        rows, freed = np.flatnonzero(self.dirty), self._freed_array()
        self.dirty[:] = False
        self.freed = {}
        return rows, (freed[:, 0].copy(), torch.from_numpy(freed[:, 1].copy()))

    def mark_changed(self, rows: np.ndarray, held_keys: np.ndarray) -> None:
        """Rows a serving copy may hold differently (a restarted trainer's: the versions
        published after its checkpoint changed them): re-ship the live ones (`held_keys`
        (N,) >= 0), free the others."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        rows = rows[(rows >= 0) & (rows < self.n)]
        live = held_keys[rows] >= 0
        self.dirty[rows[live]] = True
        self.freed.update(dict.fromkeys(rows[~live].tolist(), -1))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {
            "dirty_rows": torch.from_numpy(np.flatnonzero(self.dirty)),
            "freed": torch.from_numpy(self._freed_array()),
        }

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.dirty[:] = False
        self.dirty[tensors["dirty_rows"].numpy()] = True
        self.freed = dict(tensors["freed"].tolist())


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
