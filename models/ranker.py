"""The ranking model: feature tokens -> RankMixer blocks (+ PKM gate) -> like / rating heads.

Read top to bottom:
  1. tables: hashed id embeddings (sparse rows, trained by SparseRowAdam),
  2. encode_user(): everything that depends on the user only (UG-Sep): user
     tokens, the LMN user-memory read, the history keys/values,
  3. score_candidates(): the candidate side (item tokens, history queries,
     cosine features, task token), the backbone, the PKM memory gate, the heads.
Serving calls encode_user once per request and score_candidates on all its
candidates (`UserState.expand`); training calls both on a batch of B events.

Tokens (T = 6 + Q, each of width D), in semantic order:
  0 user        user id embedding (+ LMN read)
  1 user ctx    categorical / numeric user features, scenario
  2 item        item id embedding, online counters
  3 content     the LEMUR bank / doc encoder vector of the item (+ a bag of words: content_bag)
  4 hist stats  cosine(target, history) features over id and bank vectors
  5 task        learned task token + scenario (MDL: scenario and task are tokens)
  6.. 6+Q-1     history query tokens (cross-attention over the history)
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.features import (
    NUM_COUNTER_FEATURES,
    WORD_RATES_AT,
    ItemWordRates,
    OnlineCounters,
    UserWordAffinity,
)
from models.rankmixer import RankMixerBlock, RMSNorm
from models.sequence import (
    NUM_COS_FEATURES,
    NUM_RECENT_FEATURES,
    NUM_RIDGE_FEATURES,
    HistoryCrossAttention,
    cosine_features,
    gather_rows,
    normalize_history,
    recent_feedback,
    ridge_features,
    ridge_user_read,
)


@dataclass
class UserInputs:
    user_idx: torch.Tensor  # (B,) int64
    cat_idx: torch.Tensor  # (B, C) int64
    num: torch.Tensor  # (B, 2N) float32
    scenario_idx: torch.Tensor  # (B,) int64
    # The history as positions (B, L) pointing into a table of the batch's DISTINCT history
    # items (U): what an item is gets computed once per item, not once per position.
    hist_inverse: torch.Tensor  # (B, L) int64 row of the item table (any row where padded)
    hist_signal: torch.Tensor  # (B, L) float32, centred feedback, 0 where padded
    hist_mask: torch.Tensor  # (B, L) bool
    hist_item_idx: torch.Tensor  # (U,) int64 id-embedding row of each distinct item
    hist_bank: torch.Tensor | None  # (U, Db) bank rows (stop-gradient; misses = learned vector)
    hist_item_evidence: torch.Tensor  # (U,) float32 log(1 + events of each item before the batch)
    # Training only (LMNConfig.target = long_term): the mean of [unit item embedding, feedback *
    # unit item embedding] over ALL the user's events before the batch, and how many (B,).
    user_summary: torch.Tensor | None = None  # (B, 2E)
    user_summary_n: torch.Tensor | None = None  # (B,)

    # Fields indexed by the batch's users (the item table is shared by all of them).
    PER_USER = (
        "user_idx",
        "cat_idx",
        "num",
        "scenario_idx",
        "hist_inverse",
        "hist_signal",
        "hist_mask",
        "user_summary",
        "user_summary_n",
    )

    def select_users(self, fn) -> UserInputs:
        """A copy with fn applied to every per-user field (slicing, expanding), item table shared."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = fn(v) if f.name in self.PER_USER and v is not None else v
        return UserInputs(**out)


@dataclass
class CandidateInputs:
    item_idx: torch.Tensor  # (B,) int64
    text_idx: torch.Tensor  # (B, Lt) int64, 0 = padding
    counters: torch.Tensor  # (B, NUM_COUNTER_FEATURES) float32
    target_vec: torch.Tensor | None  # (B, Db): fresh encoder output (grad) or bank row
    item_evidence: torch.Tensor  # (B,) float32 log(1 + earlier events of the item)


