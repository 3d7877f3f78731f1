"""Plain-torch twin of the Triton product-key top-k: the CPU path and the tests' ground truth."""

from __future__ import annotations

import torch


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
