"""Bank update in Triton: scatter fresh rows into the bank, deduplicated in the batch, stamped.

    bank[rows[i]] = vectors[i], stamps[rows[i]] = step      (in place, last writer wins)

bank (N, D) fp32/bf16, stamps (N,) int64, rows (M,) int64 with duplicates allowed,
vectors (M, D) in any float dtype (cast to the bank's on store). Returns the sorted
unique rows written. Same contract as `bank_update_ref` in reference.py beside this file
(the naive torch version: unique + scatter_reduce(amax) + index_copy).

Dedup: one stable sort of rows; in each run of equal rows the last sorted position is
the last writer (stable sort keeps batch order inside a run). The kernel then has
exactly one writer per destination row: one program per (unique row, block of D)
copies vectors[last] into bank[row] with vectorised loads/stores, and the first
D-block program writes the stamp. No atomics, no races, deterministic.
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
    UNIQ,  # (U,) int64 destination rows
    SRC,  # (U,) int64 winning position in vectors
    VEC,  # (M, D), row stride stride_vec
    step,
    D,
    stride_bank,
    stride_vec,
    BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    row = tl.load(UNIQ + u)
    src = tl.load(SRC + u)
    v = tl.load(VEC + src * stride_vec + offs_d, mask=m_d)
    tl.store(BANK + row * stride_bank + offs_d, _cast(v, BANK.dtype.element_ty), mask=m_d)
    if pd == 0:
        tl.store(STAMPS + row, step)


def bank_update_triton(
    bank: torch.Tensor, stamps: torch.Tensor, rows: torch.Tensor, vectors: torch.Tensor, step: int
) -> torch.Tensor:
    """In place: bank[rows[i]] = vectors[i], stamps[rows[i]] = step; returns sorted unique rows."""
    if rows.numel() == 0:
        return rows.new_empty(0)
    assert bank.stride(-1) == 1, "bank rows must be contiguous"
    rows = rows.reshape(-1)
    vectors = vectors.reshape(rows.numel(), -1)
    if vectors.stride(-1) != 1:
        vectors = vectors.contiguous()
    sorted_rows, perm = torch.sort(rows, stable=True)  # (M,)
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)  # (U,)
    last = perm[torch.cumsum(counts, 0) - 1]  # (U,) last writer of each unique row
    D = bank.shape[1]
    BLOCK_D = min(triton.next_power_of_2(max(D, 1)), 64 if _INTERPRET else 1024)
    grid = (uniq.numel(), triton.cdiv(D, BLOCK_D))
    _bank_update_kernel[grid](
        bank,
        stamps,
        uniq,
        last,
        vectors,
        int(step),
        D,
        bank.stride(0),
        vectors.stride(0),
        BLOCK_D=BLOCK_D,
        num_warps=4,
    )
    return uniq
