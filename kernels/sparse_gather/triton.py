"""Sparse-Gather in Triton: forward, backward and the autograd.Function around them.

    out[b] = sum_j w[b, j] * V[idx[b, j]]          V (N, D), idx/w (B, K) -> out (B, D)

K = heads x top-k: any size (it is walked in blocks of BLOCK_K with a mask). V may
be fp32 or bf16; every sum is accumulated in fp32 and rounded once on store.

Backward
    dw[b, j] = <dout[b], V[idx[b, j]]>                                  dense (B, K)
    dV[r]    = sum_{(b, j): idx[b, j] = r} w[b, j] * dout[b]           only the rows used

dV is produced compactly, one row per unique index (U, D), and handed to autograd
as a coalesced sparse COO tensor (indices = sorted unique rows), i.e. the same
kind of gradient `F.embedding_bag(sparse=True)` gives, so it feeds the same
sparse optimizer. Two ways to compute it, both start from one sort of the B*K
indices (stable, so positions of a row stay in (b, j) order):

- "reverse": reverse index. The sorted (row, position) pairs are cut into pieces
  of at most PIECE positions (a hot row used 100k times becomes many pieces, so no
  program walks a giant segment alone); each piece is a segmented sum
  sum_p w[p] * dout[p // K] written to its own partial row; rows that got several
  pieces are summed by the same kernel over the partials (a second level). No
  atomics, deterministic.
- "atomic": the kernel that computes dw (it reads V[idx] and dout[b] anyway) also
  does tl.atomic_add of w * dout[b] into the compact (U, D) fp32 buffer at
  inverse[b, j]. One pass less over B*K*D, but contended atomics serialise on hot
  rows, and the order of the fp32 sums is not fixed.

Heuristic (`choose_backward`): atomics when duplicates are rare, i.e. the mean
multiplicity B*K/U <= 4 and the hottest row is used <= 64 times (few colliding
adds per address); reverse index otherwise (hot rows repeat a lot). The numbers
are a first guess to be tuned on the GPU; `MEMSTREAM_GATHER_BWD=atomic|reverse`
overrides it.

The naive torch version of the same function is `sparse_gather_ref` in reference.py
beside this file (F.embedding_bag with per_sample_weights). This file is executed twice
in a process that uses both backends: normally for CUDA tensors and as an interpreted
copy for CPU ones (kernels/dispatch.py); module globals such as PIECE exist once per
copy.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels._triton_common import cast_rne

__all__ = ["PIECE", "SparseGather", "choose_backward", "sparse_gather_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_cast = triton.jit(cast_rne)  # decorated here, see kernels/_triton_common.py

# Longest run of sorted positions one program of the segmented sum walks.
PIECE = 256
ATOMIC_MAX_MEAN_DUP = 4.0
ATOMIC_MAX_DUP = 64


def _configs(block_ks, warps):
    if _INTERPRET:  # no timing under the interpreter: one small config
        return [triton.Config({"BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_K": bk}, num_warps=nw) for bk in block_ks for nw in warps]


# ---------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------


@triton.autotune(configs=_configs([16, 32, 64], [2, 4, 8]), key=["K", "D"])
@triton.jit
def _gather_fwd_kernel(
    V,  # (N, D) values, row stride stride_v, unit column stride
    IDX,  # (B, K) int64, contiguous
    W,  # (B, K) weights, contiguous
    OUT,  # (B, D) contiguous, values' dtype
    K,
    D,
    stride_v,
    ACC: tl.constexpr,  # accumulation dtype: fp32 (fp64 only for fp64 values: gradcheck)
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    m_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        m_k = offs_k < K
        rows = tl.load(IDX + b * K + offs_k, mask=m_k, other=0).to(tl.int64)
        w = tl.load(W + b * K + offs_k, mask=m_k, other=0.0).to(ACC)
        v = tl.load(
            V + rows[:, None] * stride_v + offs_d[None, :],
            mask=m_k[:, None] & m_d[None, :],
            other=0.0,
        ).to(ACC)  # (BLOCK_K, BLOCK_D)
        acc += tl.sum(v * w[:, None], axis=0)
    tl.store(OUT + b * D + offs_d, _cast(acc, OUT.dtype.element_ty), mask=m_d)


@triton.autotune(
    # BLOCK_K = 64 spills on sm_90 at D = 128 (tests/kernels/test_kernel_compile_sm90.py)
    configs=_configs([8, 16, 32], [4, 8]),
    key=["K", "D", "COMPUTE_DW", "ATOMIC_DV"],
    reset_to_zero=["DVC"],  # timing runs must not leave their atomic adds behind
)
@triton.jit
def _gather_bwd_rows_kernel(
    V,  # (N, D)
    IDX,  # (B, K) int64
    W,  # (B, K)
    DOUT,  # (B, D) contiguous
    DW,  # (B, K) ACC out (COMPUTE_DW)
    INV,  # (B, K) int64: position of idx[b, j] among the unique rows (ATOMIC_DV)
    DVC,  # (U, D) ACC, zero-initialised compact dV (ATOMIC_DV)
    K,
    D,
    stride_v,
    COMPUTE_DW: tl.constexpr,
    ATOMIC_DV: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: fp32 (fp64 only for fp64 values: gradcheck)
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program per bag b: dw[b, :] and/or the atomic dV contributions of bag b
    b = tl.program_id(0).to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m_k = offs_k < K
        rows = tl.load(IDX + b * K + offs_k, mask=m_k, other=0).to(tl.int64)
        dw = tl.zeros([BLOCK_K], dtype=ACC)
        if ATOMIC_DV:
            w = tl.load(W + b * K + offs_k, mask=m_k, other=0.0).to(ACC)
            inv = tl.load(INV + b * K + offs_k, mask=m_k, other=0).to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m_d = offs_d < D
            m = m_k[:, None] & m_d[None, :]
            g = tl.load(DOUT + b * D + offs_d, mask=m_d, other=0.0).to(ACC)  # (BLOCK_D,)
            if COMPUTE_DW:
                v = tl.load(V + rows[:, None] * stride_v + offs_d[None, :], mask=m, other=0.0)
                dw += tl.sum(v.to(ACC) * g[None, :], axis=1)
            if ATOMIC_DV:
                tl.atomic_add(DVC + inv[:, None] * D + offs_d[None, :], w[:, None] * g[None, :], mask=m)
        if COMPUTE_DW:
            tl.store(DW + b * K + offs_k, dw, mask=m_k)


@triton.autotune(configs=_configs([16, 32, 64], [2, 4, 8]), key=["D"])
@triton.jit
def _segment_sum_kernel(
    SRC,  # (S, D) rows to sum, row stride stride_src
    GROW,  # (P,) int64: source row of sorted position p
    GW,  # (P,) ACC: weight of sorted position p
    START,  # (G,) int64: first sorted position of segment g
    END,  # (G,) int64: one past its last
    OUT,  # (G, D) ACC
    D,
    stride_src,
    ACC: tl.constexpr,  # accumulation dtype: fp32 (fp64 only for fp64 values: gradcheck)
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # OUT[g] = sum_{p in [START[g], END[g])} GW[p] * SRC[GROW[p]]
    g = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    start = tl.load(START + g)
    end = tl.load(END + g)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for p0 in range(start, end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        m_p = offs_p < end
        r = tl.load(GROW + offs_p, mask=m_p, other=0).to(tl.int64)
        gw = tl.load(GW + offs_p, mask=m_p, other=0.0)
        x = tl.load(
            SRC + r[:, None] * stride_src + offs_d[None, :], mask=m_p[:, None] & m_d[None, :], other=0.0
        )
        acc += tl.sum(x.to(ACC) * gw[:, None].to(ACC), axis=0)
    tl.store(OUT + g * D + offs_d, acc, mask=m_d)


# ---------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------


def _acc(values: torch.Tensor):
    """(torch, triton) accumulation dtypes: fp32, or fp64 for fp64 values."""
    if values.dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(D), 256 if not _INTERPRET else 64)


def _forward(values, idx, weights):
    B, K = idx.shape
    D = values.shape[1]
    out = torch.empty((B, D), dtype=values.dtype, device=values.device)
    if B == 0 or D == 0:
        return out
    if K == 0:
        return out.zero_()
    BLOCK_D = _block_d(D)
    grid = (B, triton.cdiv(D, BLOCK_D))
    _gather_fwd_kernel[grid](
        values, idx, weights, out, K, D, values.stride(0), ACC=_acc(values)[1], BLOCK_D=BLOCK_D
    )
    return out


class _ReverseIndex:
    """One stable sort of the flat indices, shared by both backward variants."""

    def __init__(self, flat_idx: torch.Tensor):
        sorted_idx, self.perm = torch.sort(flat_idx, stable=True)  # (B*K,)
        self.uniq, self.inv_sorted, self.counts = torch.unique_consecutive(
            sorted_idx, return_inverse=True, return_counts=True
        )  # (U,), (B*K,), (U,)

    def inverse(self) -> torch.Tensor:  # (B*K,): position of idx[p] in uniq
        return torch.empty_like(self.inv_sorted).scatter_(0, self.perm, self.inv_sorted)


def choose_backward(rev: _ReverseIndex, total: int) -> str:
    forced = os.environ.get("MEMSTREAM_GATHER_BWD", "auto").lower()
    if forced in ("atomic", "reverse"):
        return forced
    u = rev.uniq.numel()
    if u == 0:
        return "reverse"
    mean_dup = total / u
    max_dup = int(rev.counts.max())
    return "atomic" if (mean_dup <= ATOMIC_MAX_MEAN_DUP and max_dup <= ATOMIC_MAX_DUP) else "reverse"


def _segment_sum(src, grow, gw, start, end, D):
    out = torch.empty((start.numel(), D), dtype=gw.dtype, device=src.device)
    if start.numel() == 0:
        return out
    BLOCK_D = _block_d(D)
    grid = (start.numel(), triton.cdiv(D, BLOCK_D))
    acc = tl.float64 if gw.dtype == torch.float64 else tl.float32
    _segment_sum_kernel[grid](src, grow, gw, start, end, out, D, src.stride(0), ACC=acc, BLOCK_D=BLOCK_D)
    return out


def _pieces(starts: torch.Tensor, counts: torch.Tensor, piece: int):
    """Cut segments [starts, starts + counts) into pieces of <= piece positions.

    Returns (piece_start, piece_end, pieces_per_segment)."""
    npieces = (counts + piece - 1) // piece  # (G,)
    total = int(npieces.sum())
    owner = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), npieces, output_size=total
    )
    first = torch.cumsum(npieces, 0) - npieces  # (G,) first piece of each segment
    local = torch.arange(total, device=counts.device) - first[owner]
    pstart = starts[owner] + local * piece
    pend = torch.minimum(pstart + piece, starts[owner] + counts[owner])
    return pstart, pend, npieces


def _dv_reverse(rev: _ReverseIndex, weights, dout, K, D, acc_t, piece=None):
    piece = piece or PIECE  # module global, so tests can shrink it to force several levels
    # level 1: every sorted position p contributes w[perm[p]] * dout[perm[p] // K]
    grow = rev.perm // K  # (B*K,)
    gw = weights.reshape(-1).to(acc_t)[rev.perm]  # (B*K,)
    starts = torch.cumsum(rev.counts, 0) - rev.counts  # (U,)
    pstart, pend, npieces = _pieces(starts, rev.counts, piece)
    part = _segment_sum(dout, grow, gw, pstart, pend, D)  # (P, D) fp32
    # further levels: sum the partial rows of each unique row (pieces are in row order)
    while part.shape[0] != rev.uniq.numel():
        starts = torch.cumsum(npieces, 0) - npieces
        pstart, pend, npieces = _pieces(starts, npieces, piece)
        ones = torch.ones(part.shape[0], dtype=part.dtype, device=part.device)
        ar = torch.arange(part.shape[0], device=part.device)
        part = _segment_sum(part, ar, ones, pstart, pend, D)
    return part  # (U, D) in acc_t


def _backward(values, idx, weights, dout, need_dv, need_dw, variant="auto"):
    B, K = idx.shape
    D = values.shape[1]
    dout = dout.contiguous()
    acc_t, acc_tl = _acc(values)
    dw = torch.zeros((B, K), dtype=acc_t, device=values.device) if need_dw else None
    dvc, rev = None, None
    if B * K == 0 or D == 0:
        if need_dv:
            rev = _ReverseIndex(idx.reshape(-1))
            dvc = torch.zeros((0, D), dtype=acc_t, device=values.device)
        return rev, dvc, dw, "none"
    if need_dv:
        rev = _ReverseIndex(idx.reshape(-1))
        if variant == "auto":
            variant = choose_backward(rev, B * K)
    else:
        variant = "none"
    atomic = variant == "atomic"
    if atomic:
        dvc = torch.zeros((rev.uniq.numel(), D), dtype=acc_t, device=values.device)
        inv = rev.inverse().view(B, K)
    else:
        dvc_dummy = dw if dw is not None else dout  # unused pointers
        inv = idx
    if need_dw or atomic:
        BLOCK_D = _block_d(D)
        _gather_bwd_rows_kernel[(B,)](
            values,
            idx,
            weights,
            dout,
            dw if dw is not None else dout,
            inv,
            dvc if atomic else dvc_dummy,
            K,
            D,
            values.stride(0),
            COMPUTE_DW=need_dw,
            ATOMIC_DV=atomic,
            ACC=acc_tl,
            BLOCK_D=BLOCK_D,
        )
    if need_dv and not atomic:
        dvc = _dv_reverse(rev, weights, dout, K, D, acc_t)
    return rev, dvc, dw, variant


class SparseGather(torch.autograd.Function):
    """Thin wrapper: forward/backward kernels above, sparse COO grad for values."""

    @staticmethod
    def forward(ctx, values, idx, weights, sparse_grad: bool, variant: str):
        idx = idx.contiguous()
        weights = weights.contiguous()
        if values.stride(-1) != 1:
            values = values.contiguous()
        ctx.save_for_backward(values, idx, weights)
        ctx.sparse_grad, ctx.variant = sparse_grad, variant
        return _forward(values, idx, weights)

    @staticmethod
    def backward(ctx, dout):
        values, idx, weights = ctx.saved_tensors
        need_dv, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        rev, dvc, dw, used = _backward(values, idx, weights, dout, need_dv, need_dw, ctx.variant)
        ctx.variant_used = used
        dv = None
        if need_dv:
            N, D = values.shape
            rows = dvc.to(values.dtype)
            if ctx.sparse_grad:
                dv = torch.sparse_coo_tensor(
                    rev.uniq.unsqueeze(0), rows, (N, D), is_coalesced=True, check_invariants=False
                )
            else:
                dv = torch.zeros_like(values).index_copy_(0, rev.uniq, rows)
        if need_dw:
            dw = dw.to(weights.dtype)
        return dv, None, dw, None, None


def sparse_gather_triton(
    values: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = True,
    backward: str = "auto",
) -> torch.Tensor:
    """values (N, D), idx (B, K) int64, weights (B, K) -> (B, D) in values' dtype.

    `backward` in {"auto", "atomic", "reverse"} picks the dV variant (tests, A/B)."""
    assert values.dim() == 2 and idx.dim() == 2 and idx.shape == weights.shape
    return SparseGather.apply(values, idx, weights, sparse_grad, backward)
