"""The dispatch point: torch outside the kernel tests' environment, interpreter copies inside;
and the op names: `kernels.<op>` stays the function whatever loads the op's folder."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch
import triton

import kernels
from kernels.dispatch import triton_module

OPS = ("sparse_gather", "pkm_topk", "bank_update")


def test_cpu_uses_torch_without_the_switches(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.delenv("MEMSTREAM_KERNELS", raising=False)
    assert kernels.backend_for(t) == "torch"  # TRITON_INTERPRET alone does not switch
    monkeypatch.setenv("MEMSTREAM_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert kernels.backend_for(t) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.backend_for(t) == "triton"
    monkeypatch.setenv("MEMSTREAM_KERNELS", "torch")
    assert kernels.backend_for(t) == "torch"
    monkeypatch.setenv("MEMSTREAM_KERNELS", "auto")  # auto: Triton for CUDA tensors only
    assert kernels.backend_for(t) == "torch"


def _op_inputs(op):
    g = torch.Generator().manual_seed(0)
    if op == "sparse_gather":
        return torch.randn(10, 4, generator=g), torch.randint(0, 10, (3, 5), generator=g), torch.rand(3, 5)
    if op == "pkm_topk":
        q1, q2 = torch.randn(2, 3, 2, 4, generator=g)
        keys1, keys2 = torch.randn(2, 2, 8, 4, generator=g)
        return q1, q2, keys1, keys2, 5
    return torch.zeros(6, 3), torch.zeros(6, dtype=torch.int64), torch.tensor([1, 4, 1]), torch.randn(3, 3), 7


@pytest.mark.parametrize("mode", ["torch", "triton", "auto"])
@pytest.mark.parametrize("op", OPS)
def test_each_op_reaches_the_backend_of_the_mode(monkeypatch, op, mode):
    monkeypatch.setenv("MEMSTREAM_KERNELS", mode)
    calls = []
    pkg = sys.modules[f"kernels.{op}"]
    ref = getattr(pkg, f"{op}_ref")
    tri = triton_module(op, torch.zeros(1))
    fast = getattr(tri, f"{op}_triton")
    monkeypatch.setattr(pkg, f"{op}_ref", lambda *a: calls.append("torch") or ref(*a))
    monkeypatch.setattr(tri, f"{op}_triton", lambda *a: calls.append("triton") or fast(*a))
    getattr(kernels, op)(*_op_inputs(op))
    assert calls == ["triton" if mode == "triton" else "torch"]  # CPU tensors: auto is torch


@pytest.mark.parametrize("forced", ["atomic", "reverse"])
def test_gather_backward_variant_can_be_forced(monkeypatch, forced):
    """MEMSTREAM_GATHER_BWD overrides the shape rule, through the op's backward."""
    mod = triton_module("sparse_gather", torch.zeros(1))
    # (positions, rows): 128 positions into 8 rows: mean multiplicity 16, auto says reverse;
    # 64 into 1000: auto says atomic
    for total, rows, auto in ((128, 8, "reverse"), (64, 1000, "atomic")):
        assert mod.choose_backward(total, rows) == auto
        monkeypatch.setenv("MEMSTREAM_GATHER_BWD", forced)
        assert mod.choose_backward(total, rows) == forced
        monkeypatch.delenv("MEMSTREAM_GATHER_BWD")
    monkeypatch.setenv("MEMSTREAM_GATHER_BWD", forced)
    reversed_ = []
    dv_reverse = mod._dv_reverse
    monkeypatch.setattr(mod, "_dv_reverse", lambda *a: reversed_.append(1) or dv_reverse(*a))
    for N, idx in (
        (8, torch.zeros(8, 16, dtype=torch.int64)),
        (1000, torch.randperm(1000)[:64].reshape(8, 8)),
    ):
        V = torch.randn(N, 4, requires_grad=True)
        kernels.sparse_gather(V, idx, torch.rand(idx.shape)).sum().backward()
    assert len(reversed_) == (2 if forced == "reverse" else 0)


def test_interpreted_copy_regardless_of_import_order(monkeypatch):
    # triton is imported already (this module did) and TRITON_INTERPRET is unset while
    # the copy loads: it is still interpreted, and the environment is left as it was
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    monkeypatch.delenv("TRITON_INTERPRET")
    mod = triton_module("bank_update", torch.zeros(1))
    assert mod.__name__ == "kernels.bank_update.triton_interpreted"
    assert isinstance(mod._bank_update_kernel, InterpretedFunction)
    assert "TRITON_INTERPRET" not in os.environ
    assert triton_module("bank_update", torch.zeros(1)) is mod  # built once
    # the normal import (used for CUDA tensors) gives compiled kernels
    compiled = importlib.import_module("kernels.bank_update.triton")
    assert compiled is not mod
    assert isinstance(compiled._bank_update_kernel, JITFunction)
    assert triton.__version__


