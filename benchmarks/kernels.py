"""Kernel benchmark: each Triton kernel vs its torch reference, GB/s vs measured copy bandwidth.

    .venv/bin/python benchmarks/kernels.py                      # default shapes for the device
    .venv/bin/python benchmarks/kernels.py --shapes gather=16384,128,1000000,128,uniform \
        --shapes pkm=16384,4,1024,64,32 --shapes bank=16384,1000000,128

On a GPU: CUDA events, median of --iters runs after --warmup runs (the first calls
also autotune), outputs checked against the reference on fresh random inputs before
timing, table written to benchmarks/results/kernels_<device name>.md.
Without a GPU it says so, times the torch references only on small shapes (the
Triton interpreter is not a performance path) and writes benchmarks/results/kernels_cpu.md.

Bytes counted (the minimum each op must move; re-reads that hit in L2, index sorts and
the autotuner are not counted, so GB/s is "useful" bandwidth):
- gather fwd: gathered rows B*K*D*e + idx B*K*8 + w B*K*4 + out B*D*e
- gather fwd+bwd: fwd + dout B*D*e + rows re-read for dw B*K*D*e + idx + w + dw B*K*4
  + dV rows written U*D*e (U = unique rows used)
- pkm top-k: q1, q2 2*B*H*dk*e + sub-keys 2*H*n*dk*e + scores and slots B*H*k*(e + 8)
  (the same count for k > 128, where the Triton path is unfused: einsum scores, then the
  private row top-k of kernels/pkm_topk/triton.py on each half and on the kk*kk pair sums)
- bank update: rows M*8 + vectors M*D*e + bank rows written U*D*e + stamps U*8
Copy bandwidth: a large device-to-device tensor copy, read + write bytes over time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.bank_update.reference import bank_update_ref
from kernels.pkm_topk.reference import pkm_topk_ref
from kernels.sparse_gather.reference import sparse_gather_ref

RESULTS = Path(__file__).resolve().parent / "results"

GPU_SHAPES = {
    "gather": [(16384, 128, 1_000_000, 128, "uniform"), (16384, 128, 1_000_000, 128, "zipf")],
    "pkm": [(16384, 4, 1024, 64, 32), (1024, 4, 1024, 64, 256)],  # fused; unfused (k > 128)
    "bank": [(16384, 1_000_000, 128)],
}
CPU_SHAPES = {
    "gather": [(1024, 128, 100_000, 128, "uniform"), (1024, 128, 100_000, 128, "zipf")],
    "pkm": [(1024, 4, 256, 64, 32)],
    "bank": [(4096, 100_000, 128)],
}


# --------------------------------------------------------------------------- timing


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, dev, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters runs after warmup runs."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(dev, warmup, iters) -> float:
    """GB/s of a large device-to-device copy (read + write)."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), dev, warmup, iters)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- inputs


def _indices(B, K, N, dist, dev, gen):
    if dist == "uniform":
        return torch.randint(0, N, (B, K), device=dev, generator=gen)
    # zipf-like hot rows: rank r drawn with probability ~ 1 / (r + 1)^1.1, then scattered
    u = torch.rand(B, K, device=dev, generator=gen, dtype=torch.float64)
    a = 1.1
    r = ((N ** (1 - a) - 1) * u + 1) ** (1 / (1 - a)) - 1  # inverse CDF of a continuous 1/x^a
    perm = torch.randperm(N, device=dev, generator=gen)
    return perm[r.long().clamp_(0, N - 1)]


def _gen(dev):
    return torch.Generator(device=dev).manual_seed(int.from_bytes(os.urandom(4), "little"))


# --------------------------------------------------------------------------- ops


def run_gather(shape, dev, dtype, args, triton_mod, rows_out):
    B, K, N, D, dist = shape
    gen = _gen(dev)
    V = torch.randn(N, D, device=dev, generator=gen).to(dtype).requires_grad_()
    idx = _indices(B, K, N, dist, dev, gen)
    w = torch.randn(B, K, device=dev, generator=gen).requires_grad_()
    dout = torch.randn(B, D, device=dev, generator=gen).to(dtype)
    e = V.element_size()
    U = int(torch.unique(idx).numel())
    fwd_bytes = B * K * D * e + B * K * 8 + B * K * 4 + B * D * e
    bwd_bytes = B * D * e + B * K * D * e + B * K * 12 + B * K * 4 + U * D * e
    name = f"sparse gather B={B} K={K} N={N} D={D} {dtype_name(dtype)} {dist} (U={U})"

    def ref_fwd():
        return sparse_gather_ref(V, idx, w)

    def ref_fb():
        out = sparse_gather_ref(V, idx, w)
        return torch.autograd.grad(out, (V, w), dout)

    results = [
        ("torch embedding_bag fwd", ref_fwd, fwd_bytes),
        ("torch embedding_bag fwd+bwd", ref_fb, fwd_bytes + bwd_bytes),
    ]
    if triton_mod is not None:
        check_gather(triton_mod, V, idx, w, dout)

        def tri_fwd():
            return triton_mod.sparse_gather_triton(V, idx, w)

        def tri_fb(variant):
            def f():
                out = triton_mod.sparse_gather_triton(V, idx, w, True, variant)
                return torch.autograd.grad(out, (V, w), dout)

            return f

        results += [("triton fwd", tri_fwd, fwd_bytes)]
        results += [
            (f"triton fwd+bwd ({v})", tri_fb(v), fwd_bytes + bwd_bytes) for v in ("auto", "atomic", "reverse")
        ]
    _time_rows(name, results, dev, args, rows_out)


