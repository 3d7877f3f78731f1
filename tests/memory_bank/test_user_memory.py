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


def test_per_user_reads_do_not_depend_on_the_batch_when_serving():
    mem = _memory()  # batchnorm queries (the default): training reads use the batch's statistics
    q = torch.randn(5, 8)
    mem(q)  # a training forward moves the running statistics
    mem.eval()  # what serving and evaluation read with
    torch.testing.assert_close(mem(q)[:1], mem(q[:1]))
    ln = _memory(query_norm="layernorm")  # per-query norm: batch-independent in training too
    torch.testing.assert_close(ln(q)[:1], ln(q[:1]))


def test_state_round_trip_delegates(through_files, same_tensors):
    a = _memory()
    opt = SparseRowAdam(a.sparse_parameters(), lr=0.1)
    a.memory_loss(a(torch.randn(4, 8)), torch.randn(4, 6)).backward()
    opt.step()
    b = _memory(k=4)
    b.import_state(*through_files(a.export_state()))
    same_tensors(a.export_state()[0], b.export_state()[0])
    assert a.take_delta().tables == {}  # changed value rows are RankingState's DeltaTracker's


def test_delta_of_the_value_rows_through_the_model_state():
    """The LMN value rows a step changes reach a serving copy in RankingState.take_delta
    (memories["lmn"].tables["values"], marked by the DeltaTracker's gradient hook)."""
    from models.state import RankingState
    from stream.config import load_config

    cfg = load_config(
        None,
        [
            "model.use_bank=false",
            "model.use_lmn=true",
            "model.use_pkm=false",
            "model.lmn.n_sub_keys=8",
            "model.lmn.k=4",
            "model.history.max_users=8",
            "model.features.user_buckets=64",
            "model.features.item_buckets=64",
            "model.features.cat_buckets=64",
            "model.features.text_buckets=64",
            "model.features.affinity_buckets=64",
        ],
    ).model
    torch.manual_seed(0)
    train = RankingState(cfg)
    torch.manual_seed(1)
    serve = RankingState(cfg)
    serve.load_full(train.full_snapshot())
    train.start_delta_chain()
    lmn = train.ranker.lmn
    opt = SparseRowAdam(lmn.sparse_parameters(), lr=0.1)
    before = lmn.memory.values.detach().clone()
    query = torch.randn(4, cfg.lmn.query_dim)
    lmn.memory_loss(lmn(query), torch.randn(4, cfg.lmn.value_dim)).backward()
    opt.step()
    moved = (lmn.memory.values.detach() != before).any(1).nonzero().squeeze(1).tolist()
    delta = train.take_delta()
    rows, vals = delta.memories["lmn"].tables["values"]
    assert 0 < len(moved) <= 4 * cfg.lmn.k and rows.tolist() == moved
    assert torch.equal(vals, lmn.memory.values.detach()[rows])
    serve.apply_delta(delta)
    assert torch.equal(serve.ranker.lmn.memory.values, lmn.memory.values)
    train.ranker.eval(), serve.ranker.eval()
    assert torch.equal(serve.ranker.lmn(query), lmn(query))
    assert train.take_delta().memories["lmn"].tables["values"][0].size == 0  # taken once


def test_config_limits_name_the_field():
    with pytest.raises(ValueError, match="n_sub_keys"):
        LMNConfig(n_sub_keys=1025)
    assert LMNConfig().pkm_config().num_slots == 16_384
    assert LMNConfig().pkm_config().query_norm == "batchnorm"  # the default run's
    assert LMNConfig(n_sub_keys=1024).pkm_config().num_slots == 1 << 20
