"""Sparse gather: Triton (interpreter) vs the embedding_bag reference, fwd and both bwd variants.

The Triton values gradient is a sorted, uncoalesced COO of S = min(B*K, N) entries: the
distinct rows, then inert entries that repeat the last row with -0.0 (sizes from shapes
only, no host sync); coalesced it is the reference's gradient."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.dispatch import triton_module
from kernels.sparse_gather.reference import sparse_gather_ref

CPU = torch.zeros(0)

# (N, D, B, K): non-power-of-two D and B, K not a multiple of the block (16 under the
# interpreter), K = 1, D = 1, K > block
SHAPES = [(50, 13, 7, 12), (300, 70, 5, 33), (17, 1, 3, 1), (40, 33, 4, 40)]


def _impl():
    return triton_module("sparse_gather", CPU)


def _inputs(gen, N, D, B, K, dtype, hot=True):
    V = torch.randn(N, D, generator=gen).to(dtype)
    idx = torch.randint(0, N, (B, K), generator=gen)
    if hot:  # about half of the positions hit one of 3 hot rows
        hot_rows = torch.randint(0, N, (3,), generator=gen)
        pick = torch.rand(B, K, generator=gen) < 0.5
        idx = torch.where(pick, hot_rows[torch.randint(0, 3, (B, K), generator=gen)], idx)
    w = torch.randn(B, K, generator=gen, dtype=torch.float64 if dtype == torch.float64 else None)
    return V, idx, w


def _bound(V, idx, w, eps_out):
    # |error| <= (output rounding) + (K fp32 roundings) of sum_j |w||v|
    K = idx.shape[1]
    scale = sparse_gather_ref(V.double().abs(), idx, w.double().abs(), False)
    return (eps_out + 2 * (K + 1) * 2.0**-24) * scale + 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_reference(gen, poison, shape, dtype):
    V, idx, w = _inputs(gen, *shape, dtype)
    out = kernels.sparse_gather(V, idx, w)
    assert out.dtype == dtype and out.shape == (shape[2], shape[1])
    ref = sparse_gather_ref(V.double(), idx, w.double(), False)
    eps_out = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    err = (out.double() - ref).abs()
    assert not out.isnan().any()
    assert (err <= _bound(V, idx, w, eps_out)).all(), err.max()


def test_dispatch_reaches_triton(monkeypatch):
    called = []
    mod = _impl()
    orig = mod.sparse_gather_triton
    monkeypatch.setattr(mod, "sparse_gather_triton", lambda *a: called.append(1) or orig(*a))
    V = torch.randn(5, 3)
    kernels.sparse_gather(V, torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2))
    assert called == [1]


def _grads(fn, V, idx, w, g):
    V = V.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = fn(V, idx, w)
    dV, dw = torch.autograd.grad(out, (V, w), g)
    return dV, dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def _check_sparse_layout(dV, idx, N):
    """S sorted entries: the distinct rows of idx, then the last row again with -0.0 values."""
    S, uniq = min(idx.numel(), N), torch.unique(idx)
    U = uniq.numel()
    assert dV.layout == torch.sparse_coo and not dV.is_coalesced() and dV._nnz() == S
    rows, vals = dV._indices()[0], dV._values()
    assert torch.equal(rows[:U], uniq) and (rows[U:] == uniq[-1]).all()
    inert = vals[U:]
    assert (inert == 0).all() and torch.signbit(inert).all()
    return vals[:U]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["atomic", "reverse", "reverse-pieces"])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_backward_matches_float64_reference(gen, poison, monkeypatch, shape, variant, dtype):
    mod = _impl()
    if variant == "reverse-pieces":  # pieces of 2 positions: hot rows take both levels
        monkeypatch.setattr(mod, "PIECE", 2)
        variant = "reverse"
    N, D, B, K = shape
    V, idx, w = _inputs(gen, N, D, B, K, dtype)
    g = torch.randn(B, D, generator=gen).to(dtype)
    dV, dw = _grads(lambda v, i, x: mod.sparse_gather_triton(v, i, x, True, variant), V, idx, w, g)
    rV, rw = _grads(lambda v, i, x: sparse_gather_ref(v, i, x, True), V.double(), idx, w.double(), g.double())
    # values grad: sparse COO of the used rows (+ inert entries), values' dtype
    assert dV.dtype == dtype
    got = _check_sparse_layout(dV, idx, N)
    assert torch.equal(dV.coalesce().indices()[0], torch.unique(idx))
    ref_rows = rV.to_dense()[torch.unique(idx)]
    mult = torch.bincount(idx.reshape(-1), minlength=N)[torch.unique(idx)].double()
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    contrib = w.double().abs().reshape(-1, 1) * g.double().abs().repeat_interleave(K, 0)  # (B*K, D)
    scale_v = torch.zeros(N, D, dtype=torch.float64).index_add_(0, idx.reshape(-1), contrib)
    scale_v = scale_v[torch.unique(idx)]
    bound_v = (eps + 2 * (mult[:, None] + 1) * 2.0**-24) * scale_v + 1e-30
    assert ((got.double() - ref_rows).abs() <= bound_v).all()
    # weights grad: dense, weights' dtype
    assert dw.dtype == w.dtype and dw.layout == torch.strided
    scale_w = (V.double().abs()[idx] * g.double().abs()[:, None, :]).sum(-1)
    bound_w = 2 * (D + 1) * 2.0**-24 * scale_w + 1e-30
    assert ((dw.double() - rw).abs() <= bound_w).all()


def test_reverse_backward_is_bitwise_repeatable_and_fixed_configs(gen, monkeypatch):
    """Deterministic mode: the reverse variant under "auto", and the same bits every run."""
    from kernels import dispatch

    mod = _impl()
    monkeypatch.setattr(mod, "PIECE", 4)
    monkeypatch.setattr(dispatch, "_DETERMINISTIC", True)
    V, idx, w = _inputs(gen, 40, 9, 6, 10, torch.float32)  # E = 60 <= 4 N: atomic, were it not for the mode
    assert mod.choose_backward(idx.numel(), 40) == "reverse"
    g = torch.randn(6, 9, generator=gen)
    runs = [_grads(lambda v, i, x: mod.sparse_gather_triton(v, i, x), V, idx, w, g) for _ in range(2)]
    (a, wa), (b, wb) = runs
    assert torch.equal(a._values(), b._values()) and torch.equal(a._indices(), b._indices())
    assert torch.equal(wa, wb)


@pytest.mark.parametrize("variant", ["atomic", "reverse"])
def test_gradcheck_triton_float64(gen, monkeypatch, variant):
    mod = _impl()
    monkeypatch.setattr(mod, "PIECE", 2)
    V, idx, w = _inputs(gen, 6, 3, 3, 5, torch.float64)
    V.requires_grad_()
    w.requires_grad_()
    # gradcheck wants a strided grad for a strided input: check the dense layout, then
    # that the sparse COO grad holds the same numbers
    fn = lambda v, x: mod.sparse_gather_triton(v, idx, x, False, variant)
    assert torch.autograd.gradcheck(fn, (V, w))
    g = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    dense = torch.autograd.grad(fn(V, w), V, g)[0]
    sparse = torch.autograd.grad(mod.sparse_gather_triton(V, idx, w, True, variant), V, g)[0]
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-12, atol=1e-12)


def test_gradcheck_reference_float64(gen):
    V, idx, w = _inputs(gen, 6, 3, 3, 5, torch.float64)
    V.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, x: sparse_gather_ref(v, idx, x, False), (V, w))


def test_sparse_grad_feeds_the_same_optimizer_as_reference(gen):
    # same gradient, summed duplicates: what a sparse optimizer sees after coalesce()
    V, idx, w = _inputs(gen, 30, 8, 6, 9, torch.float32)
    g = torch.randn(6, 8, generator=gen)
    dV, _ = _grads(lambda v, i, x: kernels.sparse_gather(v, i, x), V, idx, w, g)
    rV, _ = _grads(lambda v, i, x: sparse_gather_ref(v, i, x), V, idx, w, g)
    dV, rV = dV.coalesce(), rV.coalesce()
    assert torch.equal(dV.indices(), rV.indices())
    torch.testing.assert_close(dV.values(), rV.values(), rtol=1e-5, atol=1e-5)
    opt = torch.optim.SparseAdam([torch.nn.Parameter(V.clone())], lr=0.1)
    opt.param_groups[0]["params"][0].grad = dV
    opt.step()


def test_dense_grad_and_no_weight_grad(gen):
    V, idx, w = _inputs(gen, 20, 5, 4, 6, torch.float32)
    V = V.requires_grad_()
    out = kernels.sparse_gather(V, idx, w, sparse_grad=False)
    out.sum().backward()
    ref = torch.zeros(20, 5).index_add_(0, idx.reshape(-1), w.reshape(-1, 1).expand(-1, 5))
    assert V.grad.layout == torch.strided
    torch.testing.assert_close(V.grad, ref, rtol=1e-5, atol=1e-5)


def test_backward_choice_from_shapes_only(monkeypatch):
    """atomic unless the mean multiplicity is surely > 4 (E > 4 N), or deterministic mode."""
    from kernels import dispatch

    mod = _impl()
    assert mod.choose_backward(64, 1000) == "atomic"
    assert mod.choose_backward(4000, 1000) == "atomic"
    assert mod.choose_backward(4001, 1000) == "reverse"
    monkeypatch.setattr(dispatch, "_DETERMINISTIC", True)
    assert mod.choose_backward(64, 1000) == "reverse"