def _assert_ops_are_functions():
    assert type(kernels) is ModuleType  # a plain package: no module-class trick
    for op in OPS:
        fn, pkg = getattr(kernels, op), sys.modules[f"kernels.{op}"]
        assert isinstance(pkg, ModuleType) and pkg.__path__  # the op's folder
        assert callable(fn) and fn is getattr(pkg, op)


def test_loading_an_ops_modules_keeps_the_op(monkeypatch):
    # kernels/sparse_gather/ and the op kernels.sparse_gather share a name: nothing that
    # loads the folder's modules may put a module in the function's place (it did once,
    # with kernels/sparse_gather.py: 'module' object is not callable)
    monkeypatch.delenv("TRITON_INTERPRET")  # the normal imports must stay compiled modules
    for op in OPS:
        importlib.import_module(f"kernels.{op}")
        importlib.import_module(f"kernels.{op}.reference")
        importlib.import_module(f"kernels.{op}.triton")
        triton_module(op, torch.zeros(1))  # the interpreted copy
        _assert_ops_are_functions()
    # the statement forms, too (`import a.b.c` binds only `kernels` here: the same package)
    import kernels.bank_update.triton
    import kernels.pkm_topk.reference
    from kernels import sparse_gather
    from kernels.sparse_gather import reference as sg_reference
    from kernels.sparse_gather import triton as sg_triton

    _assert_ops_are_functions()
    assert sparse_gather is kernels.sparse_gather
    assert sg_reference is sys.modules["kernels.sparse_gather.reference"]
    assert sg_triton is sys.modules["kernels.sparse_gather.triton"]


def test_loading_an_ops_modules_first_keeps_the_op():
    # a fresh process whose first import is an op's implementation module, not `kernels`
    code = (
        "import kernels.sparse_gather.triton\n"
        "from kernels.pkm_topk.reference import pkm_topk_ref\n"
        "import importlib; importlib.import_module('kernels.bank_update.triton')\n"
        "import kernels, torch\n"
        "assert all(callable(getattr(kernels, op)) for op in ('sparse_gather', 'pkm_topk', 'bank_update'))\n"
        "print(kernels.sparse_gather(torch.ones(2, 3), torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEMSTREAM_KERNELS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "tensor([[2., 2., 2.]])" in out.stdout


def test_rest_of_suite_keeps_torch_path():
    # a fresh process as the rest of `pytest tests/` sees it: no switches set
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEMSTREAM_KERNELS")}
    code = (
        "import torch, kernels, sys;"
        "print(kernels.backend_for(torch.zeros(1)));"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('kernels.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "torch"
    loaded = set(out[1].split())
    assert {f"kernels.{op}.reference" for op in OPS} <= loaded
    assert not [m for m in loaded if "triton" in m]  # the Triton modules are not even imported


def test_pkm_topk_selects_from_given_sub_key_scores_on_the_torch_path(monkeypatch):
    """The PKM layer computes the sub-key scores for its gradient anyway and hands them to
    the dispatch: the torch path selects from them, with the same result as scoring itself."""
    monkeypatch.setenv("MEMSTREAM_KERNELS", "torch")
    g = torch.Generator().manual_seed(0)
    q1, q2 = torch.randn(2, 37, 3, 8, generator=g)
    keys1, keys2 = torch.randn(2, 3, 20, 8, generator=g)
    s1 = torch.einsum("bhd,hnd->bhn", q1, keys1)
    s2 = torch.einsum("bhd,hnd->bhn", q2, keys2)
    want = kernels.pkm_topk(q1, q2, keys1, keys2, 6)
    got = kernels.pkm_topk(q1, q2, keys1, keys2, 6, scores=(s1, s2))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert torch.equal(got[1], want[1])
    # the scores are what decides: other scores, other slots
    assert not torch.equal(kernels.pkm_topk(q1, q2, keys1, keys2, 6, scores=(-s1, s2))[1], want[1])


@pytest.mark.parametrize("on", [False, True])
def test_deterministic_mode_runs_fixed_configs_not_the_autotuner(monkeypatch, on):
    """set_deterministic(True): every autotuned kernel is launched with its one fixed config
    (the autotuner, which picks by timing, is not entered); off: the autotuner runs."""
    from triton.runtime.autotuner import Autotuner

    from kernels import dispatch

    tuned = []
    run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: tuned.append(1) or run(self, *a, **k))
    monkeypatch.setattr(dispatch, "_DETERMINISTIC", False)
    dispatch.set_deterministic(on)
    assert dispatch.deterministic() is on
    V, idx, w = _op_inputs("sparse_gather")
    V.requires_grad_()
    kernels.sparse_gather(V, idx, w).sum().backward()
    kernels.pkm_topk(*_op_inputs("pkm_topk"))
    assert (len(tuned) == 0) is on
