"""Bank update in Triton: scatter fresh rows into the bank, deduplicated in the batch, stamped.

    bank[rows[i]] = vectors[i], stamps[rows[i]] = step      (in place, last writer wins)

bank (N, D) fp32/bf16, stamps (N,) int64, rows (M,) int64 with duplicates allowed,
vectors (M, D) in any float dtype (cast to the bank's on store). Returns the sorted
unique rows written. Same contract as `bank_update_ref` in reference.py beside this file
(the naive torch version: unique + scatter_reduce(amax) + index_copy).

Dedup: one stable sort of rows; in each run of equal rows the last sorted position is
the last writer (stable sort keeps batch order inside a run). One program per (sorted
position, block of D): the program of a run's last position copies vectors[perm[p]]
into bank[row] with vectorised loads/stores (its first D-block program writes the
stamp), the others store nothing. So exactly one writer per destination row, no
atomics, no races, deterministic, and the grid is sized by M, not by the number of
distinct rows: no host sync unless the caller asks for the unique rows back.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels._triton_common import cast_rne

__all__ = ["bank_update_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_cast = triton.jit(cast_rne)  # decorated here, see kernels/_triton_common.py


@triton.jit
def _bank_update_kernel(
    BANK,  # (N, D), row stride stride_bank
    STAMPS,  # (N,) int64
    ROWS,  # (M,) int64 destination rows, sorted (stable)
    SRC,  # (M,) int64 position in vectors of sorted position p
    VEC,  # (M, D), row stride stride_vec
    M,
    step,
    D,
    stride_bank,
    stride_vec,
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    row = tl.load(ROWS + p)
    nxt = tl.load(ROWS + p + 1, mask=p + 1 < M, other=-1)
    if row != nxt:  # the last position of its run: the last writer of the row
        offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = offs_d < D
        src = tl.load(SRC + p)
        v = tl.load(VEC + src * stride_vec + offs_d, mask=m_d)
        tl.store(BANK + row * stride_bank + offs_d, _cast(v, BANK.dtype.element_ty), mask=m_d)
        if pd == 0:
            tl.store(STAMPS + row, step)


def bank_update_triton(
    bank: torch.Tensor,
    stamps: torch.Tensor,
    rows: torch.Tensor,
    vectors: torch.Tensor,
    step: int,
    return_rows: bool = True,
) -> torch.Tensor | None:
    """In place: bank[rows[i]] = vectors[i], stamps[rows[i]] = step; returns sorted unique
    rows (or None with return_rows=False: then nothing here waits for the device)."""
    if rows.numel() == 0:
        return rows.new_empty(0) if return_rows else None
    assert bank.stride(-1) == 1, "bank rows must be contiguous"
    rows = rows.reshape(-1)
    vectors = vectors.reshape(rows.numel(), -1)
    if vectors.stride(-1) != 1:
        vectors = vectors.contiguous()
    sorted_rows, perm = torch.sort(rows, stable=True)  # (M,)
    D = bank.shape[1]
    BLOCK_D = min(triton.next_power_of_2(max(D, 1)), 64 if _INTERPRET else 1024)
    grid = (rows.numel(), triton.cdiv(D, BLOCK_D))
    _bank_update_kernel[grid](
        bank,
        stamps,
        sorted_rows,
        perm,
        vectors,
        rows.numel(),
        int(step),
        D,
        bank.stride(0),
        vectors.stride(0),
        BLOCK_D=BLOCK_D,
        num_warps=4,
    )
    return torch.unique_consecutive(sorted_rows) if return_rows else None
