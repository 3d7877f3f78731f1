"""Count the host<->device synchronisations code would take on a GPU, on any device.

`SyncCounter` is a TorchDispatchMode that sees every aten op and counts those that must
read a device tensor on the host before they can return: scalar reads (`int(t)`,
`float(t)`, `t.item()`, `bool(t)`: aten._local_scalar_dense), ops whose output size
depends on the data (nonzero, masked_select, boolean-mask indexing and assignment,
unique*, coalesce, repeat_interleave without output_size, bincount), comparisons that
return a Python bool (equal), and the info check of linalg.cholesky. On a CPU none of
these waits for anything, which is why the count is taken from the ops and not from
timing: the same code on a GPU would stall at each.

Not seen: reads that bypass the dispatcher (`.numpy()`, `.tolist()` of a CPU tensor)
and device-to-host copies (on a CPU there is no device). Ops run by Triton's
interpreter (TRITON_INTERPRET=1 copies kernel arguments to the host and back: a
launch on a GPU does nothing of the kind) are not counted either.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that always sync.
_ALWAYS = {
    aten._local_scalar_dense.default: "scalar read",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.unique_dim_consecutive.default: "unique",
    aten._coalesce.default: "coalesce",
    aten.bincount.default: "bincount",
    aten.equal.default: "equal",
    aten._linalg_check_errors.default: "linalg info check",
}
# Ops that sync when one of their index tensors is a boolean mask.
_MASK_INDEXED = {
    aten.index.Tensor: "boolean-mask index",
    aten.index_put.default: "boolean-mask index_put",
    aten.index_put_.default: "boolean-mask index_put",
    aten._index_put_impl_.default: "boolean-mask index_put",
}
_INTERPRETER = os.path.join("triton", "runtime", "interpreter")


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _inside_triton_interpreter() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if _INTERPRETER in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


class SyncCounter(TorchDispatchMode):
    """with SyncCounter() as c: ...; c.syncs -> Counter({reason: count}); c.total;
    c.ops: every op counted from (so a test can tell "no sync" from "nothing ran")."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.ops = 0

    @property
    def total(self) -> int:
        return sum(self.syncs.values())

    def _reason(self, func, args, kwargs) -> str | None:
        if func in _ALWAYS:
            return _ALWAYS[func]
        if func in _MASK_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(_is_mask(i) for i in indices or ()):
                return _MASK_INDEXED[func]
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _inside_triton_interpreter():
            self.ops += 1
            reason = self._reason(func, args, kwargs)
            if reason is not None:
                self.syncs[reason] += 1
        return func(*args, **kwargs)
