"""Sparse-Gather in Triton: forward, backward and the autograd.Function around them.

    out[b] = sum_j w[b, j] * V[idx[b, j]]          V (N, D), idx/w (B, K) -> out (B, D)

K = heads x top-k: any size (it is walked in blocks of BLOCK_K with a mask). V may
be fp32 or bf16; every sum is accumulated in fp32 and rounded once on store.

Backward
    dw[b, j] = <dout[b], V[idx[b, j]]>                                  dense (B, K)
    dV[r]    = sum_{(b, j): idx[b, j] = r} w[b, j] * dout[b]           only the rows used

No host sync: every size in the backward comes from shapes the host knows (E = B*K
positions, N rows), never from the data. dV is produced in S = min(E, N) slots, one
per distinct row in sorted row order; the unique rows U <= S are not counted on the
host, so the S - U slots past the last distinct row are inert: they repeat the last
row with values -0.0 (x + -0.0 == x exactly, for every x). It is handed to autograd as
a sparse COO tensor of S entries, sorted, not coalesced (the inert entries duplicate a
row): coalescing it gives exactly the gradient `F.embedding_bag(sparse=True)` gives,
and the sparse optimizer (SparseRowAdam) sums duplicates without syncing either. Two
ways to compute it, both start from one stable sort of the E indices (positions of a
row stay in (b, j) order), slot bounds by searchsorted over the sorted segment ids:

- "reverse": reverse index. Each slot's segment of sorted positions is cut into pieces
  of at most PIECE positions (a hot row used 100k times becomes many pieces, so no
  program walks a giant segment alone); the piece count is bounded by S + E / PIECE.
  Level 1 sums each piece, sum_p w[p] * dout[p // K], straight into its slot when it
  is its row's only piece, else into a partial row; level 2 sums the partial rows of
  the rows that got several pieces (and writes -0.0 into the inert slots). No atomics,
  a fixed order of every sum: deterministic.
- "atomic": the kernel that computes dw (it reads V[idx] and dout[b] anyway) also
  does tl.atomic_add of w * dout[b] into the (S, D) fp32 buffer at the position's
  slot. One pass less over E*D, but contended atomics serialise on hot rows, and the
  order of the fp32 sums is not fixed.

Choice (`choose_backward`, from shapes only: a look at the multiplicities would be a
sync): "reverse" in deterministic mode (kernels.dispatch.set_deterministic) and when
the mean multiplicity is surely above ATOMIC_MAX_MEAN_DUP (E > ATOMIC_MAX_MEAN_DUP * N);
"atomic" otherwise. Hot rows cannot be seen from shapes: for a skewed access pattern
set `MEMSTREAM_GATHER_BWD=reverse` (or `atomic` to force the other).

Configs: every kernel is autotuned by timing, except in deterministic mode, where each
runs one fixed config per shape (`kernels._triton_common.launch`).

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

from kernels._triton_common import cast_rne, launch
from kernels.dispatch import deterministic

__all__ = ["PIECE", "SparseGather", "choose_backward", "sparse_gather_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_cast = triton.jit(cast_rne)  # decorated here, see kernels/_triton_common.py

# Longest run of sorted positions one program of the level-1 segmented sum walks.
PIECE = 256
ATOMIC_MAX_MEAN_DUP = 4.0


def _configs(block_ks, warps):
    if _INTERPRET:  # no timing under the interpreter: one small config
        return [triton.Config({"BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_K": bk}, num_warps=nw) for bk in block_ks for nw in warps]


def _fixed(block_k: int, warps: int = 4) -> triton.Config:
    """The one config of deterministic mode (the interpreter's own under TRITON_INTERPRET)."""
    return _configs([block_k], [warps])[0]


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
    restore_value=["DVC"],  # timing runs must not leave their atomic adds behind
)
@triton.jit
def _gather_bwd_rows_kernel(
    V,  # (N, D)
    IDX,  # (B, K) int64
    W,  # (B, K)
    DOUT,  # (B, D) contiguous
    DW,  # (B, K) ACC out (COMPUTE_DW)
    INV,  # (B, K) int64: slot of idx[b, j] among the sorted distinct rows (ATOMIC_DV)
    DVC,  # (S, D) ACC, -0.0-initialised dV slots (ATOMIC_DV)
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


@triton.autotune(configs=_configs([16, 32, 64], [2, 4, 8]), key=["D", "SPLIT", "SKIP_SINGLE"])
@triton.jit
def _segment_sum_kernel(
    SRC,  # (R, D) rows to sum, row stride stride_src
    GROW,  # (P,) int64: source row of sorted position p
    GW,  # (P,) ACC: weight of sorted position p
    START,  # (G,) int64: first sorted position of segment g
    END,  # (G,) int64: one past its last
    OUT,  # (S, D) ACC: the slots
    PART,  # (G, D) ACC: partial rows (SPLIT)
    DEST,  # (G,) int64: slot of segment g when it is its row's only piece, else -1 (SPLIT)
    D,
    stride_src,
    SPLIT: tl.constexpr,  # level 1: store into OUT[DEST[g]] or, when DEST[g] < 0, PART[g]
    SKIP_SINGLE: tl.constexpr,  # level 2: a segment of one partial row was stored by level 1
    ACC: tl.constexpr,  # accumulation dtype: fp32 (fp64 only for fp64 values: gradcheck)
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # sum_{p in [START[g], END[g])} GW[p] * SRC[GROW[p]], from -0.0: an empty segment (an
    # inert slot) stores -0.0, and -0.0 + x == x keeps every other sum exact
    g = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = offs_d < D
    start = tl.load(START + g)
    end = tl.load(END + g)
    work = end >= start  # always: a segment ends at or after its start
    if SKIP_SINGLE:
        work = end - start != 1
    if work:
        acc = tl.full([BLOCK_D], -0.0, dtype=ACC)
        for p0 in range(start, end, BLOCK_K):
            offs_p = p0 + tl.arange(0, BLOCK_K)
            m_p = offs_p < end
            r = tl.load(GROW + offs_p, mask=m_p, other=0).to(tl.int64)
            gw = tl.load(GW + offs_p, mask=m_p, other=0.0)
            x = tl.load(
                SRC + r[:, None] * stride_src + offs_d[None, :], mask=m_p[:, None] & m_d[None, :], other=0.0
            )
            acc += tl.sum(x.to(ACC) * gw[:, None].to(ACC), axis=0)
        if SPLIT:
            dest = tl.load(DEST + g)
            if dest >= 0:
                tl.store(OUT + dest * D + offs_d, acc, mask=m_d)
            else:
                tl.store(PART + g * D + offs_d, acc, mask=m_d)
        else:
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
    launch(
        _gather_fwd_kernel,
        grid,
        values,
        idx,
        weights,
        out,
        K,
        D,
        values.stride(0),
        ACC=_acc(values)[1],
        BLOCK_D=BLOCK_D,
        fixed=_fixed(32 if K >= 32 else 16),
    )
    return out


class _SortedIndex:
    """One stable sort of the E flat indices and the slots of their distinct rows.

    Every tensor has a size the host knows (E, or S = min(E, N) slots): slot g < U holds
    the g-th distinct row, the others are inert (start = end = E, row = the last row).
    """

    def __init__(self, flat_idx: torch.Tensor, num_rows: int):
        E = flat_idx.numel()
        self.positions, self.slots = E, min(E, num_rows)
        sorted_idx, self.perm = torch.sort(flat_idx, stable=True)  # (E,)
        first = torch.ones(E, dtype=torch.bool, device=flat_idx.device)
        first[1:] = sorted_idx[1:] != sorted_idx[:-1]
        self.slot_sorted = torch.cumsum(first, 0) - 1  # (E,) slot of sorted position p
        ids = torch.arange(self.slots, device=flat_idx.device)
        self.start = torch.searchsorted(self.slot_sorted, ids)  # (S,); E for an inert slot
        self.end = torch.searchsorted(self.slot_sorted, ids, right=True)  # (S,)
        self.rows = sorted_idx[self.start.clamp(max=max(E - 1, 0))]  # (S,) sorted, inert = last

    def inverse(self) -> torch.Tensor:  # (E,): slot of idx[p]
        return torch.empty_like(self.slot_sorted).scatter_(0, self.perm, self.slot_sorted)


def choose_backward(total: int, num_rows: int) -> str:
    """The dV variant for E = `total` positions into `num_rows` rows, from shapes only."""
    forced = os.environ.get("MEMSTREAM_GATHER_BWD", "auto").lower()
    if forced in ("atomic", "reverse"):
        return forced
    if deterministic() or total > ATOMIC_MAX_MEAN_DUP * num_rows:
        return "reverse"
    return "atomic"


def _segment_sum(src, grow, gw, start, end, out, D, part=None, dest=None, skip_single=False):
    """out (or part) rows = the weighted segment sums, one program per (segment, D block)."""
    G = start.numel()
    if G == 0:
        return
    BLOCK_D = _block_d(D)
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    split = part is not None
    launch(
        _segment_sum_kernel,
        (G, triton.cdiv(D, BLOCK_D)),
        src,
        grow,
        gw,
        start,
        end,
        out,
        part if split else out,
        dest if split else start,
        D,
        src.stride(0),
        SPLIT=split,
        SKIP_SINGLE=skip_single,
        ACC=acc,
        BLOCK_D=BLOCK_D,
        fixed=_fixed(32),
    )


def _pieces(start: torch.Tensor, end: torch.Tensor, positions: int, piece: int):
    """Cut the slots' segments [start, end) of sorted positions into pieces of <= piece.

    Returns (piece_start, piece_end, piece_slot, first_piece, pieces) with P = S +
    cdiv(positions, piece) pieces (a bound: sum ceil(c / piece) <= U + positions / piece);
    the pieces past the real ones are empty and belong to no slot (piece_slot = -1)."""
    S = start.numel()
    P = S + triton.cdiv(positions, piece)
    counts = end - start  # (S,)
    pieces = (counts + piece - 1) // piece  # (S,)
    last = torch.cumsum(pieces, 0)  # (S,) one past the last piece of each slot
    first = last - pieces
    q = torch.arange(P, device=start.device)
    owner = torch.searchsorted(last, q, right=True)  # (P,) slot of piece q; S past the real ones
    real = owner < S
    owner_c = owner.clamp(max=S - 1)
    pstart = start[owner_c] + (q - first[owner_c]) * piece
    pend = torch.minimum(pstart + piece, end[owner_c])
    pstart, pend = torch.where(real, pstart, 0), torch.where(real, pend, 0)
    return pstart, pend, torch.where(real, owner_c, -1), first, pieces


def _dv_reverse(rev: _SortedIndex, weights, dout, K, D, acc_t, piece=None):
    piece = piece or PIECE  # module global, so tests can shrink it to force many pieces
    dev = dout.device
    out = torch.empty((rev.slots, D), dtype=acc_t, device=dev)
    # level 1: every sorted position p contributes w[perm[p]] * dout[perm[p] // K]
    grow = rev.perm // K  # (E,)
    gw = weights.reshape(-1).to(acc_t)[rev.perm]  # (E,)
    pstart, pend, pslot, first, pieces = _pieces(rev.start, rev.end, rev.positions, piece)
    alone = pslot >= 0
    alone &= pieces[pslot.clamp(min=0)] == 1
    dest = torch.where(alone, pslot, -1)  # (P,) a row's only piece goes straight to its slot
    part = torch.empty((pstart.numel(), D), dtype=acc_t, device=dev)
    _segment_sum(dout, grow, gw, pstart, pend, out, D, part=part, dest=dest)
    # level 2: rows of several pieces sum their partial rows (contiguous, in piece order);
    # inert slots (no piece) store -0.0; rows of one piece were stored by level 1
    ar = torch.arange(part.shape[0], device=dev)
    ones = torch.ones(part.shape[0], dtype=acc_t, device=dev)
    _segment_sum(part, ar, ones, first, first + pieces, out, D, skip_single=True)
    return out  # (S, D) in acc_t


def _backward(values, idx, weights, dout, need_dv, need_dw, variant="auto"):
    B, K = idx.shape
    N, D = values.shape
    dout = dout.contiguous()
    acc_t, acc_tl = _acc(values)
    dw = torch.zeros((B, K), dtype=acc_t, device=values.device) if need_dw else None
    dvc, rev = None, None
    if need_dv:
        rev = _SortedIndex(idx.reshape(-1), N)
    if B * K == 0 or D == 0:
        if need_dv:
            dvc = torch.full((rev.slots, D), -0.0, dtype=acc_t, device=values.device)
        return rev, dvc, dw, "none"
    if need_dv:
        if variant == "auto":
            variant = choose_backward(B * K, N)
    else:
        variant = "none"
    atomic = variant == "atomic"
    if atomic:
        dvc = torch.full((rev.slots, D), -0.0, dtype=acc_t, device=values.device)
        inv = rev.inverse().view(B, K)
    else:
        dvc_dummy = dw if dw is not None else dout  # unused pointers
        inv = idx
    if need_dw or atomic:
        BLOCK_D = _block_d(D)
        launch(
            _gather_bwd_rows_kernel,
            (B,),
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
            fixed=_fixed(16),
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
            if ctx.sparse_grad:  # S entries, sorted; inert ones repeat the last row with -0.0
                dv = torch.sparse_coo_tensor(
                    rev.rows.unsqueeze(0), rows, (N, D), is_coalesced=False, check_invariants=False
                )
            else:  # an add, not a copy: inert slots add -0.0 to their row, a no-op
                dv = torch.zeros_like(values).index_add_(0, rev.rows, rows)
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
