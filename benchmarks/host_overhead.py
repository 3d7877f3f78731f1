"""Host work and host<->device synchronisations per step of the online trainer.

What it measures, per `OnlineTrainer.step` of the default config (configs/default.yaml
model + trainer, as benchmarks/trainer_speed.py loads it) at each `--batch-sizes` (512
and 4096), on a real ML-1M prefix decoded up front (decoding, and turning ids into
integers where the decoder does that, is the ingest's work and is not timed):

- `events_per_s`: B / the median wall time of a plain step (no instrumentation);
  `events_per_clock_s` the same per second of the split's clock (CPU time on CPU: what the
  step costs when the machine is not shared).
- `host_us_per_event`: host microseconds per event spent outside torch operators: the wall
  time of a plain step minus the time spent inside torch operators, per event. The time
  inside operators is taken by a TorchDispatchMode (torch.utils._python_dispatch) that
  times each aten op it sees around the op call only: the mode sees top-level ops (an
  op's nested ops run with the mode off, inside the timed interval), and its own Python
  bookkeeping falls outside the timed intervals, so it inflates the instrumented step's
  wall (shown beside the plain one) but barely the operator time. The part it does add
  inside each interval (parsing the arguments, wrapping the outputs: ~1-3 us an op) is
  calibrated at start on ops that do almost nothing and subtracted per op;
  `host_us_per_event_uncorrected` leaves it in (it under-states the host work, the
  corrected figure over-states it by the tiny ops' own kernels: the truth is between).
  Plain and instrumented steps alternate; each plain step is paired with the instrumented
  one after it and the median over pairs is reported (machine noise that lasts longer
  than a step cancels in the pair). On CPU an op's time is its kernel plus the dispatcher
  below the Python key; what is left is the host work: the project's Python and numpy,
  dict lookups, torch's Python bindings and autograd graph bookkeeping (above the Python
  key, so it grows with `torch_ops_per_step`), the optimizer loops. On CUDA an op's time is
  its launch (and any wait it forces), so the remainder is the same host work; Triton
  kernels are launched from Python, not through aten, so their launch counts as host.
  Why not torch.profiler (step wall minus the CPU time of the aten ops with no aten
  ancestor): it records every nested op and autograd node inside its parent's interval,
  and on this 2-core machine that put the top-level op time above the plain step's wall
  (host from -370 to +125 us/event over three short runs); the mode costs ~1.6 us an op
  inside the intervals, and that share is calibrated out.
  On CPU the times of the split are the process's CPU time, not wall (other work on a
  shared machine deschedules the process: wall time accrues, CPU time does not); on CUDA
  they are wall time.
- `syncs_per_step`: the host<->device synchronisations of a step, by kind. Counted at the
  dispatcher (the same mode) and by patching the host-data entry points for the
  duration of the measurement (restored after):
    blocking (the host waits for the device):
      scalar_read        item / float / int / bool of a tensor (aten._local_scalar_dense,
                         aten.equal, aten.is_nonzero)
      bool_mask_index    t[mask] and t[mask] = v (aten.index / index_put_ with a bool
                         index: a nonzero inside)
      data_dependent     nonzero, masked_select, argwhere, unique*, repeat_interleave
                         without output_size, bincount, histc, sparse coalesce
      linalg_check       the info check of linalg.cholesky / inv / solve (not the _ex forms)
      d2h                a device tensor read on the host: on CPU every Tensor.numpy() and
                         Tensor.tolist() (what would be a device-to-host copy on a GPU); on
                         CUDA every cuda -> cpu copy at the dispatcher
    h2d (a copy to the device; blocking unless from pinned memory with non_blocking):
      h2d                on CPU every tensor made from host data (torch.from_numpy,
                         torch.tensor / as_tensor / asarray of non-tensor data) and every
                         numpy-array or list index (t[np_idx]); on CUDA every cpu -> cuda copy
                         at the dispatcher (`h2d_pinned` when the source is pinned), the
                         copies torch.tensor(..., device=cuda) makes, and host-array indices
  On CPU nothing is copied, so these are the sync points the CPU code path would take on
  a GPU (an upper bound for h2d: a tensor made from numpy that stays on the host is
  counted). Not counted: what torch.optim does with the step counters of AdamW (neither
  capturable nor fused, torch keeps them on the CPU: their .item() is no device sync).
  `--sources N` lists the N most frequent call sites (file:line of the project's code).
  Where the code takes another path on a GPU and lets a CPU run take it (a `sync_free`
  switch: SparseRowAdam compacts rows with a boolean mask on CPU, where reading a size
  costs nothing, and has a sync-free step for accelerators), a CPU run counts
  `--gpu-path-steps` more steps with the switch on: the row's sync numbers are those of
  the GPU's path (`sync_path` says which), the CPU path's are kept under `cpu_path`. The
  host times are always those of the CPU path (the GPU path is slower on a CPU).
  On CUDA `cuda_sync_warnings_per_step` counts the warnings of
  torch.cuda.set_sync_debug_mode("warn") as well, the ground truth for the blocking ones
  (a pageable H2D copy without non_blocking is one of them).
- `torch_ops_per_step`: the top-level aten ops the mode saw (forward, backward, optimizers).

Steps: `--warmup` untimed, then `--steps` plain steps interleaved with `--steps`
instrumented ones on consecutive batches (both see the stream at the same stage); one
fresh trainer per batch size. Counts are means per step, times medians.

    .venv/bin/python benchmarks/host_overhead.py --label after --merge
    .venv/bin/python benchmarks/host_overhead.py --label before --batch-sizes 512 --steps 10 \\
        --out-dir /tmp/hostov

Writes `<out-dir>/host_overhead.json` (rows per label and batch size; top-level
`host_us_per_event` and `syncs_per_step` of B = 512, from the "after" row when there is
one) and `<out-dir>/host_overhead.md`. `--merge` keeps the rows of other labels already in
the JSON, so "before" and "after" live in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LABELS = ("before", "after")  # the order of rows; the newest label gives the top-level numbers
BLOCKING_KINDS = ("scalar_read", "bool_mask_index", "data_dependent", "linalg_check", "d2h")
H2D_KINDS = ("h2d", "h2d_pinned")  # h2d_pinned: non_blocking from pinned memory, the one no sync
SYNC_KINDS = BLOCKING_KINDS + H2D_KINDS

# aten op (overload packet) -> the kind of sync it forces on CUDA, whatever its arguments.
_OP_KINDS: dict[str, str] = {
    "_local_scalar_dense": "scalar_read",
    "equal": "scalar_read",
    "is_nonzero": "scalar_read",
    "nonzero": "data_dependent",
    "argwhere": "data_dependent",
    "masked_select": "data_dependent",
    "_unique": "data_dependent",
    "_unique2": "data_dependent",
    "unique_dim": "data_dependent",
    "unique_consecutive": "data_dependent",
    "unique_dim_consecutive": "data_dependent",
    "bincount": "data_dependent",
    "histc": "data_dependent",
    "_coalesce": "data_dependent",
    "_linalg_check_errors": "linalg_check",
}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
_COPY_OPS = {"_to_copy", "copy_"}


def _is_bool_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bool, torch.uint8)


def _device_of(x: Any) -> torch.device | None:
    return x.device if isinstance(x, torch.Tensor) else None


def op_sync_kind(name: str, args: tuple, kwargs: dict) -> str | None:
    """The kind of host<->device sync an aten op (by overload packet name) forces on CUDA,
    None when it forces none. Pure: the CPU counter and the tests call it."""
    if name in _OP_KINDS:
        return _OP_KINDS[name]
    if name in _INDEX_OPS:  # (self, indices, ...): a bool index is a nonzero inside the op
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return "bool_mask_index" if any(_is_bool_tensor(i) for i in indices) else None
    if name == "repeat_interleave":  # the output length is read from `repeats` unless given
        tensor_repeats = any(isinstance(a, torch.Tensor) for a in args)
        return "data_dependent" if tensor_repeats and kwargs.get("output_size") is None else None
    if name in _COPY_OPS:
        if name == "_to_copy":  # (self, *, dtype, ..., device, ..., non_blocking, memory_format)
            source, dst = args[0], kwargs.get("device")
            non_blocking = kwargs.get("non_blocking", False)
        else:  # copy_(self=dst, src, non_blocking=False)
            source, dst = args[1], _device_of(args[0])
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        src = _device_of(source)
        dst = torch.device(dst) if dst is not None else src
        if src is None or dst is None or src.type == dst.type:
            return None
        if dst.type == "cpu":
            return "d2h"
        if src.type != "cpu":
            return None
        # Only a non_blocking copy from pinned memory leaves the host free; torch waits for
        # any other (pageable memory is staged by the host, non_blocking=False syncs the stream).
        return "h2d_pinned" if non_blocking and source.is_pinned() else "h2d"
    return None


def step_clock(device_type: str) -> Callable[[], float]:
    """The clock of the host-work split: the process's CPU time on CPU (the machine is shared:
    a process that is descheduled accrues wall time, not CPU time, so other work on the
    machine stays out of both sides of the difference); wall time on CUDA (a step waits for
    the device there, and host and device overlap)."""
    return time.process_time if device_type == "cpu" else time.perf_counter


class StepCounter(TorchDispatchMode):
    """Counts top-level aten ops, the time inside them and the syncs they force.

    `suppress` > 0 while a patched host-data entry point runs (it counted its own
    transfer): the copies it makes at the dispatcher are not counted twice."""

    def __init__(
        self,
        sources: bool = False,
        host_resident: frozenset[int] = frozenset(),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__()
        self.clock = clock  # what the op intervals are measured in (step_clock)
        self.host_resident = host_resident  # data_ptrs of tensors that stay on the host on a GPU
        self.ops = 0
        self.op_seconds = 0.0
        self.kinds: Counter[str] = Counter()
        self.suppress = 0
        self.sources: Counter[tuple[str, str]] | None = Counter() if sources else None

    def count(self, kind: str, n: int, what: str) -> None:
        """n syncs of `kind` made by `what` (an aten op, a patched entry point)."""
        self.kinds[kind] += n
        if self.sources is not None:
            self.sources[(kind, f"{call_site()} ({what})")] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = op_sync_kind(func._overloadpacket.__name__, args, kwargs)
        if kind == "scalar_read" and args[0].data_ptr() in self.host_resident:
            kind = None
        if kind is not None and not (self.suppress and kind in H2D_KINDS + ("d2h",)):
            self.count(kind, 1, str(func))
        self.ops += 1
        t0 = self.clock()
        out = func(*args, **kwargs)
        self.op_seconds += self.clock() - t0
        return out


def callers() -> Iterator[Any]:
    """The frames of the stack, innermost first, from the caller of the caller on."""
    f = sys._getframe(2)
    while f is not None:
        yield f
        f = f.f_back


def call_site() -> str:
    """file:line of the innermost frame of the project's code (not torch's, not this file's)."""
    here = Path(__file__).resolve()
    for f in callers():
        path = Path(f.f_code.co_filename)
        if path.is_relative_to(ROOT) and path != here and ".venv" not in path.parts:
            return f"{path.relative_to(ROOT)}:{f.f_lineno}"
    return "?"