def check_gather(mod, V, idx, w, dout):
    out = mod.sparse_gather_triton(V, idx, w)
    ref = sparse_gather_ref(V.detach().double(), idx, w.detach().double(), False)
    tol = 2e-2 if V.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for variant in ("atomic", "reverse"):
        gV, gw = torch.autograd.grad(mod.sparse_gather_triton(V, idx, w, True, variant), (V, w), dout)
        rV, rw = torch.autograd.grad(sparse_gather_ref(V, idx, w), (V, w), dout)
        gV, rV = gV.coalesce(), rV.coalesce()  # the Triton dV may repeat its last row (inert -0.0 slots)
        assert torch.equal(gV.indices(), rV.indices())
        torch.testing.assert_close(gV.values().float(), rV.values().float(), rtol=tol, atol=tol)
        torch.testing.assert_close(gw.float(), rw.float(), rtol=tol, atol=tol)


def run_pkm(shape, dev, dtype, args, triton_mod, rows_out):
    B, H, n, dk, k = shape
    gen = _gen(dev)
    q1, q2 = (torch.randn(B, H, dk, device=dev, generator=gen).to(dtype) for _ in range(2))
    k1, k2 = (torch.randn(H, n, dk, device=dev, generator=gen).to(dtype) for _ in range(2))
    e = q1.element_size()
    nbytes = 2 * B * H * dk * e + 2 * H * n * dk * e + B * H * k * (e + 8)
    name = f"pkm top-k B={B} H={H} n={n} dk={dk} k={k} {dtype_name(dtype)}"
    results = [("torch einsum+topk (pkm_topk_ref)", lambda: pkm_topk_ref(q1, q2, k1, k2, k), nbytes)]
    if triton_mod is not None:
        s, sl = triton_mod.pkm_topk_triton(q1, q2, k1, k2, k)
        rs, _ = pkm_topk_ref(q1, q2, k1, k2, k)
        torch.testing.assert_close(s.float(), rs.float(), rtol=1e-4, atol=1e-4)
        n_ = k1.shape[1]  # each slot's recomputed score equals the returned one
        i1, i2 = sl // n_, sl % n_
        hh = torch.arange(H, device=dev)[None, :, None]
        re = (q1[:, :, None, :] * k1[hh, i1]).sum(-1) + (q2[:, :, None, :] * k2[hh, i2]).sum(-1)
        torch.testing.assert_close(re.float(), s.float(), rtol=1e-3, atol=1e-3)
        kp = 1 << (min(k, n_) - 1).bit_length()  # next_pow2(min(k, n)): the running top-KP
        label = "triton fused" if kp <= triton_mod.FUSED_MAX_KP else "triton unfused (einsum + row top-k)"
        results.append((label, lambda: triton_mod.pkm_topk_triton(q1, q2, k1, k2, k), nbytes))
    _time_rows(name, results, dev, args, rows_out)


def run_bank(shape, dev, dtype, args, triton_mod, rows_out):
    M, N, D = shape
    gen = _gen(dev)
    bank = torch.randn(N, D, device=dev, generator=gen).to(dtype)
    stamps = torch.zeros(N, dtype=torch.int64, device=dev)
    rows = torch.randint(0, N, (M,), device=dev, generator=gen)
    vectors = torch.randn(M, D, device=dev, generator=gen).to(dtype)
    U = int(torch.unique(rows).numel())
    e = bank.element_size()
    nbytes = M * 8 + M * D * e + U * D * e + U * 8
    name = f"bank update M={M} N={N} D={D} {dtype_name(dtype)} (U={U})"
    results = [
        (
            "torch unique+index_copy (bank_update_ref)",
            lambda: bank_update_ref(bank, stamps, rows, vectors, 3),
            nbytes,
        )
    ]
    if triton_mod is not None:
        b2, s2 = bank.clone(), stamps.clone()
        triton_mod.bank_update_triton(bank, stamps, rows, vectors, 5)
        bank_update_ref(b2, s2, rows, vectors, 5)
        assert torch.equal(bank, b2) and torch.equal(stamps, s2)
        results.append(
            ("triton", lambda: triton_mod.bank_update_triton(bank, stamps, rows, vectors, 3), nbytes)
        )
    _time_rows(name, results, dev, args, rows_out)


def dtype_name(dt):
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dt]


def _time_rows(name, results, dev, args, rows_out):
    for label, fn, nbytes in results:
        ms = bench(fn, dev, args.warmup, args.iters)
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows_out.append([name, label, ms, gbs, nbytes])
        print(f"  {label:44s} {ms:9.3f} ms  {gbs:8.1f} GB/s", flush=True)


