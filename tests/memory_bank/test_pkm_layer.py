import json

import numpy as np
import pytest
import torch

from memory_bank.delta_tracker import DeltaTracker
from memory_bank.pkm import MemoryGate, PKMConfig, PKMStateError, ProductKeyMemory
from memory_bank.sparse_optim import SparseRowAdam


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    base = {
        "in_dim": 8,
        "n_sub_keys": 4,
        "heads": 2,
        "k": 16,
        "key_dim": 8,
        "value_dim": 5,
        "usage_window": 3,
        "query_reservoir": 64,
    }
    return ProductKeyMemory(PKMConfig(**{**base, **kw}))


def _brute_force(layer, x):
    """Score all N slots of every head, keep the top k, softmax, read, sum heads."""
    half, k = layer.cfg.key_dim // 2, layer.cfg.k
    q = layer.queries(x).double()  # (B, H, kd)
    keys = layer.keys().double()  # (H, 2, n, half)
    s1 = torch.einsum("bhd,hnd->bhn", q[..., :half], keys[:, 0])
    s2 = torch.einsum("bhd,hnd->bhn", q[..., half:], keys[:, 1])
    scores = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # (B, H, N), slot = i1*n + i2
    top, slots = scores.topk(k, dim=-1)
    w = torch.softmax(top, dim=-1)  # (B, H, k)
    return (w[..., None] * layer.values.double()[slots]).sum(dim=(1, 2))  # (B, value_dim)


@pytest.mark.parametrize(
    "k, norm, overparam", [(16, "layernorm", True), (3, "batchnorm", True), (2, "none", False)]
)
def test_product_key_topk_equals_brute_force_over_all_slots(k, norm, overparam):
    layer = _layer(k=k, query_norm=norm, overparam_keys=overparam)
    with torch.no_grad():  # non-trivial mixer and norm statistics
        if layer.key_mix is not None:
            layer.key_mix.add_(0.1 * torch.randn_like(layer.key_mix))
    x = torch.randn(6, 8)
    layer.train()
    out = layer(x)
    torch.testing.assert_close(out.double(), _brute_force(layer, x), rtol=1e-5, atol=1e-6)


def test_gradients_values_sparse_on_used_rows_keys_and_query_dense():
    layer = _layer(k=2, n_sub_keys=8)
    tracker = DeltaTracker()  # as RankingState registers the value table
    tracker.track("pkm", "values", layer.values)
    x = torch.randn(3, 8)
    q = layer.queries(x)
    _, slots = layer.select(q, layer.keys())
    layer(x).pow(2).sum().backward()
    g = layer.values.grad
    assert g.is_sparse
    assert set(g.coalesce().indices()[0].tolist()) == set(slots.flatten().tolist())
    assert layer.base_keys.grad.abs().sum() > 0 and layer.key_mix.grad.abs().sum() > 0
    assert layer.query.weight.grad.abs().sum() > 0
    rows, vals = tracker.take("pkm")["values"]  # the rows the gradient hook marked
    assert rows.tolist() == torch.unique(slots).tolist() and torch.equal(vals, layer.values.detach()[rows])


def test_slot_usage_stats():
    u = ProductKeyMemory._usage
    flat = u(torch.full((16,), 3))
    assert flat["slot_usage"] == 1.0 and flat["kl_uniform"] == pytest.approx(0.0) and flat["dead_slots"] == 0
    one = torch.zeros(16, dtype=torch.int64)
    one[5] = 7
    collapsed = u(one)
    assert collapsed["kl_uniform"] == pytest.approx(np.log(16)) and collapsed["dead_slots"] == 15
    assert u(torch.zeros(16, dtype=torch.int64))["kl_uniform"] is None

    layer = _layer(k=2, n_sub_keys=8)
    layer.train()
    for _ in range(4):
        layer(torch.randn(5, 8))
    s = layer.stats()
    json.dumps(s)
    assert s["windows_done"] == 1 and s["window"]["hits"] == 3 * 5 * 2 * 2
    assert s["cumulative"]["hits"] == 4 * 5 * 2 * 2
    for part in ("window", "cumulative"):
        assert 0 < s[part]["slot_usage"] <= 1 and s[part]["kl_uniform"] >= 0
        assert s[part]["dead_slots"] == round(64 * (1 - s[part]["slot_usage"]))
    layer.eval()
    layer(torch.randn(5, 8))  # eval forwards are not counted
    assert layer.stats()["cumulative"]["hits"] == s["cumulative"]["hits"]


