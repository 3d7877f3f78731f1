"""Plain-torch twin of the Triton bank update: the CPU path and the tests' ground truth."""

from __future__ import annotations

import torch


def bank_update_ref(
    bank: torch.Tensor,
    stamps: torch.Tensor,
    rows: torch.Tensor,
    vectors: torch.Tensor,
    step: int,
    return_rows: bool = True,
) -> torch.Tensor | None:
    """In place: bank[rows[i]] = vectors[i], stamps[rows[i]] = step; last writer wins.

    bank (N, D), stamps (N,) int64, rows (M,) int64 (duplicates allowed),
    vectors (M, D). Returns the sorted unique rows written (None with return_rows=False).

    Without data-dependent sizes (the sizes are M): one stable sort by row; every entry of
    a row's run takes the vector of the run's last entry (the last writer), so duplicate
    destinations receive identical values and the order they land in does not matter.
    """
    if rows.numel() == 0:
        return rows.new_empty(0) if return_rows else None
    m = rows.numel()
    sorted_rows, order = torch.sort(rows, stable=True)  # (M,) equal rows keep their order
    pos = torch.arange(m, device=rows.device)
    run_end = torch.ones(m, dtype=torch.bool, device=rows.device)
    run_end[:-1] = sorted_rows[:-1] != sorted_rows[1:]
    # For each sorted entry the position of its run's last entry: the next run end at or after it.
    last = torch.where(run_end, pos, m).flip(0).cummin(0).values.flip(0)  # (M,)
    bank.index_copy_(0, sorted_rows, vectors.index_select(0, order.index_select(0, last)).to(bank.dtype))
    stamps.index_fill_(0, sorted_rows, int(step))
    return torch.unique(rows) if return_rows else None
