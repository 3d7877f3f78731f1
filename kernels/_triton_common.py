"""Plain functions that the Triton modules decorate themselves (`_cast = triton.jit(cast_rne)`).

They stay undecorated here on purpose: a module decorates them when it is executed,
so the interpreted copy of a kernel module (see kernels/dispatch.py) gets interpreted
helpers and the compiled one compiled helpers. `launch` (host side) runs an autotuned
kernel with one fixed config in deterministic mode.
"""

from __future__ import annotations

import triton.language as tl


def cast_rne(x, dtype: tl.constexpr):
    """x.to(dtype), with fp32 -> bf16 rounded to nearest even by bit arithmetic.

    Same bits as torch's `.to(torch.bfloat16)` on every backend (the interpreter's
    own float downcast truncates); a few integer ops, free in memory-bound kernels.
    """
    if dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def launch(kernel, grid, *args, fixed, **kwargs) -> None:
    """Run an @triton.autotune kernel: autotuned, or with the config `fixed` in deterministic mode.

    `kernel.fn` is the @jit function under the autotuner: calling it with one config's
    meta-parameters skips the timing runs, so the same shape always gets the same block
    sizes, hence the same order of every sum (kernels.dispatch.set_deterministic).
    """
    from kernels.dispatch import deterministic

    if deterministic():
        kernel.fn[grid](*args, **kwargs, **fixed.all_kwargs())
    else:
        kernel[grid](*args, **kwargs)
