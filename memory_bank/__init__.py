"""The memories: stateful components with one shape of API (docs/CONTRACTS.md).

- lemur.py        ItemMemoryBank (item key -> latest doc-encoder vector, TTL/LRU, freed rows)
                  and DocEncoder (hashed-word Transformer, or all-MiniLM-L6-v2 fine-tuned)
- lmn.py          UserMemory: one product-key memory shared by all users + memory loss
- pkm.py          ProductKeyMemory (MSN layer, usage stats, dead-key reinit) and MemoryGate
- history.py      UserHistoryStore: per-user ring buffers on the device of the last L
                  (item code, item key, bank row, time, signal), keyed by user key
- sparse_optim.py SparseRowAdam: row-sparse Adam for sparse COO gradients (values, id tables)

Every component: stats() -> dict (JSON-able); export_state() -> (tensors, meta) for
safetensors + JSON and import_state(tensors, meta), bit-exact; take_delta() -> MemoryDelta
(rows changed since the previous call) and apply_delta(delta) on a serving copy. Modules are
imported by their own path (`from memory_bank.pkm import ProductKeyMemory`); nothing here
imports Ray, Kafka or `stream`.
"""

import importlib.util
from pathlib import Path

# The folder holding memory_bank and kernels side by side: the repo root (editable install)
# or site-packages.
_PACKAGES_ROOT = Path(__file__).resolve().parent.parent


class ForeignKernelsPackageError(ImportError):
    """Another distribution's `kernels` package is found before memstream's own."""


def _require_own_kernels() -> None:
    # Hugging Face's `kernels` distribution (a hard dependency of transformers >= 5.25)
    # installs a top-level package of the same name. With an editable install, site-packages
    # comes first on sys.path, so outside the repo root `import kernels` would load theirs
    # and fail far from the cause (or, worse, transformers would load ours).
    spec = importlib.util.find_spec("kernels")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is None or origin.parent.parent != _PACKAGES_ROOT:
        raise ForeignKernelsPackageError(
            f"`import kernels` resolves to {origin}, not memstream's {_PACKAGES_ROOT / 'kernels'}: "
            "another distribution named `kernels` (Hugging Face's, pulled in by "
            "transformers >= 5.25) shadows it. Fix: `pip uninstall kernels` and "
            "`pip install 'transformers<5.25'` (or re-run `make venv`)."
        )


_require_own_kernels()
