"""Bank update: scatter fresh rows into the item memory bank, deduplicated, stamped.

    bank[rows[i]] = vectors[i], stamps[rows[i]] = step      (in place, last writer wins)

The LEMUR bank writes the items of a batch with it (the same item may appear several
times in one batch). Triton on CUDA (triton.py: one sort, then exactly one writer per
destination row), torch unique + scatter_reduce + index_copy elsewhere (reference.py).
"""

from __future__ import annotations

import torch

from kernels.bank_update.reference import bank_update_ref
from kernels.dispatch import backend_for, triton_module

__all__ = ["bank_update", "bank_update_ref"]


def bank_update(
    bank: torch.Tensor, stamps: torch.Tensor, rows: torch.Tensor, vectors: torch.Tensor, step: int
) -> torch.Tensor:
    """Deduplicated last-writer-wins row scatter with stamps; see `bank_update_ref`."""
    if backend_for(bank) == "triton":
        return triton_module("bank_update", bank).bank_update_triton(bank, stamps, rows, vectors, step)
    return bank_update_ref(bank, stamps, rows, vectors, step)
