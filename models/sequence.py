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
import torch.nn.functional as F
from torch import nn

NUM_COS_FEATURES = 7
NUM_RECENT_FEATURES = 2
NUM_RIDGE_FEATURES = 2
RECENT = 5  # events in the short-term feedback mean


class HistoryCrossAttention(nn.Module):
    """Q query tokens (B, Q, D) attend the history (B, L, items) with a learned null slot.

    Attention runs at width A (attn_dim) < D. A history item's key/value is the sum of a
    projection of what the item is (id embedding, bank vector: the same in every history it
    appears in) and of what this user did with it (feedback, recency). The item part is
    projected once per DISTINCT item of the batch and gathered into the (B, L) positions:
    512 users x 200 positions point at no more than ML-1M's 3,706 items, so the
    (B*L, item_dim) -> 2A matmul, the largest of the model, shrinks more than 25x. The null
    slot (always visible) makes an empty history well-defined and lets a query attend
    "nothing relevant".
    """

    def __init__(
        self, learned_dim: int, bank_dim: int, signal_dim: int, d_model: int, attn_dim: int, num_heads: int
    ) -> None:
        super().__init__()
        self.h = num_heads
        self.a = attn_dim
        self.dh = attn_dim // num_heads
        self.q = nn.Linear(d_model, attn_dim)
        # Separate projections summed: the learned part (id embeddings) needs an input
        # gradient, the bank vectors (stop-gradient) do not, and the feedback is per position.
        self.kv_learned = nn.Linear(learned_dim, 2 * attn_dim)
        self.kv_bank = nn.Linear(bank_dim, 2 * attn_dim, bias=False) if bank_dim else None
        self.kv_signal = nn.Linear(signal_dim, 2 * attn_dim, bias=False)
        self.null_kv = nn.Parameter(torch.zeros(1, 1, 2 * attn_dim))
        self.out = nn.Linear(attn_dim, d_model)

    def history_kv(
        self,
        learned: torch.Tensor,
        bank: torch.Tensor | None,
        inverse: torch.Tensor,
        signal: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per distinct item: learned (U, El) with grad, bank (U, Eb) or None (no grad);
        per position: inverse (B, L) -> row of U, signal (B, L, S), mask (B, L)
        -> k, v (B, H, L+1, dh), mask (B, L+1). User side only."""
        b, s = inverse.shape[0], signal.shape[-1]
        item_kv = self.kv_learned(learned)  # (U, 2A)
        if self.kv_bank is not None and bank is not None:
            item_kv = item_kv + self.kv_bank(bank.detach())
        # The null slot is row 0 of the gathered tables and position 0 of every history, so
        # each (B, L+1, A) key/value tensor comes out of one gather (concatenating a null column
        # copied the largest tensor of the step again), and keys and values are built apart:
        # splitting one (B, L+1, 2A) tensor costs a full copy of it in the backward pass.
        inv = torch.cat([inverse.new_zeros(b, 1), inverse + 1], dim=1)  # (B, L+1)
        sig = torch.cat([signal.new_zeros(b, 1, s), signal], dim=1).reshape(-1, s)  # (B*(L+1), S)
        # x @ W^T with W^T made contiguous: the weight gradient is then x^T @ grad, which on
        # CPU BLAS runs ~10x faster than nn.Linear's grad^T @ x for this tall, S-wide x.
        w_k, w_v = self.kv_signal.weight.t().chunk(2, dim=1)  # (S, A) each
        out = []
        for table, w in zip(torch.cat([self.null_kv[0], item_kv], dim=0).chunk(2, dim=1), (w_k, w_v)):
            x = gather_rows(table, inv) + (sig @ w.contiguous()).view(b, -1, self.a)  # (B, L+1, A)
            out.append(x.view(b, -1, self.h, self.dh).transpose(1, 2))  # (B, H, L+1, dh)
        k, v = out
        full_mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)  # (B, L+1)
        return k, v, full_mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B, Q, D) -> (B, Q, D)."""
        b, nq, _ = q.shape
        qh = self.q(q).view(b, nq, self.h, self.dh).transpose(1, 2)  # (B, H, Q, dh)
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask[:, None, None, :])  # (B, H, Q, dh)
        return self.out(o.transpose(1, 2).reshape(b, nq, self.a))  # (B, Q, D)


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (N, E), index (...) -> (..., E): the rows table[index]. One index_select: for
    a 2-D index, table[index] is advanced indexing, which on CPU runs ~5x slower forward
    (11 vs 2 ms for a (B, L) = (512, 200) read of 64 floats) and ~1.7x slower backward."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[-1])


def normalize_history(hist: torch.Tensor) -> torch.Tensor:
    """(..., E) -> unit rows, detached: the cosine features treat the history as given
    (it gets its gradient through the attention), which halves their backward cost.
    User side: computed once per user (and once per distinct history item)."""
    return F.normalize(hist.detach(), dim=-1)


