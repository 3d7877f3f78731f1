"""Kernels for the memories, with one dispatch point.

Every op here runs a Triton kernel on CUDA tensors and the plain-torch reference
(`kernels.reference`) everywhere else. `MEMSTREAM_KERNELS=torch` forces the
references (for A/B timing and debugging); `=triton` forces Triton where the
tensors allow it (with TRITON_INTERPRET=1 that includes CPU tensors: the tests).

Interpreter and compiled kernels in one process: `@triton.jit` decides between
the compiled and the interpreted kernel when the decorated module is executed,
from TRITON_INTERPRET at that moment. So the Triton modules are loaded lazily by
`_triton_impl`: CUDA tensors use the normal import (`kernels.sparse_gather`, ...),
CPU tensors use a second copy of the same file executed with TRITON_INTERPRET=1
(`kernels._interpreted_sparse_gather`, ...). triton.language's own helpers
(tl.zeros, tl.cumsum, tl.max, ...) are @jit functions too, decorated once when
triton is imported; if that happened without TRITON_INTERPRET=1 they are compiled
JITFunctions, which an interpreted kernel cannot call. `_interpretable_stdlib`
routes such calls to the interpreter (JITFunction.__call__ otherwise only raises:
compiled code never goes through it). So nothing depends on when triton was first
imported, and TRITON_INTERPRET only has to be set while a CPU call is dispatched
(the tests set it per test).

Name clash, on purpose: the op `kernels.sparse_gather` (a function, the API) and the
module `kernels/sparse_gather.py` (its Triton implementation) share a name, and so do
pkm_topk and bank_update. Importing a submodule normally sets it as an attribute of
the package, which would replace the function; the package class below refuses that,
so `kernels.sparse_gather` is always the op. Get an implementation module with
`importlib.import_module("kernels.sparse_gather")` (or `_triton_impl`), not with
`import kernels.sparse_gather as m` (that form reads the package attribute: the op).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType

import torch

from kernels.reference import bank_update_ref, pkm_select_ref, pkm_topk_ref, sparse_gather_ref, topk_ref

__all__ = ["backend_for", "bank_update", "pkm_topk", "sparse_gather", "topk"]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 (any failure to import means: no triton)
        return False
    return True


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'torch' for an op whose main operand is `t`."""
    mode = os.environ.get("MEMSTREAM_KERNELS", "auto").lower()
    if mode == "torch" or not _triton_available():
        return "torch"
    if t.is_cuda:
        return "triton"
    if mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


class _Package(ModuleType):
    """Keeps the ops as the package attributes when their same-named modules load."""

    def __setattr__(self, name, value):
        if name in _OPS and isinstance(value, ModuleType):
            return  # the submodule stays in sys.modules["kernels." + name]
        super().__setattr__(name, value)


_OPS = ("sparse_gather", "pkm_topk", "bank_update")
_LOCK = threading.Lock()


def _interpretable_stdlib() -> None:
    """Let interpreted kernels call @jit functions decorated while not interpreting."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if getattr(JITFunction.__call__, "_memstream_interpretable", False):
        return
    compiled_call = JITFunction.__call__
    as_interpreted: dict[int, InterpretedFunction] = {}

    def __call__(self, *args, **kwargs):
        if os.environ.get("TRITON_INTERPRET") != "1":
            return compiled_call(self, *args, **kwargs)  # raises, as before
        f = as_interpreted.get(id(self))
        if f is None:
            f = as_interpreted.setdefault(id(self), InterpretedFunction(self.fn))
        return f(*args, **kwargs)

    __call__._memstream_interpretable = True
    JITFunction.__call__ = __call__


def _triton_impl(name: str, t: torch.Tensor) -> ModuleType:
    """The Triton module `kernels.<name>` for tensors on t's device (see module doc)."""
    if t.is_cuda:
        return importlib.import_module(f"kernels.{name}")
    alias = f"kernels._interpreted_{name}"
    mod = sys.modules.get(alias)
    if mod is not None:
        return mod
    with _LOCK:
        if alias in sys.modules:
            return sys.modules[alias]
        _interpretable_stdlib()
        spec = importlib.util.find_spec(f"kernels.{name}")
        mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(alias, spec.origin))
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            sys.modules[alias] = mod
            mod.__spec__.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(alias, None)
            raise
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
    return mod


def sparse_gather(
    values: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, sparse_grad: bool = True
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * values[idx[b, j]]; see `sparse_gather_ref`."""
    if backend_for(values) == "triton":
        return _triton_impl("sparse_gather", values).sparse_gather_triton(
            values, idx, weights, sparse_grad
        )
    return sparse_gather_ref(values, idx, weights, sparse_grad)


def pkm_topk(q1, q2, keys1, keys2, k: int, scores=None):
    """Product-key top-k per head; see `pkm_topk_ref`.

    scores: optional (s1, s2), the (B, H, n) sub-key scores of q1, q2 that the caller
    computed anyway (for the gradient of the chosen scores). The torch path selects from
    them instead of scoring again; the fused Triton kernel scores in registers and
    ignores them.
    """
    if backend_for(q1) == "triton":
        return _triton_impl("pkm_topk", q1).pkm_topk_triton(q1, q2, keys1, keys2, k)
    if scores is not None:
        return pkm_select_ref(scores[0], scores[1], k)
    return pkm_topk_ref(q1, q2, keys1, keys2, k)


def topk(x: torch.Tensor, k: int):
    """Top-k along the last dim, sorted descending; see `topk_ref` (and pkm_topk.py for ties)."""
    if backend_for(x) == "triton":
        return _triton_impl("pkm_topk", x).topk_triton(x, k)
    return topk_ref(x, k)


def bank_update(bank, stamps, rows, vectors, step: int):
    """Deduplicated last-writer-wins row scatter with stamps; see `bank_update_ref`."""
    if backend_for(bank) == "triton":
        return _triton_impl("bank_update", bank).bank_update_triton(bank, stamps, rows, vectors, step)
    return bank_update_ref(bank, stamps, rows, vectors, step)


sys.modules[__name__].__class__ = _Package
