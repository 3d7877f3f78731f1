"""The one config of the ranking model and of its online trainer.

Everything the model and the trainer need is here, validated by pydantic (unknown
keys are errors, so a typo in a YAML file or a `--set` override fails loudly with
the field's name). The memories own their own config models (memory_bank/*);
they are nested here so one YAML file describes the whole model. Every class default
is the value the default run uses (configs/default.yaml spells the same values out),
so a memory built on its own from its config class is the one in the default model;
only `in_dim` / `device` are set by the model at construction. Why each measured
value was chosen: benchmarks/results/config_choices.md.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from memory_bank.history import HistoryConfig
from memory_bank.lemur import BankConfig, EncoderConfig
from memory_bank.lmn import LMNConfig
from memory_bank.pkm import PKMConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FeatureConfig(_Strict):
    """How raw event fields become ids and numbers (hashing, text, counters)."""

    # Hashed id tables: collisions are accepted (Monolith-style collisionless
    # tables are a serving concern); sizes are powers of two for cheap modulo.
    user_buckets: int = Field(1 << 16, gt=0)
    item_buckets: int = Field(1 << 16, gt=0)
    cat_buckets: int = Field(1 << 14, gt=0)  # all user categorical features, salted by name
    text_buckets: int = Field(1 << 15, gt=0)  # hashed words of item_text
    max_text_tokens: int = Field(32, gt=0)
    # Categorical / numeric user features by name; empty = take whatever the
    # events carry (sorted by name). Fixing them keeps the token layout stable.
    user_cat: list[str] = Field(default_factory=list)
    user_num: list[str] = Field(default_factory=list)
    max_user_cat: int = Field(8, gt=0)
    max_user_num: int = Field(4, gt=0)
    # When the names are not declared: a new name gets a free slot once it was seen in
    # `admit_after` events (one event carrying many new names must not take every slot), at
    # most `max_admitted_per_window` names per `admission_window_events` events. Names not
    # admitted are counted as dropped; at most `max_candidate_names` are tracked meanwhile.
    admit_after: int = Field(32, ge=1)
    max_admitted_per_window: int = Field(8, ge=1)
    admission_window_events: int = Field(100_000, gt=0)
    max_candidate_names: int = Field(4096, gt=0)
    # Online counters (user / item counts, like rate, mean rating), read before
    # the batch's labels are applied: no label of an event reaches its own score.
    use_counters: bool = True
    # Counters and histories include the same user's / item's EARLIER events of the
    # current batch (labels of strictly earlier events only): what a per-event learner knows.
    in_batch_features: bool = True
    counter_prior: float = Field(5.0, ge=0)
    # The user's counters again, decayed by this factor at each of the user's events (the
    # user's recent like rate and mean rating); None = those two features are 0.
    user_decay: float | None = Field(0.9, gt=0, lt=1)
    # The user's running feedback per word of item_text (genres, title words).
    use_word_affinity: bool = True
    affinity_buckets: int = Field(1 << 21, gt=0)  # pseudo-counts for the smoothed rates
    # The stream's running feedback per word of item_text over all users (ItemWordRates):
    # a content prior for items nobody has rated yet.
    use_word_rates: bool = True
    like_task: str = "like"
    rating_task: str = "rating"
    rating_center: float = 3.5
    rating_scale: float = 1.0


class ModelConfig(_Strict):
    """Sizes, switches and the memories' configs of the ranking model."""

    # Backbone (RankMixer): T tokens of width D, H = T heads in the token mixing.
    d_model: int = Field(64, gt=0)  # D
    num_tokens: int = Field(8, gt=0)  # T
    num_layers: int = Field(2, ge=0)
    ffn_mult: int = Field(2, gt=0)  # per-token SwiGLU hidden = ffn_mult * D
    emb_dim: int = Field(32, gt=0)  # width of every id / feature embedding
    # Sequence (LEMUR / HyFormer style): query tokens cross-attend the history.
    num_queries: int = Field(2, gt=0)
    attn_heads: int = Field(2, gt=0)
    attn_dim: int = Field(32, gt=0)  # width of the history attention (its k/v projection is the cost)
    # Memories (each one's switch is what the ablations flip).
    dot_interaction: bool = True  # <user emb, item emb> added to the logits (MF path)
    use_bank: bool = True  # LEMUR doc encoder + item memory bank
    # LMN user memory. Off by default: measured, it moves neither ML-1M (0.8028 with and
    # without) nor ML-100K (-0.001 with it) nor its own stress-long-taste stream, and costs
    # about a tenth of the step (benchmarks/results/memory_value.md).
    use_lmn: bool = False
    # MSN product-key memory through a memory gate. Off by default: measured, it moves no
    # stream it was tried on (ML-1M, ML-100K, its own capacity stream at 4k..1M slots) and
    # costs about a quarter of the step (benchmarks/results/memory_value.md).
    use_pkm: bool = False
    sample_rate: float = Field(0.2, ge=0.0, le=1.0)  # fraction of targets the doc encoder runs on
    # LEMUR cold start: every item is represented by its id embedding blended with its content
    # vector (bank / encoder) mapped into the id space, weighted by the item's evidence:
    # sigmoid(w log(1 + n) + b), initially (n + 1) / (n + 1 + content_blend_prior). The mapping
    # is also trained to land each item near its own id embedding (`content_align_weight`,
    # weighted by the same evidence), so a new item starts where similar known items are.
    content_blend: bool = True
    # Item content reaches the model through the LEMUR path (doc encoder -> bank) only: with
    # use_bank=false the model has no item content. True adds the old second path, a mean of
    # hashed word embeddings of item_text in the content token and the history queries (the
    # model before the memories carried content; kept to measure against).
    content_bag: bool = False
    content_blend_prior: float = Field(5.0, gt=0)
    content_align_weight: float = Field(1.0, ge=0)
    # The bank vectors the model reads besides the blend (content token, history queries and
    # keys/values) are scaled by the same 1 - gate: content is what carries a new item, and for
    # an item with many events it is mostly noise beside the id embedding.
    content_fade: bool = True
    # The bank vector also enters the content token, the history queries and keys/values and the
    # bank cosine features (each faded by content_fade); false = only through the blend into the
    # item embedding (the one place it stands in for the id), fewer inputs to fit on small data.
    content_side_inputs: bool = True
    # The bank cosine features (cosine of the target's content vector with the user's history
    # items' bank vectors, with their feedback) also go to the wide part (trainer.lr_wide, from
    # 0): a per-user content affinity that needs no learned mapping, read by the fast learner.
    content_cos_wide: bool = False
    # Zero-init the weights that read each memory (LMN read -> user token, bank vectors ->
    # content token / history keys+values / queries / cosine stats): every memory starts
    # with no contribution and the model grows its use only where the loss asks for it.
    memory_zero_init: bool = True
    # The wide part starts as the counters' own prediction: like logit = 4 x (the item's and
    # the user's recent like rate, as deviations from the global rate; 4 = the logit's slope
    # at 1/2) + the logit of the stream's like rate so far (the level), rating = the same two
    # mean-rating deviations + the stream's mean rating, every other weight 0. A random
    # start needs tens of batches to find those weights, and the events it scores meanwhile
    # are most of the stream's first sightings of items and users.
    wide_prior_init: bool = True
    # With wide_prior_init, the like logit's starting weight on the user's mean feedback over the
    # item's words (the user x word affinity counter, centred rating units): "this user rates
    # comedies high" from the first batch. 0 leaves it to be learned from 0 at trainer.lr_wide.
    wide_prior_affinity: float = Field(1.0, ge=0)
    # The same for the item's mean word deviation from the stream's mean feedback, faded by
    # the item's evidence (features.use_word_rates, centred rating units).
    wide_prior_word_rates: float = Field(3.0, ge=0)
    # Each component of the ranker draws its initial weights from (trainer.seed, its name) only,
    # so switching a memory off changes that memory and not the random init of everything else
    # (today the doc encoder and each memory shift the draws of all that is built after them).
    paired_init: bool = False
    # Short-term feedback: a recency feature per history item (the attention had no notion of
    # order) and the mean feedback of the last 5 events + the last one in the stats token.
    recent_feedback: bool = True
    # Bank vectors enter the linear layers RMS-normalised (unit norm * sqrt(dim)): rows written
    # by an encoder at different stages of training differ in scale, not only in direction.
    bank_input_norm: bool = True
    # Per-event ridge regression of the user's feedback on their history items' unit id
    # embeddings (models/sequence.py: ridge_user_read); its prediction for the target and its
    # variance go to the stats token and the wide part. `ridge_lambda` is the ridge penalty.
    history_ridge: bool = True
    ridge_lambda: float = Field(10.0, gt=0)
    lmn_loss_weight: float = Field(0.1, ge=0)
    rating_loss_weight: float = Field(0.5, ge=0)
    # Cumulative (ordinal) auxiliary heads: P(rating >= t) for each t (label units, like
    # rating_center), as the like logit plus a learned per-threshold correction, trained with
    # BCE at `rating_threshold_weight`: more of the rating's information reaches the shared
    # representation than through the MSE alone. ML-1M's like is rating >= 4, so [2, 3, 5]
    # completes the ladder. [] = off.
    rating_thresholds: list[float] = Field(default_factory=lambda: [2.0, 3.0, 5.0])
    rating_threshold_weight: float = Field(0.5, ge=0)
    # The components' own class defaults (no override here: what a component built on its
    # own gets is what the model gets). The ranker sets pkm.in_dim to T * D; RankingState
    # puts the bank and the encoder on the trainer's device.
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    bank: BankConfig = Field(default_factory=BankConfig)  # LEMUR item memory bank
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)  # LEMUR doc encoder
    lmn: LMNConfig = Field(default_factory=LMNConfig)  # LMN user memory
    pkm: PKMConfig = Field(default_factory=PKMConfig)  # MSN product-key memory (Lample et al. 2019)
    history: HistoryConfig = Field(default_factory=HistoryConfig)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.num_tokens:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by num_tokens={self.num_tokens} "
                "(token mixing splits each token into T heads)"
            )
        if self.use_bank and self.encoder.dim != self.bank.dim:
            raise ValueError(f"encoder.dim={self.encoder.dim} must equal bank.dim={self.bank.dim}")
        if self.attn_dim % self.attn_heads:
            raise ValueError(f"attn_dim={self.attn_dim} must be divisible by attn_heads={self.attn_heads}")
        bad = [t for t in self.rating_thresholds if not math.isfinite(t)]
        if bad or len(set(self.rating_thresholds)) != len(self.rating_thresholds):
            raise ValueError(f"rating_thresholds={self.rating_thresholds} must be distinct finite numbers")
        if self.num_tokens != 6 + self.num_queries:
            raise ValueError(
                f"num_tokens={self.num_tokens} must be 6 + num_queries={self.num_queries} (user, user "
                "context, item, item content, history stats, task + one token per history query)"
            )
        return self


