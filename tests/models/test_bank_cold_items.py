"""The LEMUR content path on cold items (issue 13): what a fresh doc encoder can reach at step 0,
the blend-only content path (`content_side_inputs=false`), and same-seed ablations that differ in
the switched memory only (`paired_init`)."""

from __future__ import annotations

import numpy as np
import torch

from models.online import OnlineTrainer
from stream.train.evaluate import iter_event_batches
from tests.models.conftest import tiny_config


def _trainer(**sets: str) -> OnlineTrainer:
    cfg = tiny_config(**sets)
    return OnlineTrainer(cfg.model, cfg.trainer)


def _first_batch(path):
    return next(iter(iter_event_batches(path, 64, 64)))


def _like_logits(t: OnlineTrainer, batch, target_vec: torch.Tensor) -> torch.Tensor:
    u, c = t.inputs(batch)
    c.target_vec = target_vec
    t.model.eval()
    with torch.no_grad():
        scores, _ = t.model(u, c)
    return scores.like_logit


def test_fresh_content_reaches_no_score_at_step_0(ml1m_20k):
    """memory_zero_init: every weight that reads a bank / encoder vector starts at 0 (the blend's
    content -> id projection included), so the untrained encoder's noise moves no score before
    the loss has asked for it, with the side inputs on (default) or off."""
    batch = _first_batch(ml1m_20k)
    for side in ("true", "false"):
        t = _trainer(**{"model.content_side_inputs": side})
        dim = t.cfg.bank.dim
        g = torch.Generator().manual_seed(0)
        a = _like_logits(t, batch, torch.randn(len(batch), dim, generator=g))
        b = _like_logits(t, batch, torch.randn(len(batch), dim, generator=g) * 5.0)
        torch.testing.assert_close(a, b)


def test_blend_only_content_path(ml1m_20k):
    """content_side_inputs=false: the bank vector stands in for the id embedding through the blend
    and nowhere else (no content token input, no history keys/values or queries, no bank cosine
    features); once the blend's projection has weights, the content moves the scores through it."""
    t = _trainer(**{"model.content_side_inputs": "false"})
    m = t.model
    assert m.content_to_id is not None and m.side_dim == 0
    assert m.tok_content is None and m.history.kv_bank is None
    full = _trainer()
    assert m.tok_hist_stats.in_features < full.model.tok_hist_stats.in_features
    assert m.query_proj.in_features == full.model.query_proj.in_features - full.model.side_dim
    batch = _first_batch(ml1m_20k)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.content_to_id.weight.normal_(generator=g)
    a = _like_logits(t, batch, torch.randn(len(batch), t.cfg.bank.dim, generator=g))
    b = _like_logits(t, batch, torch.randn(len(batch), t.cfg.bank.dim, generator=g))
    assert not torch.allclose(a, b)
    t.model.train()
    for b in iter_event_batches(ml1m_20k, 64, 640):
        assert np.isfinite(t.step(b).loss)


def _params(t: OnlineTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.named_parameters()}


def test_paired_init_switching_the_bank_leaves_the_rest_of_the_init():
    """paired_init: with the bank on or off, every component whose shape does not depend on the
    bank starts from the same weights (without it the doc encoder's draws shift all of them),
    and the caller's RNG is as it was before the ranker was built."""
    on = _params(_trainer(**{"model.paired_init": "true"}))
    off = _params(_trainer(**{"model.paired_init": "true", "model.use_bank": "false"}))
    shared = [k for k in off if k in on and on[k].shape == off[k].shape]
    equal = {k for k in shared if torch.equal(on[k], off[k])}
    # Built after the bank's own key/value projection inside the history attention, or with a
    # bank-dependent width (their biases keep the shape, their draws do not).
    bank_shaped = {
        "history.kv_signal.weight",
        "history.out.weight",
        "history.out.bias",
        "tok_hist_stats.bias",
        "query_proj.bias",
    }
    assert set(shared) - equal == bank_shaped
    for k in ("tables.user_emb.weight", "tables.item_emb.weight", "lmn.memory.values", "wide.weight"):
        assert k in equal
    unpaired_on = _params(_trainer())
    unpaired_off = _params(_trainer(**{"model.use_bank": "false"}))
    assert not torch.equal(unpaired_on["tables.item_emb.weight"], unpaired_off["tables.item_emb.weight"])

    torch.manual_seed(7)
    before = torch.get_rng_state()
    cfg = tiny_config(**{"model.paired_init": "true"})
    from models.ranker import Ranker

    Ranker(cfg.model, cfg.model.bank.dim)
    assert torch.equal(torch.get_rng_state(), before)


def test_bank_cosine_features_to_the_wide_part_start_closed(ml1m_20k):
    """content_cos_wide: the 7 bank cosine features are the last inputs of the wide part, with
    weights at 0 before the stream; the fast learner opens them from the loss."""
    from models.features import NUM_COUNTER_FEATURES
    from models.sequence import NUM_COS_FEATURES, NUM_RIDGE_FEATURES

    t = _trainer(**{"model.content_cos_wide": "true"})
    w = t.model.wide.weight
    assert w.shape[1] == NUM_COUNTER_FEATURES + NUM_RIDGE_FEATURES + NUM_COS_FEATURES
    assert torch.count_nonzero(w[:, -NUM_COS_FEATURES:]) == 0
    for b in iter_event_batches(ml1m_20k, 64, 640):
        assert np.isfinite(t.step(b).loss)
    assert torch.count_nonzero(t.model.wide.weight[:, -NUM_COS_FEATURES:]) > 0
    off = _trainer(**{"model.content_cos_wide": "true", "model.use_bank": "false"})
    assert off.model.wide.weight.shape[1] == NUM_COUNTER_FEATURES + NUM_RIDGE_FEATURES
