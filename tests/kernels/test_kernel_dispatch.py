"""The dispatch point: torch outside the kernel tests' environment, interpreter copies inside."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import torch
import triton

import kernels


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


def test_interpreted_copy_regardless_of_import_order(monkeypatch):
    # triton is imported already (this module did) and TRITON_INTERPRET is unset while
    # the copy loads: it is still interpreted, and the environment is left as it was
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    monkeypatch.delenv("TRITON_INTERPRET")
    mod = kernels._triton_impl("bank_update", torch.zeros(1))
    assert isinstance(mod._bank_update_kernel, InterpretedFunction)
    assert "TRITON_INTERPRET" not in os.environ
    # the normal import (used for CUDA tensors) gives compiled kernels
    compiled = importlib.import_module("kernels.bank_update")
    assert compiled is not mod
    assert isinstance(compiled._bank_update_kernel, JITFunction)
    assert triton.__version__


def test_importing_an_implementation_module_keeps_the_op():
    # kernels/sparse_gather.py and the op kernels.sparse_gather share a name: loading the
    # module must not replace the op (it did once: 'module' object is not callable)
    for name in ("sparse_gather", "pkm_topk", "bank_update"):
        mod = importlib.import_module(f"kernels.{name}")
        assert callable(getattr(kernels, name)) and getattr(kernels, name) is not mod
    from kernels import sparse_gather

    assert callable(sparse_gather)


def test_rest_of_suite_keeps_torch_path():
    # a fresh process as the rest of `pytest tests/` sees it: no switches set
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEMSTREAM_KERNELS")}
    code = (
        "import torch, kernels, sys;"
        "print(kernels.backend_for(torch.zeros(1)));"
        "print(sorted(m for m in sys.modules if m.startswith('kernels.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "torch"
    assert "sparse_gather" not in out[1]  # the Triton modules are not even imported


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
