"""The one config of the ranking model and of its online trainer.

Everything the model and the trainer need is here, validated by pydantic (unknown
keys are errors, so a typo in a YAML file or a `--set` override fails loudly with
the field's name). The memories own their own config models (memory_bank/*);
they are nested here so one YAML file describes the whole model.
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
    # Online counters (user / item counts, like rate, mean rating), read before
    # the batch's labels are applied: no label of an event reaches its own score.
    use_counters: bool = True
    # Counters and histories include the same user's / item's EARLIER events of the
    # current batch (labels of strictly earlier events only): what a per-event learner knows.
    in_batch_features: bool = True
    counter_prior: float = Field(5.0, ge=0)
    # The user's running feedback per word of item_text (genres, title words).
    use_word_affinity: bool = True
    affinity_buckets: int = Field(1 << 21, gt=0)  # pseudo-counts for the smoothed rates
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
    use_lmn: bool = True  # LMN user memory
    use_pkm: bool = True  # MSN product-key memory through a memory gate
    sample_rate: float = Field(0.2, ge=0.0, le=1.0)  # fraction of targets the doc encoder runs on
    # Zero-init the weights that read each memory (LMN read -> user token, bank vectors ->
    # content token / history keys+values / queries / cosine stats): every memory starts
    # with no contribution and the model grows its use only where the loss asks for it.
    memory_zero_init: bool = True
    # Short-term feedback: a recency feature per history item (the attention had no notion of
    # order) and the mean feedback of the last 5 events + the last one in the stats token.
    recent_feedback: bool = True
    # Bank vectors enter the linear layers RMS-normalised (unit norm * sqrt(dim)): rows written
    # by an encoder at different stages of training differ in scale, not only in direction.
    bank_input_norm: bool = True
    # Per-event ridge regression of the user's feedback on their history items' unit id
    # embeddings (models/sequence.py: ridge_user_read); its prediction for the target and its
    # variance go to the stats token and the wide part. Full ML-1M stream, with the ordinal
    # heads below: like AUC .7979 -> .8010 (lambda 3: .8009; with the gradient also through
    # X^T X, ~7% fewer events/s: lambda 0.3 .7976, 1 .7997, 3 .8007).
    history_ridge: bool = True
    ridge_lambda: float = Field(10.0, gt=0)
    lmn_loss_weight: float = Field(0.1, ge=0)
    rating_loss_weight: float = Field(0.5, ge=0)
    # Cumulative (ordinal) auxiliary heads: P(rating >= t) for each t (label units, like
    # rating_center), as the like logit plus a learned per-threshold correction, trained with
    # BCE at `rating_threshold_weight`: more of the rating's information reaches the shared
    # representation than through the MSE alone. ML-1M's like is rating >= 4, so [2, 3, 5]
    # completes the ladder. Full stream, with the ridge read: like AUC .7991 -> .8010
    # (last 20% .8143 -> .8165); [3, 5] .8013 (.8159), [5] .8001, weight 0.25 .8007. [] = off.
    rating_thresholds: list[float] = Field(default_factory=lambda: [2.0, 3.0, 5.0])
    rating_threshold_weight: float = Field(0.5, ge=0)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    bank: BankConfig = Field(default_factory=BankConfig)
    # Sparse word table: the encoder's 2M-parameter embedding would otherwise cost a dense
    # AdamW update of every row every step.
    encoder: EncoderConfig = Field(default_factory=lambda: EncoderConfig(sparse_embedding=True))
    # BatchNorm queries: with LayerNorm the user queries collapse onto ~1% of the slots.
    lmn: LMNConfig = Field(default_factory=lambda: LMNConfig(query_norm="batchnorm"))
    # 65,536 slots, 4 heads x k=16 reads per event: the CPU budget (MSN's reference
    # k=32 costs ~25% more of the step here; GPU configs can raise it).
    pkm: PKMConfig = Field(default_factory=lambda: PKMConfig(heads=4, k=16))
    # 100k users x L=50 ids: the history store's object arrays stay ~40 MB.
    history: HistoryConfig = Field(default_factory=lambda: HistoryConfig(max_users=100_000))

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
    lr_dense: float = Field(2e-3, gt=0)
    lr_wide: float = Field(2e-2, gt=0)  # the counters -> logits linear part: learns fast
    lr_sparse: float = Field(2.5e-2, gt=0)  # id embeddings: sparse rows learn faster than dense
    weight_decay: float = Field(0.0, ge=0)
    # Adam's second-moment decay, dense (AdamW) and row-sparse (id tables, memory values).
    # One pass over ML-1M is ~2k steps and the stream drifts: 0.999 averages the squared
    # gradients over half of it, 0.99 over the last ~100 steps (full stream, like AUC
    # .7961 -> .7965, last 20% .8113 -> .8116; 0.95: .7965 / .8113).
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