_TORCH_OPTIM = os.path.join("torch", "optim", "")


def called_from_torch_optim() -> bool:
    """Whether torch.optim is on the stack: its only host tensors are the step counters of
    non-capturable optimizers, which stay on the CPU on a GPU too (`host_resident`)."""
    return any(_TORCH_OPTIM in f.f_code.co_filename for f in callers())


def host_resident(trainer) -> frozenset[int]:
    """data_ptrs of the tensors a GPU run keeps on the host: the "step" counters of the
    trainer's torch.optim optimizers that are neither capturable nor fused (torch keeps
    them on the CPU, so their .item() in the update is no device sync). Call after a step
    (the optimizer state is made lazily)."""
    ptrs = set()
    for opt in vars(trainer).values():
        if not isinstance(opt, torch.optim.Optimizer):
            continue
        for group in opt.param_groups:
            if group.get("capturable") or group.get("fused"):
                continue
            for p in group["params"]:
                step = opt.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device.type == "cpu" and step.dim() == 0:
                    ptrs.add(step.data_ptr())
    return frozenset(ptrs)


def host_array_indices(index: Any) -> int:
    """How many numpy arrays / lists an index expression holds (each is copied to the device)."""
    parts = index if isinstance(index, tuple) else (index,)
    return sum(isinstance(p, np.ndarray | list) for p in parts)


