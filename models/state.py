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

from typing import Any

import numpy as np
import torch
from torch import nn

from memory_bank.base import DeltaState, FullState, MemoryDelta, Stateful
from memory_bank.delta_tracker import DeltaTracker
from memory_bank.history import UserHistoryStore
from models.config import ModelConfig
from models.features import BatchLike, FeatureArrays, FeatureBuilder
from models.ids import default_encoder
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


class RankingState:
    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu") -> None:
        # ---- 1. the parts (creation order fixes the parameters' initial values) ---------------
        self.cfg = cfg
        self.device = torch.device(device)
        self.features = FeatureBuilder(cfg.features, self.device)
        # The LMN memory loss's long-term target: a running summary per user (2E wide).
        long_term = cfg.use_lmn and cfg.lmn.target == "long_term"
        self.history = UserHistoryStore(
            cfg.history.model_copy(update={"summary_dim": 2 * cfg.emb_dim if long_term else 0})
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

    def target_vectors(self, item_ids: np.ndarray, item_text: np.ndarray | None = None) -> torch.Tensor:
        """The bank rows of the targets (B, Db), the learned missing vector where absent; with
        `item_text`, targets absent from the bank that have a text are encoded now (a new
        item's content vector is what carries it: training encodes them the same way).

        Not `bank.read`: that counts toward the bank's coverage, which is defined over
        history lookups (LEMUR: `ItemMemoryBank.lookup_history`), and targets are not
        history. Read-only: the bank's LRU order is not touched, nothing is written.
        """
        bank = self.bank
        rows = bank.rows_of(item_ids)  # (B,)
        rows_t = torch.from_numpy(rows).to(bank.bank.device)
        hit = (rows_t >= 0).unsqueeze(1)  # (B, 1)
        vec = torch.where(hit, bank.bank.index_select(0, rows_t.clamp(min=0)), bank.missing)
        if item_text is not None:
            cold = [i for i in np.flatnonzero(rows < 0).tolist() if item_text[i]]
            if cold:
                fresh = self.encoder([item_text[i] for i in cold])  # (M, Db)
                vec = vec.index_put((torch.tensor(cold, device=vec.device),), fresh)
        return vec

    def batch_inputs(self, batch: BatchLike) -> tuple[UserInputs, CandidateInputs, FeatureArrays]:
        """Features, histories and bank vectors of a training batch as of before it (+ its
        earlier events when `in_batch_features`); also the features (labels, each event's
        feedback signal), for the updates after the step."""
        fc = self.cfg.features
        feats = self.features.build(batch)
        hist = self.history.get(batch.user_id)
        hist_items, hist_signal, hist_mask = hist.item_ids, hist.signal, hist.mask
        if fc.in_batch_features:  # + the same user's earlier events of this batch
            hist_items, hist_signal, hist_mask = _causal_string_history(
                hist_items, hist_signal, hist_mask, batch.user_id, batch.item_id, feats.signal.cpu().numpy()
            )
        target_vec = None if self.bank is None else self.target_vectors(batch.item_id)  # (B, Db)
        u, c = self.model_inputs(feats, hist_items, hist_signal, hist_mask, target_vec)
        if self.history.cfg.summary_dim:  # before the batch: no event's own label is in it
            summary, n = self.history.summary(batch.user_id)
            u.user_summary = torch.from_numpy(summary).to(self.device)
            u.user_summary_n = torch.from_numpy(n).to(self.device)
        return u, c, feats

    @torch.no_grad()
    def summarize_events(self, batch: BatchLike, feats: FeatureArrays) -> None:
        """Add a trained batch's events to their users' long-term summaries: [e, signal * e] of
        each event's item, e its unit id embedding (call after `history.append`)."""
        if not self.history.cfg.summary_dim:
            return
        w = self.ranker.tables["item_emb"].weight
        e = torch.nn.functional.normalize(w[feats.item_idx], dim=-1)
        e = e.cpu().numpy()  # (B, E)
        signal = feats.signal.cpu().numpy()
        self.history.add_summary(batch.user_id, np.concatenate([e, signal[:, None] * e], axis=1))

    def model_inputs(
        self,
        feats: FeatureArrays,
        hist_items: np.ndarray,
        hist_signal: np.ndarray,
        hist_mask: np.ndarray,
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
        # ids hashed to one embedding row can still hold different bank rows).
        hist_mask = np.asarray(hist_mask, dtype=bool)
        emb_row = default_encoder().item.many(hist_items.ravel()).reshape(hist_mask.shape)
        emb_row %= self.cfg.features.item_buckets  # (B, L)
        bank_row = np.full(hist_mask.shape, -1, np.int64)
        if self.bank is not None:  # counts the lookups toward the bank's coverage
            bank_row = self.bank.lookup_history(hist_items, hist_mask)  # (B, L), -1 = miss / padding
        key = np.where(hist_mask, emb_row * (np.int64(self.cfg.bank.capacity) + 1) + bank_row + 1, -1)
        uniq, inverse = np.unique(key, return_inverse=True)  # (U,), (B*L,); padding -> key -1
        real = uniq >= 0
        hist_rows = np.where(real, uniq // (self.cfg.bank.capacity + 1), 0)  # (U,) id-embedding rows
        hist_bank = None
        if self.bank is not None:
            hist_bank = self.bank.vectors_of_rows(uniq % (self.cfg.bank.capacity + 1) - 1, real)  # (U, Db)
        u = UserInputs(
            user_idx=tt(feats.user_idx[user_rows]),
            cat_idx=tt(feats.cat_idx[user_rows]),
            num=tt(feats.num[user_rows], torch.float32),
            scenario_idx=tt(feats.scenario_idx[user_rows]),
            hist_inverse=tt(inverse.reshape(hist_mask.shape)),
            hist_signal=tt(hist_signal, torch.float32),
            hist_mask=tt(hist_mask, torch.bool),
            hist_item_idx=tt(hist_rows),
            hist_bank=hist_bank,
            hist_item_evidence=torch.log1p(self.features.counters.item[tt(hist_rows), 0]).to(torch.float32),
        )
        c = CandidateInputs(
            item_idx=tt(feats.item_idx),
            text_idx=tt(feats.text_idx),
            counters=tt(feats.counters, torch.float32),
            target_vec=target_vec,
            item_evidence=tt(feats.item_evidence, torch.float32),
        )
        return u, c


def _causal_string_history(item_ids, signal, mask, user_ids, batch_items, batch_signal):
    """Histories as each event of the batch sees them (stored ++ the same user's earlier
    events of this batch, last L kept), for a store of item id strings."""
    b, L = item_ids.shape
    codes = np.unique(user_ids, return_inverse=True)[1].reshape(-1)
    order = np.argsort(codes, kind="stable")
    k = codes[order]
    starts = np.r_[0, np.flatnonzero(k[1:] != k[:-1]) + 1]
    run_len = np.diff(np.r_[starts, b])
    start_sorted = np.repeat(starts, run_len)
    rank = np.empty(b, dtype=np.int64)
    rank[order] = np.arange(b) - start_sorted
    if not rank.any():
        return item_ids, signal, mask
    first = np.empty(b, dtype=np.int64)
    first[order] = start_sorted
    c = np.arange(L)[None, :] + rank[:, None]
    stored = c < L
    rows = np.arange(b)[:, None]
    cs = np.minimum(c, L - 1)
    pos = order[np.minimum(first[:, None] + np.maximum(c - L, 0), b - 1)]
    new_items = np.where(stored, item_ids[rows, cs], batch_items[pos])
    new_signal = np.where(stored, signal[rows, cs], batch_signal[pos]).astype(np.float32)
    new_mask = np.where(stored, mask[rows, cs], True)
    return new_items, new_signal, new_mask
