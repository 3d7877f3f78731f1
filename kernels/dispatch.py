"""The one dispatch point of the kernels: which backend an op runs, and which Triton module.

Every op (`kernels/<op>/__init__.py`) runs its Triton kernel (`kernels/<op>/triton.py`)
on CUDA tensors and its plain-torch twin (`kernels/<op>/reference.py`) everywhere else,
by asking `backend_for` here. `MEMSTREAM_KERNELS=torch` forces the references (for A/B
timing and debugging); `=triton` forces Triton where the tensors allow it (with
TRITON_INTERPRET=1 that includes CPU tensors: the tests).

Interpreter and compiled kernels in one process: `@triton.jit` decides between the
compiled and the interpreted kernel when the decorated module is executed, from
TRITON_INTERPRET at that moment. So the Triton modules are loaded lazily, by
`triton_module`: CUDA tensors get the normal import (`kernels.sparse_gather.triton`,
...), CPU tensors a second copy of the same file executed with TRITON_INTERPRET=1
(`kernels.sparse_gather.triton_interpreted`, ...). triton.language's own helpers
(tl.zeros, tl.cumsum, tl.max, ...) are @jit functions too, decorated once when triton is
imported; if that happened without TRITON_INTERPRET=1 they are compiled JITFunctions,
which an interpreted kernel cannot call. `_interpretable_stdlib` routes such calls to
the interpreter (JITFunction.__call__ otherwise only raises: compiled code never goes
through it). So nothing depends on when triton was first imported, and
TRITON_INTERPRET only has to be set while a CPU call is dispatched (the tests set it
per test).

No Triton module is executed before an op is dispatched to Triton: a process that
only takes the torch path (the rest of the test suite, CPU training) never loads one.

Deterministic mode (`set_deterministic`, set by the trainer from `trainer.deterministic`):
every Triton kernel runs one fixed config per shape instead of the config that
`triton.autotune` found fastest by timing (timings vary between runs, and a different
block size sums in a different order), and the sparse gather's values gradient takes
the atomic-free variant. One process-wide flag here, read at each call, so the compiled
and the interpreted copy of a kernel module (both read it) agree.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType

import torch

__all__ = ["backend_for", "deterministic", "set_deterministic", "triton_module"]

_LOCK = threading.Lock()
_DETERMINISTIC = False


def set_deterministic(on: bool) -> None:
    """Fixed Triton configs (no timing autotune) and the atomic-free gather backward."""
    global _DETERMINISTIC
    _DETERMINISTIC = bool(on)


def deterministic() -> bool:
    return _DETERMINISTIC


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
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


def triton_module(op: str, t: torch.Tensor) -> ModuleType:
    """`kernels.<op>.triton` for tensors on t's device: compiled on CUDA, interpreted on CPU.

    The interpreted copy is registered as `kernels.<op>.triton_interpreted` in sys.modules
    only (not as an attribute of the op package), built once per process.
    """
    name = f"kernels.{op}.triton"
    if t.is_cuda:
        return importlib.import_module(name)
    alias = f"kernels.{op}.triton_interpreted"
    mod = sys.modules.get(alias)
    if mod is not None:
        return mod
    with _LOCK:
        if alias in sys.modules:
            return sys.modules[alias]
        _interpretable_stdlib()
        spec = importlib.util.find_spec(name)
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
