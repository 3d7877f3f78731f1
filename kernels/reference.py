"""Plain-torch references of every kernel in this package, same signatures.

They are the CPU path (CI, laptops) and the ground truth the Triton kernels are
tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_gather_ref(
    values: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, sparse_grad: bool = True
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * values[idx[b, j]].

    values (N, D), idx (B, K) int64, weights (B, K) -> out (B, D) in values' dtype
    (accumulated in fp32 by embedding_bag for bf16 inputs on CUDA). With
    sparse_grad the gradient w.r.t. values is a sparse COO tensor holding only
    the rows used, which the sparse optimizer consumes.
    """
    return F.embedding_bag(
        idx, values, per_sample_weights=weights.to(values.dtype), mode="sum", sparse=sparse_grad
    )


def pkm_topk_ref(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key retrieval per head.

    q1, q2 (B, H, dk): the two query halves; keys1, keys2 (H, n, dk) sub-keys.
    Returns (scores (B, H, k), indices (B, H, k)) with index = i1 * n + i2 into
    the n*n slots, sorted by score descending. Selection only: callers that need
    gradients recompute the scores of the chosen slots differentiably.
    """
    s1 = torch.einsum("bhd,hnd->bhn", q1, keys1)  # (B, H, n)
    s2 = torch.einsum("bhd,hnd->bhn", q2, keys2)  # (B, H, n)
    return pkm_select_ref(s1, s2, k)


def pkm_select_ref(s1: torch.Tensor, s2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection half of `pkm_topk_ref`, from sub-key scores s1, s2 (B, H, n) each."""
    n = s1.shape[-1]
    kk = min(k, n)
    t1, i1 = s1.topk(kk, dim=-1)  # (B, H, kk)
    t2, i2 = s2.topk(kk, dim=-1)  # (B, H, kk)
    pair = t1.unsqueeze(-1) + t2.unsqueeze(-2)  # (B, H, kk, kk)
    best, flat = pair.flatten(-2).topk(k, dim=-1)  # (B, H, k)
    slot = i1.gather(-1, flat // kk) * n + i2.gather(-1, flat % kk)  # (B, H, k)
    return best, slot


def topk_ref(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, sorted descending (reference for the radix select)."""
    return x.topk(k, dim=-1)


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
