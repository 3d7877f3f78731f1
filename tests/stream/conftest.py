"""A small model and trainer service for the stream tests (pure logic, no broker, no Ray)."""

from __future__ import annotations

from pathlib import Path

from models.config import ModelConfig, TrainerConfig
from models.online import OnlineTrainer
from stream.train.checkpoints import CheckpointManager
from stream.train.service import TrainerService


def small_model_config() -> ModelConfig:
    """All three memories on, tables small enough for tests of a few hundred events."""
    return ModelConfig.model_validate(
        {
            "bank": {"capacity": 400},
            "lmn": {"n_sub_keys": 8},
            "pkm": {"n_sub_keys": 8, "k": 4},
            "features": {"user_buckets": 1024, "item_buckets": 1024, "cat_buckets": 512, "text_buckets": 512},
        }
    )


def small_service(ckpt_dir: Path, seed: int = 0) -> TrainerService:
    """A TrainerService over a small trainer, checkpointing to `ckpt_dir`."""
    trainer = OnlineTrainer(small_model_config(), TrainerConfig(seed=seed))
    return TrainerService(trainer, CheckpointManager(ckpt_dir), batch_size=64, full_every=10, first_version=1)