def cosine_features(
    target: torch.Tensor, hist_unit: torch.Tensor, signal: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """LEMUR's cosine(target, history item) features, summarised over the history.

    target (B, E), hist_unit (B, L, E) unit rows, signal (B, L) (centred feedback),
    mask (B, L) -> (B, 7): mean cos, max cos, mean cos*signal, cos-weighted signal,
    signal of the nearest item, mean signal, log(1 + history length).
    """
    m = mask.to(target.dtype)  # (B, L)
    cnt = m.sum(1)  # (B,)
    n = cnt.clamp_min(1.0)
    t = F.normalize(target, dim=-1)  # (B, E)
    # (1, E) x (E, L) per user, not (L, E) x (E, 1): the same product, but this layout's
    # forward and backward run ~5x faster on CPU BLAS at L = 200.
    cos = torch.bmm(t.unsqueeze(1), hist_unit.transpose(1, 2)).squeeze(1) * m  # (B, L)
    mean_cos = cos.sum(1) / n
    max_cos = cos.masked_fill(~mask, -1.0).max(1).values * (cnt > 0)
    cos_sig = (cos * signal).sum(1) / n
    w = torch.softmax((cos * 5.0).masked_fill(~mask, -1e4), dim=1) * m  # (B, L)
    wsig = (w * signal).sum(1)
    near_sig = signal.gather(1, cos.masked_fill(~mask, -2.0).argmax(1, keepdim=True)).squeeze(1)
    mean_sig = (signal * m).sum(1) / n
    return torch.stack([mean_cos, max_cos, cos_sig, wsig, near_sig, mean_sig, torch.log1p(cnt)], dim=1)


def recent_feedback(signal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The user's short-term feedback: signal (B, L), mask (B, L), most recent last ->
    (B, 2): mean signal of the last RECENT events, signal of the last one (0 without history).
    Users drift within a rating session; the window-long means above hide it."""
    sig, m = signal[:, -RECENT:], mask[:, -RECENT:].to(signal.dtype)
    return torch.stack([(sig * m).sum(1) / m.sum(1).clamp_min(1.0), signal[:, -1] * mask[:, -1]], dim=1)


def ridge_user_read(
    hist: torch.Tensor, signal: torch.Tensor, mask: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's taste as a ridge regression of their feedback on their history items.

    hist (B, L, E) item vectors, signal (B, L) feedback, mask (B, L) -> X^T y (B, E) and the
    Cholesky factor (B, E, E) of A = X^T X + lam I over the real positions, y = the signal
    centred per user; the fit is w = A^-1 X^T y (`ridge_features` solves with the factor).

    Why: within a ML-1M batch of 512 the average event's user has ~110 events (rating
    sessions), so a new user's id embedding cannot learn until their session is mostly over;
    this read is a per-event fit on what the user did so far (in-batch events included), in
    the item space the model learns. The gradient reaches the item vectors through X^T y and
    the target, not through A (a constant here): the inverse's backward cost 3x the rest of
    the read on CPU. User side only (UG-Sep): candidates need only X^T y and the factor.
    """
    m = mask.to(hist.dtype)  # (B, L)
    n = m.sum(1, keepdim=True).clamp_min(1.0)
    y = (signal - (signal * m).sum(1, keepdim=True) / n) * m  # (B, L) centred per user
    x = hist * m.unsqueeze(-1)  # (B, L, E)
    xty = torch.bmm(y.unsqueeze(1), x).squeeze(1)  # (B, E): sum over positions of y x
    with torch.no_grad():
        xd = x.detach()
        eye = torch.eye(hist.shape[-1], dtype=hist.dtype, device=hist.device)
        # SPD for lam > 0, so the factorisation cannot fail on finite input; cholesky_ex
        # skips the info check, which on a GPU is a host sync per call. Non-finite input
        # (a poisoned batch) gives a non-finite factor, hence a non-finite loss, which the
        # trainer rejects as before.
        chol = torch.linalg.cholesky_ex(xd.transpose(1, 2) @ xd + lam * eye).L  # (B, E, E)
    return xty, chol


def ridge_features(target: torch.Tensor, xty: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """target (B, E) unit item vectors -> (B, 2): the ridge prediction <A^-1 X^T y, t>
    (centred feedback units) and the variance factor t^T A^-1 t (large = the history says
    little about items like t). One triangular solve pair for both right-hand sides."""
    s = torch.cholesky_solve(torch.stack([xty, target], dim=-1), chol)  # (B, E, 2)
    return torch.stack([(s[..., 0] * target).sum(-1), (s[..., 1] * target).sum(-1)], dim=1)