class TrainerConfig(_Strict):
    """The online trainer: optimizers, batching, determinism, metrics."""

    batch_size: int = Field(512, gt=0)
    # The stream's first events train in smaller steps: the micro-batch starts at
    # min_batch_size and doubles at batch_ramp_events / 2^k events applied, reaching
    # batch_size at batch_ramp_events (with the defaults: 64 until 8k events, 128 until 16k,
    # 256 until 32k). A new stream's first sightings of items and users are scored by a model
    # that has taken few steps; smaller steps there take ~4x as many updates from the same
    # events. 0 = batch_size from the start.
    min_batch_size: int = Field(64, gt=0)
    batch_ramp_events: int = Field(32_000, ge=0)
    lr_dense: float = Field(2e-3, gt=0)
    lr_wide: float = Field(2e-2, gt=0)  # the counters -> logits linear part: learns fast
    lr_sparse: float = Field(2.5e-2, gt=0)  # id embeddings: sparse rows learn faster than dense
    weight_decay: float = Field(0.0, ge=0)
    # The dense learning rates (backbone, heads, wide part) ramp linearly from 1/n to 1 over the
    # first n steps. Adam's first steps move every weight by about its lr whatever the gradient's
    # size: the zero-initialised heads (hundreds of inputs) then shift every score's level by ~1
    # logit from one batch to the next, which costs the stream's first batches, where most of
    # the first sightings of items are. 0 or 1: no ramp. 40 steps: the first 2,560 events at
    # the batch ramp's 64-event steps (10 steps of 512 before the ramp: benchmarks/results/
    # config_choices.md).
    lr_warmup_steps: int = Field(40, ge=0)
    # Adam's second-moment decay, dense (AdamW) and row-sparse (id tables, memory values).
    # 0.99 averages the squared gradients over the last ~100 steps, 0.999 over ~1,000 (one
    # pass over ML-1M at batch 512 is ~2k steps, and the stream drifts).
    adam_beta2: float = Field(0.99, ge=0, lt=1)
    sparse_beta2: float = Field(0.99, ge=0, lt=1)
    grad_clip: float = Field(10.0, gt=0)
    seed: int = 0
    device: str = Field("cpu", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")  # auto: cuda when there is one
    # Every N steps, PKM/LMN sub-keys no query selected since the last time are moved onto
    # k-means centroids of recent queries (faiss); 0 = never.
    reinit_dead_keys_every: int = Field(0, ge=0)
    threads: int = Field(1, ge=1)  # torch intra-op threads; fixed for determinism
    deterministic: bool = True
    metrics_window: int = Field(10_000, gt=0)  # W of the windowed metrics
    keep_score_log: bool = True  # ordered (score, label) log: AUC of the last 20%

    def micro_batch_size(self, events_applied: int) -> int:
        """Events in the next training step, after `events_applied` (see batch_ramp_events)."""
        size, upto = self.batch_size, self.batch_ramp_events
        while size > self.min_batch_size and events_applied < upto:
            size, upto = max(size // 2, self.min_batch_size), upto // 2
        return size
