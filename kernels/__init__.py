"""Kernels for the memories: one folder per op, one dispatch point.

    kernels/<op>/__init__.py    the op (the API): picks the backend, calls one of
    kernels/<op>/triton.py      the Triton kernels (+ autograd.Function where there is a backward)
    kernels/<op>/reference.py   a short plain-torch twin: the CPU path and the tests' ground truth
    kernels/dispatch.py         backend_for (MEMSTREAM_KERNELS) and triton_module (the loader
                                of compiled / interpreted copies of kernels/<op>/triton.py)
    kernels/_triton_common.py   plain helpers the Triton modules decorate themselves

Ops: sparse_gather (the MSN value read, sparse values gradient), pkm_topk (product-key
top-k selection), bank_update (deduplicated, stamped row scatter). The row top-k that
pkm_topk's Triton path needs for large k is private to kernels/pkm_topk/triton.py.

Names: `kernels.sparse_gather` is the function, although kernels/sparse_gather/ is a
package of the same name. Python binds a submodule onto its parent only when it first
loads it; this file loads every op folder before it binds the op's function over that
name, and the lazily loaded modules (`kernels.<op>.triton`, `.reference`) bind onto the
op folder, not onto `kernels`, so nothing later puts a module back in the function's
place (tests/kernels/test_kernel_dispatch.py checks it). Reach an op's modules with
`from kernels.sparse_gather import triton, reference`, `sys.modules["kernels.sparse_gather"]`
or `importlib.import_module("kernels.sparse_gather.triton")`; not with
`import kernels.sparse_gather.triton as m` (that form walks package attributes, and the
package attribute `kernels.sparse_gather` is the function). For the device-appropriate
Triton module use `kernels.dispatch.triton_module(op, tensor)`.
"""

from __future__ import annotations

from kernels.bank_update import bank_update
from kernels.dispatch import backend_for
from kernels.pkm_topk import pkm_topk
from kernels.sparse_gather import sparse_gather

__all__ = ["backend_for", "bank_update", "pkm_topk", "sparse_gather"]
