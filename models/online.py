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
No Ray, no Kafka: the streaming job (stream/) drives this object.

Determinism: everything is seeded from `trainer.seed` (torch, the sampling
generator), the thread count is fixed, and save/load restores every RNG, so a
run that is saved and loaded continues bit-for-bit like one that was not.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.deterministic
from safetensors.torch import load_file, save_file

from memory_bank.base import MemoryDelta
from memory_bank.history import UserHistoryStore
from memory_bank.sparse_optim import SparseRowAdam
from models.config import ModelConfig, TrainerConfig
from models.features import (
    BatchLike,
    FeatureArrays,
    FeatureBuilder,
    causal_batch_history,
    feedback_signal,
)
from models.metrics import StreamingMetrics
from models.ranker import CandidateInputs, Ranker, UserInputs

STATE_VERSION = 1
# The doc encoder's hashed word table, by its name in dense_state; trained row-sparse, so
# snapshots ship its touched rows like the id tables (8 MB whole at the default sizes).
WORD_TABLE = "encoder.tok.weight"


class TrainerStateError(ValueError):
    """A saved state that does not match this trainer (config, version, shapes)."""


@dataclass
class StepResult:
    events: int  # events in the batch (all trained on)
    loss: float  # total training loss of the batch
    like_logit: np.ndarray  # (B,) pre-update scores (what the metrics saw)
    rating_pred: np.ndarray  # (B,)
    encoded: int  # targets that ran through the doc encoder
    seconds: float


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def keep_freed_memory_mapped() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MB in the process (Linux only).

    A CPU step allocates and frees several 2-8 MB tensors (the PKM gradient rows, their
    optimizer gathers). Above its mmap threshold glibc returns each one to the kernel on
    free, so the next step's allocation page-faults every 4 KB page again: in a VM, the
    two 8 MB index_selects of a step took 24 and 21 ms instead of 8 and 5. Keeping them
    costs at most the step's peak of freed memory. Returns whether it took effect.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


