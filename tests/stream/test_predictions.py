"""Per-event predictions: what the file holds equals what the report measured, the writer's
memory is bounded by its row groups, and a restarted trainer's files give each event once."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.metrics import auc_exact, logloss_from_logits
from models.slices import EVIDENCE_BUCKETS, evidence_bucket, history_bucket
from stream.recordings.data.synthetic import build_synthetic_recording
from stream.train.predictions import (
    PredictionsError,
    PredictionWriter,
    incarnation_path,
    prediction_files,
    read_predictions,
)
from tests.stream.conftest import small_service, synthetic_units

pytestmark = pytest.mark.timeout(300)


def _eval_config():
    from stream.config import load_config

    return load_config(
        None,
        [
            "trainer.batch_size=100",
            "model.use_pkm=false",
            "model.use_lmn=false",
            "model.features.user_buckets=1024",
            "model.features.item_buckets=1024",
            "model.bank.capacity=300",
            "model.history.length=8",  # so that some users reach a full window: "long"
        ],
    )


def _check_against_metrics(t, summary: dict, slices: dict, history_length: int) -> None:
    """The file's like scores and evidence give the report's overall and slice numbers."""
    y = t["label.like"].to_numpy(zero_copy_only=False)
    z = t["score.like"].to_numpy()
    ok = ~np.isnan(y)
    assert ok.sum() == summary["n.like"]
    assert auc_exact(z[ok], y[ok]) == pytest.approx(summary["auc.like"], abs=1e-12)
    ie, ue = t["item_evidence"].to_numpy(), t["user_evidence"].to_numpy()
    groups = {
        "item_evidence": evidence_bucket(ie[ok]),
        "user_evidence": evidence_bucket(ue[ok]),
        "user_history": history_bucket(ue[ok], history_length),
    }
    for name, idx in groups.items():
        for b, got in enumerate(slices[name].values()):
            hit = idx == b
            assert got["n"] == hit.sum(), (name, b)
            if len(np.unique(y[ok][hit])) == 2:
                assert got["auc.like"] == pytest.approx(auc_exact(z[ok][hit], y[ok][hit]), abs=1e-12)
                loss = logloss_from_logits(z[ok][hit], y[ok][hit]).mean()
                assert got["logloss.like"] == pytest.approx(loss, rel=1e-9)
            else:
                assert got["auc.like"] is None


def _reference_evidence(ids: list[str]) -> np.ndarray:
    seen: Counter = Counter()
    out = []
    for x in ids:
        out.append(seen[x])
        seen[x] += 1
    return np.array(out)


def test_eval_predictions_match_the_report(tmp_path):
    from stream.train.evaluate import format_slices, run_eval

    rec = build_synthetic_recording(tmp_path / "syn.parquet", events=900, users=25, items=120, seed=2)
    cfg = _eval_config()
    out = tmp_path / "pred" / "p.parquet"
    report = run_eval(cfg, rec, progress=False, predictions=out).to_json()
    t = pq.read_table(out)
    assert t.num_rows == report["events_trained"] == 900
    np.testing.assert_array_equal(t["seq"].to_numpy(), np.arange(900))
    assert t.schema.metadata[b"memstream.history_length"] == b"8"
    # Evidence: earlier events of the item / user in stream order, by the definition.
    np.testing.assert_array_equal(
        t["item_evidence"].to_numpy(), _reference_evidence(t["item_id"].to_pylist())
    )
    np.testing.assert_array_equal(
        t["user_evidence"].to_numpy(), _reference_evidence(t["user_id"].to_pylist())
    )
    prob = t["prob.like"].to_numpy()
    np.testing.assert_allclose(
        prob, 1 / (1 + np.exp(-t["score.like"].to_numpy().astype(np.float64))), rtol=1e-6
    )
    assert t["score.rating"].null_count == 0 and t["event_id"].null_count == 0
    summary = {
        "n.like": sum(1 for v in t["label.like"].to_pylist() if v is not None),
        "auc.like": report["auc.like"],
    }
    _check_against_metrics(t, summary, report["slices"], 8)
    assert report["slices"]["user_history"]["long"]["n"] > 0
    table = format_slices(report["slices"])
    assert len(table.splitlines()) == 1 + 4 + 4 + 2 and "user_history" in table


def _fake_step(n: int, start: int):
    """A batch and a StepResult-shaped result (pure writer logic: no model needed)."""
    from stream.ingest.events import EventBatch

    none = np.full(n, None, dtype=object)
    batch = EventBatch(
        event_id=np.array([f"e{start + i}" for i in range(n)], dtype=object),
        ts_ms=np.arange(start, start + n),
        user_id=np.array(["u"] * n, dtype=object),
        item_id=np.array(["i"] * n, dtype=object),
        scenario=none,
        item_text=none,
        query=none,
        labels={"like": np.where(np.arange(n) % 3 == 0, np.nan, 1.0)},  # no rating task at all
    )
    result = SimpleNamespace(
        events=n,
        like_logit=np.zeros(n, np.float32),
        rating_pred=np.full(n, 3.0, np.float32),
        item_evidence=np.arange(start, start + n),
        user_evidence=np.arange(start, start + n),
    )
    return batch, result


def test_writer_memory_is_bounded_by_row_groups_and_an_error_still_closes_it(tmp_path):
    path = tmp_path / "p.parquet"
    with (
        pytest.raises(RuntimeError, match="boom"),
        PredictionWriter(path, "like", "rating", row_group_rows=1000) as w,
    ):
        for k in range(12):
            w.write(*_fake_step(300, 300 * k), seq_start=300 * k)
            assert w.buffered < 1000 + 300  # never more than a row group and a batch held
        assert w.rows_written >= 3000
        raise RuntimeError("boom")
    f = pq.ParquetFile(path)  # closed on the way out: readable, every row there
    assert f.metadata.num_rows == 3600
    assert all(f.metadata.row_group(i).num_rows <= 1000 for i in range(f.metadata.num_row_groups))
    t = f.read()
    assert t["label.like"].null_count == 1200 and t["label.rating"].null_count == 3600
    with pytest.raises(PredictionsError, match="closed"):
        w.write(*_fake_step(1, 0), seq_start=0)
    with pytest.raises(PredictionsError, match="cannot write"):
        PredictionWriter(path / "under_a_file.parquet", "like", "rating")


def test_each_incarnation_writes_its_own_file_and_the_lineage_reads_each_event_once(tmp_path):
    units = synthetic_units(tmp_path / "syn.parquet", events=500)
    out = tmp_path / "p.parquet"
    first = small_service(tmp_path / "ck")
    assert first.open_predictions(out) == out
    first.apply_units(units[:2])
    first.checkpoint()
    first.apply_units(units[2:4])  # trained, then the trainer "dies" before a checkpoint
    first.close_predictions()
    assert first.progress().predictions == {"path": str(out), "rows": 400, "error": None}

    second = small_service(tmp_path / "ck")  # restores the checkpoint after 200 events
    assert second.open_predictions(out) == tmp_path / "p.1.parquet"
    second.apply_units(units[2:])
    second.close_predictions()
    assert incarnation_path(out) == (tmp_path / "p.2.parquet", 2)
    assert prediction_files(out) == [out, tmp_path / "p.1.parquet"]
    assert pq.read_table(tmp_path / "p.1.parquet")["seq"].to_numpy().min() == 200

    lineage = read_predictions(out)
    np.testing.assert_array_equal(lineage["seq"].to_numpy(), np.arange(500))
    assert len(set(lineage["event_id"].to_pylist())) == 500
    m = second.trainer.metrics
    _check_against_metrics(lineage, m.summary(), second.progress().slices, second.trainer.cfg.history.length)

    (tmp_path / "p.2.parquet").write_bytes(b"PAR1 cut short")  # a writer killed mid-file
    with pytest.raises(PredictionsError, match="p.2.parquet"):
        read_predictions(out)


def test_slices_and_bucket_names_in_progress(tmp_path):
    svc = small_service(tmp_path / "ck")
    assert svc.progress().predictions is None
    assert list(svc.progress().slices["item_evidence"]) == list(EVIDENCE_BUCKETS)
