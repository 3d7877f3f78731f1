"""The compiled (GPU) path without a GPU: every Triton kernel goes through the whole
compiler for sm_90 (frontend -> TTGIR -> LLVM -> PTX -> cubin with the ptxas that ships
with triton), so a kernel that only works under the interpreter fails here, in CI.
Register use and spills are printed (cuobjdump) to guide block sizes; nothing is run.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile

import pytest
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

pytestmark = pytest.mark.skipif(
    not isinstance(tl.standard.sum, JITFunction),
    reason="triton was imported with TRITON_INTERPRET=1: its own helpers are interpreted",
)


@pytest.fixture(scope="module")
def compiled_modules():
    # the normal import (compiled kernels): TRITON_INTERPRET must be off while it runs
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:  # (importlib: `import kernels.sparse_gather.triton as m` would fail, see kernels/)
        sg, pk, bu = (
            importlib.import_module(f"kernels.{m}.triton")
            for m in ("sparse_gather", "pkm_topk", "bank_update")
        )
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    return sg, pk, bu


def compile_sm90(kernel, sig, consts, num_warps=4):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    assert isinstance(fn, JITFunction)
    full = {n: ("constexpr" if n in consts else sig[n]) for n in fn.arg_names}
    c = triton.compile(
        ASTSource(fn, full, constexprs=consts),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )
    cubin = c.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        usage = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    print(f"{fn.__name__} {consts}: {m.group(0) if m else usage}")
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(autouse=True)
def _fp_fusion(monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's default-change warning


def _sig(spec: str) -> dict:
    """'V:*fp32 K:i32' -> {'V': '*fp32', 'K': 'i32'}"""
    return dict(item.split(":") for item in spec.split())


ACC = {"ACC": tl.float32, "BLOCK_K": 32, "BLOCK_D": 128}
# (module index, kernel, signature, constexprs, num_warps); realistic block sizes
CASES = [
    *[
        (0, "_gather_fwd_kernel", f"V:*{dt} IDX:*i64 W:*fp32 OUT:*{dt} K:i32 D:i32 stride_v:i32", ACC, 4)
        for dt in ("fp32", "bf16")
    ],
    *[
        (
            0,
            "_gather_bwd_rows_kernel",
            f"V:*{dt} IDX:*i64 W:*fp32 DOUT:*{dt} DW:*fp32 INV:*i64 DVC:*fp32 K:i32 D:i32 stride_v:i32",
            {"COMPUTE_DW": dw, "ATOMIC_DV": at, **ACC},
            4,
        )
        for dt in ("fp32", "bf16")
        for dw, at in ((True, True), (True, False), (False, True))
    ],
    *[
        (
            0,
            "_segment_sum_kernel",
            f"SRC:*{dt} GROW:*i64 GW:*fp32 START:*i64 END:*i64 OUT:*fp32 PART:*fp32 DEST:*i64 "
            "D:i32 stride_src:i32",
            {"SPLIT": split, "SKIP_SINGLE": skip, **ACC},
            4,
        )
        for dt in ("fp32", "bf16")
        for split, skip in ((True, False), (False, True))
    ],
    (
        1,
        "_pkm_topk_kernel",
        (
            "Q1:*fp32 Q2:*fp32 K1:*fp32 K2:*fp32 CI:*i32 CJ:*i32 OUT_S:*fp32 OUT_I:*i64 "
            "B:i32 H:i32 n:i32 dk:i32 k:i32"
        ),
        {"BLOCK_B": 16, "BLOCK_N": 128, "BLOCK_DK": 64, "KP": 32, "C": 128, "KF": 32, "USE_DOT": True},
        8,
    ),
    (
        1,
        "_topk_stream_kernel",
        "X:*fp32 OUT_V:*fp32 OUT_I:*i64 L:i32 k:i32 stride_x:i32",
        {"BLOCK": 1024, "KP": 32},
        4,
    ),
    (
        1,
        "_topk_radix_kernel",
        "X:*fp32 OUT_V:*fp32 OUT_I:*i64 BUF_K:*i32 BUF_I:*i32 R:i32 L:i32 k:i32 stride_x:i32",
        {"BLOCK": 2048, "KF": 32, "BITS": 8},
        8,
    ),
    (
        2,
        "_bank_update_kernel",
        (
            "BANK:*bf16 STAMPS:*i64 ROWS:*i64 SRC:*i64 VEC:*fp32 M:i32 step:i64 D:i32 stride_bank:i32 stride_vec:i32"
        ),
        {"BLOCK_D": 128},
        4,
    ),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"{c[1]}-{c[2].split()[0]}-{c[3].get('ATOMIC_DV', '')}{c[3].get('SPLIT', '')}",
)
def test_kernel_compiles_for_sm90_without_spills(compiled_modules, case):
    mod_i, name, sig, consts, warps = case
    _regs, stack = compile_sm90(getattr(compiled_modules[mod_i], name), _sig(sig), consts, warps)
    assert stack <= 8, f"{name} uses {stack} bytes of stack (spills)"
