import pytest
import torch
import torch.nn.functional as F

from memory_bank.delta_tracker import DeltaTracker
from memory_bank.sparse_optim import SparseOptimConfig, SparseOptimStateError, SparseRowAdam


def _sparse_step(table, opt, rows):
    out = F.embedding(torch.tensor(rows), table, sparse=True)
    (out * torch.arange(1.0, out.shape[1] + 1)).sum().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("sync_free", [False, True])
def test_only_selected_rows_and_their_state_change(sync_free):
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(20, 4))
    tracker = DeltaTracker()  # how production learns which rows the optimizer changed
    tracker.track("embeddings", "t", table)
    opt = SparseRowAdam([table], lr=0.1, sync_free=sync_free)
    _sparse_step(table, opt, [1, 2, 3])
    before = table.detach().clone()
    st = {k: v.clone() for k, v in opt.export_state()[0].items()}
    _sparse_step(table, opt, [3, 7, 7])  # duplicate row: gradients summed
    changed = (table.detach() != before).any(1).nonzero().squeeze(1).tolist()
    assert changed == [3, 7]
    after = opt.export_state()[0]
    for name in ("p0.exp_avg", "p0.exp_avg_sq", "p0.row_step"):
        diff = (after[name] != st[name]).reshape(20, -1).any(1).nonzero().squeeze(1).tolist()
        assert diff == [3, 7], name
    assert after["p0.row_step"].tolist()[:8] == [0, 1, 1, 2, 0, 0, 0, 1]
    rows, vals = tracker.take("embeddings")["t"]  # the gradient's rows = the rows the step moved
    assert rows.tolist() == [1, 2, 3, 7] and torch.equal(vals, table.detach()[rows])
    assert tracker.take("embeddings")["t"][0].tolist() == []


def test_rows_hit_every_step_follow_dense_adam():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    sparse = SparseRowAdam([a], lr=0.01)
    dense = torch.optim.Adam([b], lr=0.01)
    for _ in range(5):
        g = torch.randn(5, 3)
        a.grad = torch.sparse_coo_tensor(torch.arange(5)[None], g, (5, 3), check_invariants=True)
        b.grad = g.clone()
        sparse.step()
        dense.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dense_gradient_updates_nonzero_rows_only():
    p = torch.nn.Parameter(torch.ones(6, 2))
    opt = SparseRowAdam([p], lr=0.5)
    grad = torch.zeros(6, 2)
    grad[4] = 1.0
    p.grad = grad
    opt.step()
    assert (p.detach() != 1).any(1).nonzero().squeeze(1).tolist() == [4]


def test_export_import_bit_exact_and_training_continues_identically(through_files, same_tensors):
    torch.manual_seed(0)
    t1 = torch.nn.Parameter(torch.randn(30, 8))
    o1 = SparseRowAdam([t1], lr=0.05, weight_decay=0.01)
    for rows in ([0, 1, 2], [2, 5, 9], [9, 9, 29]):
        _sparse_step(t1, o1, rows)
    tensors, meta = through_files(o1.export_state())
    t2 = torch.nn.Parameter(t1.detach().clone())
    o2 = SparseRowAdam([t2], lr=1.0)
    o2.import_state(tensors, meta)
    same_tensors(o1.export_state()[0], o2.export_state()[0])
    assert o2.param_groups[0]["lr"] == 0.05
    for rows in ([1, 3], [29, 0]):
        _sparse_step(t1, o1, rows)
        _sparse_step(t2, o2, rows)
    assert torch.equal(t1, t2)
    same_tensors(o1.export_state()[0], o2.export_state()[0])


def test_import_rejects_mismatch():
    o = SparseRowAdam([torch.nn.Parameter(torch.zeros(3, 2))])
    tensors, meta = o.export_state()
    other = SparseRowAdam([torch.nn.Parameter(torch.zeros(4, 2))])
    with pytest.raises(SparseOptimStateError, match="p0.exp_avg"):
        other.import_state(tensors, meta)


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="lr"):
        SparseOptimConfig(lr=-1)
    with pytest.raises(ValueError, match="beta2"):
        SparseRowAdam([torch.nn.Parameter(torch.zeros(2, 2))], betas=(0.9, 1.5))


def test_group_added_later_gets_state_and_its_own_lr():
    a, b = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(4, 2))
    opt = SparseRowAdam([a], lr=0.1)
    opt.add_param_group({"params": [b], "lr": 0.01})
    for p in (a, b):
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (4, 2), check_invariants=True)
    opt.step()
    assert a[1, 0].item() == pytest.approx(-0.1, rel=1e-5) and b[1, 0].item() == pytest.approx(
        -0.01, rel=1e-5
    )
    assert set(opt.export_state()[0]) == {
        f"p{i}.{n}" for i in (0, 1) for n in ("exp_avg", "exp_avg_sq", "row_step")
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("shape", [(50, 8), (1000, 64), (40,)])  # E > N, E < N, a 1-D table
def test_sync_free_step_is_bitwise_the_compacting_one(shape, wd):
    """The sync-free step (fixed-size slots, the GPU default) against the compacting one
    (the CPU default): sparse (duplicates, E > N and E < N), coalesced and dense gradients,
    several steps: the same rows get the same update, bit for bit, and the others stay."""
    gen = torch.Generator().manual_seed(7)
    init = torch.randn(shape, generator=gen)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    fast = SparseRowAdam([a], lr=0.05, weight_decay=wd, sync_free=True)
    ref = SparseRowAdam([b], lr=0.05, weight_decay=wd, sync_free=False)
    N = shape[0]
    for step in range(8):
        E = (3 * N // 2, N // 3, 1, 2 * N)[step % 4]
        idx = torch.randint(0, N, (E,), generator=gen)
        idx[: E // 2] = idx[0]  # a hot row
        vals = torch.randn((E, *shape[1:]), generator=gen)
        grad = torch.sparse_coo_tensor(idx[None], vals, shape, check_invariants=True)
        if step == 5:
            grad = grad.coalesce()
        if step == 6:
            grad = grad.to_dense()
        a.grad, b.grad = grad.clone(), grad.clone()
        fast.step()
        ref.step()
        assert torch.equal(a, b), step
        for name, t in fast.export_state()[0].items():
            assert torch.equal(t, ref.export_state()[0][name]), (step, name)
