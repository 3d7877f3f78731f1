"""Plain-torch twin of the Triton bank update: the CPU path and the tests' ground truth."""

from __future__ import annotations

import torch


def bank_update_ref(
    bank: torch.Tensor,
    stamps: torch.Tensor,
    rows: torch.Tensor,
    vectors: torch.Tensor,
    step: int,
) -> torch.Tensor:
    """In place: bank[rows[i]] = vectors[i], stamps[rows[i]] = step; last writer wins.

    bank (N, D), stamps (N,) int64, rows (M,) int64 (duplicates allowed),
    vectors (M, D). Returns the sorted unique rows written.
    """
    if rows.numel() == 0:
        return rows.new_empty(0)
    m = rows.numel()
    # For each distinct row keep the position of its last occurrence.
    uniq, inverse = torch.unique(rows, return_inverse=True)
    last = torch.full((uniq.numel(),), -1, dtype=torch.int64, device=rows.device)
    last.scatter_reduce_(0, inverse, torch.arange(m, device=rows.device), reduce="amax")
    bank.index_copy_(0, uniq, vectors[last].to(bank.dtype))
    stamps.index_fill_(0, uniq, int(step))
    return uniq
