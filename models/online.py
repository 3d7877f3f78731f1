"""The online trainer: one pass over a stream, test-then-train, memories updated as it goes.

`OnlineTrainer.step(batch)` on a micro-batch of events (anything with
EventBatch's attributes):
  1. features, the users' histories (history store) and their bank vectors are
     read as they were BEFORE this batch (labels of this batch are not in them);
  2. the doc encoder runs on a sampled fraction of the targets (LEMUR, default
     20%); the other targets read their bank row;
  3. forward; the scores are recorded in the streaming metrics BEFORE any
     parameter changes (progressive validation);
  4. backward; dense AdamW and row-sparse Adam (id tables, LMN/PKM values) step;
  5. memories: fresh encoder outputs overwrite their bank rows (staleness is
     measured against the cached row first), histories are appended, online
     counters take the labels; touched rows are tracked for delta snapshots.
No Ray, no Kafka: the streaming job (stream/) drives this object. The model's state
(ranker, memories, features, history) is a `models.state.RankingState`; this object
adds what only learning needs: the optimizers, the metrics and the RNG.

Determinism: everything is seeded from `trainer.seed` (torch, the sampling
generator), the thread count is fixed, and save/load restores every RNG, so a
run that is saved and loaded continues bit-for-bit like one that was not.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.deterministic
from safetensors.torch import load_file, save_file

from kernels.dispatch import set_deterministic
from memory_bank.history import HistoryCapacityError
from memory_bank.lemur import BankCapacityError
from memory_bank.sparse_optim import SparseRowAdam
from models.config import ModelConfig, TrainerConfig
from models.features import BatchLike
from models.metrics import StreamingMetrics
from models.ranker import CandidateInputs, UserInputs
from models.state import EMBEDDINGS, ENCODER_WORDS, RankingState

# 2: the model state as RankingState components (id tables in one component, the row
# marks of one DeltaTracker). 3: the bank and the histories keyed by integer keys
# (models.ids), histories on the device. 4: the item word rates (features.word_rates, two
# more counter columns). States of other versions are refused.
STATE_VERSION = 4


class TrainerStateError(ValueError):
    """A saved state that does not match this trainer (config, version, shapes)."""


class PoisonBatchError(RuntimeError):
    """A batch whose step raised or gave a non-finite loss or gradient. Nothing of it reached
    the optimizers, the memories, the counters or the metrics; the caller can split it to
    find the events at fault (TrainerService does)."""


@dataclass
class StepResult:
    events: int  # events in the batch (all trained on)
    loss: float  # total training loss of the batch
    like_logit: np.ndarray  # (B,) pre-update scores (what the metrics saw)
    rating_pred: np.ndarray  # (B,)
    encoded: int  # targets that ran through the doc encoder
    seconds: float
    # Earlier events of each event's item / user at scoring time (models/slices.py).
    item_evidence: np.ndarray  # (B,) int64
    user_evidence: np.ndarray  # (B,) int64


@dataclass(frozen=True)
class _HostRead:
    """What the host reads of a step, in one device-to-host copy."""

    loss: float
    like_logit: np.ndarray  # (B,) float32
    rating: np.ndarray  # (B,) float32


def _label_loss(fn, pred: torch.Tensor, target: torch.Tensor, present: np.ndarray, total: bool = False):
    """`fn(pred, target)` averaged over the events whose label is present. `present` is the
    label mask on the host: it decides without a device sync. A batch where every event has
    the label takes fn's own reduction (the float order of the indexed version before);
    otherwise the per-event losses are masked. total: sum over each event's K terms, mean
    over events (the ordinal heads)."""
    n = int(present.sum())
    if n == len(present):
        # Through an index of every row, as when the rows were picked on the host: the same
        # gradient float order (metrics bit-identical to the host-indexed version), no sync.
        pred = pred[torch.arange(n, device=pred.device)]
        return fn(pred, target, reduction="sum") / n if total else fn(pred, target)
    per = fn(pred, target, reduction="none")  # (B,) or (B, K)
    if total:
        per = per.sum(1)
    mask = torch.from_numpy(present).to(per.device, per.dtype)  # rare: a batch of mixed labels
    return (per * mask).sum() / n


@functools.cache
def _glibc_function(name: str):
    """glibc's `name` (mallopt, malloc_trim) through ctypes, loaded once; None off Linux or
    where the libc is not glibc (musl has neither)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory_mapped() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MB in the process (Linux only).

    A CPU step allocates and frees several 2-8 MB tensors (the PKM gradient rows, their
    optimizer gathers). Above its mmap threshold glibc returns each one to the kernel on
    free, so the next step's allocation page-faults every 4 KB page again: in a VM, the
    two 8 MB index_selects of a step took 24 and 21 ms instead of 8 and 5. Keeping them
    costs at most the step's peak of freed memory. Returns whether it took effect.
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


