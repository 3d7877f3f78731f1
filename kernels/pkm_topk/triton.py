"""Product-key top-k in Triton (fused), and the row top-k its large-k path needs.

Tie rule (every path here): results are sorted by value descending, and among
equal values the smaller index comes first. Each candidate is packed into one
int64, `order_key(value) << 32 | (2^32 - 1 - index)`, where order_key maps the fp32
bits to an int32 whose signed order is the float order (-0.0 is folded into +0.0),
so a descending sort of the packed words is exactly (value desc, index asc).
torch.topk does not promise any order among ties; tests compare values exactly
and indices as sets where values tie. NaN inputs are not supported.

1. `pkm_topk_triton(q1, q2, keys1, keys2, k)`: same contract as `pkm_topk_ref`
   (reference.py beside this file). One program per (block of BLOCK_B queries, head):
   - per half: scores q (BLOCK_B, dk) x keys^T (dk, BLOCK_N) chunk by chunk over the
     n sub-keys (tl.dot, fp32 "ieee" so it matches the fp32 reference), each chunk
     reduced to its top KP (bitonic top-k of the packed words, `_bitonic_topk`) and
     merged into a running top KP; the (BLOCK_B, n) score matrix never reaches memory.
   - combine: both halves are sorted, so pair (i, j) can be in the top k only if
     (i + 1) * (j + 1) <= k (at least that many pairs beat or tie it). Only that
     "staircase" (119 pairs for k = 32, instead of 1024) is gathered, packed with
     its slot i1 * n + i2 and sorted; the first k are the result.
   Used when next_pow2(min(k, n)) <= FUSED_MAX_KP = 128 (the running top-KP lives in
   registers); beyond that `_pkm_topk_unfused`: torch scores, then `_row_topk` on each
   half and on the kk*kk pair sums.
2. `_row_topk(x, k)`: top-k along the last dim, torch.topk's contract plus the tie rule.
   Private: it exists for the large-k PKM path above, not as an op of its own. By row
   length (`_choose_row_topk`):
   - short rows (L <= 8192 and k <= 128): "stream": one program per row walks the row
     in chunks, top-KP of each chunk by the bitonic network merged into a running
     top-KP.
   - long rows (or larger k, up to 2048): "radix", in the spirit of AIR Top-K
     (NVIDIA, SC'23): the fp32 bits mapped to order-preserving uint32, 4 passes of
     8-bit digits from the top. Each pass builds the histogram of the current digit
     over the candidates (tl.histogram), a suffix sum over the 256 bins finds the
     digit of the k-th largest, and the candidates whose prefix matches are
     compacted (cumsum positions) into a buffer that the next pass reads; the filter
     of pass p is fused into the histogram loop of pass p + 1, as in AIR. After the
     last pass the k-th key is known exactly; a final pass takes every element
     above it plus the first (by index) ties, and a bitonic sort of those k orders
     them. Unlike AIR, one program owns one row (no multi-block rows, no early
     stop, buffers sized to the row); that is fine for many rows, not for a single
     huge row.
   - k > 2048: torch.topk.

Configs: the fused kernel is autotuned by timing, except in deterministic mode
(kernels.dispatch.set_deterministic), where it runs one fixed config per shape; the
row top-k kernels take fixed configs always. No host sync anywhere here.

Like every kernels/<op>/triton.py, this file is executed once per backend in use:
normally for CUDA tensors, and as an interpreted copy for CPU ones (kernels/dispatch.py).
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl

from kernels._triton_common import cast_rne, launch
from kernels.pkm_topk.reference import pkm_topk_ref

__all__ = ["pkm_topk_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_cast = triton.jit(cast_rne)  # decorated here, see kernels/_triton_common.py

STREAM_MAX_LEN = 8192
STREAM_MAX_K = 128
RADIX_MAX_K = 2048
FUSED_MAX_KP = 128


# ---------------------------------------------------------------------------------
# packing helpers (jit)
# ---------------------------------------------------------------------------------


@triton.jit
def _order_key(x):
    # fp32 -> int32 with the same order (signed compare); -0.0 folded into +0.0
    i = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(i < 0, i ^ 0x7FFFFFFF, i)


@triton.jit
def _key_to_f32(key):
    i = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return i.to(tl.float32, bitcast=True)


@triton.jit
def _pack_key(key, idx):
    # key: int32 order key; (key desc, index asc) == descending order of the int64
    low = tl.full([], 0xFFFFFFFF, tl.int64)
    return (key.to(tl.int64) << 32) | (low - idx.to(tl.int64))


@triton.jit
def _pack(x, idx):
    return _pack_key(_order_key(x.to(tl.float32)), idx)


@triton.jit
def _pack_empty(shape: tl.constexpr):
    # (-inf, index 2^32 - 1): loses to every real candidate
    return _pack(tl.full(shape, float("-inf"), tl.float32), tl.full(shape, 0xFFFFFFFF, tl.int64))


@triton.jit
def _unpack(p):
    low = tl.full([], 0xFFFFFFFF, tl.int64)
    key = (p >> 32).to(tl.int32)
    idx = low - (p & low)
    return _key_to_f32(key), idx


# Bitonic top-k / sort of packed int64 along the last dim: triton's own `tl.topk` /
# `tl.sort` algorithm (language/standard.py, MIT licence), with one change: the partner
# of an element along a hypercube axis of size 2 is found as `sum(pair) - x` (add
# reduce, wraps like two's complement) instead of `x ^ xor_sum(pair)`. Same cost when
# compiled, but the interpreter runs sum in numpy while xor_sum goes through its
# per-element Python reduce: that is what keeps the CPU tests fast.


@triton.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    ar = tl.arange(0, 2)
    return tl.reshape(ar, [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(x, flip, i: tl.constexpr):
    n_dims: tl.constexpr = _log2(x.numel)
    y = tl.sum(x, axis=n_dims - 1 - i, keep_dims=True) - x  # partner along axis i
    is_right = _indicator(n_dims, i)
    return tl.where((x > y) != (flip ^ is_right).to(tl.int1), y, x)


@triton.jit
def _bitonic_merge(x, stage: tl.constexpr, order: tl.constexpr):
    # order 0: ascending, 1: descending, 2: alternating
    if order == 2:
        flip = _indicator(_log2(x.numel), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        x = _compare_and_swap(x, flip, stage - 1 - i)
    return x


@triton.jit
def _bitonic_topk(x, k: tl.constexpr):
    # x (..., M) int64, M and k powers of two -> (..., k): the k largest, descending
    log_n: tl.constexpr = _log2(x.shape[len(x.shape) - 1])
    log_k: tl.constexpr = _log2(k)
    n_dims: tl.constexpr = _log2(x.numel)
    if log_k == 0:
        out = tl.max(x, axis=len(x.shape) - 1, keep_dims=True)
    else:
        h = tl.reshape(x, [2] * n_dims)
        for i in tl.static_range(1, log_k + 1):
            h = _bitonic_merge(h, i, 2 if i < log_n else 1)
        for i in tl.static_range(log_k + 1, log_n + 1):
            h = tl.max(h, axis=(_log2(h.numel) - 1 - log_k))
            h = _bitonic_merge(h, log_k, 2 if i < log_n else 1)
        out = tl.reshape(h, x.shape[:-1] + [k])
    return out


@triton.jit
def _merge_top(run, chunk, KP: tl.constexpr):
    # run (R, KP), chunk (R, KP) packed -> top KP of both, sorted descending
    both = tl.reshape(tl.join(run, chunk), [run.shape[0], 2 * KP])
    return _bitonic_topk(both, KP)


# ---------------------------------------------------------------------------------
# fused product-key top-k
# ---------------------------------------------------------------------------------


@triton.jit
def _half_topk(
    q,
    KEYS,
    n,
    dk,
    offs_dk,
    m_dk,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KP: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    # q (BLOCK_B, BLOCK_DK) fp32; KEYS: this head's (n, dk) sub-keys -> packed top KP
    run = _pack_empty([BLOCK_B, KP])
    for n0 in range(0, n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m_n = offs_n < n
        keys = tl.load(
            KEYS + offs_n[:, None] * dk + offs_dk[None, :], mask=m_n[:, None] & m_dk[None, :], other=0.0
        ).to(tl.float32)  # (BLOCK_N, BLOCK_DK)
        if USE_DOT:
            s = tl.dot(q, tl.trans(keys), input_precision="ieee")  # (BLOCK_B, BLOCK_N)
        else:
            s = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)
        s = tl.where(m_n[None, :], s, float("-inf"))
        p = _pack(s, tl.broadcast_to(offs_n[None, :], [BLOCK_B, BLOCK_N]))
        if BLOCK_N > KP:
            p = _bitonic_topk(p, KP)
        run = _merge_top(run, p, KP)
    return run


def _pkm_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_B": 16, "BLOCK_N": 64}, num_warps=4)]
    # BLOCK_B = 16: the smallest tl.dot M. Compiled for sm_90 at KP = 32, dk = 64:
    # (64, 4 warps) 230 regs, (64, 8) 128, (128, 8) 218, no spills; BLOCK_B = 32,
    # (128, 4 warps) and BLOCK_N = 256 spill (1.3-3 KB of stack), so they are left out.
    return [
        triton.Config({"BLOCK_B": 16, "BLOCK_N": bn}, num_warps=nw) for bn, nw in ((64, 4), (64, 8), (128, 8))
    ]


def _prune_pkm(configs, named_args, **kwargs):
    # a chunk must hold at least KP candidates; keep one config whatever KP is
    kp = kwargs["KP"]
    ok = [c for c in configs if c.kwargs["BLOCK_N"] >= kp]
    if ok:
        return ok
    c = configs[0]
    return [triton.Config({**c.kwargs, "BLOCK_N": kp}, num_warps=c.num_warps)]


@triton.autotune(
    configs=_pkm_configs(), key=["n", "dk", "k", "KP"], prune_configs_by={"early_config_prune": _prune_pkm}
)
@triton.jit
def _pkm_topk_kernel(
    Q1,
    Q2,  # (B, H, dk) contiguous
    K1,
    K2,  # (H, n, dk) contiguous
    CI,
    CJ,  # (C,) int32: staircase pairs (i, j) with (i + 1) * (j + 1) <= k, padded with -1
    OUT_S,  # (B, H, k) scores, q's dtype
    OUT_I,  # (B, H, k) int64 slots
    B,
    H,
    n,
    dk,
    k,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    KP: tl.constexpr,
    C: tl.constexpr,
    KF: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid_b = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # (BLOCK_B,)
    m_b = offs_b < B
    offs_dk = tl.arange(0, BLOCK_DK)
    m_dk = offs_dk < dk
    q_off = (offs_b[:, None] * H + h) * dk + offs_dk[None, :]
    m_q = m_b[:, None] & m_dk[None, :]
    q1 = tl.load(Q1 + q_off, mask=m_q, other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_DK)
    q2 = tl.load(Q2 + q_off, mask=m_q, other=0.0).to(tl.float32)
    t1 = _half_topk(q1, K1 + h * n * dk, n, dk, offs_dk, m_dk, BLOCK_B, BLOCK_N, KP, USE_DOT)
    t2 = _half_topk(q2, K2 + h * n * dk, n, dk, offs_dk, m_dk, BLOCK_B, BLOCK_N, KP, USE_DOT)
    v1, i1 = _unpack(t1)  # (BLOCK_B, KP) each, sorted descending
    v2, i2 = _unpack(t2)
    # staircase candidates
    ci = tl.load(CI + tl.arange(0, C))  # (C,)
    cj = tl.load(CJ + tl.arange(0, C))
    valid = ci >= 0
    gi = tl.broadcast_to(tl.where(valid, ci, 0)[None, :], [BLOCK_B, C])
    gj = tl.broadcast_to(tl.where(valid, cj, 0)[None, :], [BLOCK_B, C])
    pv = tl.gather(v1, gi, axis=1) + tl.gather(v2, gj, axis=1)  # (BLOCK_B, C)
    pi1 = tl.gather(i1, gi, axis=1)
    pi2 = tl.gather(i2, gj, axis=1)
    ok = valid[None, :] & (pi1 < n) & (pi2 < n)
    slot = tl.where(ok, pi1 * n + pi2, 0)
    pv = tl.where(ok, pv, float("-inf"))
    best = _bitonic_topk(_pack(pv, slot), KF)  # (BLOCK_B, KF)
    bv, bslot = _unpack(best)
    offs_k = tl.arange(0, KF)
    o_off = (offs_b[:, None] * H + h) * k + offs_k[None, :]
    m_o = m_b[:, None] & (offs_k[None, :] < k)
    tl.store(OUT_S + o_off, _cast(bv, OUT_S.dtype.element_ty), mask=m_o)
    tl.store(OUT_I + o_off, bslot, mask=m_o)


@cache
def _staircase(k: int, kk: int):
    """Pairs (i, j), i, j < kk, with (i + 1) * (j + 1) <= k, padded to a power of two."""
    pairs = [(i, j) for i in range(kk) for j in range(kk) if (i + 1) * (j + 1) <= k]
    c = max(triton.next_power_of_2(len(pairs)), triton.next_power_of_2(k))
    ci = [p[0] for p in pairs] + [-1] * (c - len(pairs))
    cj = [p[1] for p in pairs] + [-1] * (c - len(pairs))
    return ci, cj, c


_STAIRCASES: dict = {}


def _staircase_on(k: int, kk: int, device):
    """The staircase tables as int32 tensors on `device`, built once (no copy per call)."""
    key = (k, kk, str(device))
    if key not in _STAIRCASES:
        ci, cj, c = _staircase(k, kk)
        _STAIRCASES[key] = (
            torch.tensor(ci, dtype=torch.int32, device=device),
            torch.tensor(cj, dtype=torch.int32, device=device),
            c,
        )
    return _STAIRCASES[key]


def pkm_topk_triton(q1, q2, keys1, keys2, k: int):
    """q1, q2 (B, H, dk), keys1, keys2 (H, n, dk) -> (scores (B, H, k), slots (B, H, k))."""
    B, H, dk = q1.shape
    n = keys1.shape[1]
    kk = min(k, n)
    assert 1 <= k <= kk * kk, "k must be in [1, min(k, n)^2]"
    assert n * n < 2**32, "slots must fit in 32 bits"
    KP = triton.next_power_of_2(kk)
    if q1.dtype == torch.float64:  # the kernels score in fp32
        return pkm_topk_ref(q1, q2, keys1, keys2, k)
    if KP > FUSED_MAX_KP:
        return _pkm_topk_unfused(q1, q2, keys1, keys2, k)
    q1, q2 = q1.contiguous(), q2.contiguous()
    keys1, keys2 = keys1.contiguous(), keys2.contiguous()
    scores = torch.empty((B, H, k), dtype=q1.dtype, device=q1.device)
    slots = torch.empty((B, H, k), dtype=torch.int64, device=q1.device)
    if B == 0 or H == 0:
        return scores, slots
    ci_t, cj_t, C = _staircase_on(k, kk, q1.device)
    BLOCK_DK = max(triton.next_power_of_2(dk), 16)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), H)
    launch(
        _pkm_topk_kernel,
        grid,
        q1,
        q2,
        keys1,
        keys2,
        ci_t,
        cj_t,
        scores,
        slots,
        B,
        H,
        n,
        dk,
        k,
        BLOCK_DK=BLOCK_DK,
        KP=KP,
        C=C,
        KF=triton.next_power_of_2(k),
        USE_DOT=True,
        # deterministic mode: the first config that fits KP (the selection is exact
        # either way; fixed block sizes also fix the order of the fp32 score sums)
        fixed=_prune_pkm(_pkm_configs(), None, KP=KP)[0],
    )
    return scores, slots


def _pkm_topk_unfused(q1, q2, keys1, keys2, k: int):
    # large k: scores by GEMM, row top-k by _row_topk, then the kk*kk combine in torch
    n = keys1.shape[1]
    kk = min(k, n)
    s1 = torch.einsum("bhd,hnd->bhn", q1, keys1)  # (B, H, n)
    s2 = torch.einsum("bhd,hnd->bhn", q2, keys2)  # (B, H, n)
    t1, i1 = _row_topk(s1, kk)  # (B, H, kk)
    t2, i2 = _row_topk(s2, kk)  # (B, H, kk)
    pair = (t1.unsqueeze(-1) + t2.unsqueeze(-2)).flatten(-2)  # (B, H, kk*kk)
    best, flat = _row_topk(pair, k)  # (B, H, k)
    slot = i1.gather(-1, flat // kk) * n + i2.gather(-1, flat % kk)  # (B, H, k)
    return best, slot


# ---------------------------------------------------------------------------------
# row top-k (private, for _pkm_topk_unfused): streaming path (short rows)
# ---------------------------------------------------------------------------------


@triton.jit
def _topk_stream_kernel(X, OUT_V, OUT_I, L, k, stride_x, BLOCK: tl.constexpr, KP: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    run = _pack_empty([1, KP])
    for c0 in range(0, L, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = offs < L
        x = tl.load(X + r * stride_x + offs, mask=m, other=float("-inf")).to(tl.float32)
        p = tl.reshape(_pack(x, offs), [1, BLOCK])
        if BLOCK > KP:
            p = _bitonic_topk(p, KP)
        run = _merge_top(run, p, KP)
    v, i = _unpack(tl.reshape(run, [KP]))
    offs_k = tl.arange(0, KP)
    tl.store(OUT_V + r * k + offs_k, _cast(v, OUT_V.dtype.element_ty), mask=offs_k < k)
    tl.store(OUT_I + r * k + offs_k, i, mask=offs_k < k)


# ---------------------------------------------------------------------------------
# row top-k (private, for _pkm_topk_unfused): radix select (long rows), AIR Top-K style
# ---------------------------------------------------------------------------------


@triton.jit
def _ukey(key):
    # int32 order key -> uint32 with the same order under unsigned compare (digits)
    return (key ^ -0x80000000).to(tl.uint32, bitcast=True)


@triton.jit
def _select_digit(hist, k_rem, NB: tl.constexpr):
    # hist (NB,) int32 counts per digit; find the digit d holding the k_rem-th largest,
    # and how many candidates have a larger digit.
    bins = tl.arange(0, NB)
    cs = tl.cumsum(hist, 0)
    ge = tl.sum(hist, 0) - cs + hist  # (NB,) count with digit >= bin
    d = tl.max(tl.where(ge >= k_rem, bins, -1), 0)
    above = tl.sum(tl.where(bins == d, ge - hist, 0), 0)
    return d, above


@triton.jit
def _topk_radix_kernel(
    X,  # (R, L) rows, row stride stride_x
    OUT_V,
    OUT_I,  # (R, k)
    BUF_K,
    BUF_I,  # (2, R, L) int32 scratch: candidate order keys and indices
    R,
    L,
    k,
    stride_x,
    BLOCK: tl.constexpr,
    KF: tl.constexpr,
    BITS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    NB: tl.constexpr = 1 << BITS
    NPASS: tl.constexpr = 32 // BITS
    DMASK: tl.constexpr = NB - 1
    row = X + r * stride_x
    k_rem = k
    prefix = tl.zeros([], dtype=tl.uint32)  # digits of the k-th key found so far
    cnt = L  # candidates entering the pass (rows for passes 0 and 1)
    for p in tl.static_range(NPASS):
        shift = 32 - BITS * (p + 1)  # (constexprs, recomputed per unrolled pass)
        src_buf = (p - 2) % 2  # buffer read by pass p >= 2
        dst_buf = (p - 1) % 2  # buffer written by pass 1 <= p < NPASS - 1
        hist = tl.zeros([NB], dtype=tl.int32)
        n_src = cnt
        new_cnt = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, n_src, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            m = offs < n_src
            if p <= 1:
                key = _order_key(tl.load(row + offs, mask=m, other=0.0).to(tl.float32))
                ii = offs
            else:
                base = (src_buf * R + r) * L
                key = tl.load(BUF_K + base + offs, mask=m, other=0)
                ii = tl.load(BUF_I + base + offs, mask=m, other=0)
            u = _ukey(key)
            if p == 0:
                keep = m
            else:
                # filter of the previous pass, fused into this pass's histogram
                keep = m & ((u >> (shift + BITS)) == prefix)
                if p < NPASS - 1:
                    pos = new_cnt + tl.cumsum(keep.to(tl.int32), 0) - 1
                    dbase = (dst_buf * R + r) * L
                    tl.store(BUF_K + dbase + pos, key, mask=keep)
                    tl.store(BUF_I + dbase + pos, ii.to(tl.int32), mask=keep)
                    new_cnt += tl.sum(keep.to(tl.int32), 0)
            digit = ((u >> shift) & DMASK).to(tl.int32)
            hist += tl.histogram(digit, NB, mask=keep)
        d, above = _select_digit(hist, k_rem, NB)
        k_rem -= above
        prefix = (prefix << BITS) | d.to(tl.uint32)
        if p >= 1:
            cnt = new_cnt
    # prefix is now the full key of the k-th largest; k_rem of its ties are taken
    kth = prefix
    out_cnt = tl.zeros([], dtype=tl.int32)
    eq_seen = tl.zeros([], dtype=tl.int32)
    obase = r * L  # buffer 0 holds the k winners, in index order
    for c0 in range(0, L, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = offs < L
        key = _order_key(tl.load(row + offs, mask=m, other=0.0).to(tl.float32))
        u = _ukey(key)
        eq = m & (u == kth)
        eq_rank = eq_seen + tl.cumsum(eq.to(tl.int32), 0)
        sel = (m & (u > kth)) | (eq & (eq_rank <= k_rem))
        pos = out_cnt + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(BUF_K + obase + pos, key, mask=sel)
        tl.store(BUF_I + obase + pos, offs.to(tl.int32), mask=sel)
        out_cnt += tl.sum(sel.to(tl.int32), 0)
        eq_seen += tl.sum(eq.to(tl.int32), 0)
    offs_k = tl.arange(0, KF)
    m_k = offs_k < k
    key = tl.load(BUF_K + obase + offs_k, mask=m_k, other=0)
    ii = tl.load(BUF_I + obase + offs_k, mask=m_k, other=0)
    packed = tl.where(m_k, _pack_key(key, ii), _pack_empty([KF]))
    v, i = _unpack(_bitonic_topk(packed, KF))
    tl.store(OUT_V + r * k + offs_k, _cast(v, OUT_V.dtype.element_ty), mask=m_k)
    tl.store(OUT_I + r * k + offs_k, i, mask=m_k)


def _choose_row_topk(L: int, k: int) -> str:
    if k <= STREAM_MAX_K and L <= STREAM_MAX_LEN:
        return "stream"
    if k <= RADIX_MAX_K:
        return "radix"
    return "torch"


def _row_topk(x: torch.Tensor, k: int, method: str = "auto"):
    """x (..., L) -> (values (..., k), indices (..., k) int64), sorted descending, tie rule above.

    method: "auto" (`_choose_row_topk`), "stream", "radix" or "torch" (tests, A/B)."""
    L = x.shape[-1]
    assert 0 <= k <= L, "k must be <= the row length"
    lead = x.shape[:-1]
    if method == "auto":
        method = _choose_row_topk(L, k)
    if method == "torch" or x.dtype == torch.float64:
        return x.topk(k, dim=-1)
    assert L < 2**31
    x2 = x.reshape(-1, L)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    R = x2.shape[0]
    vals = torch.empty((R, k), dtype=x.dtype, device=x.device)
    idx = torch.empty((R, k), dtype=torch.int64, device=x.device)
    if R == 0 or k == 0:
        return vals.reshape(*lead, k), idx.reshape(*lead, k)
    if method == "stream":
        KP = triton.next_power_of_2(k)
        BLOCK = max(KP, min(triton.next_power_of_2(L), 256 if _INTERPRET else 1024))
        _topk_stream_kernel[(R,)](x2, vals, idx, L, k, x2.stride(0), BLOCK=BLOCK, KP=KP, num_warps=4)
    elif method == "radix":
        buf_k = torch.empty((2, R, L), dtype=torch.int32, device=x.device)
        buf_i = torch.empty((2, R, L), dtype=torch.int32, device=x.device)
        BLOCK = min(triton.next_power_of_2(L), 512 if _INTERPRET else 2048)
        _topk_radix_kernel[(R,)](
            x2,
            vals,
            idx,
            buf_k,
            buf_i,
            R,
            L,
            k,
            x2.stride(0),
            BLOCK=BLOCK,
            KF=triton.next_power_of_2(k),
            BITS=8,
            num_warps=8,
        )
    else:
        raise ValueError(method)
    return vals.reshape(*lead, k), idx.reshape(*lead, k)
