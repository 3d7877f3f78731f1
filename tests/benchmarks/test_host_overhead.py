"""benchmarks/host_overhead.py: its sync counter on toy functions whose syncs are known, the
patched entry points restored, and the merge of before / after rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import host_overhead as ho  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def count(fn) -> ho.StepCounter:
    """The counter of one call of fn, as the benchmark counts a CPU step."""
    counter = ho.StepCounter()
    with ho.host_transfer_hooks(counter, "cpu"), counter:
        fn()
    return counter


def kinds(counter: ho.StepCounter) -> dict[str, int]:
    return {k: v for k, v in counter.kinds.items() if v}


def test_scalar_reads_and_boolean_masks_are_blocking_syncs():
    t = torch.randn(8)
    mask = t > 0

    def toy():
        float(t.sum())  # scalar read
        if (t > 10).any():  # bool(tensor): scalar read
            pass
        t[mask]  # boolean-mask index
        t.clone()[mask] = 0.0  # boolean-mask index_put_
        torch.nonzero(mask)
        torch.unique(t)
        torch.linalg.cholesky(torch.eye(3))  # its info check
        torch.linalg.cholesky_ex(torch.eye(3))  # none: the info stays on the device

    c = count(toy)
    assert kinds(c) == {"scalar_read": 2, "bool_mask_index": 2, "data_dependent": 2, "linalg_check": 1}
    assert c.ops >= 10 and c.op_seconds > 0


def test_host_data_in_and_out_counts_as_copies():
    a = np.arange(6)
    t = torch.arange(6.0)

    def toy():
        torch.from_numpy(a).to("cpu", torch.float32)  # one H2D (the .to is not a second)
        torch.tensor([1.0, 2.0])
        torch.as_tensor(t)  # already a tensor: no copy
        t[a[:2]]  # a numpy index is copied to the device
        t.numpy()  # D2H
        t.tolist()
        t.sum().item()  # scalar read, not D2H
        torch.repeat_interleave(t, torch.tensor([1] * 6), output_size=6)  # its tensor is one H2D

    assert kinds(count(toy)) == {"h2d": 4, "d2h": 2, "scalar_read": 1}


def test_repeat_interleave_without_output_size_is_data_dependent():
    reps = torch.tensor([1, 2, 3])
    c = count(lambda: torch.repeat_interleave(torch.arange(3), reps))
    assert kinds(c) == {"data_dependent": 1}


def test_hooks_restore_the_patched_entry_points_even_on_error():
    before = (torch.from_numpy, torch.tensor, torch.as_tensor, torch.asarray)
    with pytest.raises(RuntimeError, match="inside"), ho.host_transfer_hooks(ho.StepCounter(), "cpu"):
        assert torch.from_numpy is not before[0]
        raise RuntimeError("inside")
    assert (torch.from_numpy, torch.tensor, torch.as_tensor, torch.asarray) == before
    for name in ("__getitem__", "__setitem__", "numpy", "tolist"):
        assert name not in torch.Tensor.__dict__  # inherited from TensorBase again


def test_cross_device_copies_are_classified_by_direction():
    cpu = torch.zeros(2)
    device_side = torch.empty(2, device="meta")  # stands in for a device tensor on a CPU machine
    kind = ho.op_sync_kind
    assert kind("_to_copy", (cpu,), {"device": torch.device("cpu")}) is None
    assert kind("_to_copy", (cpu,), {"dtype": torch.float64}) is None
    assert kind("_to_copy", (cpu,), {"device": torch.device("cuda")}) == "h2d"
    # non_blocking from pageable memory still waits for the host to stage it
    assert kind("_to_copy", (cpu,), {"device": torch.device("cuda"), "non_blocking": True}) == "h2d"
    assert kind("_to_copy", (device_side,), {"device": torch.device("cpu")}) == "d2h"
    assert kind("copy_", (cpu, device_side), {}) == "d2h"
    assert kind("copy_", (device_side, cpu), {}) == "h2d"
    assert kind("add", (cpu, cpu), {}) is None


def test_rows_of_the_other_label_are_kept_with_merge():
    def row(b: int, host: float, syncs: float) -> dict:
        return {
            "batch_size": b,
            "host_us_per_event": host,
            "syncs_per_step": syncs,
            "blocking_syncs_per_step": 1,
        }

    before = [{"label": "before", **row(512, 25.0, 55)}, {"label": "before", **row(4096, 20.0, 55)}]
    after = [row(4096, 1.0, 1), row(512, 2.0, 2)]
    rows = ho.merge_rows(before, after, "after", keep_other_labels=True)
    assert [(r["label"], r["batch_size"]) for r in rows] == [
        ("before", 512),
        ("before", 4096),
        ("after", 512),
        ("after", 4096),
    ]
    newest = {"host_us_per_event": 2.0, "syncs_per_step": 2, "blocking_syncs_per_step": 1}
    assert ho.headline(rows) == newest
    assert ho.headline(ho.merge_rows(before, after, "after", keep_other_labels=False)) == newest
    assert ho.headline(before)["syncs_per_step"] == 55


def test_adamw_step_counters_stay_on_the_host_and_are_no_syncs():
    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([w], lr=0.1, foreach=True)
    trainer = SimpleNamespace(opt_dense=opt, other=w)  # host_resident reads its optimizers

    def step():
        w.grad = torch.ones(4)
        opt.step()

    step()  # the optimizer's state is made at its first step
    resident = ho.host_resident(trainer)
    assert resident == {opt.state[w]["step"].data_ptr()}
    counter = ho.StepCounter(host_resident=resident)
    with ho.host_transfer_hooks(counter, "cpu"), counter:
        step()
    assert kinds(counter) == {}  # its .item() of the CPU step and its torch.tensor(1.0) are host-only
    assert kinds(count(step))["scalar_read"] >= 1  # without the exclusion they would count


def test_sources_name_the_call_site_in_the_project():
    t = torch.randn(3)
    counter = ho.StepCounter(sources=True)
    with ho.host_transfer_hooks(counter, "cpu"), counter:
        line = sys._getframe().f_lineno + 1
        t.sum().item()
    site = f"tests/benchmarks/test_host_overhead.py:{line} (aten._local_scalar_dense.default)"
    assert counter.sources == {("scalar_read", site): 1}


def test_before_and_after_runs_share_one_file(tmp_path):
    from stream.recordings.data.synthetic import build_synthetic_recording

    rec = build_synthetic_recording(tmp_path / "s.parquet", events=400, users=40, items=60, seed=1)
    tiny = ["model.pkm.n_sub_keys=16", "model.lmn.n_sub_keys=16", "model.bank.capacity=2000"]
    tiny += ["model.features.user_buckets=4096", "model.features.item_buckets=4096"]
    common = ["--recording", str(rec), "--batch-sizes", "32", "--warmup", "1", "--steps", "2"]
    common += ["--out-dir", str(tmp_path)] + [a for s in tiny for a in ("--set", s)]
    assert ho.main(["--label", "before", *common]) == 0
    assert ho.main(["--label", "after", "--merge", *common]) == 0
    doc = json.loads((tmp_path / "host_overhead.json").read_text())
    assert [(r["label"], r["batch_size"]) for r in doc["rows"]] == [("before", 32), ("after", 32)]
    after = doc["rows"][1]
    assert doc["host_us_per_event"] is None  # no B = 512 row here
    assert after["syncs_per_step"] > 0 and after["torch_ops_per_step"] > 100 and after["events_per_s"] > 0
    assert after["syncs_per_step"] == pytest.approx(
        after["blocking_syncs_per_step"] + after["h2d_copies_per_step"]
    )
    assert set(doc["runs"]) == {"before", "after"} and doc["device"] == "cpu"
    md = (tmp_path / "host_overhead.md").read_text()
    assert "| before | 32 |" in md and "| after | 32 |" in md


def test_gpu_path_switches_are_forced_and_put_back():
    from memory_bank.sparse_optim import SparseRowAdam

    table = torch.nn.Parameter(torch.zeros(8, 2))
    trainer = SimpleNamespace(opt_sparse=SparseRowAdam([table]), other=table)
    assert ho.gpu_path_switches(trainer) == ["opt_sparse"]
    encoder = SimpleNamespace(sync_free=None)  # a part of the state (the doc encoder's embedding)
    with_state = SimpleNamespace(opt_sparse=trainer.opt_sparse, state=SimpleNamespace(encoder=encoder))
    assert ho.gpu_path_switches(with_state) == ["opt_sparse", "state.encoder"]
    with ho.gpu_path(with_state, ["state.encoder"]):
        assert encoder.sync_free is True
    assert encoder.sync_free is None
    assert trainer.opt_sparse.sync_free is None  # by device: the CPU's compacting step
    with pytest.raises(RuntimeError), ho.gpu_path(trainer, ["opt_sparse"]):
        assert trainer.opt_sparse.sync_free is True
        raise RuntimeError
    assert trainer.opt_sparse.sync_free is None
