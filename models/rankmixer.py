"""RankMixer / TokenMixer backbone blocks.

x (B, T, D): T feature tokens of width D. One block:
    x = x + unmix(y), y = m + per_token_ffn(rmsnorm(m)), m = mix(rmsnorm(x))
Token mixing is parameter-free: split every token into H = T heads of width
D/H and give head h of every token to output token h:
    (B, T, H, D/H) -> transpose -> (B, H, T, D/H) -> (B, H, T*D/H) = (B, T, D)
With H = T this is a square "transpose" of the (token, head) grid, so it is its
own inverse; `unmix` is the same reshape read backwards (mix-and-revert brings
each token's features back to the token they belong to after the FFN, so the
residual stream stays token-aligned).
The FFN is per token: token t has its own SwiGLU weights (RankMixer's
"per-token FFN": heterogeneous feature groups do not share a projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def token_mix(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, T, D): output token h = the h-th head (width D/T) of every token."""
    b, t, d = x.shape
    if d % t:
        raise ValueError(f"token_mix needs D divisible by T, got D={d}, T={t}")
    return x.reshape(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)


def token_unmix(x: torch.Tensor) -> torch.Tensor:
    """Inverse of token_mix (the same transpose: H = T makes it an involution)."""
    return token_mix(x)


class PerTokenSwiGLU(nn.Module):
    """T independent SwiGLU FFNs, one per token, as batched matmuls.

    x (B, T, D) -> (B, T, D); weights w_in (T, D, 2F), w_out (T, F, D).
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(num_tokens, dim, 2 * hidden) / math.sqrt(dim))
        self.w_out = nn.Parameter(torch.randn(num_tokens, hidden, dim) / math.sqrt(hidden) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("btd,tdf->btf", x, self.w_in)  # (B, T, 2F)
        gate, up = h.chunk(2, dim=-1)  # (B, T, F) each
        return torch.einsum("btf,tfd->btd", F.silu(gate) * up, self.w_out)  # (B, T, D)


class RankMixerBlock(nn.Module):
    """Pre-norm block: parameter-free token mixing, per-token SwiGLU, revert, residual.

    x (B, T, D), the residual stream in feature-token layout ->
      m = mix(rmsnorm(x))                (B, T, D) mixed token h = head h of all tokens
      y = m + ffn(rmsnorm(m))            per-token FFN on the mixed tokens (residual)
      out = x + unmix(y)                 revert to feature-token layout, residual
    """

    def __init__(self, num_tokens: int, dim: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_mix = RMSNorm(dim)
        self.norm_ffn = RMSNorm(dim)
        self.ffn = PerTokenSwiGLU(num_tokens, dim, ffn_mult * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = token_mix(self.norm_mix(x))  # (B, T, D) mixed layout
        y = m + self.ffn(self.norm_ffn(m))  # (B, T, D)
        return x + token_unmix(y)  # (B, T, D) feature-token layout
