"""The memories' mechanisms: the LEMUR bank carries item content (new items encoded on first
sight, content blended into the item by evidence), and the LMN memory loss reconstructs the
user's long-term summary (all earlier events, not only the last L)."""

from __future__ import annotations

import numpy as np
import torch

from models.ids import key64
from models.online import OnlineTrainer
from stream.train.evaluate import iter_event_batches
from tests.models.conftest import tiny_config


def _batches(path, n_events, batch_size=64):
    return list(iter_event_batches(path, batch_size, n_events))


def test_new_items_are_encoded_on_first_sight(ml1m_20k):
    """With no sampling at all, every item of a trained batch that has a text is in the bank
    afterwards: a new item's content vector is there from its first event."""
    cfg = tiny_config(**{"model.sample_rate": "0"})
    t = OnlineTrainer(cfg.model, cfg.trainer)
    b = _batches(ml1m_20k, 64)[0]
    res = t.step(b)
    with_text = {i for i, x in zip(b.item_id.tolist(), b.item_text.tolist()) if x}
    assert with_text and res.encoded == sum(1 for x in b.item_text if x)  # each occurrence, first sight
    assert (t.bank.rows_of([key64(i) for i in sorted(with_text)]) >= 0).all()
    res = t.step(b)  # the same items again: known now, nothing sampled, nothing encoded
    assert res.encoded == 0


def test_content_blend_moves_from_content_to_id_embedding_with_evidence():
    """_blend_content: an item never seen is (mostly) its content prediction; one seen often is
    its own id embedding; the gate is monotone in the evidence."""
    cfg = tiny_config()
    t = OnlineTrainer(cfg.model, cfg.trainer)
    m = t.model
    torch.manual_seed(0)
    with torch.no_grad():
        m.content_to_id.weight.normal_()
    item = torch.randn(3, cfg.model.emb_dim)
    content = torch.randn(3, cfg.model.bank.dim)
    evidence = torch.log1p(torch.tensor([0.0, 5.0, 10_000.0]))
    blended, pred, gate = m._blend_content(item, content, evidence)
    g = gate.squeeze(-1)
    assert g[0] < g[1] < g[2]
    torch.testing.assert_close(g[0], torch.tensor(1 / (1 + cfg.model.content_blend_prior)))
    torch.testing.assert_close(blended[2], item[2], atol=1e-2, rtol=0)
    torch.testing.assert_close(blended, g[:, None] * item + (1 - g[:, None]) * pred)


def test_item_content_comes_through_the_bank_only(ml1m_20k):
    """By default the bank is the model's one content path: no separate bag-of-words table;
    with the bank off the content token is the same for every item (no content at all);
    `content_bag` restores the old bag-of-words path."""
    on = OnlineTrainer(*_cfgs(tiny_config()))
    assert "text_emb" not in on.model.tables and on.model.content_to_id is not None
    off = OnlineTrainer(*_cfgs(tiny_config(**{"model.use_bank": "false"})))
    assert off.model.tok_content is None and off.model.content_to_id is None
    bag = OnlineTrainer(*_cfgs(tiny_config(**{"model.use_bank": "false", "model.content_bag": "true"})))
    assert "text_emb" in bag.model.tables and bag.model.tok_content is not None
    for t in (on, off, bag):  # each trains
        for b in _batches(ml1m_20k, 256):
            assert np.isfinite(t.step(b).loss)


def _cfgs(cfg):
    return cfg.model, cfg.trainer


def test_lmn_target_is_the_long_term_summary_of_every_earlier_event(ml1m_20k):
    """lmn.target=long_term: the store keeps a 2E-wide summary per user over every trained
    event (the window keeps L); the batch's inputs carry it as of before the batch."""
    L = 4
    cfg = tiny_config(**{"model.history.length": str(L)})
    t = OnlineTrainer(cfg.model, cfg.trainer)
    assert t.history.cfg.summary_dim == 2 * cfg.model.emb_dim
    batches = _batches(ml1m_20k, 640)
    for b in batches[:-1]:
        t.step(b)
    users, counts = np.unique(np.concatenate([b.user_id for b in batches[:-1]]), return_counts=True)
    _, n = t.history.summary([key64(u) for u in users])
    np.testing.assert_array_equal(n, counts)  # every event, far more than L for some users
    assert counts.max() > L
    last = batches[-1]
    u, _, _ = t.state.batch_inputs(last)
    known = np.isin(last.user_id, users)
    np.testing.assert_array_equal(u.user_summary_n.numpy() > 0, known)
    recent = OnlineTrainer(*_cfgs(tiny_config(**{"model.lmn.target": "recent"})))
    assert recent.history.cfg.summary_dim == 0


def test_usage_reports_each_memory_for_the_dashboard(ml1m_20k):
    """RankingState.usage(): what /metrics exports per memory (memstream_memory_slot_usage,
    memstream_bank_coverage...), filled once the memories have been read."""
    cfg = tiny_config()
    t = OnlineTrainer(cfg.model, cfg.trainer)
    for b in _batches(ml1m_20k, 256):
        t.step(b)
    u = t.state.usage()
    assert set(u) == {"pkm", "lmn", "bank"}
    for name in ("pkm", "lmn"):
        assert 0 < u[name]["slot_usage"] <= 1
    assert 0 < u["bank"]["fill"] <= 1 and 0 <= u["bank"]["coverage"] <= 1
