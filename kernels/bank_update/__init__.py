"""Bank update: scatter fresh rows into the item memory bank, deduplicated, stamped.

    bank[rows[i]] = vectors[i], stamps[rows[i]] = step      (in place, last writer wins)

The LEMUR bank writes the items of a batch with it (the same item may appear several
times in one batch). Triton on CUDA (triton.py: one sort, then exactly one writer per
destination row), a stable sort and a last-writer gather elsewhere (reference.py).

The sorted unique rows written are returned by default; their number depends on the
data, so on a GPU that is a host sync. A caller that knows them already (the bank
has its rows on the host) passes `return_rows=False`: the Triton write is then
sync-free (its sizes are M, the rows given) and None is returned.
"""

from __future__ import annotations

import torch

from kernels.bank_update.reference import bank_update_ref
from kernels.dispatch import backend_for, triton_module

__all__ = ["bank_update", "bank_update_ref"]


def bank_update(
    bank: torch.Tensor,
    stamps: torch.Tensor,
    rows: torch.Tensor,
    vectors: torch.Tensor,
    step: int,
    return_rows: bool = True,
) -> torch.Tensor | None:
    """Deduplicated last-writer-wins row scatter with stamps; see `bank_update_ref`."""
    if backend_for(bank) == "triton":
        mod = triton_module("bank_update", bank)
        return mod.bank_update_triton(bank, stamps, rows, vectors, step, return_rows)
    return bank_update_ref(bank, stamps, rows, vectors, step, return_rows)
