"""The model's state, apart from whoever trains it: `RankingState`.

It owns everything a prediction reads: the ranker (with its id tables, LMN and PKM
memories), the feature builder (hashers, slot layout, online counters), the user-history
store, the LEMUR item bank and its doc encoder. It holds no optimizer, no RNG and sets
no process-wide torch option, so a serving replica builds one as it is, and the
trainer (`models.online.OnlineTrainer`) is a RankingState plus optimizers, metrics and
RNG.

Read top to bottom:
  1. construction: the parts, and the one DeltaTracker every row-sparse table is
     registered with;
  2. components(): the Stateful parts by name (memory_bank.base.Stateful); full and
     delta snapshots, checkpoints and stats are loops over it;
  3. the dense tensors (everything that is not a component's), whole in every version;
  4. the read path: a batch -> the model's inputs as of now (training and serving).
A fourth memory is one new file plus one line in `components()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from memory_bank.base import DeltaState, FullState, MemoryDelta, Stateful, index_block, index_columns
from memory_bank.delta_tracker import DeltaTracker
from memory_bank.history import HistoryAppendPlan, HistoryView, UserHistoryStore
from memory_bank.lemur import BankWritePlan
from models.config import ModelConfig
from models.features import BatchLike, FeatureArrays, FeatureBuilder, causal_batch_history
from models.ranker import CandidateInputs, Ranker, UserInputs

EMBEDDINGS = "embeddings"  # the component of the id tables (and the doc encoder's word table)
ENCODER_WORDS = "encoder_words"  # the doc encoder's hashed word table, when trained row-sparse


class RankingStateError(ValueError):
    """A saved or shipped state that does not fit this model (tensors, components)."""


class IdTables:
    """The row-sparse id tables as one Stateful component: full tables in export_state,
    changed rows (from the DeltaTracker, merged in by RankingState) in deltas."""

    def __init__(self, tables: dict[str, nn.Parameter]):
        self.tables = tables  # name -> (rows, dim) weight

    def stats(self) -> dict[str, Any]:
        return {name: {"rows": int(w.shape[0]), "dim": int(w.shape[1])} for name, w in self.tables.items()}

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {name: w.detach().cpu().clone() for name, w in self.tables.items()}, {}

    @torch.no_grad()
    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for name, w in self.tables.items():
            if name not in tensors or tensors[name].shape != w.shape:
                got = tuple(tensors[name].shape) if name in tensors else "nothing"
                raise RankingStateError(f"{EMBEDDINGS}.{name}: saved {got}, have {tuple(w.shape)}")
            w.copy_(tensors[name])

    def take_delta(self) -> MemoryDelta:
        return MemoryDelta()  # every row of these tables is tracked by the DeltaTracker

    @torch.no_grad()
    def apply_delta(self, delta: MemoryDelta) -> None:
        for name, (rows, vals) in delta.tables.items():
            if name not in self.tables:
                raise RankingStateError(f"{EMBEDDINGS}.{name}: not a table of this model")
            w = self.tables[name]
            w.index_copy_(0, torch.from_numpy(rows).to(w.device), vals.to(w))


@dataclass(frozen=True)
class StepWrites:
    """What a training step writes to the memories once it has succeeded, planned on the
    host before it runs (`RankingState.plan_writes`): the bank rows of the targets it
    encodes and the users' history slots. Their index arrays cross to the device in the
    batch's one staged copy (`index_block`, as `feats.extra["writes"]`); `commit_writes`
    applies them after the optimizer step; a step that fails drops them, nothing changed."""

    hist_slot: np.ndarray  # (B,) the slots the batch reads (history.touch_slots)
    history: HistoryAppendPlan
    bank: BankWritePlan | None  # None: no bank, or nothing encoded
    bank_rows_after: np.ndarray  # (B,) each target's bank row after the write, -1 none
    # What crosses to the device, computed once: the bank's index arrays (`n_bank` of
    # them), the history's, then bank_rows_after.
    index_arrays: list[np.ndarray]
    n_bank: int


class RankingState:
    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu") -> None:
        # ---- 1. the parts (creation order fixes the parameters' initial values) ---------------
        self.cfg = cfg
        self.device = torch.device(device)
        self.features = FeatureBuilder(cfg.features, self.device)
        # The LMN memory loss's long-term target: a running summary per user (2E wide).
        long_term = cfg.use_lmn and cfg.lmn.target == "long_term"
        self.history = UserHistoryStore(
            cfg.history.model_copy(
                update={"summary_dim": 2 * cfg.emb_dim if long_term else 0, "device": str(self.device)}
            )
        )
        self.bank = None
        self.encoder = None
        bank_dim = 0
        if cfg.use_bank:
            from memory_bank.lemur import DocEncoder, ItemMemoryBank

            on_device = {"device": str(self.device)}
            self.bank = ItemMemoryBank(cfg.bank.model_copy(update=on_device))
            self.encoder = DocEncoder(cfg.encoder.model_copy(update=on_device))
            bank_dim = cfg.bank.dim
        self.ranker = Ranker(cfg, bank_dim).to(self.device)
        # Every row-sparse table, under the component that ships its rows.
        self.tracker = DeltaTracker()
        tables = self.ranker.id_tables()
        if self.word_table() is not None:
            tables[ENCODER_WORDS] = self.word_table()
        self.id_tables = IdTables(tables)
        for name, w in tables.items():
            self.tracker.track(EMBEDDINGS, name, w)
        for name in ("lmn", "pkm"):
            mem = getattr(self.ranker, name)
            if mem is not None:
                (values,) = mem.sparse_parameters()
                self.tracker.track(name, "values", values)

    def word_table(self) -> nn.Parameter | None:
        """The doc encoder's hashed word table when it is trained row-sparse, else None."""
        sparse = self.encoder.sparse_parameters() if self.encoder is not None else []
        return sparse[0] if sparse else None

    # ---- 2. the components --------------------------------------------------------------------

    def components(self) -> dict[str, Stateful]:
        """The Stateful parts by name: the names of snapshot memories and checkpoint prefixes."""
        comps: dict[str, Stateful] = {
            EMBEDDINGS: self.id_tables,
            "history": self.history,
            "features": self.features,
        }
        if self.bank is not None:
            comps["bank"] = self.bank
        if self.ranker.lmn is not None:
            comps["lmn"] = self.ranker.lmn
        if self.ranker.pkm is not None:
            comps["pkm"] = self.ranker.pkm
        return comps

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Row-sparse parameters (SparseRowAdam), in the tracker's order."""
        return [w for owner in self.tracker.owners() for w in self.tracker.tables(owner).values()]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything the dense optimizer trains: the ranker's dense weights, the encoder's,
        and the bank's learned "missing" vector."""
        sparse = {id(p) for p in self.sparse_parameters()}
        params = [p for p in self.ranker.parameters() if id(p) not in sparse]
        if self.encoder is not None:
            params += [p for p in self.encoder.parameters() if id(p) not in sparse] + [self.bank.missing]
        return params

    def full_snapshot(self) -> FullState:
        """Every tensor a serving copy needs, copied. No side effect on the next delta: a new
        delta chain starts with `start_delta_chain()`."""
        return FullState(
            self.dense_state(), {name: comp.export_state() for name, comp in self.components().items()}
        )

    def take_delta(self) -> DeltaState:
        """The dense tensors and every component's changes since the previous take."""
        memories = {}
        for name, comp in self.components().items():
            d = comp.take_delta()
            d.tables.update(self.tracker.take(name))
            memories[name] = d
        return DeltaState(self.dense_state(), memories)

    def start_delta_chain(self) -> None:
        """Forget pending changes: the next delta is relative to the state as it is now."""
        for comp in self.components().values():
            comp.take_delta()
        self.tracker.clear()

    def load_full(self, full: FullState) -> None:
        self.load_dense(full.dense)
        comps = self.components()
        if set(full.memories) != set(comps):
            raise RankingStateError(
                f"components: shipped {sorted(full.memories)}, this model has {sorted(comps)}"
            )
        for name, comp in comps.items():
            comp.import_state(*full.memories[name])

    def apply_delta(self, delta: DeltaState) -> None:
        self.load_dense(delta.dense)
        comps = self.components()
        unknown = set(delta.memories) - set(comps)
        if unknown:
            raise RankingStateError(f"delta has components this model does not: {sorted(unknown)}")
        for name, d in delta.memories.items():
            comps[name].apply_delta(d)

    def stats(self) -> dict[str, Any]:
        return {name: comp.stats() for name, comp in self.components().items()}

    def usage(self) -> dict[str, dict[str, float | None]]:
        """The few numbers per memory a dashboard follows (cheap: no percentile over the bank):
        slot usage and KL from uniform of the last usage window (pkm, lmn), coverage of the
        recent history lookups and fill fraction (bank)."""
        out: dict[str, dict[str, float | None]] = {}
        for name in ("pkm", "lmn"):
            mem = getattr(self.ranker, name)
            if mem is not None:
                w = mem.stats()["window"]
                out[name] = {"slot_usage": w["slot_usage"], "kl_uniform": w["kl_uniform"]}
        if self.bank is not None:
            b = self.bank
            out["bank"] = {"coverage": b.recent_coverage(), "fill": len(b) / b.cfg.capacity}
        return out

    # ---- 3. dense tensors ---------------------------------------------------------------------

    def _dense_tensors(self) -> dict[str, torch.Tensor]:
        """name -> live tensor: the ranker's and the encoder's persistent state without the
        row-sparse tables (components ship those), and the bank's "missing" vector."""
        sparse = {id(p) for p in self.sparse_parameters()}
        out = {n: t for n, t in self.ranker.state_dict(keep_vars=True).items() if id(t) not in sparse}
        if self.encoder is not None:
            out.update(
                {
                    f"encoder.{n}": t
                    for n, t in self.encoder.state_dict(keep_vars=True).items()
                    if id(t) not in sparse
                }
            )
            out["bank.missing"] = self.bank.missing
        return out

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Copies of the dense tensors (cpu): small, and they change every step."""
        return {n: t.detach().cpu().clone() for n, t in self._dense_tensors().items()}

    @torch.no_grad()
    def load_dense(self, dense: dict[str, torch.Tensor]) -> None:
        """Copy every dense tensor in place; refuses a set of names that is not this model's."""
        own = self._dense_tensors()
        if set(dense) != set(own):
            missing, unexpected = sorted(set(own) - set(dense)), sorted(set(dense) - set(own))
            raise RankingStateError(
                f"dense tensors do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for n, t in own.items():
            if dense[n].shape != t.shape:
                raise RankingStateError(f"dense.{n}: shipped {tuple(dense[n].shape)}, have {tuple(t.shape)}")
            t.copy_(dense[n])

    # ---- 4. the read path -----------------------------------------------------------------------

    def target_vectors(self, item_keys: np.ndarray, item_text: np.ndarray | None = None) -> torch.Tensor:
        """The bank rows of the targets (B, Db), the learned missing vector where absent; with
        `item_text`, targets absent from the bank that have a text are encoded now (a new
        item's content vector is what carries it: training encodes them the same way).

        Not `bank.lookup_history`: that counts toward the bank's coverage, which is defined
        over history lookups (LEMUR), and targets are not history. Read-only (`rows_of`):
        the bank's LRU order is not touched, nothing is written.
        """
        rows = self.bank.rows_of(item_keys)  # (B,)
        vec = self._bank_vectors(torch.from_numpy(rows).to(self.bank.bank.device))
        if item_text is not None:
            cold = [i for i in np.flatnonzero(rows < 0).tolist() if item_text[i]]
            if cold:
                fresh = self.encoder([item_text[i] for i in cold])  # (M, Db)
                vec = vec.index_put((torch.tensor(cold, device=vec.device),), fresh)
        return vec

    def _bank_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(B,) bank rows on the device (-1 = absent) -> (B, Db): the rows, `missing` where absent."""
        bank = self.bank
        return torch.where(
            (rows >= 0).unsqueeze(1), bank.bank.index_select(0, rows.clamp(min=0)), bank.missing
        )

    def batch_inputs(
        self,
        batch: BatchLike,
        target_rows: np.ndarray | None = None,
        encode: np.ndarray | None = None,
        tokens: np.ndarray | None = None,
        writes: StepWrites | None = None,
    ) -> tuple[UserInputs, CandidateInputs, FeatureArrays]:
        """Features, histories and bank vectors of a training batch as of before it (+ its
        earlier events when `in_batch_features`); also the features (labels, each event's
        feedback signal), for the updates after the step.

        What the host decides for the batch crosses in the features' one copy: the users'
        history slots, the targets' bank rows (`target_rows`, from `bank.read_targets`, which
        refreshes their LRU recency; read here when not given) and, for the trainer, the
        targets it will encode (`encode` (B,) bool -> `feats.extra["encode"]`, see
        `with_encoded`) and their token ids (`tokens` (M, T), DocEncoder.token_array ->
        `feats.extra["tokens"]` (B, T), its first M rows) and the writes it will make after
        the step (`writes`, from `plan_writes`, whose slots the read uses)."""
        fc = self.cfg.features
        codes = batch.id_codes()
        slot = self.history.touch_slots(codes.user_key) if writes is None else writes.hist_slot
        extra = {"hist_slot": slot}
        if self.bank is not None:
            extra["target_rows"] = (
                self.bank.read_targets(codes.item_key) if target_rows is None else target_rows
            )
        if encode is not None:
            extra["encode"] = np.asarray(encode, dtype=np.int64)
        if tokens is not None:
            block = np.zeros((len(batch), tokens.shape[1]), dtype=np.int64)  # M <= B rows used
            block[: len(tokens)] = tokens
            extra["tokens"] = block
        if writes is not None:
            extra["writes"] = index_block(writes.index_arrays, len(batch))
        feats = self.features.build(batch, extra)
        hist = self.history.read(feats.extra["hist_slot"])
        target_rows = feats.extra.get("target_rows")
        if target_rows is None:
            target_rows = torch.full((len(batch),), -1, dtype=torch.int64, device=self.device)
        if fc.in_batch_features:  # + the same user's earlier events of this batch
            own = {  # the batch's columns, on the device already (the features' one copy)
                "item_code": feats.item_code,
                "item_key": feats.item_key,
                "bank_row": target_rows,
                "ts_ms": feats.ts_ms,
                "signal": feats.signal,
            }
            stored = {name: getattr(hist, name) for name in own}
            merged, mask = causal_batch_history(stored, hist.mask, feats.user_key, own)
            hist = HistoryView(**merged, mask=mask, slot=hist.slot)
        target_vec = None if self.bank is None else self._bank_vectors(target_rows)  # (B, Db)
        u, c = self.model_inputs(feats, hist, target_vec)
        if self.history.cfg.summary_dim:  # before the batch: no event's own label is in it
            u.user_summary, u.user_summary_n = self.history.summary_at(hist.slot)
        return u, c, feats

    def plan_writes(self, batch: BatchLike, target_rows: np.ndarray | None, pick: np.ndarray) -> StepWrites:
        """The memory writes of a training step, before it runs: the bank rows of the
        targets at positions `pick` (M,) (encoded this step; `target_rows` (B,) their rows
        now, from `bank.read_targets`) and the history append of every event. The batch's
        read of its users' histories (`touch_slots`, an LRU use) happens here."""
        codes = batch.id_codes()
        hist_slot = self.history.touch_slots(codes.user_key)
        bank_plan, rows_after = None, np.full(len(batch), -1, dtype=np.int64)
        if self.bank is not None:
            rows_after = np.asarray(target_rows, dtype=np.int64)
            if len(pick):
                bank_plan = self.bank.plan_write(codes.item_key[pick], rows_after[pick])
                rows_after = bank_plan.rows_after(codes.item_key, rows_after)
        history = self.history.plan_append(codes.user_key, hist_slot)
        bank_arrays = [] if bank_plan is None else bank_plan.index_arrays()
        arrays = bank_arrays + history.index_arrays() + [rows_after]
        return StepWrites(hist_slot, history, bank_plan, rows_after, arrays, len(bank_arrays))

    def commit_writes(
        self,
        writes: StepWrites,
        feats: FeatureArrays,
        fresh: torch.Tensor | None,
        step: int,
        now_s: float,
        item_ids=None,
    ) -> None:
        """Apply `writes` after the step: the fresh encodings (M, Db) to the bank, then every
        event to its user's history with the bank row its item has now; index tensors from
        the staged copy (`feats.extra["writes"]`), so nothing crosses to the device here."""
        index = index_columns(feats.extra["writes"], writes.index_arrays)
        nb = writes.n_bank
        if writes.bank is not None:
            self.bank.commit_write(writes.bank, index[:nb], fresh, step=step, now_s=now_s, item_ids=item_ids)
        cols = {
            "item_code": feats.item_code,
            "item_key": feats.item_key,
            "bank_row": index[-1],
            "ts_ms": feats.ts_ms,
            "signal": feats.signal,
        }
        self.history.commit_append(writes.history, index[nb:-1], cols, summary=self.summary_vectors(feats))

    @staticmethod
    def with_encoded(target_vec: torch.Tensor, fresh: torch.Tensor, encode: torch.Tensor) -> torch.Tensor:
        """The targets' vectors (B, Db) with the fresh encodings (M, Db) of the rows where
        `encode` (B,) is set, in row order; on the device, no host index."""
        pick = encode.to(torch.bool)
        pos = (pick.cumsum(0) - 1).clamp(min=0)  # (B,) each picked row's encoding
        return torch.where(pick.unsqueeze(1), fresh.index_select(0, pos), target_vec)

    @torch.no_grad()
    def summary_vectors(self, feats: FeatureArrays) -> torch.Tensor | None:
        """What each event of a trained batch adds to its user's long-term summary (B, 2E):
        [e, signal * e], e its item's unit id embedding (as updated by this step). None when
        the model keeps no summaries. `history.append(..., summary=...)` adds them."""
        if not self.history.cfg.summary_dim:
            return None
        w = self.ranker.tables["item_emb"].weight
        e = torch.nn.functional.normalize(w[feats.item_idx], dim=-1)  # (B, E)
        sig = feats.signal.to(w.device, torch.float32)[:, None]
        return torch.cat([e, sig * e], dim=1)

    def model_inputs(
        self,
        feats: FeatureArrays,
        hist: HistoryView,
        target_vec: torch.Tensor | None,
        user_rows: slice = slice(None),
    ) -> tuple[UserInputs, CandidateInputs]:
        """Tensors for the model from built features: the user side from `user_rows` of
        `feats` and the histories given (serving passes one user's row for N candidates),
        the candidate side from every row. History items read their bank vectors here."""
        dev = self.device

        def tt(a, dt=torch.int64) -> torch.Tensor:
            if isinstance(a, torch.Tensor):
                return a.to(dev, dt)
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev, dt)

        # The distinct history items: an item is its id-embedding row and its bank row (two
        # items whose codes share an embedding row still hold different bank rows). Tensor
        # ops on the device; torch.unique is the one host sync of this read (its size).
        mask = hist.mask.to(dev)
        emb_row = hist.item_code.to(dev) % self.cfg.features.item_buckets  # (B, L) id-embedding rows
        bank_row = torch.full_like(emb_row, -1)
        if self.bank is not None:  # validated against the bank's row_key; counts toward its coverage
            bank_row = self.bank.lookup_history(hist.item_key, hist.bank_row, mask)  # (B, L), -1 = miss
        span = self.cfg.bank.capacity + 1
        key = torch.where(mask, emb_row * span + bank_row + 1, -1)
        uniq, inverse = torch.unique(key.reshape(-1), return_inverse=True)  # (U,), (B*L,); padding -> -1
        real = uniq >= 0
        hist_rows = torch.where(real, uniq // span, 0)  # (U,) id-embedding rows
        hist_bank = None
        if self.bank is not None:
            hist_bank = self.bank.vectors_of_rows(uniq % span - 1, real)  # (U, Db)
        u = UserInputs(
            user_idx=tt(feats.user_idx[user_rows]),
            cat_idx=tt(feats.cat_idx[user_rows]),
            num=tt(feats.num[user_rows], torch.float32),
            scenario_idx=tt(feats.scenario_idx[user_rows]),
            hist_inverse=inverse.reshape(mask.shape),
            hist_signal=hist.signal.to(dev, torch.float32),
            hist_mask=mask,
            hist_item_idx=hist_rows,
            hist_bank=hist_bank,
            hist_item_evidence=torch.log1p(self.features.counters.item[hist_rows, 0]).to(torch.float32),
        )
        c = CandidateInputs(
            item_idx=tt(feats.item_idx),
            text_idx=tt(feats.text_idx),
            counters=tt(feats.counters, torch.float32),
            target_vec=target_vec,
            item_evidence=tt(feats.item_evidence, torch.float32),
        )
        return u, c
