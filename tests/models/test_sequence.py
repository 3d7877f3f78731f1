"""The history read-outs of models/sequence.py against direct computations."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.sequence import (
    HistoryCrossAttention,
    cosine_features,
    gather_rows,
    ridge_features,
    ridge_user_read,
)


def _ridge_inputs(seed: int, b: int = 6, L: int = 9, e: int = 4):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(b, L, e, generator=g, dtype=torch.float64)
    signal = torch.randn(b, L, generator=g, dtype=torch.float64)
    mask = torch.rand(b, L, generator=g) < 0.6
    target = torch.randn(b, e, generator=g, dtype=torch.float64)
    return hist, signal, mask, target


def test_ridge_read_predicts_with_the_ridge_solution_over_the_real_positions():
    hist, signal, mask, t = _ridge_inputs(0)
    lam = 0.7
    mask[0] = False  # a user without history: prediction 0, variance |t|^2 / lam
    f = ridge_features(t, *ridge_user_read(hist, signal, mask, lam))
    assert f.shape == (6, 2)
    for i in range(6):
        m = mask[i].numpy()
        x, y = hist[i].numpy()[m], signal[i].numpy()[m]
        y = y - y.mean() if m.any() else y
        a = x.T @ x + lam * np.eye(4)
        w = np.linalg.solve(a, x.T @ y)
        np.testing.assert_allclose(f[i, 0].item(), w @ t[i].numpy(), atol=1e-10)
        np.testing.assert_allclose(
            f[i, 1].item(), t[i].numpy() @ np.linalg.solve(a, t[i].numpy()), atol=1e-10
        )
    np.testing.assert_allclose(f[0].numpy(), [0.0, (t[0] @ t[0]).item() / lam])
    # padded positions carry no information whatever they hold
    hist2, signal2 = hist.clone(), signal.clone()
    hist2[~mask] = 1e3
    signal2[~mask] = -7.0
    torch.testing.assert_close(ridge_features(t, *ridge_user_read(hist2, signal2, mask, lam)), f)


def test_ridge_read_gradient_reaches_items_through_the_fit_not_the_gram_matrix():
    hist, signal, mask, t = _ridge_inputs(1, 3, 5, 4)
    hist.requires_grad_(True)
    t.requires_grad_(True)
    xty, chol = ridge_user_read(hist, signal, mask, 0.5)
    assert xty.requires_grad and not chol.requires_grad
    # with the factor held fixed the read is linear in X^T y and its gradients are exact
    torch.autograd.gradcheck(
        lambda h, tt: ridge_features(tt, ridge_user_read(h, signal, mask, 0.5)[0], chol), (hist, t)
    )


def test_history_kv_is_the_null_slot_then_each_position_item_plus_feedback_projection():
    """history_kv gathers keys and values from one table with the null slot as row 0 (for
    speed); against the direct construction: per position the item's projection plus the
    feedback's, the learned null slot first. Forward and every parameter's gradient."""
    g = torch.Generator().manual_seed(3)
    b, L, u, s = 5, 7, 6, 4
    attn = HistoryCrossAttention(learned_dim=8, bank_dim=3, signal_dim=s, d_model=12, attn_dim=8, num_heads=2)
    attn = attn.double()
    with torch.no_grad():
        attn.null_kv.normal_(generator=g)
    learned = torch.randn(u, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(u, 3, generator=g, dtype=torch.float64)
    inverse = torch.randint(0, u, (b, L), generator=g)
    signal = torch.randn(b, L, s, generator=g, dtype=torch.float64)
    mask = torch.rand(b, L, generator=g) < 0.6

    def direct():
        item = attn.kv_learned(learned) + attn.kv_bank(bank)  # (U, 2A)
        kv = torch.cat([attn.null_kv.expand(b, 1, -1), item[inverse] + attn.kv_signal(signal)], dim=1)
        k, v = (x.reshape(b, L + 1, 2, 4).transpose(1, 2) for x in kv.chunk(2, dim=-1))
        return k, v

    params = [learned, *attn.parameters()]
    got, want = attn.history_kv(learned, bank, inverse, signal, mask)[:2], direct()
    w = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in want]
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    grads = [
        torch.autograd.grad(sum((x * wi).sum() for x, wi in zip(r, w)), params, allow_unused=True)
        for r in (got, direct())
    ]
    for a, e in zip(*grads):
        if e is None:
            assert a is None or not a.abs().sum()
        else:
            torch.testing.assert_close(a, e)
    full_mask = attn.history_kv(learned, bank, inverse, signal, mask)[2]
    assert full_mask[:, 0].all() and torch.equal(full_mask[:, 1:], mask)


def test_cosine_features_match_a_per_user_loop():
    g = torch.Generator().manual_seed(4)
    b, L, e = 4, 6, 5
    hist = F.normalize(torch.randn(b, L, e, generator=g, dtype=torch.float64), dim=-1)
    target = torch.randn(b, e, generator=g, dtype=torch.float64)
    signal = torch.randn(b, L, generator=g, dtype=torch.float64)
    mask = torch.rand(b, L, generator=g) < 0.7
    mask[0] = False
    signal = signal * mask  # the contract: 0 where padded (UserInputs.hist_signal)
    f = cosine_features(target, hist, signal, mask)
    t = F.normalize(target, dim=-1)
    for i in range(b):
        m = mask[i]
        if not m.any():
            torch.testing.assert_close(f[i], torch.zeros(7, dtype=torch.float64))
            continue
        cos = hist[i][m] @ t[i]
        sig = signal[i][m]
        n = m.sum()
        w = torch.softmax(cos * 5.0, 0)
        want = [
            cos.mean(),
            cos.max(),
            (cos * sig).mean(),
            (w * sig).sum(),
            sig[cos.argmax()],
            sig.mean(),
            torch.log1p(n.double()),
        ]
        torch.testing.assert_close(f[i], torch.stack(want))


def test_gather_rows_is_table_indexing_forward_and_backward():
    torch.manual_seed(0)
    table = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    for index in (torch.randint(0, 7, (4, 6)), torch.randint(0, 7, (9,)), torch.randint(0, 7, (2, 3, 4))):
        out = gather_rows(table, index)
        want = table[index]
        assert out.shape == want.shape and torch.equal(out, want)
        g = torch.randn_like(want)
        (got,) = torch.autograd.grad(out, table, g)
        (ref,) = torch.autograd.grad(want, table, g)
        torch.testing.assert_close(got, ref)  # repeated rows summed
