"""MSN product-key memory layer (Lample et al. 2019, as scaled up by MSN) and its gate.

Per head h, a query q = norm(W_q x) (B, key_dim) is split in halves q1, q2; each
half scores the n sub-keys of its axis; top-k per half, then top-k over the k*k
sums picks k of the N = n*n slots (`kernels.pkm_topk`, selection only). The chosen
scores are recomputed differentiably (so keys and the query net get gradient),
softmax-ed, and the values V (N, value_dim) are read through
`kernels.sparse_gather` (gradient = the rows used, a sparse COO tensor for
`SparseRowAdam`). Heads share V and are summed. Cost O((n + k^2) d) instead of O(N d).

Balance (MSN): queries are normalised (BatchNorm or LayerNorm) and keys are
over-parameterised, keys = base_keys @ key_mix with a learned (half, half) matrix
per head and axis, initialised to the identity. Slot usage is monitored (window
and cumulative hit counts, KL from uniform, dead slots); sub-keys no query selects
are re-initialised from faiss k-means centroids of recent queries (a bounded ring
of recent normalised queries is kept in the layer).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

import kernels
from memory_bank.base import MemoryDelta


class PKMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    in_dim: int = Field(64, ge=1, description="width of the layer input x (the ranker sets T * D)")
    n_sub_keys: int = Field(256, ge=2, le=4096, description="n; slots N = n*n")
    heads: int = Field(4, ge=1)
    k: int = Field(16, ge=1, description="slots read per head (MSN's reference scale: 32)")
    key_dim: int = Field(128, ge=2, description="query/key width per head (two halves)")
    value_dim: int = Field(64, ge=1)
    query_norm: Literal["batchnorm", "layernorm", "none"] = "batchnorm"
    overparam_keys: bool = True
    value_lr: float = Field(1e-3, gt=0, description="lr of the values' SparseRowAdam (set by the caller)")
    usage_window: int = Field(100, ge=1, description="training forwards per slot-usage window")
    query_reservoir: int = Field(4096, ge=0, description="recent queries kept per head for dead-key reinit")
    device: str = "cpu"  # the model moves the layer to its device

    @model_validator(mode="after")
    def _check(self) -> PKMConfig:
        if self.key_dim % 2:
            raise ValueError(f"key_dim: {self.key_dim} must be even (two halves)")
        if self.k > self.n_sub_keys * self.n_sub_keys:
            raise ValueError(f"k: {self.k} exceeds the {self.n_sub_keys**2} slots")
        return self

    @property
    def num_slots(self) -> int:
        return self.n_sub_keys * self.n_sub_keys


class PKMStateError(ValueError):
    """import_state / apply_delta got tensors that do not fit this layer."""


class ProductKeyMemory(nn.Module):
    """forward(x (B, in_dim)) -> (B, value_dim).

    Parameters: query (Linear in_dim -> heads*key_dim), query norm, base_keys
    (heads, 2, n, key_dim/2), key_mix (heads, 2, key_dim/2, key_dim/2) when over-parameterised,
    values (N, value_dim) with a sparse gradient: give `values` to SparseRowAdam with
    lr=cfg.value_lr and everything else (`dense_parameters()`) to the dense optimizer.
    """

    def __init__(self, cfg: PKMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PKMConfig()
        dev = torch.device(cfg.device)
        H, n, half, N = cfg.heads, cfg.n_sub_keys, cfg.key_dim // 2, cfg.num_slots
        self.query = nn.Linear(cfg.in_dim, H * cfg.key_dim)
        if cfg.query_norm == "batchnorm":
            self.query_norm = nn.BatchNorm1d(H * cfg.key_dim)
        elif cfg.query_norm == "layernorm":
            self.query_norm = nn.LayerNorm(cfg.key_dim)  # per head
        else:
            self.query_norm = nn.Identity()
        bound = half**-0.5
        self.base_keys = nn.Parameter(torch.empty(H, 2, n, half).uniform_(-bound, bound))
        if cfg.overparam_keys:
            self.key_mix = nn.Parameter(torch.eye(half).repeat(H, 2, 1, 1))  # (H, 2, half, half)
        else:
            self.register_parameter("key_mix", None)
        self.values = nn.Parameter(torch.randn(N, cfg.value_dim) * cfg.value_dim**-0.5)
        # Usage: slot hits (cumulative, current window, last full window) and sub-key hits
        # since the last reinit; a ring of recent normalised queries per head.
        # Non-persistent: they follow .to(device) but stay out of the model's state_dict
        # (weights only); export_state saves them. The value rows changed since the last
        # delta are tracked by the model state's DeltaTracker (table "values").
        tracking = {
            "hits_total": torch.zeros(N, dtype=torch.int64),
            "hits_window": torch.zeros(N, dtype=torch.int64),
            "hits_last_window": torch.zeros(N, dtype=torch.int64),
            "subkey_hits": torch.zeros(H, 2, n, dtype=torch.int64),
            "recent_queries": torch.zeros(H, cfg.query_reservoir, cfg.key_dim),
        }
        for name, t in tracking.items():
            self.register_buffer(name, t, persistent=False)
        self.tracking_names = tuple(tracking)
        self.forwards_in_window = 0
        self.windows_done = 0
        self.reservoir_filled = 0
        self.reservoir_next = 0
        self.reinit_total = 0
        self.to(dev)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but `values` (for the model's dense optimizer)."""
        return [p for name, p in self.named_parameters() if name != "values"]

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.values]

    # -- forward -------------------------------------------------------------------------------

    def keys(self) -> torch.Tensor:
        """Effective sub-keys (heads, 2, n, half): base_keys @ key_mix (or base_keys)."""
        if self.key_mix is None:
            return self.base_keys
        return self.base_keys @ self.key_mix  # (H, 2, n, half)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_dim) -> normalised queries (B, heads, key_dim)."""
        B, H = x.shape[0], self.cfg.heads
        q = self.query(x)  # (B, H*key_dim)
        if isinstance(self.query_norm, nn.LayerNorm):
            return self.query_norm(q.view(B, H, -1))  # (B, H, key_dim)
        if B == 1 and self.training and isinstance(self.query_norm, nn.BatchNorm1d):
            # Batch statistics of one row are undefined (torch raises ValueError), and a
            # streaming trainer does get one-event batches at low traffic: normalise with
            # the running statistics instead (affine weights still learn).
            bn = self.query_norm
            return F.batch_norm(
                q, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
            ).view(B, H, -1)
        return self.query_norm(q).view(B, H, -1)  # (B, H, key_dim)

    def select(self, q: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, key_dim), keys (H, 2, n, half) -> (scores (B, H, k) differentiable, slots (B, H, k)).

        The kernel selects (no grad); the chosen scores are then read differentiably as
        s1[i1] + s2[i2] from the (B, H, n) sub-key scores, which is cheaper than gathering
        (B, H, k, half) key rows and keeps the gradient of the keys dense and small.
        """
        n, half = self.cfg.n_sub_keys, self.cfg.key_dim // 2
        q1, q2 = q[..., :half], q[..., half:]  # (B, H, half) each
        keys1, keys2 = keys[:, 0], keys[:, 1]  # (H, n, half) each
        s1 = torch.einsum("bhd,hnd->bhn", q1, keys1)  # (B, H, n)
        s2 = torch.einsum("bhd,hnd->bhn", q2, keys2)  # (B, H, n)
        with torch.no_grad():  # the CPU path selects from s1, s2 (not scored twice)
            _, slots = kernels.pkm_topk(
                q1, q2, keys1, keys2, self.cfg.k, scores=(s1.detach(), s2.detach())
            )  # (B, H, k)
        scores = s1.gather(-1, slots // n) + s2.gather(-1, slots % n)  # (B, H, k)
        return scores, slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q = self.queries(x)  # (B, H, key_dim)
        scores, slots = self.select(q, self.keys())  # (B, H, k)
        weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)  # (B, H, k)
        if self.training:
            self._track(q.detach(), slots)
        # Heads share the values: one gather over H*k slots sums the heads.
        return kernels.sparse_gather(
            self.values, slots.reshape(B, -1), weights.reshape(B, -1)
        )  # (B, value_dim)

    # -- usage ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _track(self, q: torch.Tensor, slots: torch.Tensor) -> None:
        """Count slot / sub-key hits and remember queries (training forwards only)."""
        n, H = self.cfg.n_sub_keys, self.cfg.heads
        flat = slots.reshape(-1)
        ones = torch.ones_like(flat)
        self.hits_total.index_add_(0, flat, ones)
        self.hits_window.index_add_(0, flat, ones)
        # Sub-keys: (B, H, k) -> per head offsets into the flattened (H, 2, n) counter.
        head = torch.arange(H, device=slots.device)[None, :, None] * (2 * n)  # (1, H, 1)
        self.subkey_hits.view(-1).index_add_(0, (head + slots // n).reshape(-1), ones)
        self.subkey_hits.view(-1).index_add_(0, (head + n + slots % n).reshape(-1), ones)
        self.forwards_in_window += 1
        if self.forwards_in_window >= self.cfg.usage_window:
            self.hits_last_window.copy_(self.hits_window)
            self.hits_window.zero_()
            self.forwards_in_window = 0
            self.windows_done += 1
        R = self.cfg.query_reservoir
        if R:
            qs = q.transpose(0, 1)[:, -R:]  # (H, b, key_dim), b <= R
            at = (self.reservoir_next + torch.arange(qs.shape[1], device=q.device)) % R
            # A non-finite query (a poisoned batch, rolled back by the trainer) must not reach
            # the reservoir that dead keys are re-initialised from; no host sync to check it.
            qs = qs.to(self.recent_queries.dtype)
            self.recent_queries[:, at] = torch.where(torch.isfinite(qs), qs, self.recent_queries[:, at])
            self.reservoir_next = int((self.reservoir_next + qs.shape[1]) % R)
            self.reservoir_filled = min(R, self.reservoir_filled + qs.shape[1])

    @staticmethod
    def _usage(counts: torch.Tensor) -> dict[str, Any]:
        """Slot hit counts (N,) -> fraction used, KL(p || uniform) in nats, dead slots, top share."""
        N = counts.numel()
        total = int(counts.sum())
        used = int((counts > 0).sum())
        if total == 0:
            return {"hits": 0, "slot_usage": 0.0, "kl_uniform": None, "dead_slots": N, "top1pct_share": None}
        p = counts[counts > 0].double() / total
        kl = float((p * (p * N).log()).sum())
        top = counts.topk(max(1, N // 100)).values.sum()
        return {
            "hits": total,
            "slot_usage": used / N,
            "kl_uniform": kl,
            "dead_slots": N - used,
            "top1pct_share": float(top) / total,
        }

    def stats(self) -> dict[str, Any]:
        """Slot usage: window (last full window of usage_window training forwards, else the
        current one) and cumulative: hits, slot_usage (fraction of slots hit), kl_uniform
        (KL(p || uniform), nats; 0 = perfectly even, log N = one slot), dead_slots,
        top1pct_share; top_slots [[slot, hits]] (cumulative); dead sub-keys since the last reinit."""
        window = self.hits_last_window if self.windows_done else self.hits_window
        dead_sub = (self.subkey_hits == 0).sum().item()
        top = self.hits_total.topk(min(10, self.cfg.num_slots))
        return {
            "num_slots": self.cfg.num_slots,
            "top_slots": [
                [int(i), int(c)] for c, i in zip(top.values.tolist(), top.indices.tolist()) if c > 0
            ],
            "window": self._usage(window),
            "cumulative": self._usage(self.hits_total),
            "windows_done": self.windows_done,
            "dead_sub_keys": int(dead_sub),
            "sub_keys": int(self.subkey_hits.numel()),
            "reinit_sub_keys_total": self.reinit_total,
        }

    @torch.no_grad()
    def reinit_dead_keys(self, recent_queries: torch.Tensor | None = None, seed: int = 0) -> int:
        """Re-initialise the sub-keys no query selected since the previous call (or the start).

        recent_queries (H, M, key_dim) normalised queries per head, or (M, key_dim) used for
        every head; default: the layer's own
        ring of recent training queries. Dead sub-keys of head h, axis a are set to faiss
        k-means centroids of that half of the queries (+ small noise when there are more
        dead keys than centroids). Other keys do not change. Returns the number re-initialised.
        """
        import faiss

        half, H = self.cfg.key_dim // 2, self.cfg.heads
        if recent_queries is None:
            recent_queries = self.recent_queries[:, : self.reservoir_filled]
        elif recent_queries.dim() == 2:
            recent_queries = recent_queries.unsqueeze(0).expand(H, -1, -1)  # (H, M, key_dim)
        if recent_queries.shape[0] != H or recent_queries.shape[-1] != self.cfg.key_dim:
            raise ValueError(
                f"recent_queries: shape {tuple(recent_queries.shape)}, want ({H}, M, {self.cfg.key_dim})"
            )
        M = recent_queries.shape[1]
        dead = self.subkey_hits == 0  # (H, 2, n)
        if M == 0 or not dead.any():
            self.subkey_hits.zero_()
            return 0
        g = torch.Generator().manual_seed(seed)
        new_keys = self.keys().detach().clone()  # (H, 2, n, half)
        count = 0
        for h in range(H):
            for a in range(2):
                rows = dead[h, a].nonzero().squeeze(1)  # (D,)
                if rows.numel() == 0:
                    continue
                pts = recent_queries[h, :, a * half : (a + 1) * half].float().cpu().numpy()  # (M, half)
                n_cent = min(rows.numel(), M)
                km = faiss.Kmeans(half, n_cent, niter=10, seed=seed + 2 * h + a, verbose=False)
                km.cp.min_points_per_centroid = 1
                km.train(np.ascontiguousarray(pts, dtype=np.float32))
                cent = torch.from_numpy(km.centroids)  # (n_cent, half)
                pick = torch.arange(rows.numel()) % n_cent
                noise = torch.randn(rows.numel(), half, generator=g) * 0.01 * (half**-0.5)
                new_keys[h, a, rows] = (cent[pick] + noise).to(new_keys)
                count += rows.numel()
        # keys = base @ mix  =>  base = keys @ mix^-1 for the dead rows only.
        if self.key_mix is None:
            self.base_keys[dead] = new_keys[dead]
        else:
            base = torch.linalg.solve(self.key_mix.transpose(-1, -2), new_keys.transpose(-1, -2)).transpose(
                -1, -2
            )
            self.base_keys[dead] = base[dead]
        self.subkey_hits.zero_()
        self.reinit_total += count
        return count

    # -- state ---------------------------------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        return {
            "forwards_in_window": self.forwards_in_window,
            "windows_done": self.windows_done,
            "reservoir_filled": self.reservoir_filled,
            "reservoir_next": self.reservoir_next,
            "reinit_total": self.reinit_total,
        }

    def _all_tensors(self) -> dict[str, torch.Tensor]:
        """state_dict (weights, norm statistics) + the non-persistent tracking buffers."""
        return {**self.state_dict(), **{name: getattr(self, name) for name in self.tracking_names}}

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every parameter and buffer (usage counters and query ring included); config in meta."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._all_tensors().items()}
        return tensors, {"config": self.cfg.model_dump(exclude={"device"}), "counters": self._counters()}

    @torch.no_grad()
    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        mine = self.cfg.model_dump(exclude={"device"})
        if meta["config"] != mine:
            raise PKMStateError(f"config: saved {meta['config']}, have {mine}")
        own = self._all_tensors()
        for key, t in own.items():
            if key not in tensors or tensors[key].shape != t.shape or tensors[key].dtype != t.dtype:
                saved = (tuple(tensors[key].shape), tensors[key].dtype) if key in tensors else "nothing"
                raise PKMStateError(f"{key}: saved {saved}, have {(tuple(t.shape), t.dtype)}")
        for key, t in own.items():
            t.copy_(tensors[key])
        for name, value in meta["counters"].items():
            setattr(self, name, int(value))

    def take_delta(self) -> MemoryDelta:
        """Nothing of its own: the changed value rows are tracked where every trainable
        table's are (memory_bank.delta_tracker, table "values"), and the small dense
        tensors (query net, norm, keys) change every step and travel in the dense state."""
        return MemoryDelta()

    @torch.no_grad()
    def apply_delta(self, delta: MemoryDelta) -> None:
        """Serving copy: write the changed value rows."""
        for name, (rows, vals) in delta.tables.items():
            if name != "values":
                raise PKMStateError(f"{name}: a delta of this layer carries value rows only")
            r = torch.from_numpy(rows).to(self.values.device)
            self.values.index_copy_(0, r, vals.to(self.values))


class MemoryGate(nn.Module):
    """Feeds a memory read v (B, mem_dim) into T feature tokens t (B, T, D).

    mode="scale":    t_i <- t_i * 2*sigmoid(W_i v)  (W init 0: the gate starts as identity)
    mode="residual": t_i <- t_i + W_i v             (W init 0: starts as identity)
    W_i (D, mem_dim) per token, held as one Linear mem_dim -> T*D.
    """

    def __init__(
        self, num_tokens: int, token_dim: int, mem_dim: int, mode: Literal["scale", "residual"] = "scale"
    ):
        super().__init__()
        if mode not in ("scale", "residual"):
            raise ValueError(f"mode: {mode!r}, want 'scale' or 'residual'")
        self.num_tokens, self.token_dim, self.mode = num_tokens, token_dim, mode
        self.proj = nn.Linear(mem_dim, num_tokens * token_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = self.proj(v).view(-1, self.num_tokens, self.token_dim)  # (B, T, D)
        if self.mode == "scale":
            return tokens * (2 * torch.sigmoid(g))
        return tokens + g


__all__ = ["MemoryGate", "PKMConfig", "PKMStateError", "ProductKeyMemory"]
