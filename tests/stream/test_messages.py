"""The messages that cross processes: frozen, picklable (Ray), and the report's JSON keys
pinned (users, benchmarks and the README read them: a renamed field fails here)."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pyarrow as pa
import pytest

from stream.job.report import run_report
from stream.messages import (
    DeadLettered,
    IngestUnit,
    RunReport,
    ServingEvent,
    TrainerFinal,
    TrainerProgress,
    finite_or_none,
)

# What `memstream eval` and `memstream run` both write.
COMMON_KEYS = {
    "events_trained",
    "events_dlq",
    "dlq_categories",
    "steps",
    "duration_s",
    "throughput_eps",
    "auc.like",
    "auc.like_error_bound",
    "auc_last20.like",
    "logloss.like",
    "rmse.rating",
    "window.auc.like",
    "window.logloss.like",
    "window.rmse.rating",
    "offsets",
    "memories",
    "config",
    "bank.coverage",
    "bank.staleness_cos",
    "pkm.slot_usage",
    "pkm.slot_usage_window",
    "pkm.kl_uniform",
    "lmn.slot_usage",
    "lmn.kl_uniform",
    "slices",
}
# What only `memstream run` adds.
STREAMING_KEYS = {
    "events_consumed",
    "duplicates_dropped",
    "trainer_busy",
    "trainer_uptime_s",
    "publish_failures",
    "freshness_p50_s",
    "freshness_p99_s",
    "freshness_samples",
    "freshness_steady_p50_s",
    "freshness_steady_p99_s",
    "written_p50_s",
    "written_p99_s",
    "freshness_legs",
    "snapshots_published",
    "snapshot_bases_written",
    "snapshot_base_failures",
    "snapshot_version",
    "versions_withheld",
    "checkpoint_saves",
    "checkpoint_failures",
    "checkpoints_quarantined",
    "last_durable_offsets",
    "serving_version",
    "serving",
    "trainer_restarts",
    "restored_from_checkpoint",
    "predictions",
}


def _progress(**kw) -> TrainerProgress:
    base = {
        "events_applied": 90,
        "steps": 3,
        "rejects_applied": {"invalid_json": 2},
        "duplicates_dropped": 1,
        "next_offsets": {0: 50, 1: 42},
        "lineage": {0: [50, 1225, 40425]},
        "events_consumed": 92,
        "snapshot_version": 4,
        "publish_failures": 0,
        "checkpoint_failures": 0,
        "restored_from": None,
        "throughput_eps": 1234.5,
        "busy": {"train_s": 1.0},
        "uptime_s": 9.0,
        "metrics": {"auc.like": 0.7, "logloss.like": 0.6, "rmse.rating": None, "window.auc.like": 0.71},
        "health": {"healthy": True, "versions_withheld": 0},
        "checkpoints": {
            "saves": 2,
            "save_failures": 1,
            "quarantined": 1,
            "last_durable": {"offsets": {"0": 50}},
        },
    }
    return TrainerProgress(**{**base, **kw})


def test_run_report_keys_of_a_streaming_run():
    final = TrainerFinal(progress=_progress(), memories={"history": {"users": 3}}, auc_last20_like=0.72)
    fresh = {"p50_s": 0.9, "p99_s": 1.5, "count": 88, "legs": {"train": {"p50_s": 0.1}}}
    report = run_report(
        final,
        fresh,
        {"published": 5, "bases_written": 1, "base_failures": 0},
        [{"replica": "r1", "version": 4}],
        4,
        0,
        12.0,
        {"trainer": {}},
    )
    out = report.to_json()
    assert set(out) == COMMON_KEYS | STREAMING_KEYS
    assert out["events_consumed"] == out["events_trained"] + out["events_dlq"] == 92
    assert out["auc.like"] == 0.7 and out["auc_last20.like"] == 0.72 and out["serving_version"] == 4
    assert out["offsets"] == {"0": 50, "1": 42} and out["bank.coverage"] is None


def test_run_report_keys_of_an_eval(tmp_path):
    from stream.config import load_config
    from stream.recordings.data.synthetic import build_synthetic_recording
    from stream.train.evaluate import run_eval

    rec = build_synthetic_recording(tmp_path / "syn.parquet", events=300, users=20, items=50, seed=1)
    cfg = load_config(
        None,
        [
            "trainer.batch_size=100",
            "model.use_pkm=false",
            "model.use_lmn=false",
            "model.features.user_buckets=1024",
            "model.features.item_buckets=1024",
            "model.bank.capacity=200",
        ],
    )
    out = run_eval(cfg, rec, progress=False).to_json()
    assert set(out) == COMMON_KEYS
    assert out["events_trained"] == 300 and out["events_dlq"] == 0 and out["pkm.slot_usage"] is None
    assert set(out["memories"]) == {"embeddings", "history", "features", "bank"}
    assert sum(out["offsets"].values()) == 300  # one past the last offset of each partition


def test_json_has_no_nan():
    assert finite_or_none(
        {"a": math.nan, "b": [np.float32(1.5), np.inf], "c": np.int64(3), "d": np.array([1])}
    ) == {"a": None, "b": [1.5, None], "c": 3, "d": [1]}
    report = RunReport.from_metrics(
        {"auc.like": math.nan},
        None,
        events_trained=0,
        events_dlq=0,
        dlq_categories={},
        steps=0,
        duration_s=0.0,
        throughput_eps=None,
        offsets={},
        memories={},
        config={},
        streaming=None,
    )
    assert report.to_json()["auc.like"] is None


@pytest.mark.parametrize(
    "message",
    [
        IngestUnit(
            events=pa.table({"x": [1, 2]}), rejects=(DeadLettered(0, 7, "invalid_json"),), next_offsets={0: 8}
        ),
        ServingEvent("refused", 3, 1.5, "SnapshotCorrupt: sha256"),
        _progress(),
    ],
)
def test_messages_are_frozen_and_cross_processes(message):
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.__setattr__(dataclasses.fields(message)[0].name, None)
    again = pickle.loads(pickle.dumps(message))  # what Ray does with them
    assert type(again) is type(message)
    if isinstance(message, IngestUnit):
        assert again.events.equals(message.events) and again.rejects == message.rejects
    else:
        assert again == message
