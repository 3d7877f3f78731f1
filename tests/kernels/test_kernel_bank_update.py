"""Bank update: Triton (interpreter) vs bank_update_ref, duplicates and stamps."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.bank_update.reference import bank_update_ref
from kernels.dispatch import triton_module


def _case(gen, N, D, M, bank_dtype, vec_dtype, dup_rows):
    bank = torch.randn(N, D, generator=gen).to(bank_dtype)
    bank[::3] = float("nan")  # untouched rows must stay exactly as they were, NaN included
    stamps = torch.randint(0, 5, (N,), generator=gen)
    rows = torch.randint(0, N, (M,), generator=gen)
    if dup_rows:  # every other write goes to one of 2 hot rows
        hot = torch.randint(0, N, (2,), generator=gen)
        rows[::2] = hot[torch.randint(0, 2, ((M + 1) // 2,), generator=gen)]
    vectors = torch.randn(M, D, generator=gen).to(vec_dtype)
    return bank, stamps, rows, vectors


@pytest.mark.parametrize(
    "bank_dtype,vec_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("shape", [(40, 13, 25), (300, 70, 64), (5, 1, 9), (50, 130, 1)])
@pytest.mark.parametrize("dup_rows", [False, True])
def test_bank_update_matches_reference(gen, poison, shape, bank_dtype, vec_dtype, dup_rows):
    bank, stamps, rows, vectors = _case(gen, *shape, bank_dtype, vec_dtype, dup_rows)
    rb, rs = bank.clone(), stamps.clone()
    step = int(torch.randint(10, 1 << 40, (1,), generator=gen))
    out = kernels.bank_update(bank, stamps, rows, vectors, step)
    ref = bank_update_ref(rb, rs, rows, vectors, step)
    assert torch.equal(out, ref) and torch.equal(out, torch.unique(rows))
    assert torch.equal(bank, rb) or torch.allclose(bank, rb, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(stamps, rs)
    # last writer wins, spelled out
    for r in out.tolist():
        last = int(torch.nonzero(rows == r).max())
        assert torch.equal(bank[r], vectors[last].to(bank_dtype))
        assert int(stamps[r]) == step


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bank_update_without_returning_rows_writes_the_same(gen, monkeypatch, backend):
    monkeypatch.setenv("MEMSTREAM_KERNELS", backend)
    bank, stamps, rows, vectors = _case(gen, 60, 9, 40, torch.float32, torch.float32, True)
    rb, rs = bank.clone(), stamps.clone()
    assert kernels.bank_update(bank, stamps, rows, vectors, 11, return_rows=False) is None
    bank_update_ref(rb, rs, rows, vectors, 11)
    assert torch.allclose(bank, rb, equal_nan=True, rtol=0, atol=0) and torch.equal(stamps, rs)
    empty = torch.zeros(0, dtype=torch.int64)
    assert kernels.bank_update(bank, stamps, empty, torch.zeros(0, 9), 12, return_rows=False) is None


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bank_update_takes_rows_as_a_strided_column(gen, monkeypatch, backend):
    """A training step's rows arrive as one column of its staged (B, k) index block
    (memory_bank.base.index_columns): a view with stride k, not a contiguous array."""
    monkeypatch.setenv("MEMSTREAM_KERNELS", backend)
    bank, stamps, rows, vectors = _case(gen, 60, 9, 40, torch.float32, torch.float32, True)
    block = torch.zeros(48, 5, dtype=torch.int64)
    block[:40, 2] = rows
    column = block[:40, 2]
    assert not column.is_contiguous()
    rb, rs = bank.clone(), stamps.clone()
    kernels.bank_update(bank, stamps, column, vectors, 7, return_rows=False)
    bank_update_ref(rb, rs, rows, vectors, 7)
    assert torch.allclose(bank, rb, equal_nan=True, rtol=0, atol=0) and torch.equal(stamps, rs)


def test_bank_update_empty_and_dispatch(monkeypatch):
    bank = torch.zeros(4, 3)
    stamps = torch.zeros(4, dtype=torch.int64)
    out = kernels.bank_update(bank, stamps, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3), 1)
    assert out.numel() == 0 and (stamps == 0).all()
    mod = triton_module("bank_update", bank)
    called = []
    orig = mod.bank_update_triton
    monkeypatch.setattr(mod, "bank_update_triton", lambda *a: called.append(1) or orig(*a))
    kernels.bank_update(bank, stamps, torch.tensor([2, 2]), torch.tensor([[1.0] * 3, [2.0] * 3]), 9)
    assert called == [1] and bank[2].tolist() == [2.0] * 3 and stamps.tolist() == [0, 0, 9, 0]