# --------------------------------------------------------------------------- main


def parse_shapes(specs):
    shapes = {}
    for spec in specs or []:
        op, _, vals = spec.partition("=")
        parts = [p for p in vals.split(",") if p]
        if op == "gather":
            dist = parts[4] if len(parts) > 4 else "uniform"
            shapes.setdefault(op, []).append((*map(int, parts[:4]), dist))
        elif op in ("pkm", "bank"):
            shapes.setdefault(op, []).append(tuple(map(int, parts)))
        else:
            raise SystemExit(f"unknown op in --shapes: {spec!r} (gather=, pkm=, bank=)")
    return shapes


def _speedups(rows):
    """speedup of each Triton row vs the torch row of the same op and direction."""
    out = []
    for name, label, ms, _gbs, _nbytes in rows:
        sp = ""
        if label.startswith("triton"):
            want = "fwd+bwd" if "fwd+bwd" in label else ("fwd" if "fwd" in label else "")
            for n2, l2, ms2, *_ in rows:
                if n2 == name and l2.startswith("torch") and (want == "" or l2.endswith(want)):
                    sp = f"{ms2 / ms:.2f}x"
        out.append(sp)
    return out


def write_table(path, dev_name, copy_gbs, rows, note, args):
    lines = [
        f"# Kernel benchmark: {dev_name}",
        "",
        note,
        "",
        (
            f"Copy bandwidth (device-to-device, read + write): **{copy_gbs:.1f} GB/s**. "
            f"Median of {args.iters} runs after {args.warmup} warm-up runs. "
            f"Command: `{' '.join(sys.argv)}`"
        ),
        "",
        "| op / shape | implementation | median ms | GB/s | % of copy BW | speedup vs torch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (name, label, ms, gbs, _), sp in zip(rows, _speedups(rows)):
        lines.append(f"| {name} | {label} | {ms:.3f} | {gbs:.1f} | {100 * gbs / copy_gbs:.0f}% | {sp} |")
    lines += [
        "",
        (
            "Bytes per op are counted as in the docstring of benchmarks/kernels.py "
            "(minimum traffic; index sorts and L2 re-reads not counted)."
        ),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shapes", action="append", help="gather=B,K,N,D[,uniform|zipf] | pkm=B,H,n,dk,k | bank=M,N,D"
    )
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None, help="table path (default benchmarks/results/kernels_<device>.md)")
    ap.add_argument(
        "--triton-cpu",
        action="store_true",
        help="smoke-test the Triton rows on CPU under the interpreter (tiny shapes via "
        "--shapes; times are meaningless, nothing is written unless --out)",
    )
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    if args.triton_cpu:
        os.environ.update(TRITON_INTERPRET="1", MEMSTREAM_KERNELS="triton")
    if gpu or args.triton_cpu:
        dev_name = torch.cuda.get_device_name(dev) if gpu else "cpu (Triton interpreter smoke test)"
        args.warmup = 10 if args.warmup is None else args.warmup
        args.iters = 50 if args.iters is None else args.iters
        from kernels.dispatch import triton_module

        mods = {
            op: triton_module(m, torch.zeros(1, device=dev))
            for op, m in (("gather", "sparse_gather"), ("pkm", "pkm_topk"), ("bank", "bank_update"))
        }
        shapes = {**GPU_SHAPES, **parse_shapes(args.shapes)}
        note = "Triton kernels and torch references on the GPU."
        out = Path(args.out) if args.out else RESULTS / f"kernels_{dev_name.replace(' ', '_')}.md"
        if args.triton_cpu:
            shapes = parse_shapes(args.shapes)
            note = "Triton interpreter smoke test on CPU: times are meaningless."
            out = Path(args.out) if args.out else None
    else:
        dev_name = "cpu"
        args.warmup = 2 if args.warmup is None else args.warmup
        args.iters = 7 if args.iters is None else args.iters
        mods = {"gather": None, "pkm": None, "bank": None}
        shapes = {**CPU_SHAPES, **parse_shapes(args.shapes)}
        note = (
            "**No GPU on this machine: only the torch references are timed, on small "
            "shapes** (the Triton kernels run on CPU only under the interpreter, which is a "
            "correctness tool, not a performance path). GPU numbers: run this script on a GPU."
        )
        print("no GPU: timing the torch references only (small shapes); Triton needs a GPU to be timed")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    copy_gbs = copy_bandwidth(dev, args.warmup, args.iters)
    print(f"device: {dev_name}; copy bandwidth {copy_gbs:.1f} GB/s")
    rows = []
    runners = {"gather": run_gather, "pkm": run_pkm, "bank": run_bank}
    for op, runner in runners.items():
        for shape in shapes.get(op, []):
            print(f"{op} {shape}", flush=True)
            runner(shape, dev, dtype, args, mods[op], rows)
    if not (gpu or args.triton_cpu):
        out = Path(args.out) if args.out else RESULTS / "kernels_cpu.md"
    if out is not None:
        write_table(out, dev_name, copy_gbs, rows, note, args)


if __name__ == "__main__":
    main()