# Steps between two `return_free_memory` calls: a trim is a few ms, the page faults after it
# one slower step; every 200 steps (~100k events at B = 512) that is noise.
TRIM_EVERY_STEPS = 200


def return_free_memory() -> bool:
    """malloc_trim(0): give the kernel the free pages `keep_freed_memory_mapped` keeps.

    Kept for the step's speed, freed blocks accumulate in malloc's arenas up to the 1 GB trim
    threshold, fragmented, so a long-lived trainer's resident memory moves in steps of tens
    of MB both ways with no live data behind them (benchmarks/results/soak_cpu.md: +-60 MB
    steps over 8M events). Trimming every TRIM_EVERY_STEPS keeps the resident figure close
    to what is live, which is what a memory alert on the trainer watches. Linux / glibc only;
    returns whether memory was released."""
    trim = _glibc_function("malloc_trim")
    return bool(trim(0)) if trim is not None else False


class OnlineTrainer:
    def __init__(self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig | None = None) -> None:
        self.cfg = model_cfg
        self.tcfg = tcfg = trainer_cfg or TrainerConfig()
        # Process-wide settings: the trainer owns its process (serving copies do not set them).
        torch.set_num_threads(tcfg.threads)
        keep_freed_memory_mapped()
        # The kernels' switch: one fixed Triton config per shape (no timing autotune), the
        # atomic-free gather backward.
        set_deterministic(tcfg.deterministic)
        if tcfg.deterministic:
            # cuBLAS GEMMs are repeatable only with a fixed workspace config, which torch reads
            # at the process's first cuBLAS call: set before this trainer touches the GPU (an
            # operator's own setting wins).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # warn_only=True, on CUDA too: torch flags ops by name, not by input, and the step
            # has ops it flags that are exact whatever their order (the float cumsums of the
            # integer-valued counters in models/features.py); raising would stop every run of
            # the default config on a GPU. torch still warns once per such op, and the
            # save -> load -> continue test checks the result bit for bit.
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode also fills every new tensor with NaN (to expose reads of
            # uninitialised memory); nothing here reads before writing, and the fills cost
            # ~4% of a CPU step (an 8 MB index_select: 1.7 -> 3.2 ms).
            torch.utils.deterministic.fill_uninitialized_memory = False
        torch.manual_seed(tcfg.seed)  # before the state is built: it fixes the initial weights
        # "auto": the GPU when this process has one (the streaming job resolves it per
        # actor; `memstream eval` and tests resolve it here).
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if tcfg.device == "auto" else tcfg.device
        )
        self.state = st = RankingState(model_cfg, self.device)
        self.model = st.ranker
        self._rating_thresholds = torch.tensor(model_cfg.rating_thresholds, device=self.device)  # (K,)
        # Dense AdamW: the backbone, the encoder, the bank's learned "missing" vector. The wide
        # part (counters -> logits) in its own group: a handful of weights that carry the cold
        # start if they learn fast.
        wide = {id(p) for p in self.model.wide.parameters()}
        groups = [
            {"params": [p for p in st.dense_parameters() if id(p) not in wide]},
            {"params": list(self.model.wide.parameters()), "lr": tcfg.lr_wide},
        ]
        self.opt_dense = torch.optim.AdamW(
            groups,
            lr=tcfg.lr_dense,
            betas=(0.9, tcfg.adam_beta2),
            weight_decay=tcfg.weight_decay,
            fused=True,
        )
        self._dense_lr = [g["lr"] for g in self.opt_dense.param_groups]  # before lr_warmup_steps
        self.opt_sparse = SparseRowAdam(
            self._sparse_groups(), lr=tcfg.lr_sparse, betas=(0.9, tcfg.sparse_beta2)
        )
        self.metrics = StreamingMetrics(tcfg.metrics_window, tcfg.keep_score_log, model_cfg.history.length)
        # Running statistics a training forward updates in place (batch norms): saved before
        # each step and put back if the step turns out poisoned (serving reads them).
        self._norm_stats = [
            t
            for m in self.model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)
            if t is not None
        ]
        self.rng = np.random.Generator(np.random.PCG64(tcfg.seed))
        self.steps = 0
        self.events_applied = 0

    # The parts of the state, by their usual names.
    @property
    def features(self):
        return self.state.features

    @property
    def history(self):
        return self.state.history

    @property
    def bank(self):
        return self.state.bank

    @property
    def encoder(self):
        return self.state.encoder

    def _sparse_groups(self) -> list[dict[str, Any]]:
        """Id tables at the trainer's sparse lr; the encoder's word table at the dense lr;
        memory values at their own lr (MSN). Derived from the tracker's tables."""
        tables = self.state.tracker.tables(EMBEDDINGS)
        words = tables.pop(ENCODER_WORDS, None)
        groups = [{"params": list(tables.values()), "lr": self.tcfg.lr_sparse}]
        if words is not None:
            groups.append({"params": [words], "lr": self.tcfg.lr_dense})
        for name, lr in (("lmn", self.cfg.lmn.value_lr), ("pkm", self.cfg.pkm.value_lr)):
            values = list(self.state.tracker.tables(name).values())
            if values:
                groups.append({"params": values, "lr": lr})
        return groups

    # ---- the step ----------------------------------------------------------------------------

    def _labels(self, batch: BatchLike, name: str) -> np.ndarray:
        v = batch.labels.get(name)
        return np.full(len(batch), np.nan) if v is None else np.asarray(v, dtype=np.float64)

    def inputs(self, batch: BatchLike) -> tuple[UserInputs, CandidateInputs]:
        """The model's inputs for a batch as of now, without training: targets read their
        bank rows, and those not in the bank are encoded, as in serving and in `step` (which
        also encodes a sample of the others). For scoring outside `step`."""
        u, c, _ = self.state.batch_inputs(batch)
        if self.bank is not None:
            c.target_vec = self.state.target_vectors(batch.id_codes().item_key, batch.item_text)
        return u, c

    def micro_batches(self, batch):
        """`batch` (an EventBatch) as the training steps it takes: (start, micro-batch) pairs,
        each of TrainerConfig.micro_batch_size after the events applied before it, so step
        on each before taking the next."""
        start = 0
        while start < len(batch):
            stop = min(start + self.tcfg.micro_batch_size(self.events_applied), len(batch))
            yield start, batch.take(slice(start, stop))
            start = stop

    def step(self, batch: BatchLike) -> StepResult:
        t0 = time.perf_counter()
        n = len(batch)
        if n == 0:
            none = np.zeros(0, np.int64)
            return StepResult(0, 0.0, np.zeros(0, np.float32), np.zeros(0, np.float32), 0, 0.0, none, none)
        fc = self.cfg.features
        like = self._labels(batch, fc.like_task)  # (B,) NaN = missing
        rating = self._labels(batch, fc.rating_task)
        codes = batch.id_codes()  # the ids as integers (computed where the batch was decoded)

        # 1-4. Inputs as of before this batch, the encoder on sampled targets, forward, losses,
        # backward. Nothing is updated until all of it is known to be finite: a poisoned
        # batch leaves the model as it was (PoisonBatchError).
        saved = [t.clone() for t in self._norm_stats]
        self.state.tracker.hold()  # the backward's row marks count once the step is known good
        try:
            encoded, fresh, target_rows, encode, tokens = 0, None, None, None, None
            pick = np.zeros(0, np.int64)  # (M,) the targets encoded this step
            if self.bank is not None:
                # LEMUR sampling: the encoder runs (forward and backward) on a fraction of targets.
                has_text = np.array([t is not None and t != "" for t in batch.item_text])
                sampled = self.rng.random(n) < self.cfg.sample_rate
                # An item not in the bank (new, or evicted) is encoded at once: its content
                # vector is what carries it until its id embedding has learned.
                target_rows = self.bank.read_targets(codes.item_key)  # (B,) host; -1 = absent
                encode = (sampled | (target_rows < 0)) & has_text
                pick = np.flatnonzero(encode)
                encoded = len(pick)
                if encoded:
                    tokens = self.encoder.token_array([batch.item_text[i] for i in pick])  # (M, T)
            # The bank and history writes after the step, planned now so that their indices
            # cross in the batch's one copy; nothing changes until commit_writes.
            writes = self.state.plan_writes(batch, target_rows, pick)
            u, c, feats = self.state.batch_inputs(batch, target_rows, encode, tokens, writes)
            if encoded:
                fresh = self.encoder.encode_ids(feats.extra["tokens"][:encoded, : tokens.shape[1]])  # (M, Db)
                c.target_vec = self.state.with_encoded(c.target_vec, fresh, feats.extra["encode"])
            scores, host = self._forward_backward(u, c, feats, like, rating)
        except Exception as e:
            with torch.no_grad():
                for t, v in zip(self._norm_stats, saved):
                    t.copy_(v)
            self.opt_dense.zero_grad(set_to_none=True)
            self.opt_sparse.zero_grad(set_to_none=True)
            self.state.tracker.discard()
            # A memory too small for one batch is the config's fault, not the batch's: it
            # must stop the trainer with its message, not dead-letter every batch.
            if isinstance(e, (PoisonBatchError, BankCapacityError, HistoryCapacityError)):
                raise
            raise PoisonBatchError(f"{type(e).__name__}: {e}") from e
        # The metrics see the scores of the model as it was before this batch (read on the host
        # with the finiteness check: the step's one blocking device-to-host copy).
        like_logit, rating_pred = host.like_logit, host.rating
        evidence = self.metrics.update(  # the slices count events per user / item by their keys
            like_logit, like, rating_pred, rating, codes.user_key, codes.item_key
        )
        ramp = min(1.0, (self.steps + 1) / max(1, self.tcfg.lr_warmup_steps))
        for group, lr in zip(self.opt_dense.param_groups, self._dense_lr):
            group["lr"] = lr * ramp
        self.opt_dense.step()
        self.opt_sparse.step()  # the DeltaTracker marked the rows it updates (gradient hooks)
        self.state.tracker.commit()

        # 5. Memories and counters take this batch.
        self.steps += 1
        if self.steps % TRIM_EVERY_STEPS == 0:
            return_free_memory()
        now_s, item_ids = 0.0, None
        if fresh is not None:
            fresh = fresh.detach()
            now_s = float(batch.ts_ms[pick].max()) / 1000.0
            item_ids = batch.item_id[pick]
        self.state.commit_writes(writes, feats, fresh, step=self.steps, now_s=now_s, item_ids=item_ids)
        self.features.learn(feats)
        self.events_applied += n
        self._housekeeping(float(batch.ts_ms.max()) / 1000.0)
        seconds = time.perf_counter() - t0
        return StepResult(
            n, host.loss, like_logit, rating_pred, encoded, seconds, evidence.item, evidence.user
        )

    def _forward_backward(self, u, c, feats, like: np.ndarray, rating: np.ndarray) -> tuple[Any, _HostRead]:
        """The training forward and backward of a batch, and one device-to-host read of what
        the host needs: the loss, the scores, and whether the loss and every gradient are
        finite. Raises PoisonBatchError when they are not (the gradients are then left for
        the caller to drop). `like` / `rating` (host copies of feats.like / feats.rating)
        only decide, without a sync, which loss terms the batch has."""
        self.model.train()
        scores, us = self.model(u, c)
        loss = scores.like_logit.new_zeros(())
        has_like = ~np.isnan(like)
        if has_like.any():
            y = torch.nan_to_num(feats.like).to(torch.float32)  # (B,) 0 where there is no like
            bce = F.binary_cross_entropy_with_logits
            loss = loss + _label_loss(bce, scores.like_logit, y, has_like)
        has_rating = ~np.isnan(rating)
        if has_rating.any():
            y = torch.nan_to_num(feats.rating).to(torch.float32)  # (B,) 0 where there is no rating
            if self.cfg.rating_loss_weight > 0:
                mse = _label_loss(F.mse_loss, scores.rating, y, has_rating)
                loss = loss + self.cfg.rating_loss_weight * mse
            if scores.threshold_logits is not None:
                above = (y[:, None] >= self._rating_thresholds).float()  # (B, K)
                ordinal = _label_loss(
                    F.binary_cross_entropy_with_logits, scores.threshold_logits, above, has_rating, total=True
                )
                loss = loss + self.cfg.rating_threshold_weight * ordinal
        if scores.content_align_loss is not None and self.cfg.content_align_weight > 0:
            loss = loss + self.cfg.content_align_weight * scores.content_align_loss
        lmn_loss = self.model.lmn_loss(us)
        if lmn_loss is not None and self.cfg.lmn_loss_weight > 0:
            loss = loss + self.cfg.lmn_loss_weight * lmn_loss
        self.opt_dense.zero_grad(set_to_none=True)
        self.opt_sparse.zero_grad(set_to_none=True)
        # Backward even if the loss is not finite: asking first would be a sync of its own; the
        # optimizers step only after the one check below.
        loss.backward()
        dense = [p for g in self.opt_dense.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(dense, self.tcfg.grad_clip, error_if_nonfinite=False)
        # The sum of each row-sparse table's gradient values is finite iff every value is (a NaN
        # or an infinity reaches the sum; a sum of finite values overflowing float32 would need
        # values ~1e32, poison anyway). One pass over the values; torch.isfinite took three
        # full-size passes plus temporaries, ~10% of a CPU step on the PKM's gradient.
        grads = [p.grad for g in self.opt_sparse.param_groups for p in g["params"] if p.grad is not None]
        sums = [(x._values() if x.is_sparse else x).sum().to(torch.float32) for x in grads]
        checks = torch.stack([loss.detach().to(torch.float32), norm.to(torch.float32), *sums])
        # The step's one blocking read: checks (loss, dense grad norm, sparse sums) and scores.
        read = torch.cat([checks, scores.like_logit.detach().float(), scores.rating.detach().float()]).cpu()
        read = read.numpy()
        k, b = len(checks), len(like)
        host = _HostRead(float(read[0]), read[k : k + b], read[k + b : k + 2 * b])
        if not np.isfinite(read[0]):
            raise PoisonBatchError(f"non-finite loss {read[0]}")
        if not np.isfinite(read[1]):
            raise PoisonBatchError(f"non-finite gradient: the total norm of the dense gradients is {read[1]}")
        if not np.isfinite(read[2:k]).all():
            raise PoisonBatchError("non-finite gradient of a row-sparse table")
        return scores, host

    def _housekeeping(self, stream_now_s: float) -> None:
        """Bank TTL on the stream's clock (replays evict as the live run did) and, every
        `reinit_dead_keys_every` steps, dead product sub-keys moved onto recent queries."""
        if self.bank is not None and self.bank.cfg.ttl_s is not None:
            self.bank.evict_expired(stream_now_s)
        every = self.tcfg.reinit_dead_keys_every
        if every and self.steps % every == 0:
            for mem in (self.model.pkm, self.model.lmn):
                if mem is not None:
                    mem.reinit_dead_keys(seed=self.tcfg.seed + self.steps)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.steps, "events_applied": self.events_applied}
        out.update(self.metrics.summary())
        out.update(self.state.stats())
        return out

    # ---- save / load (safetensors + JSON, no pickle) ------------------------------------------

    def save(self, directory: str | Path) -> None:
        self.write_state(directory, *self.capture_state())

    @staticmethod
    def write_state(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Write what `capture_state` returned (safe off the training thread: it is a copy)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "trainer.safetensors"))
        (d / "trainer.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    def capture_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A copy of the whole training state (tensors, JSON meta) for `write_state`: the
        model state (dense tensors + each component), the optimizers, the metrics, the
        delta tracker's marks and the RNGs."""
        tensors: dict[str, torch.Tensor] = {}

        def put(prefix: str, ts: dict[str, Any]) -> None:
            for k, v in ts.items():
                t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                tensors[f"{prefix}{k}"] = t.detach().cpu().contiguous().clone()

        put("dense.", self.state.dense_state())
        meta: dict[str, Any] = {"version": STATE_VERSION}
        for name, comp in {**self.state.components(), "metrics": self.metrics}.items():
            ts, meta[name] = comp.export_state()
            put(f"{name}.", ts)
        dense_t, meta["opt_dense"] = _adam_export(self.opt_dense)
        put("opt_dense.", dense_t)
        sparse_t, meta["opt_sparse"] = self.opt_sparse.export_state()
        put("opt_sparse.", sparse_t)
        put("tracker.", self.state.tracker.export_state())
        tensors["torch_rng"] = torch.get_rng_state()
        if self.device.type == "cuda":  # the generator of the trainer's GPU (dropout, sampling)
            tensors["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        meta.update(
            model_config=self.cfg.model_dump(mode="json"),
            trainer_config=self.tcfg.model_dump(mode="json"),
            rng=_jsonable_rng(self.rng.bit_generator.state),
            steps=self.steps,
            events_applied=self.events_applied,
        )
        return tensors, copy.deepcopy(meta)

    @classmethod
    def from_dir(cls, directory: str | Path) -> OnlineTrainer:
        """A trainer built from the config saved in `directory`, with its state loaded."""
        meta = json.loads((Path(directory) / "trainer.json").read_text())
        t = cls(
            ModelConfig.model_validate(meta["model_config"]),
            TrainerConfig.model_validate(meta["trainer_config"]),
        )
        t.load(directory)
        return t

    def load(self, directory: str | Path) -> None:
        d = Path(directory)
        meta = json.loads((d / "trainer.json").read_text())
        if meta.get("version") != STATE_VERSION:
            raise TrainerStateError(
                f"version: saved {meta.get('version')}, this trainer reads {STATE_VERSION} "
                "(a state of another release: start fresh or use that release)"
            )
        if meta["model_config"] != self.cfg.model_dump(mode="json"):
            raise TrainerStateError("model_config: the saved model config differs from this trainer's")
        tensors = load_file(str(d / "trainer.safetensors"))

        def take(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.state.load_dense(take("dense."))
        for name, comp in self.state.components().items():
            comp.import_state(take(f"{name}."), meta[name])
        self.metrics.import_state({k: v.numpy() for k, v in take("metrics.").items()}, meta["metrics"])
        _adam_import(self.opt_dense, take("opt_dense."), meta["opt_dense"])
        self.opt_sparse.import_state(take("opt_sparse."), meta["opt_sparse"])
        self.state.tracker.import_state(take("tracker."))
        torch.set_rng_state(tensors["torch_rng"])
        # A state saved on a CPU has no CUDA generator: the GPU keeps the one seeded at start.
        if self.device.type == "cuda" and "cuda_rng" in tensors:
            torch.cuda.set_rng_state(tensors["cuda_rng"], self.device)
        self.rng.bit_generator.state = meta["rng"]
        self.steps = meta["steps"]
        self.events_applied = meta["events_applied"]


def _jsonable_rng(state: dict) -> dict:
    return json.loads(json.dumps(state))  # PCG64 state is ints and strings already


def _adam_export(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> flat tensors + JSON meta (no pickle)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                raise TrainerStateError(f"optimizer state {idx}.{k} is not a tensor")
            tensors[f"{idx}.{k}"] = v
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        for k, v in g.items():
            if isinstance(v, tuple):
                g[k] = {"__tuple__": list(v)}
        groups.append(g)
    return tensors, {"param_groups": groups}


def _adam_import(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        groups.append(
            {
                k: tuple(v["__tuple__"]) if isinstance(v, dict) and "__tuple__" in v else v
                for k, v in g.items()
            }
        )
    opt.load_state_dict({"state": state, "param_groups": groups})