@contextmanager
def host_transfer_hooks(counter: StepCounter, device_type: str) -> Iterator[None]:
    """Patch the entry points where host data enters or leaves torch, for the duration:
    each call counts its transfers (see the module docstring for what counts on which
    device). Restored on exit, also on an exception."""
    on_cpu = device_type == "cpu"
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, transfers: Callable[..., tuple[str, int] | None]) -> None:
        """owner.name counts `transfers(*args)` = (kind, how many) per call, None = nothing."""
        saved.append((owner, name, owner.__dict__.get(name)))  # None: inherited, deleted after
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            found = transfers(*args, **kwargs)
            if found is None or called_from_torch_optim():
                return original(*args, **kwargs)
            counter.count(*found, f"{getattr(owner, '__name__', owner)}.{name}")
            counter.suppress += 1  # the copies it makes at the dispatcher are counted here
            try:
                return original(*args, **kwargs)
            finally:
                counter.suppress -= 1

        setattr(owner, name, counting)

    def on_device(t: torch.Tensor) -> bool:  # a transfer on this device type
        return on_cpu or t.device.type != "cpu"

    def creation(data=None, *args, **kwargs):  # torch.tensor / as_tensor / asarray
        if isinstance(data, torch.Tensor):
            return None
        dev = kwargs.get("device")
        return ("h2d", 1) if on_cpu or (dev is not None and torch.device(dev).type != "cpu") else None

    def indexing(self, index, *value):  # Tensor.__getitem__ / __setitem__
        n = host_array_indices(index) + sum(isinstance(v, np.ndarray) for v in value)
        return ("h2d", n) if n and on_device(self) else None

    def read_back(self, *args, **kwargs):  # Tensor.numpy / tolist
        return ("d2h", 1) if on_device(self) else None

    if on_cpu:  # on CUDA the .to(device) after it is the copy (counted at the dispatcher)
        patch(torch, "from_numpy", lambda *a, **k: ("h2d", 1))
    for name in ("tensor", "as_tensor", "asarray"):
        patch(torch, name, creation)
    patch(torch.Tensor, "__getitem__", indexing)
    patch(torch.Tensor, "__setitem__", indexing)
    patch(torch.Tensor, "numpy", read_back)
    patch(torch.Tensor, "tolist", read_back)
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def counted_step(
    trainer, batch, sources: bool = False, resident: frozenset[int] = frozenset()
) -> tuple[float, StepCounter, int]:
    """(wall s, counter, CUDA sync-debug warnings) of one instrumented step; with `sources`
    the counter also records the call site of each sync; scalar reads of `resident`
    tensors (host_resident) are none."""
    counter = StepCounter(sources, resident, step_clock(trainer.device.type))
    on_cuda = trainer.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        try:
            with host_transfer_hooks(counter, trainer.device.type), counter:
                trainer.step(batch)
        finally:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
        wall = time.perf_counter() - t0
    sync_warnings = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
    return wall, counter, sync_warnings


