"""What every memory component shares: the delta of changed rows for snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class MemoryDelta:
    """Rows changed since the previous `take_delta()` of one memory component.

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