@dataclass
class UserState:
    """The user-side half of the model, reusable across candidates."""

    tokens: torch.Tensor  # (B, 2, D) user and user-context tokens
    query_ctx: torch.Tensor  # (B, E) user part of the history queries
    k: torch.Tensor  # (B, H, L+1, dh) history keys (with the null slot)
    v: torch.Tensor  # (B, H, L+1, dh)
    kv_mask: torch.Tensor  # (B, L+1) bool
    hist_unit: torch.Tensor  # (B, L, E) history item id embeddings, unit norm, detached
    hist_bank_unit: torch.Tensor | None  # (B, L, Db) bank vectors, unit norm
    hist_signal: torch.Tensor  # (B, L)
    hist_mask: torch.Tensor  # (B, L)
    scen_emb: torch.Tensor  # (B, E)
    user_emb: torch.Tensor  # (B, E) user id embedding (the MF term)
    bias: torch.Tensor  # (B, 2) user bias for (like, rating)
    lmn_read: torch.Tensor | None  # (B, dv) for the memory loss
    lmn_target: torch.Tensor | None  # (B, dv) history summary the read must reconstruct
    lmn_target_mask: torch.Tensor | None  # (B,) bool: users the target says something about
    ridge_xty: torch.Tensor | None  # (B, E) the user's ridge read: X^T y over the history items
    ridge_chol: torch.Tensor | None  # (B, E, E) and the Cholesky factor of X^T X + lam I

    def expand(self, n: int) -> UserState:
        """One user (B = 1) -> n identical rows, to score n candidates (views, no copies)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = None if t is None else t.expand(n, *t.shape[1:])
        return UserState(**out)


@dataclass
class Scores:
    like_logit: torch.Tensor  # (B,)
    rating: torch.Tensor  # (B,) predicted rating (in label units)
    threshold_logits: torch.Tensor | None = None  # (B, len(cfg.rating_thresholds)): P(rating >= t)
    # Training only: how far the targets' content vectors, mapped into the id space, are from
    # their id embeddings (evidence-weighted mean squared error); None without content blend.
    content_align_loss: torch.Tensor | None = None


class Ranker(nn.Module):
    def __init__(self, cfg: ModelConfig, bank_dim: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        fc = cfg.features
        E, D, T, Q = cfg.emb_dim, cfg.d_model, cfg.num_tokens, cfg.num_queries
        C, N = fc.max_user_cat, fc.max_user_num
        Db = bank_dim if cfg.use_bank else 0
        self.bank_dim = Db
        # Width of the bank vector where the model reads it besides the blend (content token,
        # history queries and keys/values, bank cosine features); 0 with content_side_inputs off.
        Ds = Db if cfg.content_side_inputs or not cfg.content_blend else 0
        self.side_dim = Ds
        # ModelConfig.paired_init: each component below draws its initial weights from (the
        # trainer's seed, its name) only; the caller's RNG is left as it was.
        self._pair_seed = torch.initial_seed() if cfg.paired_init else None
        rng_before = torch.get_rng_state() if cfg.paired_init else None

        # 1. Id tables, keyed by name (every list of tables derives from this dict); their
        # gradients are sparse COO rows -> SparseRowAdam, their touched rows -> DeltaTracker.
        self._reseed("tables")
        self.tables = nn.ModuleDict(
            {
                "user_emb": nn.Embedding(fc.user_buckets, E, sparse=True),
                "item_emb": nn.Embedding(fc.item_buckets, E, sparse=True),
                "cat_emb": nn.Embedding(fc.cat_buckets, E, sparse=True),
                "user_bias": nn.Embedding(fc.user_buckets, 2, sparse=True),
                "item_bias": nn.Embedding(fc.item_buckets, 2, sparse=True),
            }
        )
        self._reseed("text_emb")
        self._bag = cfg.content_bag
        if self._bag:
            self.tables["text_emb"] = nn.EmbeddingBag(
                fc.text_buckets, E, mode="mean", sparse=True, padding_idx=0
            )
        self._reseed("tables_init")
        t = self.tables
        for name in ("user_emb", "item_emb", "cat_emb", "text_emb"):
            if name in t:
                nn.init.normal_(t[name].weight, std=0.05)
        nn.init.zeros_(t["user_bias"].weight)
        nn.init.zeros_(t["item_bias"].weight)

        # 2. User side.
        self.lmn = None
        lmn_dv = 0
        if cfg.use_lmn:
            from memory_bank.lmn import UserMemory

            # The user-aware query: user id, user features, scenario -> the memory's query width.
            self._reseed("lmn")
            self.lmn_query = nn.Linear(E * (C + 2), cfg.lmn.query_dim)
            self.lmn = UserMemory(cfg.lmn)
            lmn_dv = cfg.lmn.value_dim
            # The memory loss target: a FIXED random projection of the history summary
            # (learned targets would let read and target collapse together).
            g = torch.Generator().manual_seed(1234)
            self.register_buffer(
                "lmn_target_proj", torch.randn(2 * E, lmn_dv, generator=g) / math.sqrt(2 * E)
            )
        self._reseed("tok_user")
        self.tok_user = nn.Linear(E + lmn_dv, D)
        self._reseed("tok_user_ctx")
        self.tok_user_ctx = nn.Linear(E * (C + 1) + 2 * N, D)
        # History items: id embedding (learned) + bank vector and feedback features (given).
        # Recent feedback: a recency feature per history item (keys/values) and the mean
        # feedback of the last RECENT events + the last one (stats token).
        self._recency = cfg.recent_feedback
        n_sig = 4 if self._recency else 3
        self._reseed("history")
        self.history = HistoryCrossAttention(E, Ds, n_sig, D, cfg.attn_dim, cfg.attn_heads)

        # 3. Candidate side.
        self._reseed("tok_item")
        self.tok_item = nn.Linear(E + NUM_COUNTER_FEATURES, D)
        Eb = E if self._bag else 0  # width of the bag of words, when there is one
        self._bag_width = Eb
        # Without any content (no bank, no bag) the content token is a learned constant.
        self._reseed("tok_content")
        self.tok_content = nn.Linear(Eb + Ds, D) if Eb + Ds else None
        self.no_content = nn.Parameter(torch.zeros(D)) if not Eb + Ds else None
        # LEMUR cold start (ModelConfig.content_blend): content vector -> id embedding space,
        # and the gate over the item's evidence (w, b) of sigmoid(w log(1 + n) + b).
        self.content_to_id = self.blend_gate = None
        if Db and cfg.content_blend:
            self._reseed("content_to_id")
            self.content_to_id = nn.Linear(Db, E)
            self.blend_gate = nn.Parameter(torch.tensor([1.0, -math.log(cfg.content_blend_prior)]))
        n_ridge = NUM_RIDGE_FEATURES if cfg.history_ridge else 0
        n_cos = NUM_COS_FEATURES * (2 if Ds else 1) + (NUM_RECENT_FEATURES if self._recency else 0) + n_ridge
        self._reseed("tok_hist_stats")
        self.tok_hist_stats = nn.Linear(n_cos, D)
        self._reseed("task_token")
        self.task_token = nn.Parameter(torch.randn(D) * 0.02)
        self._reseed("tok_task")
        self.tok_task = nn.Linear(E, D)
        self._reseed("query_proj")
        self.query_proj = nn.Linear(E * 2 + Eb + Ds + NUM_COUNTER_FEATURES, Q * D)
        self._reseed("blocks")
        self.blocks = nn.ModuleList(RankMixerBlock(T, D, cfg.ffn_mult) for _ in range(cfg.num_layers))
        self.pkm = self.pkm_gate = None
        if cfg.use_pkm:
            from memory_bank.pkm import MemoryGate, ProductKeyMemory

            self._reseed("pkm")
            self.pkm = ProductKeyMemory(cfg.pkm.model_copy(update={"in_dim": T * D}))
            self._reseed("pkm_gate")
            self.pkm_gate = MemoryGate(T, D, cfg.pkm.value_dim)
        self.norm_out = RMSNorm(D)
        self._reseed("head")
        n_thr = len(cfg.rating_thresholds)
        self.head = nn.Linear(T * D, 2 + n_thr)  # (like logit, rating offset, threshold corrections)
        # Wide part: the online counters straight to the logits. A handful of weights
        # learn in a few batches, which carries the cold start of the stream while the
        # deep part's embeddings are still noise.
        # The ridge read's prediction is a feature of the same kind (a number per event that
        # is already on the label's scale), so it goes the same direct way.
        # With content_cos_wide the bank cosine features (what the user did with items whose
        # content is like the target's) go the same way: they need no learned content mapping.
        self._wide_cos = NUM_COS_FEATURES if cfg.content_cos_wide and Ds else 0
        self._reseed("wide")
        self.wide = nn.Linear(NUM_COUNTER_FEATURES + n_ridge + self._wide_cos, 2 + n_thr)
        self.dot_scale = nn.Parameter(torch.ones(2))  # (like, rating) weights of <user, item>
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if cfg.memory_zero_init:
            self._zero_memory_inputs()
        if cfg.wide_prior_init and cfg.features.use_counters:
            self._wide_prior()
        if self._pair_seed is not None:  # the caller's RNG as it was before the reseeds
            torch.set_rng_state(rng_before)
        del self._pair_seed

    def _reseed(self, component: str) -> None:
        """paired_init: the global RNG seeded from (trainer seed, component name), so whether
        another component exists (a memory switched off) does not move this one's initial
        weights: a same-seed ablation then differs in the switched memory only, not in the
        random draw of everything built after it."""
        if self._pair_seed is not None:
            torch.manual_seed((self._pair_seed * 1_000_003 + zlib.crc32(component.encode())) % (1 << 63))

    @torch.no_grad()
    def _wide_prior(self) -> None:
        """ModelConfig.wide_prior_init: the wide part predicts from the counters' rates."""
        w = self.wide.weight  # (2 + n_thr, NUM_COUNTER_FEATURES + ...): rows like, rating, thresholds
        w.zero_()
        self.wide.bias.zero_()
        w[0, list(OnlineCounters.LIKE_DEV)] = 4.0  # d logit / d p at p = 1/2
        w[1, list(OnlineCounters.RATING_DEV)] = 1.0 / self.cfg.features.rating_scale  # rating units
        w[0, OnlineCounters.BASE_LIKE_LOGIT] = 1.0  # the level: the stream's like rate so far
        w[1, OnlineCounters.BASE_RATING] = 1.0 / self.cfg.features.rating_scale
        if self.cfg.features.use_word_affinity:  # [counters | user x word affinity | ...]
            w[0, OnlineCounters.NUM_FEATURES + UserWordAffinity.MEAN_FEEDBACK] = self.cfg.wide_prior_affinity
        if self.cfg.features.use_word_rates:  # [... | item word rates]
            w[0, WORD_RATES_AT + ItemWordRates.MEAN_DEVIATION] = self.cfg.wide_prior_word_rates

    @torch.no_grad()
    def _zero_memory_inputs(self) -> None:
        """Zero the weight columns that read a memory: a fresh memory is noise (random LMN
        values, an untrained doc encoder), so each branch starts contributing nothing."""
        E, Ds = self.cfg.emb_dim, self.side_dim
        if self.lmn is not None:
            self.tok_user.weight[:, E:].zero_()  # [user emb | LMN read]
        if Ds:
            self.tok_content.weight[:, self._bag_width :].zero_()  # [text bag | bank vector]
            self.query_proj.weight[:, -Ds:].zero_()  # [..., bank vector]
            self.tok_hist_stats.weight[
                :, NUM_COS_FEATURES : 2 * NUM_COS_FEATURES
            ].zero_()  # [id cos | bank cos | ..]
            self.history.kv_bank.weight.zero_()
            if self._wide_cos:  # [counters | ridge | bank cos]
                self.wide.weight[:, -self._wide_cos :].zero_()
        if self.bank_dim:
            if self.content_to_id is not None:  # a new item starts as a shrunk id embedding
                self.content_to_id.weight.zero_()
                self.content_to_id.bias.zero_()

    # ---- parameter groups for the optimizers ----------------------------------------------

    def id_tables(self) -> dict[str, nn.Parameter]:
        """The id tables' weights by table name (the order of `self.tables`)."""
        return {name: emb.weight for name, emb in self.tables.items()}

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse rows (SparseRowAdam)."""
        params = list(self.id_tables().values())
        for mem in (self.lmn, self.pkm):
            if mem is not None:
                params += list(mem.sparse_parameters())
        return params

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def _bank_input(self, vec: torch.Tensor) -> torch.Tensor:
        """A bank / encoder vector as the linear layers read it (RMS-normalised by default)."""
        if self.cfg.bank_input_norm:
            return F.normalize(vec, dim=-1) * math.sqrt(vec.shape[-1])
        return vec

    def _blend_content(
        self, item: torch.Tensor, content: torch.Tensor, evidence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """item (N, E) id embeddings, content (N, Db) bank vectors (as `_bank_input`), evidence
        (N,) log(1 + n) -> the blended item (N, E), the content in id space (N, E), the gate (N, 1).

        An item seen n times has an id embedding trained by n events; its content vector is
        there from its first event. The gate moves the item from the content's prediction to
        its own embedding as evidence accumulates: a new item is scored, attended and
        regressed on (ridge read) where items with similar content are."""
        pred = self.content_to_id(content)  # (N, E)
        gate = torch.sigmoid(self.blend_gate[0] * evidence + self.blend_gate[1]).unsqueeze(-1)  # (N, 1)
        return gate * item + (1.0 - gate) * pred, pred, gate

    # ---- 2. user side (UG-Sep: computed once per user) -------------------------------------

    def encode_user(self, u: UserInputs) -> UserState:
        b = u.user_idx.shape[0]
        user = self.tables["user_emb"](u.user_idx)  # (B, E)
        cats = self.tables["cat_emb"](u.cat_idx).reshape(b, -1)  # (B, C*E)
        scen = self.tables["cat_emb"](u.scenario_idx)  # (B, E)
        lmn_read = lmn_target = lmn_mask = None
        inv = u.hist_inverse  # (B, L) -> rows of the distinct history items
        item_emb = self.tables["item_emb"](u.hist_item_idx)  # (U, E)
        bank = bank_unit = None
        if u.hist_bank is not None:
            bank_unit = normalize_history(u.hist_bank)  # (U, Db)
            bank = bank_unit * math.sqrt(bank_unit.shape[-1]) if self.cfg.bank_input_norm else u.hist_bank
            if self.content_to_id is not None:
                item_emb, _, hgate = self._blend_content(item_emb, bank, u.hist_item_evidence)  # (U, E)
                if self.cfg.content_fade:
                    bank = bank * (1.0 - hgate)  # (U, Db)
        sig = u.hist_signal  # (B, L)
        m = u.hist_mask.to(sig.dtype)
        if self.lmn is not None:
            lmn_read = self.lmn(self.lmn_query(torch.cat([user, cats, scen], dim=1)))  # (B, dv)
            if u.user_summary is not None:  # the user's whole past (LMNConfig.target = long_term)
                summary, lmn_mask = u.user_summary, u.user_summary_n > 0  # (B, 2E), (B,)
            else:  # the recent history: mean item embedding and feedback-weighted mean
                n = m.sum(1, keepdim=True).clamp_min(1.0)
                he = gather_rows(item_emb.detach(), inv)  # (B, L, E)
                summary = torch.cat(
                    [(he * m.unsqueeze(-1)).sum(1) / n, (he * (sig * m).unsqueeze(-1)).sum(1) / n], dim=1
                )  # (B, 2E)
                lmn_mask = u.hist_mask.any(1)  # users without history have nothing to remember
            lmn_target = summary @ self.lmn_target_proj  # (B, dv)
            user_tok = self.tok_user(torch.cat([user, lmn_read], dim=1))
        else:
            user_tok = self.tok_user(user)
        ctx_tok = self.tok_user_ctx(torch.cat([cats, scen, u.num], dim=1))
        if self._recency:  # histories are most recent last: exp(-steps back / 8)
            L = sig.shape[1]
            rec = torch.exp(-(L - 1 - torch.arange(L, dtype=sig.dtype, device=sig.device)) / 8.0) * m
            sig_feats = torch.stack([sig, sig.abs(), m, rec], dim=-1)  # (B, L, 4)
        else:
            sig_feats = torch.stack([sig, sig.abs(), m], dim=-1)  # (B, L, 3)
        if not self.side_dim:  # the bank reached the history through the blend only
            bank = bank_unit = None
        k, v, kv_mask = self.history.history_kv(item_emb, bank, inv, sig_feats, u.hist_mask)
        ridge_xty = ridge_chol = None
        if self.cfg.history_ridge:
            item_unit = F.normalize(item_emb, dim=-1)  # (U, E), with grad: the ridge read's item space
            hist_unit = gather_rows(item_unit.detach(), inv)  # (B, L, E) = normalize_history, once
            x = gather_rows(item_unit, inv)  # (B, L, E) with grad
            ridge_xty, ridge_chol = ridge_user_read(x, sig, u.hist_mask, self.cfg.ridge_lambda)
        else:
            hist_unit = gather_rows(normalize_history(item_emb), inv)  # (B, L, E)
        return UserState(
            tokens=torch.stack([user_tok, ctx_tok], dim=1),
            query_ctx=user,
            k=k,
            v=v,
            kv_mask=kv_mask,
            hist_unit=hist_unit,
            hist_bank_unit=None if bank_unit is None else gather_rows(bank_unit, inv),  # (B, L, Db)
            hist_signal=sig,
            hist_mask=u.hist_mask,
            scen_emb=scen,
            user_emb=user,
            bias=self.tables["user_bias"](u.user_idx),
            lmn_read=lmn_read,
            lmn_target=lmn_target,
            lmn_target_mask=lmn_mask,
            ridge_xty=ridge_xty,
            ridge_chol=ridge_chol,
        )

    # ---- 3. candidate side ---------------------------------------------------------------

    def score_candidates(self, us: UserState, c: CandidateInputs) -> Scores:
        b = c.item_idx.shape[0]
        cfg = self.cfg
        item = self.tables["item_emb"](c.item_idx)  # (B, E)
        text = [self.tables["text_emb"](c.text_idx)] if self._bag else []  # (B, E) mean of word embeddings
        tv = None if c.target_vec is None else self._bank_input(c.target_vec)  # (B, Db)
        align = None
        if tv is not None and self.content_to_id is not None:
            own = item
            item, pred, gate = self._blend_content(own, tv, c.item_evidence)  # (B, E)
            if self.training:  # the mapping learns from items whose embedding has learned
                err = (pred - own.detach()).pow(2).sum(-1)  # (B,)
                align = (gate.detach().squeeze(-1) * err).mean()
            if cfg.content_fade:  # the content inputs fade as the id embedding takes over
                tv = tv * (1.0 - gate)  # (B, Db)
        side = tv if self.side_dim else None  # (B, Db) the bank vector beside the blend
        item_tok = self.tok_item(torch.cat([item, c.counters], dim=1))
        content = text + ([] if side is None else [side])
        if self.tok_content is None:
            content_tok = self.no_content.expand(b, -1)  # (B, D)
        else:
            content_tok = self.tok_content(torch.cat(content, dim=1))
        cos = [cosine_features(item, us.hist_unit, us.hist_signal, us.hist_mask)]  # (B, 7)
        bank_cos = None
        if side is not None and us.hist_bank_unit is not None:
            bank_cos = cosine_features(
                c.target_vec, us.hist_bank_unit, us.hist_signal, us.hist_mask
            )  # (B, 7)
            cos.append(bank_cos)
        if self._recency:
            cos.append(recent_feedback(us.hist_signal, us.hist_mask))  # (B, 2)
        wide_in = c.counters
        if us.ridge_xty is not None:
            ridge = ridge_features(F.normalize(item, dim=-1), us.ridge_xty, us.ridge_chol)  # (B, 2)
            cos.append(ridge)
            wide_in = torch.cat([c.counters, ridge], dim=1)
        if self._wide_cos:
            if bank_cos is None:  # no target vector (cannot happen with the bank on in a trainer)
                bank_cos = wide_in.new_zeros(b, self._wide_cos)
            wide_in = torch.cat([wide_in, bank_cos], dim=1)
        stats_tok = self.tok_hist_stats(torch.cat(cos, dim=1))
        task_tok = self.task_token + self.tok_task(us.scen_emb)  # (B, D)
        # History queries from non-sequence features (target-aware; the history never
        # sees the candidate, so k/v above are reusable across candidates).
        qin = [us.query_ctx, item, *text, c.counters] + ([] if side is None else [side])
        q = self.query_proj(torch.cat(qin, dim=1)).view(b, cfg.num_queries, cfg.d_model)  # (B, Q, D)
        hist_toks = self.history.attend(q, us.k, us.v, us.kv_mask)  # (B, Q, D)
        x = torch.cat(
            [us.tokens, torch.stack([item_tok, content_tok, stats_tok, task_tok], dim=1), hist_toks], dim=1
        )  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0 and self.pkm is not None:
                x = self.pkm_gate(x, self.pkm(x.reshape(b, -1)))  # MSN: memory read gates the tokens
        if self.pkm is not None and not self.blocks:
            x = self.pkm_gate(x, self.pkm(x.reshape(b, -1)))
        out = self.head(self.norm_out(x).reshape(b, -1)) + self.wide(wide_in)  # (B, 2 + n_thr)
        out, thr = out[:, :2], out[:, 2:]
        out = out + us.bias + self.tables["item_bias"](c.item_idx)
        if cfg.dot_interaction:
            # Matrix factorisation term <user, item> per head: the user x item interaction
            # as a direct path; through the mixer alone it is learned much more slowly.
            out = out + self.dot_scale * (us.user_emb * item).sum(-1, keepdim=True)
        fc = cfg.features
        return Scores(
            like_logit=out[:, 0],
            rating=fc.rating_center + fc.rating_scale * out[:, 1],
            threshold_logits=out[:, :1] + thr if thr.shape[1] else None,
            content_align_loss=align,
        )

    def forward(self, u: UserInputs, c: CandidateInputs) -> tuple[Scores, UserState]:
        us = self.encode_user(u)
        return self.score_candidates(us, c), us

    def lmn_loss(self, us: UserState) -> torch.Tensor | None:
        if self.lmn is None or us.lmn_read is None:
            return None
        return self.lmn.memory_loss(us.lmn_read, us.lmn_target, mask=us.lmn_target_mask)
