"""Plain-torch twin of the Triton sparse gather: the CPU path and the tests' ground truth."""

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