def test_reinit_changes_only_dead_keys():
    layer = _layer(n_sub_keys=16, heads=2, k=1, query_reservoir=32)
    layer.train()
    layer(torch.randn(4, 8))
    dead = (layer.subkey_hits == 0).clone()  # (H, 2, n)
    assert dead.any() and (~dead).any()
    base_before, keys_before = layer.base_keys.detach().clone(), layer.keys().detach().clone()
    assert layer.reinit_dead_keys() == int(dead.sum())
    base_after, keys_after = layer.base_keys.detach(), layer.keys().detach()
    assert torch.equal(base_after[~dead], base_before[~dead])
    assert torch.equal(keys_after[~dead], keys_before[~dead])
    assert (base_after[dead] != base_before[dead]).any(-1).all()
    # The new keys sit among the recent queries (k-means centroids), not at random places.
    q = layer.recent_queries[:, :4]  # (H, 4, kd)
    half = layer.cfg.key_dim // 2
    for h in range(2):
        for a in range(2):
            pts = q[h, :, a * half : (a + 1) * half]
            d = torch.cdist(keys_after[h, a][dead[h, a]], pts).min(1).values
            assert d.max() < 0.1
    assert layer.stats()["reinit_sub_keys_total"] == int(dead.sum())
    assert layer.subkey_hits.sum() == 0  # counting starts again
    assert layer.reinit_dead_keys(torch.randn(16, 8)) == 64  # (M, key_dim): same queries, every head


def _train_step(layer, opts, x):
    loss = (layer(x) - 1).pow(2).mean()
    loss.backward()
    for o in opts:
        o.step()
        o.zero_grad()
    return loss


def test_save_load_bit_exact_and_training_continues_identically(through_files, same_tensors):
    a = _layer(k=3, n_sub_keys=6)
    opts_a = [SparseRowAdam([a.values], lr=0.05), torch.optim.SGD(a.dense_parameters(), lr=0.1)]
    xs = [torch.randn(5, 8) for _ in range(6)]
    for x in xs[:3]:
        _train_step(a, opts_a, x)
    layer_state = through_files(a.export_state())
    opt_state = through_files(opts_a[0].export_state())
    b = _layer(seed=123, k=3, n_sub_keys=6)
    opts_b = [SparseRowAdam([b.values], lr=0.05), torch.optim.SGD(b.dense_parameters(), lr=0.1)]
    b.import_state(*layer_state)
    opts_b[0].import_state(*opt_state)
    same_tensors(a.export_state()[0], b.export_state()[0])
    assert a.export_state()[1] == b.export_state()[1]
    assert "hits_total" in layer_state[0] and "hits_total" not in a.state_dict()  # weights only there
    for x in xs[3:]:
        assert torch.equal(_train_step(a, opts_a, x), _train_step(b, opts_b, x))
    same_tensors(a.export_state()[0], b.export_state()[0])
    with pytest.raises(PKMStateError, match="config"):
        _layer(k=2, n_sub_keys=6).import_state(*layer_state)


def _delta(layer, tracker):
    """What RankingState.take_delta ships for the layer: its own delta (nothing) plus the value
    rows the DeltaTracker marked since the last take."""
    d = layer.take_delta()
    assert d.tables == {} and d.ids == {}  # the layer tracks nothing itself
    d.tables.update(tracker.take("pkm"))
    return d


def test_delta_makes_a_serving_copy_equal(through_files):
    train = _layer(k=2, n_sub_keys=8)
    serve = _layer(seed=9, k=2, n_sub_keys=8)
    tracker = DeltaTracker()
    tracker.track("pkm", "values", train.values)
    serve.import_state(*through_files(train.export_state()))  # the full snapshot
    opts = [SparseRowAdam([train.values], lr=0.1), torch.optim.Adam(train.dense_parameters(), lr=0.01)]
    changed, moved = set(), set()
    for step in range(5):
        before = train.values.detach().clone()
        _train_step(train, opts, torch.randn(4, 8))
        moved |= set((train.values.detach() != before).any(1).nonzero().squeeze(1).tolist())
        if step % 2:
            d = _delta(train, tracker)
            changed |= set(d.tables["values"][0].tolist())
            serve.apply_delta(d)
    d = _delta(train, tracker)
    changed |= set(d.tables["values"][0].tolist())
    serve.apply_delta(d)
    assert moved <= changed and 0 < len(changed) < 64  # every moved row shipped, not the table
    assert torch.equal(train.values, serve.values)
    # The dense tensors (query net, norm, keys) travel in RankingState's dense state.
    serve.load_state_dict({k: v for k, v in train.state_dict().items() if k != "values"}, strict=False)
    train.eval(), serve.eval()
    x = torch.randn(7, 8)
    assert torch.equal(train(x), serve(x))


def test_memory_gate():
    tokens, v = torch.randn(3, 4, 6), torch.randn(3, 5)
    for mode in ("scale", "residual"):
        gate = MemoryGate(num_tokens=4, token_dim=6, mem_dim=5, mode=mode)
        assert torch.equal(gate(tokens, v), tokens)  # identity at init
        with torch.no_grad():
            gate.proj.weight.normal_()
        out = gate(tokens, v)
        assert out.shape == (3, 4, 6) and not torch.equal(out, tokens)
    ratio = out - tokens  # residual: difference is W v
    torch.testing.assert_close(ratio, gate.proj(v).view(3, 4, 6))
    with pytest.raises(ValueError, match="mode"):
        MemoryGate(4, 6, 5, mode="add")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="key_dim"):
        PKMConfig(key_dim=7)
    with pytest.raises(ValueError, match="query_norm"):
        PKMConfig(query_norm="rms")
    with pytest.raises(ValueError, match="k"):
        PKMConfig(n_sub_keys=2, k=5)
