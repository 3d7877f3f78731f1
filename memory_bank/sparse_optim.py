"""Row-sparse Adam for parameters whose gradient is a sparse COO tensor.

Who uses it: the value tables of the PKM layer and the LMN user memory (gathered
through `kernels.sparse_gather`, gradient = the rows used) and the hashed id
embedding tables of the model (`nn.Embedding(sparse=True)`).

Why Adam with per-row step counts ("lazy Adam") and not Adagrad: the stream is
non-stationary. Adagrad's accumulator only grows, so the rows hit most often
(popular items, busy slots) get an ever smaller step and stop following the
stream; Adam's second moment is an exponential average and keeps a usable step
size forever. Every row keeps its own step count, so the bias correction of a row
hit for the first time after a million steps is that of a fresh row (torch's
SparseAdam uses one global step, which under-corrects rarely used rows).

What a step touches: only the rows present in the gradient, and only their rows
of exp_avg / exp_avg_sq / row_step. Rows absent from the gradient keep their
value and their optimizer state bit for bit (no decay of absent rows' moments).
Dense gradients are accepted too (rows = the rows with a non-zero gradient).

No host sync on an accelerator (a GPU step never waits for the device): how many
distinct rows a gradient has is not counted on the host there. A sparse gradient of E
entries into N rows is summed into S = min(E, N) slots (one sort, a segment sum),
slot g < R holding the g-th distinct row; the S - R slots past them are inert: each
is given a distinct row that the gradient does not touch (the (g - R)-th such row,
found by a searchsorted) and writes back that row's own values and state. So every
write of a step goes to a different row (no duplicate-index writes, no races) and has
a size the host knows. The price is the work on S instead of R rows, which on a CPU
(where reading a tensor on the host costs nothing) made the step 3-4x slower: CPU
parameters keep the compacting step (boolean-mask compaction to the R rows). Both
give the touched rows the same update bit for bit (same sort, same sums in the same
order, same elementwise ops; tests/memory_bank/test_sparse_row_adam.py);
`sync_free=True/False` forces one.

State is saved with `export_state()` (tensors for safetensors + JSON meta, no
pickle) and restored bit-exactly with `import_state()`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field


class SparseOptimConfig(BaseModel):
    """Hyper-parameters of `SparseRowAdam` (one learning rate for all its rows)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="decoupled (AdamW), touched rows only")


