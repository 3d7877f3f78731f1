"""Product-key top-k: per head, the k best of the n*n slots scored by two sub-key halves.

    score(i1 * n + i2) = <q1, keys1[i1]> + <q2, keys2[i2]>     q (B, H, dk), keys (H, n, dk)

Selection only (no gradient): the PKM layer reads the chosen scores differentiably from
its own sub-key scores. Triton on CUDA (triton.py: one fused kernel that scores in
registers), torch einsum + topk elsewhere (reference.py); on the torch path the caller
may hand in the sub-key scores it computed anyway, so they are not computed twice.
"""

from __future__ import annotations

import torch

from kernels.dispatch import backend_for, triton_module
from kernels.pkm_topk.reference import pkm_select_ref, pkm_topk_ref

__all__ = ["pkm_select_ref", "pkm_topk", "pkm_topk_ref"]


def pkm_topk(
    q1: torch.Tensor,
    q2: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    k: int,
    scores: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key top-k per head -> (scores (B, H, k), slots (B, H, k)); see `pkm_topk_ref`.

    scores: optional (s1, s2), the (B, H, n) sub-key scores of q1, q2 that the caller
    computed anyway (for the gradient of the chosen scores). The torch path selects from
    them instead of scoring again; the fused Triton kernel scores in registers and
    ignores them.
    """
    if backend_for(q1) == "triton":
        return triton_module("pkm_topk", q1).pkm_topk_triton(q1, q2, keys1, keys2, k)
    if scores is not None:
        return pkm_select_ref(scores[0], scores[1], k)
    return pkm_topk_ref(q1, q2, keys1, keys2, k)
