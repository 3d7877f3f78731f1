"""The rows of the model's trainable tables that changed since the last delta, in one place.

In the spirit of TorchRec's `ModelDeltaTracker`: every row-sparse table (the ranker's
id tables, the doc encoder's word table, the LMN and PKM value tables) is registered
once, under the component that ships it and the table's name in that component's
delta. A gradient hook marks the rows each backward touches; the sparse optimizer
updates exactly those rows, so the marks are the rows that changed. `take(owner)` hands
one component's changed rows over (and clears them); `clear()` starts a new delta
chain (after a full snapshot). The marks are boolean masks on the table's device:
nothing is copied to the host until a delta is cut.

A trainer that learns whether its step is usable only after the backward (one check,
one sync) calls `hold()` before it: the backward's marks wait for `commit()` (the
optimizers stepped) or `discard()` (a poisoned batch changed nothing).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class DeltaTrackerError(ValueError):
    """A table registered twice, or a saved state that does not fit the tables."""


class DeltaTracker:
    def __init__(self) -> None:
        self._tables: dict[str, dict[str, nn.Parameter]] = {}  # owner -> table -> weight
        self._marks: dict[str, dict[str, torch.Tensor]] = {}  # owner -> table -> (N,) bool
        self._held: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (mark, rows) until commit

    def track(self, owner: str, table: str, weight: nn.Parameter) -> None:
        """Register `weight` (N, ...) as `owner`'s table `table`; its gradients mark rows."""
        if table in self._tables.setdefault(owner, {}):
            raise DeltaTrackerError(f"{owner}.{table}: already tracked")
        self._tables[owner][table] = weight
        mark = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        self._marks.setdefault(owner, {})[table] = mark
        weight.register_hook(lambda grad, mark=mark: self._mark(mark, grad))

    def _mark(self, mark: torch.Tensor, grad: torch.Tensor) -> None:
        # A sparse gradient's row indices, or a dense gradient's rows with any non-zero entry.
        rows = grad._indices()[0] if grad.is_sparse else grad.reshape(grad.shape[0], -1).ne(0).any(dim=1)
        if self._held is not None:
            self._held.append((mark, rows))
        else:
            self._set(mark, rows)

    @staticmethod
    def _set(mark: torch.Tensor, rows: torch.Tensor) -> None:
        if rows.dtype == torch.bool:
            mark |= rows
        else:
            mark[rows] = True

    def hold(self) -> None:
        """The marks of the backwards until `commit()` / `discard()` wait."""
        self._held = []

    def commit(self) -> None:
        """The held marks count (the optimizers changed those rows)."""
        for mark, rows in self._held or []:
            self._set(mark, rows)
        self._held = None

    def discard(self) -> None:
        """The held marks are dropped (the step changed nothing)."""
        self._held = None

    def owners(self) -> list[str]:
        return list(self._tables)

    def tables(self, owner: str) -> dict[str, nn.Parameter]:
        return dict(self._tables.get(owner, {}))

    def take(self, owner: str) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """{table: (rows (M,) int64 sorted, values (M, ...) cpu)} changed since the last take."""
        out = {}
        for table, weight in self._tables.get(owner, {}).items():
            mark = self._marks[owner][table]
            rows = mark.nonzero().squeeze(1)  # (M,)
            mark.zero_()
            out[table] = (rows.cpu().numpy(), weight.detach().index_select(0, rows).cpu())
        return out

    def clear(self) -> None:
        """Forget every mark: the next delta starts from the state as it is now."""
        for marks in self._marks.values():
            for mark in marks.values():
                mark.zero_()

    def export_state(self) -> dict[str, torch.Tensor]:
        """The marks as uint8 tensors `<owner>.<table>` (for checkpoints)."""
        return {f"{o}.{t}": m.to(torch.uint8).cpu() for o, ms in self._marks.items() for t, m in ms.items()}

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Marks from `export_state`; a table the saved state did not track is marked whole."""
        for owner, marks in self._marks.items():
            for table, mark in marks.items():
                saved = tensors.get(f"{owner}.{table}")
                if saved is None:
                    mark.fill_(True)
                elif saved.shape != mark.shape:
                    raise DeltaTrackerError(
                        f"{owner}.{table}: saved {tuple(saved.shape)}, have {tuple(mark.shape)}"
                    )
                else:
                    mark.copy_(saved.to(torch.bool))
