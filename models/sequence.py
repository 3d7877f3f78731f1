"""The user's history as a sequence signal: query tokens cross-attending history items.

LEMUR / HyFormer style: no self-attention over the history. A few query tokens
built from the NON-sequence features (user, target item, context) attend over
the history items; the history side (keys, values) depends on the user only, so
it is computed once per user (UG-Sep: `history_kv`) and reused for every
candidate (`attend`). Each history item is represented by its id embedding, its
item-bank vector (LEMUR: read from the bank, never re-encoded) and the feedback
the user gave it (the signal, e.g. the rating): "this user liked items like X"
is the strongest sequence signal on rating data.

Beside the attention, cosine(target, history item) features (LEMUR) summarise
how close the candidate is to what the user saw and how they rated it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_COS_FEATURES = 7


class HistoryCrossAttention(nn.Module):
    """Q query tokens (B, Q, D) attend the history (B, L, D) with a learned null slot.

    The null slot (always visible) makes an empty history well-defined and lets a
    query attend "nothing relevant" instead of being forced onto some item.
    """

    def __init__(self, item_dim: int, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.h = num_heads
        self.dh = d_model // num_heads
        self.kv = nn.Linear(item_dim, 2 * d_model)
        self.null_kv = nn.Parameter(torch.zeros(2, d_model))
        self.out = nn.Linear(d_model, d_model)

    def history_kv(self, items: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """items (B, L, item_dim), mask (B, L) -> k, v (B, H, L+1, dh), mask (B, L+1). User side only."""
        b = items.shape[0]
        kv = self.kv(items)  # (B, L, 2D)
        kv = torch.cat([self.null_kv.expand(b, 1, 2, -1).reshape(b, 1, -1), kv], dim=1)  # (B, L+1, 2D)
        k, v = kv.chunk(2, dim=-1)  # (B, L+1, D) each
        k = k.view(b, -1, self.h, self.dh).transpose(1, 2)  # (B, H, L+1, dh)
        v = v.view(b, -1, self.h, self.dh).transpose(1, 2)
        full_mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)  # (B, L+1)
        return k, v, full_mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B, Q, D) -> (B, Q, D)."""
        b, nq, d = q.shape
        qh = q.view(b, nq, self.h, self.dh).transpose(1, 2)  # (B, H, Q, dh)
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask[:, None, None, :])  # (B, H, Q, dh)
        return self.out(o.transpose(1, 2).reshape(b, nq, d))  # (B, Q, D)


def cosine_features(
    target: torch.Tensor, hist: torch.Tensor, signal: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """LEMUR's cosine(target, history item) features, summarised over the history.

    target (B, E), hist (B, L, E), signal (B, L) (centred feedback), mask (B, L)
    -> (B, 7): mean cos, max cos, mean cos*signal, cos-weighted signal, signal of the
    nearest item, mean signal, log(1 + history length).
    """
    m = mask.to(target.dtype)  # (B, L)
    n = m.sum(1).clamp_min(1.0)  # (B,)
    cos = F.cosine_similarity(target.unsqueeze(1), hist, dim=-1) * m  # (B, L)
    mean_cos = cos.sum(1) / n
    max_cos = cos.masked_fill(~mask, -1.0).max(1).values * (m.sum(1) > 0)
    cos_sig = (cos * signal).sum(1) / n
    w = torch.softmax((cos * 5.0).masked_fill(~mask, -1e4), dim=1) * m  # (B, L)
    wsig = (w * signal).sum(1)
    near_sig = signal.gather(1, cos.masked_fill(~mask, -2.0).argmax(1, keepdim=True)).squeeze(1)
    mean_sig = (signal * m).sum(1) / n
    return torch.stack([mean_cos, max_cos, cos_sig, wsig, near_sig, mean_sig, torch.log1p(m.sum(1))], dim=1)