class OnlineTrainer:
    def __init__(self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig | None = None) -> None:
        self.cfg = model_cfg
        self.tcfg = tcfg = trainer_cfg or TrainerConfig()
        torch.set_num_threads(tcfg.threads)
        keep_freed_memory_mapped()
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode also fills every new tensor with NaN (to expose reads of
            # uninitialised memory); nothing here reads before writing, and the fills cost
            # ~4% of a CPU step (an 8 MB index_select: 1.7 -> 3.2 ms).
            torch.utils.deterministic.fill_uninitialized_memory = False
        torch.manual_seed(tcfg.seed)
        # "auto": the GPU when this process has one (the streaming job resolves it per
        # actor; `memstream eval` and tests resolve it here).
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if tcfg.device == "auto" else tcfg.device
        )
        self.features = FeatureBuilder(model_cfg.features)
        self.history = UserHistoryStore(model_cfg.history)
        self.bank = None
        self.encoder = None
        bank_dim = 0
        if model_cfg.use_bank:
            from memory_bank.lemur import DocEncoder, ItemMemoryBank

            on_device = {"device": str(self.device)}
            self.bank = ItemMemoryBank(model_cfg.bank.model_copy(update=on_device))
            self.encoder = DocEncoder(model_cfg.encoder.model_copy(update=on_device))
            bank_dim = model_cfg.bank.dim
        self.model = Ranker(model_cfg, bank_dim).to(self.device)
        self._rating_thresholds = torch.tensor(model_cfg.rating_thresholds, device=self.device)  # (K,)
        # Dense AdamW: the backbone, the encoder, the bank's learned "missing" vector.
        dense = self.model.dense_parameters()
        if self.bank is not None:
            enc_sparse = {id(p) for p in self.encoder.sparse_parameters()}
            dense += [p for p in self.encoder.parameters() if id(p) not in enc_sparse] + [self.bank.missing]
        # The wide part (counters -> logits) in its own group: a handful of weights that
        # carry the cold start if they learn fast.
        wide = {id(p) for p in self.model.wide.parameters()}
        groups = [{"params": [p for p in dense if id(p) not in wide]},
                  {"params": list(self.model.wide.parameters()), "lr": tcfg.lr_wide}]
        self.opt_dense = torch.optim.AdamW(groups, lr=tcfg.lr_dense, betas=(0.9, tcfg.adam_beta2),
                                           weight_decay=tcfg.weight_decay, foreach=True)
        self.opt_sparse = SparseRowAdam(self._sparse_groups(), lr=tcfg.lr_sparse,
                                        betas=(0.9, tcfg.sparse_beta2))
        self.metrics = StreamingMetrics(tcfg.metrics_window, tcfg.keep_score_log)
        self.rng = np.random.Generator(np.random.PCG64(tcfg.seed))
        self.steps = 0
        self.events_applied = 0
        self.max_offset: dict[int, int] = {}  # kafka partition -> max offset trained on
        self._dense_names = self._dense_state_names()
        self._touched = {n: np.zeros(p.shape[0], dtype=bool) for n, p in self._id_tables().items()}
        if self._word_table() is not None:  # the doc encoder's hashed word rows, same tracking
            self._touched[WORD_TABLE] = np.zeros(self._word_table().shape[0], dtype=bool)

    # ---- setup helpers ---------------------------------------------------------------------

    def _sparse_groups(self) -> list[dict[str, Any]]:
        """Id tables at the trainer's sparse lr; memory values at their own lr (MSN)."""
        m = self.model
        own = [m.user_emb.weight, m.item_emb.weight, m.cat_emb.weight, m.text_emb.weight,
               m.user_bias.weight, m.item_bias.weight]
        groups = [{"params": own, "lr": self.tcfg.lr_sparse}]
        if self.encoder is not None and self.encoder.sparse_parameters():
            # The doc encoder's hashed word table: rows of the words in this batch's texts.
            groups.append({"params": self.encoder.sparse_parameters(), "lr": self.tcfg.lr_dense})
        if m.lmn is not None:
            groups.append({"params": list(m.lmn.sparse_parameters()), "lr": self.cfg.lmn.value_lr})
        if m.pkm is not None:
            groups.append({"params": list(m.pkm.sparse_parameters()), "lr": self.cfg.pkm.value_lr})
        return groups

    def _dense_state_names(self) -> list[str]:
        sparse = {id(p) for g in self._sparse_groups() for p in g["params"]}
        return [n for n, p in self.model.named_parameters() if id(p) not in sparse]

    # ---- the step ----------------------------------------------------------------------------

    def _labels(self, batch: BatchLike, name: str) -> np.ndarray:
        v = batch.labels.get(name)
        return np.full(len(batch), np.nan) if v is None else np.asarray(v, dtype=np.float64)

    def _target_rows(self, item_ids: np.ndarray) -> torch.Tensor:
        """The bank rows of the targets (B, Db), the learned missing vector where absent.

        Not `bank.read`: that counts toward the bank's coverage, which is defined over
        history lookups (DESIGN 5.1), and targets are not history.
        """
        bank = self.bank
        rows = np.fromiter((bank.rows.get(x, -1) for x in item_ids.tolist()), dtype=np.int64, count=len(item_ids))
        rows_t = torch.from_numpy(rows).to(bank.bank.device)
        hit = (rows_t >= 0).unsqueeze(1)  # (B, 1)
        return torch.where(hit, bank.bank.index_select(0, rows_t.clamp(min=0)), bank.missing)

    def inputs(self, batch: BatchLike) -> tuple[UserInputs, CandidateInputs]:
        """The model's inputs for a batch as of now, without training: targets read their
        bank rows (no encoder run). For scoring outside `step` (serving-style checks)."""
        u, c, _, _ = self._inputs(batch)
        return u, c

    def _inputs(self, batch: BatchLike) -> tuple[UserInputs, CandidateInputs, FeatureArrays, np.ndarray]:
        """Features, histories and bank vectors as of before this batch (+ its earlier events)."""
        fc = self.cfg.features
        like = self._labels(batch, fc.like_task)  # (B,) NaN = missing
        rating = self._labels(batch, fc.rating_task)
        feats = self.features.build(batch)
        hist = self.history.get(batch.user_id)
        signal = feedback_signal(like, rating, fc.rating_center, fc.rating_scale)  # (B,) what each event adds
        hist_items, hist_signal, hist_mask_np = hist.item_ids, hist.signal, hist.mask
        if fc.in_batch_features:  # + the same user's earlier events of this batch
            hist_items, hist_signal, hist_mask_np = causal_batch_history(
                hist_items, hist_signal, hist_mask_np, batch.user_id, batch.item_id, signal)
        target_vec = None if self.bank is None else self._target_rows(batch.item_id)  # (B, Db) cached rows
        u, c = self.model_inputs(feats, hist_items, hist_signal, hist_mask_np, target_vec)
        return u, c, feats, signal

    def model_inputs(
        self, feats: FeatureArrays, hist_items: np.ndarray, hist_signal: np.ndarray, hist_mask: np.ndarray,
        target_vec: torch.Tensor | None, user_rows: slice = slice(None),
    ) -> tuple[UserInputs, CandidateInputs]:
        """Tensors for the model from built features: the user side from `user_rows` of
        `feats` and the histories given (serving passes one user's row for N candidates),
        the candidate side from every row. History items read their bank vectors here."""
        dev = self.device
        tt = lambda a, dt=torch.int64: torch.from_numpy(np.ascontiguousarray(a)).to(dev, dt)
        # The distinct history items: an item is its id-embedding row and its bank row (two
        # ids hashed to one embedding row can still hold different bank rows).
        hist_mask = np.asarray(hist_mask, dtype=bool)
        emb_row = self.features.items.many(hist_items)  # (B, L)
        bank_row = np.full(hist_mask.shape, -1, np.int64)
        if self.bank is not None:  # counts the lookups toward the bank's coverage
            bank_row = self.bank.lookup_history(hist_items, hist_mask)  # (B, L), -1 = miss / padding
        key = np.where(hist_mask, emb_row * (np.int64(self.cfg.bank.capacity) + 1) + bank_row + 1, -1)
        uniq, inverse = np.unique(key, return_inverse=True)  # (U,), (B*L,); padding -> key -1
        real = uniq >= 0
        hist_bank = None
        if self.bank is not None:
            hist_bank = self.bank.vectors_of_rows(uniq % (self.cfg.bank.capacity + 1) - 1, real)  # (U, Db)
        u = UserInputs(
            user_idx=tt(feats.user_idx[user_rows]), cat_idx=tt(feats.cat_idx[user_rows]),
            num=tt(feats.num[user_rows], torch.float32), scenario_idx=tt(feats.scenario_idx[user_rows]),
            hist_inverse=tt(inverse.reshape(hist_mask.shape)),
            hist_signal=tt(hist_signal, torch.float32), hist_mask=tt(hist_mask, torch.bool),
            hist_item_idx=tt(np.where(real, uniq // (self.cfg.bank.capacity + 1), 0)),
            hist_bank=hist_bank,
        )
        c = CandidateInputs(
            item_idx=tt(feats.item_idx), text_idx=tt(feats.text_idx),
            counters=tt(feats.counters, torch.float32), target_vec=target_vec,
        )
        return u, c

    def step(self, batch: BatchLike) -> StepResult:
        t0 = time.perf_counter()
        n = len(batch)
        if n == 0:
            return StepResult(0, 0.0, np.zeros(0, np.float32), np.zeros(0, np.float32), 0, 0.0)
        dev = self.device
        fc = self.cfg.features
        like = self._labels(batch, fc.like_task)  # (B,) NaN = missing
        rating = self._labels(batch, fc.rating_task)

        # 1. Inputs as of before this batch.
        u, c, feats, signal = self._inputs(batch)
        encoded = 0
        fresh = None
        if self.bank is not None:
            # 2. LEMUR sampling: the encoder runs (forward and backward) on a fraction of targets.
            has_text = np.array([t is not None and t != "" for t in batch.item_text])
            pick = np.flatnonzero((self.rng.random(n) < self.cfg.sample_rate) & has_text)
            encoded = len(pick)
            if encoded:
                fresh = self.encoder([batch.item_text[i] for i in pick])  # (M, Db)
                c.target_vec = c.target_vec.index_put((torch.from_numpy(pick).to(dev),), fresh)

        # 3. Forward; the metrics see these scores before any update.
        self.model.train()
        scores, us = self.model(u, c)
        like_logit, rating_pred = _np(scores.like_logit), _np(scores.rating)
        self.metrics.update(like_logit, like, rating_pred, rating)

        # 4. Losses, backward, optimizer steps.
        loss = scores.like_logit.new_zeros(())
        has_like = ~np.isnan(like)
        if has_like.any():
            idx = torch.from_numpy(np.flatnonzero(has_like)).to(dev)
            y = torch.from_numpy(like[has_like]).to(dev, torch.float32)
            loss = loss + F.binary_cross_entropy_with_logits(scores.like_logit[idx], y)
        has_rating = ~np.isnan(rating)
        if has_rating.any():
            idx = torch.from_numpy(np.flatnonzero(has_rating)).to(dev)
            y = torch.from_numpy(rating[has_rating]).to(dev, torch.float32)  # (R,)
            if self.cfg.rating_loss_weight > 0:
                loss = loss + self.cfg.rating_loss_weight * F.mse_loss(scores.rating[idx], y)
            if scores.threshold_logits is not None:
                above = (y[:, None] >= self._rating_thresholds).float()  # (R, K)
                loss = loss + self.cfg.rating_threshold_weight * F.binary_cross_entropy_with_logits(
                    scores.threshold_logits[idx], above, reduction="sum") / len(idx)
        lmn_loss = self.model.lmn_loss(us)
        if lmn_loss is not None and self.cfg.lmn_loss_weight > 0:
            loss = loss + self.cfg.lmn_loss_weight * lmn_loss
        self.opt_dense.zero_grad(set_to_none=True)
        self.opt_sparse.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for g in self.opt_dense.param_groups for p in g["params"] if p.grad is not None],
            self.tcfg.grad_clip,
        )
        self.opt_dense.step()
        self.opt_sparse.step()
        self._collect_touched()

        # 5. Memories and counters take this batch.
        self.steps += 1
        if fresh is not None:
            ids = batch.item_id[pick]
            fresh_d = fresh.detach()
            self.bank.record_staleness(ids, fresh_d)
            self.bank.write_rows(ids, fresh_d, step=self.steps, now_s=float(batch.ts_ms[pick].max()) / 1000.0)
        self.history.append(batch.user_id, batch.item_id, batch.ts_ms, signal)
        self.features.learn(feats, like, rating)
        self.events_applied += n
        self._track_offsets(batch)
        self._housekeeping(float(batch.ts_ms.max()) / 1000.0)
        return StepResult(n, float(loss.detach()), like_logit, rating_pred, encoded, time.perf_counter() - t0)

    def _track_offsets(self, batch: BatchLike) -> None:
        parts = np.asarray(batch.kafka_partition)
        offs = np.asarray(batch.kafka_offset)
        ok = (parts >= 0) & (offs >= 0)
        for p in np.unique(parts[ok]).tolist():
            top = int(offs[ok & (parts == p)].max())
            self.max_offset[int(p)] = max(top, self.max_offset.get(int(p), -1))

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

    # ---- serving / snapshots -----------------------------------------------------------------

    def _id_tables(self) -> dict[str, torch.nn.Parameter]:
        m = self.model
        return {"user_emb": m.user_emb.weight, "item_emb": m.item_emb.weight, "cat_emb": m.cat_emb.weight,
                "text_emb": m.text_emb.weight, "user_bias": m.user_bias.weight, "item_bias": m.item_bias.weight}

    def _word_table(self) -> torch.nn.Parameter | None:
        """The doc encoder's hashed word table when it is trained row-sparse, else None."""
        sparse = self.encoder.sparse_parameters() if self.encoder is not None else []
        return sparse[0] if sparse else None

    def _collect_touched(self) -> None:
        """Move the optimizer's per-step row lists into one bool mask per id table.

        The optimizer keeps a tensor of rows per step until someone takes them; over a
        long stream without snapshots that list grows without bound, a mask does not.
        Memory values (LMN/PKM) track their own rows (gradient hooks).
        """
        tracked = dict(self._id_tables())
        if self._word_table() is not None:
            tracked[WORD_TABLE] = self._word_table()
        for name, p in tracked.items():
            rows = self.opt_sparse.take_touched(p)
            if len(rows):
                self._touched[name][rows] = True
        for group in self.opt_sparse.param_groups[1:]:
            for p in group["params"]:
                if not any(p is t for t in tracked.values()):
                    self.opt_sparse.take_touched(p)

    def take_deltas(self) -> dict[str, MemoryDelta]:
        """Rows changed since the previous call, per memory (clears the tracking).

        "embeddings": the model's id tables (rows updated by the sparse optimizer);
        "encoder_words": the doc encoder's word-table rows (when trained row-sparse);
        "bank", "lmn", "pkm", "history": each memory's own delta.
        """

        def touched_rows(name: str, p: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
            rows = np.flatnonzero(self._touched[name])
            self._touched[name][:] = False
            return rows, p.detach()[torch.from_numpy(rows).to(p.device)].cpu()

        emb = MemoryDelta()
        for name, p in self._id_tables().items():
            emb.tables[name] = touched_rows(name, p)
        out = {"embeddings": emb, "history": self.history.take_delta()}
        if self._word_table() is not None:
            out["encoder_words"] = MemoryDelta(tables={WORD_TABLE: touched_rows(WORD_TABLE, self._word_table())})
        if self.bank is not None:
            out["bank"] = self.bank.take_delta()
        for name, mem in (("lmn", self.model.lmn), ("pkm", self.model.pkm)):
            if mem is not None:
                out[name] = mem.take_delta()
        return out

    def dense_state(self, word_table: bool = True) -> dict[str, torch.Tensor]:
        """Dense weights (full, for snapshots): every model tensor except the sparse tables;
        `word_table=False` leaves out the encoder's row-sparse word table (deltas ship its
        touched rows instead, see take_deltas)."""
        params = dict(self.model.named_parameters())
        out = {n: params[n].detach().cpu().clone() for n in self._dense_names}
        for n, b in self.model.named_buffers():
            out[n] = b.detach().cpu().clone()
        if self.encoder is not None:
            for n, p in self.encoder.state_dict().items():
                if word_table or f"encoder.{n}" != WORD_TABLE or self._word_table() is None:
                    out[f"encoder.{n}"] = p.detach().cpu().clone()
        return out

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.steps, "events_applied": self.events_applied}
        out.update(self.metrics.summary())
        if self.bank is not None:
            out["bank"] = self.bank.stats()
        if self.model.lmn is not None:
            out["lmn"] = self.model.lmn.stats()
        if self.model.pkm is not None:
            out["pkm"] = self.model.pkm.stats()
        out["history"] = self.history.stats()
        return out

    # ---- save / load (safetensors + JSON, no pickle) ------------------------------------------

    def _components(self) -> dict[str, Any]:
        """Stateful parts saved through their own export_state/import_state."""
        comps: dict[str, Any] = {"features": self.features, "history": self.history, "metrics": self.metrics}
        for name, comp in (("bank", self.bank), ("lmn", self.model.lmn), ("pkm", self.model.pkm)):
            if comp is not None:
                comps[name] = comp
        return comps

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
        """A copy of the whole training state (tensors, JSON meta) for `write_state`."""
        tensors: dict[str, torch.Tensor] = {}

        def put(prefix: str, ts: dict[str, Any]) -> None:
            for k, v in ts.items():
                t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                tensors[f"{prefix}{k}"] = t.detach().cpu().contiguous().clone()

        put("model.", self.model.state_dict())
        if self.encoder is not None:
            put("encoder.", self.encoder.state_dict())
        dense_t, dense_meta = _adam_export(self.opt_dense)
        put("opt_dense.", dense_t)
        sparse_t, sparse_meta = self.opt_sparse.export_state()
        put("opt_sparse.", sparse_t)
        meta: dict[str, Any] = {"version": STATE_VERSION, "opt_dense": dense_meta, "opt_sparse": sparse_meta}
        for name, comp in self._components().items():
            ts, cm = comp.export_state()
            put(f"{name}.", ts)
            meta[name] = cm
        put("touched.", {k: v.view(np.uint8) for k, v in self._touched.items()})
        tensors["torch_rng"] = torch.get_rng_state()
        meta.update(
            model_config=self.cfg.model_dump(mode="json"),
            trainer_config=self.tcfg.model_dump(mode="json"),
            rng=_jsonable_rng(self.rng.bit_generator.state),
            steps=self.steps,
            events_applied=self.events_applied,
            max_offset={str(k): v for k, v in self.max_offset.items()},
        )
        return tensors, copy.deepcopy(meta)

    @classmethod
    def from_dir(cls, directory: str | Path) -> OnlineTrainer:
        """A trainer built from the config saved in `directory`, with its state loaded."""
        meta = json.loads((Path(directory) / "trainer.json").read_text())
        t = cls(ModelConfig.model_validate(meta["model_config"]), TrainerConfig.model_validate(meta["trainer_config"]))
        t.load(directory)
        return t

    def load(self, directory: str | Path) -> None:
        d = Path(directory)
        meta = json.loads((d / "trainer.json").read_text())
        if meta.get("version") != STATE_VERSION:
            raise TrainerStateError(f"version: saved {meta.get('version')}, expected {STATE_VERSION}")
        if meta["model_config"] != self.cfg.model_dump(mode="json"):
            raise TrainerStateError("model_config: the saved model config differs from this trainer's")
        tensors = load_file(str(d / "trainer.safetensors"))

        def take(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(take("model."), strict=True)
        if self.encoder is not None:
            self.encoder.load_state_dict(take("encoder."), strict=True)
        _adam_import(self.opt_dense, take("opt_dense."), meta["opt_dense"])
        self.opt_sparse.import_state(take("opt_sparse."), meta["opt_sparse"])
        numpy_comps = {"features", "metrics"}  # these keep numpy arrays, not tensors
        for name, comp in self._components().items():
            ts = take(f"{name}.")
            if name in numpy_comps:
                ts = {k: v.numpy() for k, v in ts.items()}
            comp.import_state(ts, meta[name])
        touched = {k: v.numpy().astype(bool) for k, v in take("touched.").items()}
        for k, mask in self._touched.items():  # a table the saved state did not track: all rows
            touched.setdefault(k, np.ones_like(mask))
        self._touched = touched
        torch.set_rng_state(tensors["torch_rng"])
        self.rng.bit_generator.state = meta["rng"]
        self.steps = meta["steps"]
        self.events_applied = meta["events_applied"]
        self.max_offset = {int(k): int(v) for k, v in meta["max_offset"].items()}


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
        groups.append({k: tuple(v["__tuple__"]) if isinstance(v, dict) and "__tuple__" in v else v
                       for k, v in g.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})
