"""LMN user memory: one large product-key memory shared by all users.

Large Memory Network compresses user behaviour into one memory block (16K..1M
slots) addressed with product keys: a user-aware query (built by the model from
user features) picks top-k on each sub-key axis, then top-k of the k*k pairs, and
reads a softmax-weighted sum of value rows. A memory loss writes behaviour into
the memory: the read must reconstruct a (detached) summary of the user's recent
history, supplied by the caller; it trains jointly with the ranking loss. Values
are sparse parameters (only touched rows change per step, `SparseRowAdam` with
lr=cfg.value_lr). Slots take long to fill, so per-slot hit counts are reported and
the memory warm-starts from checkpoints (export_state / import_state).

The addressing is the product-key layer of `memory_bank.pkm` (same selection,
recompute and sparse gather), configured for LMN: plain keys; LayerNorm queries by
default (a training read does not depend on the rest of the batch), BatchNorm as the
option that keeps far more slots in use (see `LMNConfig.query_norm`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from memory_bank.base import MemoryDelta
from memory_bank.pkm import PKMConfig, ProductKeyMemory


class LMNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query_dim: int = Field(64, ge=1, description="width of the user-aware query the model builds")
    n_sub_keys: int = Field(128, ge=2, le=1024, description="n; slots N = n*n (16,384 .. 1,048,576)")
    heads: int = Field(1, ge=1)
    k: int = Field(16, ge=1)
    key_dim: int = Field(64, ge=2)
    value_dim: int = Field(64, ge=1)
    value_lr: float = Field(1e-2, gt=0, description="lr of the values' SparseRowAdam (set by the caller)")
    query_norm: Literal["layernorm", "batchnorm", "none"] = Field(
        "batchnorm",
        description="batchnorm centres queries across users and spreads them over the slots "
        "(layernorm queries collapse onto few slots: benchmarks/results/config_choices.md); its "
        "training reads depend on the batch, eval reads use running statistics",
    )
    memory_loss: Literal["cosine", "mse"] = "cosine"
    target: Literal["long_term", "recent"] = Field(
        "long_term",
        description="what the memory loss makes the read reconstruct: a summary of ALL the user's "
        "earlier events (long_term: what the last-L history window no longer shows) or of the "
        "last L only (recent: what the history attention already sees)",
    )
    usage_window: int = Field(100, ge=1)
    query_reservoir: int = Field(4096, ge=0)
    device: str = "cpu"

    def pkm_config(self) -> PKMConfig:
        return PKMConfig(
            in_dim=self.query_dim,
            n_sub_keys=self.n_sub_keys,
            heads=self.heads,
            k=self.k,
            key_dim=self.key_dim,
            value_dim=self.value_dim,
            query_norm=self.query_norm,
            overparam_keys=False,
            value_lr=self.value_lr,
            usage_window=self.usage_window,
            query_reservoir=self.query_reservoir,
            device=self.device,
        )


class UserMemory(nn.Module):
    """forward(query (B, query_dim)) -> read (B, value_dim);
    memory_loss(read (B, value_dim), target (B, value_dim)) -> scalar (target detached).

    `memory.values` (N, value_dim) has a sparse gradient (SparseRowAdam); the rest
    (`dense_parameters()`) goes to the model's dense optimizer.
    """

    def __init__(self, cfg: LMNConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LMNConfig()
        self.memory = ProductKeyMemory(cfg.pkm_config())

    def dense_parameters(self) -> list[nn.Parameter]:
        return self.memory.dense_parameters()

    def sparse_parameters(self) -> list[nn.Parameter]:
        return self.memory.sparse_parameters()

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return self.memory(query)  # (B, value_dim)

    def memory_loss(
        self, read: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean over users of 1 - cos(read, target) (or MSE); mask (B,) bool drops users without history."""
        target = target.detach()
        if self.cfg.memory_loss == "cosine":
            per_user = 1 - F.cosine_similarity(read, target, dim=-1)  # (B,)
        else:
            per_user = (read - target).pow(2).mean(-1)  # (B,)
        if mask is not None:
            m = mask.to(per_user.dtype)
            return (per_user * m).sum() / m.sum().clamp(min=1)
        return per_user.mean()

    def stats(self) -> dict[str, Any]:
        """Slot usage (window / cumulative: fraction hit, KL from uniform, dead slots)."""
        return self.memory.stats()

    def reinit_dead_keys(self, recent_queries: torch.Tensor | None = None, seed: int = 0) -> int:
        return self.memory.reinit_dead_keys(recent_queries, seed)

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.memory.export_state()

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.memory.import_state(tensors, meta)

    def take_delta(self) -> MemoryDelta:
        return self.memory.take_delta()

    def apply_delta(self, delta: MemoryDelta) -> None:
        self.memory.apply_delta(delta)


__all__ = ["LMNConfig", "UserMemory"]