def _kept(live: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Live slots take `new`; inert ones (see the module docstring) write `old` back."""
    if live is None:  # the compacting step: every row is live
        return new
    return torch.where(live.view((-1,) + (1,) * (new.dim() - 1)), new, old)


class SparseOptimStateError(ValueError):
    """import_state got tensors that do not match the parameters."""


class SparseRowAdam(torch.optim.Optimizer):
    """Lazy Adam over rows: params are 2-D (rows, dim) or 1-D tables, grads sparse COO or dense.

    `SparseRowAdam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)`
    or `SparseRowAdam.from_config(params, SparseOptimConfig(...))`.

    Per parameter p (N, *): state moments (N, 2, *) (exp_avg, exp_avg_sq), row_step (N,) int64.
    Which rows changed (for snapshot deltas) is the DeltaTracker's record, not this one's.
    A step reads nothing on the host (see the module docstring).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        sync_free: bool | None = None,
    ):
        # None: sync-free for parameters off the CPU (see the module docstring)
        self.sync_free = sync_free
        cfg = SparseOptimConfig(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
        defaults = {
            "lr": cfg.lr,
            "betas": (cfg.beta1, cfg.beta2),
            "eps": cfg.eps,
            "weight_decay": cfg.weight_decay,
        }
        super().__init__(params, defaults)
        for p in self._params():
            self._init_state(p)

    def _init_state(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """Zero state of p (also for groups added later with add_param_group)."""
        st = self.state[p]
        if "moments" not in st:
            if p.dim() == 0:
                raise ValueError("SparseRowAdam: parameters must have a row dimension (dim >= 1)")
            # One (N, 2, *) tensor for both moments: a step gathers and scatters them once.
            st["moments"] = torch.zeros((p.shape[0], 2, *p.shape[1:]), dtype=p.dtype, device=p.device)
            st["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
        return st

    @classmethod
    def from_config(cls, params, cfg: SparseOptimConfig) -> SparseRowAdam:
        return cls(
            params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
        )

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    @staticmethod
    def _compact(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grad (sparse COO or dense, (N, *)) -> (sorted unique rows (R,), summed grad rows (R, *)).

        Boolean-mask compaction: R is read on the host (free on a CPU, a sync on a GPU).
        Sparse: one sort of the row indices and a sorted segment sum (index_add_ over sorted
        segment ids), several times cheaper on CPU than `coalesce()` for the ~65k-entry
        gradients of a PKM batch.
        """
        if grad.is_sparse:
            if grad.is_coalesced():
                return grad.indices()[0], grad.values()
            sorted_idx, first, segment, vals = SparseRowAdam._sorted_segments(grad)
            rows = sorted_idx[first]  # (R,)
            summed = vals.new_zeros((rows.numel(), *vals.shape[1:]))
            return rows, summed.index_add_(0, segment, vals)
        nonzero = grad.reshape(grad.shape[0], -1).ne(0).any(dim=1)  # (N,)
        rows = nonzero.nonzero().squeeze(1)
        return rows, grad.index_select(0, rows)

    @staticmethod
    def _sorted_segments(grad: torch.Tensor):
        """Uncoalesced sparse grad (E entries) -> sorted row indices (E,), first of each
        row (E,) bool, slot of each entry (E,) (0.. in row order), entry values in that order."""
        idx, vals = grad._indices()[0], grad._values()  # (E,), (E, *)
        sorted_idx, perm = idx.sort()  # (E,)
        first = torch.ones_like(sorted_idx, dtype=torch.bool)
        first[1:] = sorted_idx[1:] != sorted_idx[:-1]  # (E,) start of each row's segment
        return sorted_idx, first, first.cumsum(0) - 1, vals.index_select(0, perm)

    @staticmethod
    def _slots(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """grad (sparse COO or dense, (N, *)) -> (rows (S,) distinct, summed grad (S, *), live (S,)).

        Sizes from shapes only: live slots hold the distinct rows of the gradient (sorted
        for an uncoalesced sparse gradient), the others distinct rows it does not touch.
        """
        N = grad.shape[0]
        if not grad.is_sparse:  # every row is a slot; live = the rows with a non-zero entry
            rows = torch.arange(N, device=grad.device)
            return rows, grad, grad.reshape(N, -1).ne(0).any(dim=1)
        idx = grad._indices()[0]
        if grad.is_coalesced():
            return idx, grad._values(), torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        E = idx.numel()
        S = min(E, N)
        sorted_idx, _, segment, vals = SparseRowAdam._sorted_segments(grad)
        summed = vals.new_zeros((S, *vals.shape[1:])).index_add_(0, segment, vals)
        slot = torch.arange(S, device=idx.device)
        start = torch.searchsorted(segment, slot)  # (S,) first entry of each slot; E when inert
        live = start < E
        real = sorted_idx[start.clamp(max=E - 1)]  # (S,) the distinct rows, ascending, while live
        # Inert slot g takes the k-th row absent from the gradient, k = g - R (R live slots):
        # that row is k + #{i : real[i] - i <= k} (real[i] - i = absent rows below real[i]).
        absent_below = torch.where(live, real - slot, N)  # (S,) non-decreasing
        k = (slot - live.sum()).clamp(min=0)
        spare = k + torch.searchsorted(absent_below, k, right=True)
        return torch.where(live, real, spare), summed, live

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or (p.grad.is_sparse and p.grad._nnz() == 0):
                    continue
                sync_free = p.device.type != "cpu" if self.sync_free is None else self.sync_free
                if sync_free:
                    rows, g, live = self._slots(p.grad)  # (S,), (S, *), (S,)
                else:
                    (rows, g), live = self._compact(p.grad), None  # (R,), (R, *)
                    if rows.numel() == 0:
                        continue
                g = g.to(p.dtype)
                st = self._init_state(p)
                old_mv = st["moments"].index_select(0, rows)  # (S, 2, *)
                mv = old_mv if live is None else old_mv.clone()
                m, v = mv[:, 0], mv[:, 1]  # (S, *) views
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                old_t = st["row_step"].index_select(0, rows)  # (S,)
                t = old_t + 1
                st["moments"].index_copy_(0, rows, _kept(live, mv, old_mv))
                st["row_step"].index_copy_(0, rows, _kept(live, t, old_t))
                # Per-row bias correction: p -= lr/b1 * m / (sqrt(v/b2) + eps), b = 1 - beta^t_row.
                tf = t.to(p.dtype).view((-1,) + (1,) * (p.dim() - 1))  # (S, 1...)
                step_size = (1 - torch.pow(beta1, tf)).reciprocal_().mul_(-lr)  # (S, 1...)
                inv_sqrt_b2 = (1 - torch.pow(beta2, tf)).rsqrt_()  # (S, 1...)
                denom = v.sqrt().mul_(inv_sqrt_b2).add_(eps)  # (S, *)
                old = p.index_select(0, rows)
                new = (old.mul(1 - lr * wd) if wd else old).addcdiv(m * step_size, denom)
                p.index_copy_(0, rows, _kept(live, new, old))
        return loss

    # -- save / load without pickle ----------------------------------------------------------

    def _named_state(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """The saved names of p's state: exp_avg, exp_avg_sq (views of `moments`), row_step."""
        st = self._init_state(p)
        return {"exp_avg": st["moments"][:, 0], "exp_avg_sq": st["moments"][:, 1], "row_step": st["row_step"]}

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors `p{i}.exp_avg|exp_avg_sq|row_step` (i = order of parameters) + hyper-params."""
        tensors: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self._params()):
            for name, t in self._named_state(p).items():
                tensors[f"p{i}.{name}"] = t.detach().cpu().contiguous()
        groups = [
            {
                "lr": g["lr"],
                "betas": list(g["betas"]),
                "eps": g["eps"],
                "weight_decay": g["weight_decay"],
                "num_params": len(g["params"]),
            }
            for g in self.param_groups
        ]
        return tensors, {"kind": "SparseRowAdam", "param_groups": groups}

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        groups = meta.get("param_groups", [])
        if len(groups) != len(self.param_groups):
            raise SparseOptimStateError(
                f"param_groups: saved {len(groups)}, optimizer has {len(self.param_groups)}"
            )
        for g, saved in zip(self.param_groups, groups):
            if saved["num_params"] != len(g["params"]):
                raise SparseOptimStateError(
                    f"param_groups.num_params: saved {saved['num_params']}, have {len(g['params'])}"
                )
            g["lr"], g["betas"] = saved["lr"], tuple(saved["betas"])
            g["eps"], g["weight_decay"] = saved["eps"], saved["weight_decay"]
        for i, p in enumerate(self._params()):
            for name, dst in self._named_state(p).items():
                key = f"p{i}.{name}"
                if key not in tensors:
                    raise SparseOptimStateError(f"{key}: missing")
                src = tensors[key]
                if src.shape != dst.shape or src.dtype != dst.dtype:
                    raise SparseOptimStateError(
                        f"{key}: saved {tuple(src.shape)} {src.dtype}, have {tuple(dst.shape)} {dst.dtype}"
                    )
                dst.copy_(src)
