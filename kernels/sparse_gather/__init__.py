"""Sparse-Gather (MSN value read): a weighted embedding bag with a sparse values gradient.

    out[b] = sum_j weights[b, j] * values[idx[b, j]]     values (N, D), idx/weights (B, K) -> (B, D)

The PKM layer reads its values with it (K = heads x top-k); the values' gradient is a
sparse COO tensor holding only the rows used, for the sparse optimizer. Triton on CUDA
(triton.py: forward, dw and two dV variants, an autograd.Function), F.embedding_bag
elsewhere (reference.py).
"""

from __future__ import annotations

import torch

from kernels.dispatch import backend_for, triton_module
from kernels.sparse_gather.reference import sparse_gather_ref

__all__ = ["sparse_gather", "sparse_gather_ref"]


def sparse_gather(
    values: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, sparse_grad: bool = True
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * values[idx[b, j]]; see `sparse_gather_ref`."""
    if backend_for(values) == "triton":
        return triton_module("sparse_gather", values).sparse_gather_triton(values, idx, weights, sparse_grad)
    return sparse_gather_ref(values, idx, weights, sparse_grad)
