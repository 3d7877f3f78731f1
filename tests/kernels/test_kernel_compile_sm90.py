"""The compiled (GPU) path without a GPU: every Triton kernel goes through the whole
compiler for sm_90 (frontend -> TTGIR -> LLVM -> PTX -> cubin with the ptxas that ships
with triton), so a kernel that only works under the interpreter fails here, in CI.
Register use and spills are printed (cuobjdump) to guide block sizes; nothing is run.

The compiles run in a fresh process (this file as a script), never in the test session:
while a kernel runs under the interpreter, triton patches triton.language in-process and
restores it after, and two kernels interpreted at once on two threads can leave the
interpreter's versions behind (each restores what the other had patched). A compile
after that goes through the interpreter's builder and fails ("'value' object has no
attribute 'dtype'") on code that is fine: seen once in a full `pytest tests/` run.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

ROOT = Path(__file__).resolve().parents[2]


def compiled_modules():
    """The Triton modules, imported normally (compiled kernels; the fresh process has
    TRITON_INTERPRET unset). importlib: `import kernels.sparse_gather.triton as m` would
    fail, see kernels/."""
    return [
        importlib.import_module(f"kernels.{m}.triton") for m in ("sparse_gather", "pkm_topk", "bank_update")
    ]


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


def _case_id(c) -> str:
    return f"{c[1]}-{c[2].split()[0]}-{c[3].get('ATOMIC_DV', '')}{c[3].get('SPLIT', '')}"


def compile_all() -> dict[str, list[int]]:
    """case id -> [registers, stack bytes] of every case, compiled here."""
    mods = compiled_modules()
    return {_case_id(c): list(compile_sm90(getattr(mods[c[0]], c[1]), _sig(c[2]), c[3], c[4])) for c in CASES}


@pytest.fixture(scope="module")
def sm90_usage() -> dict[str, list[int]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence 3.9's default-change warning
    run = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, f"the compile process failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    print(run.stdout)  # registers and stack per kernel (pytest -s shows them)
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_compiles_for_sm90_without_spills(sm90_usage, case):
    _regs, stack = sm90_usage[_case_id(case)]
    assert stack <= 8, f"{case[1]} uses {stack} bytes of stack (spills)"


if __name__ == "__main__":  # the fixture's fresh process: one JSON line last
    sys.path.insert(0, str(ROOT))
    assert isinstance(tl.standard.sum, JITFunction), "TRITON_INTERPRET must be unset here"
    print(json.dumps(compile_all()))
