"""RankMixer blocks: token mixing shapes, mix/revert invertibility, per-token weights."""

from __future__ import annotations

import torch

from models.rankmixer import PerTokenSwiGLU, RankMixerBlock, token_mix, token_unmix


def test_token_mix_shape_and_layout():
    b, t, d = 3, 4, 8  # H = T = 4 heads of width 2
    x = torch.arange(b * t * d, dtype=torch.float32).view(b, t, d)
    m = token_mix(x)
    assert m.shape == (b, t, d)
    # Output token h holds head h of every input token, in token order.
    for h in range(t):
        expect = torch.cat([x[:, j, 2 * h : 2 * h + 2] for j in range(t)], dim=1)
        assert torch.equal(m[:, h], expect)


def test_mix_and_revert_are_inverse():
    x = torch.randn(5, 8, 64)
    assert torch.equal(token_unmix(token_mix(x)), x)
    assert torch.equal(token_mix(token_unmix(x)), x)


def test_per_token_ffn_has_independent_weights():
    ffn = PerTokenSwiGLU(num_tokens=4, dim=8, hidden=16)
    x = torch.randn(2, 4, 8)
    y = ffn(x)
    assert y.shape == (2, 4, 8)
    ffn.w_out.data[1] += 1.0  # change token 1's weights only
    y2 = ffn(x)
    assert torch.equal(y[:, [0, 2, 3]], y2[:, [0, 2, 3]])
    assert not torch.equal(y[:, 1], y2[:, 1])


def test_block_shapes_and_gradients():
    blk = RankMixerBlock(num_tokens=8, dim=64, ffn_mult=2)
    x = torch.randn(6, 8, 64, requires_grad=True)
    y = blk(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
