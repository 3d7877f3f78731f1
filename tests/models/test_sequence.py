"""The history read-outs of models/sequence.py against direct computations."""

from __future__ import annotations

import numpy as np
import torch

from models.sequence import ridge_features, ridge_user_read


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
