import json

import pytest
import torch

from memory_bank.lmn import LMNConfig, UserMemory
from memory_bank.sparse_optim import SparseRowAdam


def _memory(**kw):
    torch.manual_seed(0)
    base = {"query_dim": 8, "n_sub_keys": 8, "k": 4, "key_dim": 8, "value_dim": 6}
    return UserMemory(LMNConfig(**{**base, **kw}))


def test_read_shape_and_memory_loss_trains_the_memory():
    mem = _memory()
    query, target = torch.randn(16, 8), torch.randn(16, 6)
    sparse = SparseRowAdam(mem.sparse_parameters(), lr=mem.cfg.value_lr * 10)
    dense = torch.optim.Adam(mem.dense_parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        read = mem(query)
        assert read.shape == (16, 6)
        loss = mem.memory_loss(read, target)
        loss.backward()
        sparse.step(), dense.step()
        sparse.zero_grad(), dense.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    s = mem.stats()
    json.dumps(s)
    assert s["num_slots"] == 64 and 0 < s["cumulative"]["slot_usage"] <= 1


def test_memory_loss_variants_and_mask():
    read, target = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    mem = _memory(memory_loss="mse")
    mask = torch.tensor([True, False, True, False])
    want = (read - target).pow(2).mean(-1)[mask].mean()
    torch.testing.assert_close(mem.memory_loss(read, target, mask), want)
    mem.memory_loss(read, target).backward()
    assert target.grad is None  # the summary target is detached
    cos = _memory().memory_loss(target.detach(), target.detach())
    assert float(cos) == pytest.approx(0.0, abs=1e-6)


def test_per_user_reads_do_not_depend_on_the_batch():
    mem = _memory()
    q = torch.randn(5, 8)
    torch.testing.assert_close(mem(q)[:1], mem(q[:1]))


def test_state_and_delta_delegate(through_files, same_tensors):
    a = _memory()
    opt = SparseRowAdam(a.sparse_parameters(), lr=0.1)
    a.memory_loss(a(torch.randn(4, 8)), torch.randn(4, 6)).backward()
    opt.step()
    b = _memory(k=4)
    b.import_state(*through_files(a.export_state()))
    same_tensors(a.export_state()[0], b.export_state()[0])
    d = a.take_delta()
    assert 0 < len(d.tables["values"][0]) <= 16
    b.apply_delta(d)
    assert torch.equal(a.memory.values, b.memory.values)


def test_config_limits_name_the_field():
    with pytest.raises(ValueError, match="n_sub_keys"):
        LMNConfig(n_sub_keys=1025)
    assert LMNConfig().pkm_config().num_slots == 16_384
    assert LMNConfig(n_sub_keys=1024).pkm_config().num_slots == 1 << 20
