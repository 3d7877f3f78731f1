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


class SparseOptimStateError(ValueError):
    """import_state got tensors that do not match the parameters."""


class SparseRowAdam(torch.optim.Optimizer):
    """Lazy Adam over rows: params are 2-D (rows, dim) or 1-D tables, grads sparse COO or dense.

    `SparseRowAdam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)`
    or `SparseRowAdam.from_config(params, SparseOptimConfig(...))`.

    Per parameter p (N, *): state moments (N, 2, *) (exp_avg, exp_avg_sq), row_step (N,) int64.
    Which rows changed (for snapshot deltas) is the DeltaTracker's record, not this one's.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
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
    def _rows_and_values(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grad (sparse COO or dense, (N, *)) -> (sorted unique rows (R,), summed grad rows (R, *)).

        Sparse: one sort of the row indices and a sorted segment sum (index_add_ over sorted
        segment ids), several times cheaper on CPU than `coalesce()` for the ~65k-entry
        gradients of a PKM batch.
        """
        if grad.is_sparse:
            if grad.is_coalesced():
                return grad.indices()[0], grad.values()
            idx, vals = grad._indices()[0], grad._values()  # (E,), (E, *)
            sorted_idx, perm = idx.sort()  # (E,)
            first = torch.ones_like(sorted_idx, dtype=torch.bool)
            first[1:] = sorted_idx[1:] != sorted_idx[:-1]  # (E,) start of each row's segment
            segment = first.cumsum(0) - 1  # (E,) output row of each entry
            rows = sorted_idx[first]  # (R,)
            summed = vals.new_zeros((rows.numel(),) + tuple(vals.shape[1:]))
            return rows, summed.index_add_(0, segment, vals.index_select(0, perm))  # (R, *)
        nonzero = grad.reshape(grad.shape[0], -1).ne(0).any(dim=1)  # (N,)
        rows = nonzero.nonzero().squeeze(1)
        return rows, grad.index_select(0, rows)

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
                if p.grad is None:
                    continue
                rows, g = self._rows_and_values(p.grad)  # (R,), (R, *)
                if rows.numel() == 0:
                    continue
                g = g.to(p.dtype)
                st = self._init_state(p)
                mv = st["moments"].index_select(0, rows)  # (R, 2, *)
                m, v = mv[:, 0], mv[:, 1]  # (R, *) views
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                t = st["row_step"].index_select(0, rows) + 1  # (R,)
                st["moments"].index_copy_(0, rows, mv)
                st["row_step"].index_copy_(0, rows, t)
                # Per-row bias correction: p -= lr/b1 * m / (sqrt(v/b2) + eps), b = 1 - beta^t_row.
                tf = t.to(p.dtype).view((-1,) + (1,) * (p.dim() - 1))  # (R, 1...)
                step_size = (1 - torch.pow(beta1, tf)).reciprocal_().mul_(-lr)  # (R, 1...)
                inv_sqrt_b2 = (1 - torch.pow(beta2, tf)).rsqrt_()  # (R, 1...)
                denom = v.sqrt().mul_(inv_sqrt_b2).add_(eps)  # (R, *)
                new = p.index_select(0, rows)
                if wd:
                    new.mul_(1 - lr * wd)
                new.addcdiv_(m * step_size, denom)
                p.index_copy_(0, rows, new)
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
