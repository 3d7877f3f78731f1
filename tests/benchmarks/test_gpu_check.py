"""benchmarks/gpu_check.py: every section in its CPU smoke mode (so the GPU check does not rot
while no GPU is lent), the shapes and the 10x config it reads, and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check as gc  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def ml1m_small(tmp_path_factory) -> Path:
    from stream.recordings.data import movielens as ml1m
    from stream.recordings.data.common import DataError

    try:
        ml1m.ml1m_dir()
    except DataError as e:  # the data wheel is not installed on this machine
        if os.environ.get("CI"):
            pytest.fail(f"ML-1M not available in CI: {e}")
        pytest.skip(f"ML-1M not available: {e}")
    return ml1m.build_ml1m_recording(
        tmp_path_factory.mktemp("gpu_check") / "ml1m.parquet", limit=gc.SMOKE_EVENTS
    )


def test_every_section_runs_in_smoke_mode_and_prints_its_table(ml1m_small, tmp_path, monkeypatch):
    # The kernels section turns the Triton interpreter on for CPU tensors: undone afterwards.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MEMSTREAM_KERNELS", "auto")
    md = tmp_path / "gpu_check.md"
    common = [
        "--device",
        "cpu",
        "--smoke",
        "--recording",
        str(ml1m_small),
        "--out",
        str(md),
        "--budget-s",
        "100",
    ]
    for section in gc.SECTIONS:
        assert gc.main([section, *common]) == 0, section
    text = md.read_text()
    for heading in (
        "## Versions",
        "## Kernels",
        "### sparse gather",
        "### pkm top-k",
        "### bank update",
        "### Timings",
        "## Trainer: cpu against cpu",
        "## Training throughput",
        "## `memstream eval`",
    ):
        assert heading in text, heading
    assert "all import." in text
    for failure in ("**raised**", "**NO**", "**FAIL**", "not timed:", "skipped:", "**failed**"):
        assert failure not in text, failure
    # Kernels: the reference and both Triton backward variants, each with its errors.
    assert text.count("| smoke: B=8 K=8 N=512 D=16 uniform | triton (dV ") == 2
    assert "| triton fwd+bwd (reverse) |" in text
    # Parity: the same code twice on the CPU is bit-identical (the smoke stand-in for CUDA).
    assert "step 1 within 0.0001: PASS (0.0e+00)" in text and "no NaN in 3 steps: PASS" in text
    # Throughput: one row per run, events/s measured.
    rows = [line for line in text.splitlines() if line.startswith(("| default |", "| 10x |"))]
    assert [r.split(" | ")[1] for r in rows] == [str(b) for _, b in gc.THROUGHPUT_SMOKE_RUNS]
    assert all(float(r.split(" | ")[3].replace(",", "")) > 0 for r in rows)
    # Eval: both runs finished with the same AUC (two CPU runs of one deterministic config).
    evals = [line.split(" | ") for line in text.splitlines() if line.startswith("| cpu")]
    assert len(evals) == 2 and evals[0][3] == evals[1][3] and evals[0][2] == f"{gc.SMOKE_EVENTS // 2:,}"
    assert "AUC difference cpu - cpu (second run): +0.00000" in text


def test_kernel_shapes_are_the_default_models_and_the_10x_config_is_what_it_says():
    shapes = dict(gc.kernel_shapes(smoke=False).gather)
    assert shapes["default PKM"] == (512, 4 * 16, 256**2, 64, "uniform")
    assert shapes["large"] == (4096, 128, 1_000_000, 128, "uniform")
    assert dict(gc.kernel_shapes(smoke=False).pkm)["default PKM"] == (512, 4, 256, 64, 16)
    m = gc.load(gc.TENX_SETS, smoke=False, device="cuda").model
    assert m.pkm.n_sub_keys**2 == 1 << 20 and m.lmn.n_sub_keys**2 == 1 << 18
    assert m.features.user_buckets == m.features.item_buckets == 1 << 20 and m.d_model == 128
    small = gc.load(gc.TENX_SMOKE_SETS, smoke=True).model  # the same fields, small values
    assert {s.split("=")[0] for s in gc.TENX_SMOKE_SETS} == {s.split("=")[0] for s in gc.TENX_SETS}
    assert small.d_model == 128


def test_refusals_say_what_to_do(tmp_path, capsys):
    assert gc.main(["kernels", "--device", "cpu"]) == 2
    assert "--device cpu runs only with --smoke" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert gc.main(["versions"]) == 2
        assert "no CUDA device visible" in capsys.readouterr().err
    missing = tmp_path / "none.parquet"
    assert gc.main(["parity", "--device", "cpu", "--smoke", "--recording", str(missing)]) == 2
    assert "gpu_wheels.sh" in capsys.readouterr().err
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--bogus"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert run.returncode == 2 and "unknown argument '--bogus'" in run.stderr and "usage:" in run.stderr
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--smoke",
                          "--only", "kernels,bogus"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "--only: no section 'bogus'" in run.stderr
