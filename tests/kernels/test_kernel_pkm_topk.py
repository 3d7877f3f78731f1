"""Fused product-key top-k, and the row top-k of its large-k path, vs brute force.

The row top-k (`_row_topk`, stream and radix paths) is private to
kernels/pkm_topk/triton.py: pkm_topk_triton runs it when min(k, n) > 128 does not fit
the fused kernel's registers; it is tested on its own here because the PKM cases can
only reach it with large k.

Tie rule of the Triton paths: value descending, then index ascending. torch.topk
promises no order among ties, so against it values are compared exactly and indices
as sets where values tie; the Triton result is also checked against the rule itself.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.dispatch import triton_module
from kernels.pkm_topk.reference import pkm_topk_ref

CPU = torch.zeros(0)


def _impl():
    return triton_module("pkm_topk", CPU)


def assert_topk_rule(x: torch.Tensor, k: int, vals: torch.Tensor, idx: torch.Tensor):
    """vals/idx (R, k) must be the top-k of x (R, L) under (value desc, index asc)."""
    assert vals.shape == idx.shape == (x.shape[0], k)
    assert not vals.isnan().any() and (idx >= 0).all() and (idx < x.shape[1]).all()
    assert torch.equal(x.gather(1, idx), vals)  # indices point at the values returned
    ref_vals, _ = x.double().topk(k, dim=1)  # brute force, exact
    assert torch.equal(vals.double(), ref_vals)
    # the rule: a stable sort of (-value) gives value desc, index asc
    order = torch.sort(-x.double(), dim=1, stable=True).indices[:, :k]
    assert torch.equal(idx, order)


def assert_same_topk_as_torch(x, k, vals, idx):
    """Against torch.topk: values exactly, indices as sets within each group of tied values."""
    rv, ri = x.topk(k, dim=1)
    assert torch.equal(vals, rv)
    kth = rv[:, -1:]
    for r in range(x.shape[0]):
        above = vals[r] > kth[r]
        assert set(idx[r][above].tolist()) == set(ri[r][rv[r] > kth[r]].tolist())
        for v in vals[r].unique().tolist():  # equal values: same count, all really equal
            assert (vals[r] == v).sum() == (rv[r] == v).sum()
            assert (x[r, idx[r][vals[r] == v]] == v).all()


TOPK_CASES = [  # (R, L, k)
    (3, 100, 5),
    (2, 37, 37),  # k == L, L not a power of two
    (4, 300, 32),
    (1, 1, 1),
    (2, 700, 13),
    (2, 300, 100),  # k-th value mid-range: ties at the k-th mixed with larger values
]


@pytest.mark.parametrize("method", ["stream", "radix"])
@pytest.mark.parametrize("case", TOPK_CASES)
@pytest.mark.parametrize("kind", ["normal", "ties", "bf16"])
def test_topk_vs_brute_force(gen, poison, method, case, kind):
    R, L, k = case
    if kind == "ties":  # few distinct values: ties everywhere, also across the k-th
        x = torch.randint(-4, 4, (R, L), generator=gen).float()
    else:
        x = torch.randn(R, L, generator=gen)
        if kind == "bf16":
            x = x.to(torch.bfloat16)
    vals, idx = _impl()._row_topk(x, k, method)
    assert vals.dtype == x.dtype and idx.dtype == torch.int64
    assert_topk_rule(x, k, vals, idx)
    assert_same_topk_as_torch(x, k, vals, idx)


@pytest.mark.parametrize("method", ["stream", "radix"])
def test_topk_special_values(gen, method):
    # +-0.0 tie, infinities, denormals, negative values: the order-preserving mapping
    row = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, -3.0, 2.5, -0.0, float("inf"), 1e-45, -2.5]
    )
    x = torch.stack([row, row.flip(0), -row])
    vals, idx = _impl()._row_topk(x, 7, method)
    assert_same_topk_as_torch(x, 7, vals, idx)
    assert torch.equal(x.gather(1, idx), vals)


def test_topk_method_by_row_length():
    mod = _impl()
    assert mod._choose_row_topk(1024, 32) == "stream"
    assert mod._choose_row_topk(1 << 20, 32) == "radix"
    assert mod._choose_row_topk(1000, 512) == "radix"
    assert mod._choose_row_topk(1 << 20, 4096) == "torch"


def test_topk_keeps_leading_dims(gen):
    x = torch.randn(3, 2, 50, generator=gen)  # (B, H, n) as the PKM path calls it
    vals, idx = _impl()._row_topk(x, 6)
    assert vals.shape == idx.shape == (3, 2, 6)
    assert_topk_rule(x.reshape(6, 50), 6, vals.reshape(6, 6), idx.reshape(6, 6))


# ----------------------------------------------------------------------------- PKM


def _pkm_inputs(gen, B, H, n, dk, kind):
    if kind.startswith("ints"):  # exact dot products (|score| <= 256), many tied scores
        mk = lambda *s: torch.randint(-2, 3, s, generator=gen).float()
    else:
        mk = lambda *s: torch.randn(*s, generator=gen)
    q1, q2 = mk(B, H, dk), mk(B, H, dk)
    k1, k2 = mk(H, n, dk), mk(H, n, dk)
    dt = torch.bfloat16 if kind == "ints-bf16" else torch.float32
    return [t.to(dt) for t in (q1, q2, k1, k2)]


def _all_pair_scores(q1, q2, k1, k2):
    s1 = torch.einsum("bhd,hnd->bhn", q1.double(), k1.double())
    s2 = torch.einsum("bhd,hnd->bhn", q2.double(), k2.double())
    return (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (B, H, n*n), slot = i1*n + i2


def check_pkm(q1, q2, k1, k2, k, scores, slots, exact: bool):
    B, H, _ = q1.shape
    n = k1.shape[1]
    full = _all_pair_scores(q1, q2, k1, k2)  # float64 brute force over all n*n slots
    assert scores.shape == slots.shape == (B, H, k)
    assert scores.dtype == q1.dtype and slots.dtype == torch.int64
    assert ((slots >= 0) & (slots < n * n)).all()
    assert (slots.sort(-1).values.diff(dim=-1) != 0).all()  # no slot twice
    assert (scores[..., :-1] >= scores[..., 1:]).all()  # sorted descending
    best = full.topk(k, dim=-1).values
    mine = full.gather(-1, slots)  # true scores of the slots returned
    if exact:  # integer inputs: exact up to the one rounding into the output dtype
        rnd = lambda t: t.to(q1.dtype).double()
        assert torch.equal(scores.double(), rnd(mine))  # scores belong to their slots
        assert torch.equal(scores.double(), rnd(best))  # and are the k best
    else:
        tol = 1e-5 * (1 + full.abs().amax(-1, keepdim=True))
        assert ((scores.double() - mine).abs() <= tol).all()
        assert ((scores.double() - best).abs() <= tol).all()
    if exact:  # ties: same set above the k-th value, the rest tied with it
        ref_s, _ = pkm_topk_ref(q1, q2, k1, k2, k)
        assert torch.equal(scores, ref_s)
        kth = best[..., -1:]
        for b in range(B):
            for h in range(H):
                a = set(slots[b, h][mine[b, h] > kth[b, h]].tolist())
                assert a == set(torch.nonzero(full[b, h] > kth[b, h]).flatten().tolist())


PKM_CASES = [  # (B, H, n, dk, k)
    (5, 2, 40, 12, 8),
    (17, 3, 100, 20, 32),  # B not a multiple of the 16-query block, n not a power of two
    (3, 1, 6, 5, 20),  # k > n: per-half top-6, k = 20 <= 36 pairs
    (4, 2, 64, 64, 5),  # k not a power of two
]


@pytest.mark.parametrize("kind", ["normal", "ints", "ints-bf16"])
@pytest.mark.parametrize("case", PKM_CASES)
def test_pkm_topk_vs_brute_force(gen, poison, case, kind):
    B, H, n, dk, k = case
    q1, q2, k1, k2 = _pkm_inputs(gen, B, H, n, dk, kind)
    scores, slots = kernels.pkm_topk(q1, q2, k1, k2, k)
    check_pkm(q1, q2, k1, k2, k, scores, slots, exact=kind != "normal")


def test_pkm_unfused_path_for_large_k(gen, monkeypatch):
    mod = _impl()
    monkeypatch.setattr(mod, "FUSED_MAX_KP", 4)  # force the GEMM + row top-k path
    q1, q2, k1, k2 = _pkm_inputs(gen, 3, 2, 30, 8, "ints")
    scores, slots = mod.pkm_topk_triton(q1, q2, k1, k2, 9)
    check_pkm(q1, q2, k1, k2, 9, scores, slots, exact=True)


def test_pkm_large_k_through_dispatch_uses_the_row_topk(gen, poison, monkeypatch):
    # k = 130 > 128 = FUSED_MAX_KP, nothing patched: the path a PKM layer with k > 128
    # takes on CUDA (radix select for both halves and for the 130 x 130 pair sums)
    mod = _impl()
    calls = []
    row_topk = mod._row_topk
    monkeypatch.setattr(mod, "_row_topk", lambda x, k: calls.append((x.shape[-1], k)) or row_topk(x, k))
    q1, q2, k1, k2 = _pkm_inputs(gen, 2, 1, 150, 8, "ints")
    scores, slots = kernels.pkm_topk(q1, q2, k1, k2, 130)
    check_pkm(q1, q2, k1, k2, 130, scores, slots, exact=True)
    assert calls == [(150, 130), (150, 130), (130 * 130, 130)]


def test_staircase_is_enough():
    # sorted halves: pair (i, j) has at least (i+1)(j+1) pairs >= it, so only the
    # staircase can hold the top k
    ci, cj, c = _impl()._staircase(32, 32)
    pairs = {(i, j) for i, j in zip(ci, cj) if i >= 0}
    assert len(pairs) == 119 and c == 128
    assert all((i + 1) * (j + 1) <= 32 for i, j in pairs)
