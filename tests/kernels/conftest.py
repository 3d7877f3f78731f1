"""Kernel tests: the Triton kernels under TRITON_INTERPRET=1 on CPU, against the references.

How the interpreter is switched on without touching the rest of the suite: nothing is
set at import or collection time. `kernels.dispatch.triton_module` loads a separate,
interpreted copy of each Triton module (`kernels/<op>/triton.py`) for CPU tensors
(executed with TRITON_INTERPRET=1 whatever the process had), so it does not matter
whether triton was imported before. The dispatch (`backend_for`) only picks Triton for CPU tensors
while TRITON_INTERPRET=1 and MEMSTREAM_KERNELS=triton are set; the autouse fixture
below sets both for each test of this folder and monkeypatch restores them after, so
every other test of a `pytest tests/` session keeps the torch path. The kernels'
deterministic switch starts off in each test (a trainer built earlier in the session,
with trainer.deterministic, leaves it on: it is process-wide).

Random inputs are fresh each run: the seed comes from os.urandom (or
MEMSTREAM_TEST_SEED to replay) and is printed, so pytest shows it for a failure.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import dispatch


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MEMSTREAM_KERNELS", "triton")
    monkeypatch.delenv("MEMSTREAM_GATHER_BWD", raising=False)
    monkeypatch.setattr(dispatch, "_DETERMINISTIC", False)
    yield


@pytest.fixture
def gen(request) -> torch.Generator:
    seed = int(os.environ.get("MEMSTREAM_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"{request.node.nodeid}: seed={seed} (replay with MEMSTREAM_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


_SENTINEL_INT = -77777


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty / empty_like during the test comes back NaN (or -77777) filled,
    so an output element a kernel forgets to write cannot pass by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and t.numel():
            t.fill_(_SENTINEL_INT)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
    yield