def plain_step(trainer, batch) -> tuple[float, float]:
    """(wall s, step_clock s) of one step, nothing instrumented (waits for the device on CUDA)."""
    clock = step_clock(trainer.device.type)
    t0, c0 = time.perf_counter(), clock()
    trainer.step(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, clock() - c0


def calibrate_op_overhead(clock: Callable[[], float], calls: int = 2000) -> dict[str, float]:
    """Seconds the mode adds inside each op interval (arguments parsed into the dispatcher's
    stack, outputs wrapped as Python objects), estimated as the timed interval of ops that do
    almost nothing (1-element CPU tensors, whatever the device under test: the boxing is the
    same): per op kind, the median over `calls`. Returns min / median / max over the kinds;
    the median is subtracted per op (their tiny kernels are in it too: it over-corrects a
    little, the uncorrected figure under-states the host work)."""
    a, b = torch.ones(4), torch.ones(4)
    idx, cond = torch.tensor([0, 2]), torch.tensor([True, False, True, False])
    tiny: list[Callable[[], Any]] = [
        lambda: a + b,
        lambda: a.mul_(1.0),
        lambda: a.view(2, 2),
        lambda: a.index_select(0, idx),
        lambda: a.sum(),
        lambda: torch.empty(0),
        lambda: torch.cat([a, b]),
        lambda: torch.where(cond, a, b),
    ]
    per_kind = []
    for fn in tiny:
        counter = StepCounter(clock=clock)
        with counter:
            for _ in range(calls):
                fn()
        per_kind.append(counter.op_seconds / counter.ops)
    return {"min": min(per_kind), "median": statistics.median(per_kind), "max": max(per_kind)}


def gpu_path_switches(trainer) -> list[str]:
    """The trainer's parts that take another code path on a GPU and let a CPU run take it:
    those with a `sync_free` attribute (memory_bank.sparse_optim.SparseRowAdam: `None` picks
    the path by device, `True` forces the accelerator's sync-free step; the doc encoder's
    token embedding, memory_bank.lemur.DocEncoder). By attribute path from the trainer."""
    state = vars(trainer.state) if hasattr(trainer, "state") else {}
    parts = {**vars(trainer), **{f"state.{n}": p for n, p in state.items()}}
    return [name for name, part in parts.items() if hasattr(part, "sync_free")]


def _part(trainer, name: str):
    for attr in name.split("."):
        trainer = getattr(trainer, attr)
    return trainer


@contextmanager
def gpu_path(trainer, switches: list[str]) -> Iterator[None]:
    """The `switches` (gpu_path_switches) forced onto the GPU's path, put back on exit."""
    saved = {name: _part(trainer, name).sync_free for name in switches}
    try:
        for name in switches:
            _part(trainer, name).sync_free = True
        yield
    finally:
        for name, value in saved.items():
            _part(trainer, name).sync_free = value


def sync_summary(kinds: Counter[str], steps: int, sites: Counter, top_sources: int) -> dict[str, Any]:
    """Per-step sync numbers of `steps` counted steps (kinds, and sites when recorded)."""
    per_step = {k: kinds[k] / steps for k in SYNC_KINDS}
    out: dict[str, Any] = {
        "syncs_per_step": round(sum(per_step[k] for k in SYNC_KINDS if k != "h2d_pinned"), 2),
        "blocking_syncs_per_step": round(sum(per_step[k] for k in BLOCKING_KINDS), 2),
        "h2d_copies_per_step": round(sum(per_step[k] for k in H2D_KINDS), 2),
        "sync_kinds_per_step": {k: round(v, 2) for k, v in per_step.items()},
    }
    if top_sources:
        out["sync_sources"] = [
            {"kind": kind, "site": site, "per_step": round(c / steps, 2)}
            for (kind, site), c in sites.most_common(top_sources)
        ]
    return out


def measure(
    cfg, batches: list, warmup: int, steps: int, top_sources: int = 0, gpu_path_steps: int = 0
) -> dict[str, Any]:
    """One row: a fresh trainer over `batches` (warmup, then interleaved plain / instrumented
    steps, then on CPU `gpu_path_steps` counted steps on the GPU's code path where the
    trainer has one: the row's sync numbers are theirs, the CPU path's are kept beside);
    with `top_sources`, the call sites of the most frequent syncs.

    The host time of a pair (a plain step, the instrumented step after it): the plain step's
    time (step_clock) minus the instrumented step's op time less the mode's own share of it (ops x the
    calibrated per-op overhead); the row gives the median over pairs, which keeps machine
    noise that lasts longer than a step out of the difference."""
    from models.online import OnlineTrainer

    trainer = OnlineTrainer(cfg.model, cfg.trainer)
    b = len(batches[0])
    for batch in batches[:warmup]:
        trainer.step(batch)
    resident = host_resident(trainer)
    plain, plain_clock, counted_wall, op_s, ops, warns = [], [], [], [], [], []
    kinds: Counter[str] = Counter()
    sites: Counter[tuple[str, str]] = Counter()
    timed = batches[warmup : warmup + 2 * steps]
    for i, batch in enumerate(timed):
        if i % 2 == 0:
            wall, spent = plain_step(trainer, batch)
            plain.append(wall)
            plain_clock.append(spent)
            continue
        wall, counter, sync_warnings = counted_step(trainer, batch, top_sources > 0, resident)
        counted_wall.append(wall)
        op_s.append(counter.op_seconds)
        ops.append(counter.ops)
        warns.append(sync_warnings)
        kinds.update(counter.kinds)
        sites.update(counter.sources or {})
    n = len(op_s)
    wall_s, op_med = statistics.median(plain), statistics.median(op_s)
    boxing = calibrate_op_overhead(step_clock(trainer.device.type))
    pairs = list(zip(plain_clock, op_s, ops))
    host_s = statistics.median(w - (o - k * boxing["median"]) for w, o, k in pairs)
    host_uncorrected_s = statistics.median(w - o for w, o, _ in pairs)
    row: dict[str, Any] = {
        "batch_size": b,
        "host_us_per_event": round(host_s / b * 1e6, 2),
        "host_us_per_event_uncorrected": round(host_uncorrected_s / b * 1e6, 2),
        "mode_us_per_op": {k: round(v * 1e6, 3) for k, v in boxing.items()},
        "torch_ops_per_step": round(statistics.mean(ops), 1),
        "events_per_s": round(b / wall_s, 1),
        "events_per_clock_s": round(b / statistics.median(plain_clock), 1),
        "step_ms": round(wall_s * 1e3, 2),
        "step_clock_ms": round(statistics.median(plain_clock) * 1e3, 2),
        "clock": "process CPU time" if trainer.device.type == "cpu" else "wall",
        "instrumented_step_ms": round(statistics.median(counted_wall) * 1e3, 2),
        "torch_op_ms_per_step": round(op_med * 1e3, 2),
        "device": str(trainer.device),
        "plain_steps": len(plain),
        "instrumented_steps": n,
    }
    if trainer.device.type == "cuda":
        row["cuda_sync_warnings_per_step"] = round(statistics.mean(warns), 2)
    counted = sync_summary(kinds, n, sites, top_sources)
    switches = gpu_path_switches(trainer) if trainer.device.type == "cpu" else []
    extra = batches[warmup + 2 * steps : warmup + 2 * steps + gpu_path_steps]
    if switches and extra:
        gpu_kinds: Counter[str] = Counter()
        gpu_sites: Counter[tuple[str, str]] = Counter()
        with gpu_path(trainer, switches):
            for batch in extra:
                _, counter, _ = counted_step(trainer, batch, top_sources > 0, resident)
                gpu_kinds.update(counter.kinds)
                gpu_sites.update(counter.sources or {})
        row.update(sync_summary(gpu_kinds, len(extra), gpu_sites, top_sources))
        row["sync_path"] = (
            f"GPU path ({', '.join(f'{s}.sync_free=True' for s in switches)}), {len(extra)} steps"
        )
        row["cpu_path"] = counted
    else:
        row.update(counted)
        row["sync_path"] = "the code path of the device measured"
    return row


# ---- results: merge, JSON, markdown --------------------------------------------------------


def merge_rows(old: list[dict], new: list[dict], label: str, keep_other_labels: bool) -> list[dict]:
    """`new` (all of `label`) replaces the rows of that label; rows of other labels stay when
    `keep_other_labels`. Ordered by label (LABELS), then batch size."""
    kept = [r for r in old if keep_other_labels and r["label"] != label]
    rows = kept + [{"label": label, **r} for r in new]
    order = {lab: i for i, lab in enumerate(LABELS)}
    return sorted(rows, key=lambda r: (order.get(r["label"], len(order)), r["batch_size"]))


def headline(rows: list[dict], batch_size: int = 512) -> dict[str, float | None]:
    """The issue's numbers: B = `batch_size` of the newest label present."""
    keys = ("host_us_per_event", "syncs_per_step", "blocking_syncs_per_step")
    for label in reversed(LABELS):
        for r in rows:
            if r["label"] == label and r["batch_size"] == batch_size:
                return {k: r[k] for k in keys}
    return dict.fromkeys(keys)


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    lines = [
        "# Host work and host<->device syncs per trainer step",
        "",
        "Method (benchmarks/host_overhead.py, its docstring): host = a plain step's time minus the",
        "time inside the top-level aten ops of the instrumented step after it (a TorchDispatchMode",
        "timing each op call, less its own calibrated share per op: `mode us/op`; `uncorrected`",
        "keeps that share in: the truth lies between the two), median over pairs; process CPU time",
        "on CPU (other work on the machine stays out of it), wall time on CUDA. Host work includes",
        "torch's Python bindings and autograd bookkeeping, which grow with the ops per step.",
        "",
        "Syncs are counted at the dispatcher and at the entry points of host data. On CPU they are",
        "the sync points the CPU code path would take on a GPU: every tensor made from host data",
        "counts as an H2D copy from pageable memory (a sync; pinning cannot be seen on a CPU), and",
        "the kernels/*/reference.py lines are the CPU twins of Triton kernels (on a GPU those run",
        "instead). syncs/step = blocking + H2D copies other than non_blocking ones from pinned memory.",
        "",
        "Default config (configs/default.yaml), ML-1M prefix decoded up front, a fresh trainer per",
        "batch size. Counts are means per step, times medians. The CPU machine has 2 cores shared",
        "with other work: wall times and events/s move between runs (compare events/s with",
        "events/CPU s), CPU times by ~10%; the counts do not move.",
        "",
    ]
    for label in LABELS:
        meta = doc.get("runs", {}).get(label)
        if meta:
            lines.append(
                f"- **{label}**: commit {meta['commit']}, {meta['device']}, torch {meta['torch']}, "
                f"{meta['taken']}; `{meta['command']}`"
            )
    lines += [
        "",
        "| label | B | host us/event | uncorrected | syncs/step | blocking | H2D copies | torch ops/step "
        "| events/s | events/CPU s | step ms (wall) | step CPU ms | instrumented step ms (wall) | torch op ms/step "
        "| mode us/op (range) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['batch_size']} | {r['host_us_per_event']:.1f} | "
            f"{r['host_us_per_event_uncorrected']:.1f} | {r['syncs_per_step']:.1f} | "
            f"{r['blocking_syncs_per_step']:.1f} | {r['h2d_copies_per_step']:.1f} | "
            f"{r['torch_ops_per_step']:,.0f} | {r['events_per_s']:,.0f} | {r['events_per_clock_s']:,.0f} | "
            f"{r['step_ms']:.1f} | "
            f"{r['step_clock_ms']:.1f} | {r['instrumented_step_ms']:.1f} | {r['torch_op_ms_per_step']:.1f} | "
            f"{r['mode_us_per_op']['median']:.2f} ({r['mode_us_per_op']['min']:.2f}-{r['mode_us_per_op']['max']:.2f}) |"
        )
    cuda = any("cuda_sync_warnings_per_step" in r for r in rows)
    lines += [
        "",
        "Syncs per step by kind (blocking: " + ", ".join(BLOCKING_KINDS) + "; copies to the device: "
        "h2d, h2d_pinned)" + (", and CUDA sync-debug warnings:" if cuda else ":"),
        "",
        "| label | B | path | " + " | ".join(SYNC_KINDS) + (" | cuda sync warnings |" if cuda else " |"),
        "|---|---:|---|" + "---:|" * (len(SYNC_KINDS) + cuda),
    ]
    for r in rows:
        paths = [(r.get("sync_path", "-"), r)]
        if "cpu_path" in r:  # the CPU's own path beside the GPU path's counts
            paths.append(("CPU path (timed steps)", r["cpu_path"]))
        for path, counts in paths:
            cells = [f"{counts['sync_kinds_per_step'].get(k, 0):.1f}" for k in SYNC_KINDS]
            if cuda:
                w = r.get("cuda_sync_warnings_per_step")
                cells.append("-" if w is None else f"{w:.1f}")
            lines.append(f"| {r['label']} | {r['batch_size']} | {path} | " + " | ".join(cells) + " |")
    for r in rows:
        if r.get("sync_sources") and r["batch_size"] == min(x["batch_size"] for x in rows):
            lines += [
                "",
                f"Where the syncs of **{r['label']}** come from (B = {r['batch_size']}, the most frequent "
                "call sites in the project's code):",
                "",
                "| kind | call site | per step |",
                "|---|---|---:|",
            ]
            lines += [f"| {s['kind']} | {s['site']} | {s['per_step']:.1f} |" for s in r["sync_sources"]]
    lines += [
        "",
        f"Headline (B = 512, newest label): host_us_per_event = {doc['host_us_per_event']}, "
        f"syncs_per_step = {doc['syncs_per_step']}, of them blocking {doc['blocking_syncs_per_step']} "
        "(issue 15's targets: <= 3 us per event, <= 2 blocking syncs per step).",
    ]
    return "\n".join(lines) + "\n"


def decoded_batches(recording: Path, batch_size: int, count: int) -> list:
    """`count` full batches of the recording's prefix, decoded (and their integer ids made,
    where the batch type has them) before any timing."""
    from stream.train.evaluate import iter_event_batches

    batches = [
        b for b in iter_event_batches(recording, batch_size, batch_size * count) if len(b) == batch_size
    ]
    if len(batches) < count:
        raise SystemExit(f"{recording}: {len(batches)} batches of {batch_size}, need {count}")
    for b in batches:
        if hasattr(b, "id_codes"):
            b.id_codes()
    return batches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", choices=LABELS, required=True, help="which rows this run gives")
    ap.add_argument("--merge", action="store_true", help="keep the other label's rows of the JSON")
    ap.add_argument("--recording", default="runs/ml1m.parquet", help="built if missing (ML-1M)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--set", action="append", default=[], help="config override (section.field=value)")
    ap.add_argument("--batch-sizes", default="512,4096")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per batch size")
    ap.add_argument("--steps", type=int, default=30, help="plain steps, and as many instrumented")
    ap.add_argument("--sources", type=int, default=15, help="call sites of the most frequent syncs listed")
    ap.add_argument(
        "--gpu-path-steps", type=int, default=5, help="CPU: steps counted on the GPU's code path (0: none)"
    )
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.gpu_path_steps < 0:
        raise SystemExit(
            "--steps and --warmup must be >= 1 (the optimizers' state is made at the first step), --gpu-path-steps >= 0"
        )

    from benchmarks.memory_value import git_commit
    from stream.config import load_config

    rec = Path(args.recording)
    if not rec.exists():
        from stream.recordings.data.movielens import build_ml1m_recording

        build_ml1m_recording(rec)
    cfg = load_config(args.config, args.set)
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        batches = decoded_batches(rec, b, args.warmup + 2 * args.steps + args.gpu_path_steps)
        rows.append(measure(cfg, batches, args.warmup, args.steps, args.sources, args.gpu_path_steps))
        print(f"[host_overhead] {args.label} B={b}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "host_overhead.json"
    old = json.loads(json_path.read_text()) if args.merge and json_path.exists() else {}
    device = rows[0]["device"]
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name(device)
    run = {
        "commit": git_commit(),
        "device": device,
        "torch": torch.__version__,
        "taken": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {cfg.trainer.threads}",
        "command": "benchmarks/host_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    doc: dict[str, Any] = {
        "device": run["device"],
        "torch": run["torch"],
        "commit": run["commit"],
        "runs": {**(old.get("runs", {}) if args.merge else {}), args.label: run},
        "rows": merge_rows(old.get("rows", []), rows, args.label, args.merge),
    }
    doc["runs"] = {k: v for k, v in doc["runs"].items() if any(r["label"] == k for r in doc["rows"])}
    doc.update(headline(doc["rows"]))
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (out / "host_overhead.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
