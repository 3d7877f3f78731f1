"""A small model and trainer service for the stream tests (pure logic, no broker, no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig, TrainerConfig
from models.online import OnlineTrainer
from stream.messages import IngestUnit
from stream.recordings.data.synthetic import build_synthetic_recording
from stream.train.checkpoints import CheckpointManager
from stream.train.evaluate import iter_event_batches
from stream.train.service import TrainerService


def small_model_config() -> ModelConfig:
    """All three memories on, tables small enough for tests of a few hundred events."""
    return ModelConfig.model_validate(
        {
            "use_lmn": True,
            "use_pkm": True,
            "bank": {"capacity": 400},
            "lmn": {"n_sub_keys": 8},
            "pkm": {"n_sub_keys": 8, "k": 4},
            "features": {"user_buckets": 1024, "item_buckets": 1024, "cat_buckets": 512, "text_buckets": 512},
        }
    )


def small_service(ckpt_dir: Path, seed: int = 0, **trainer_fields: Any) -> TrainerService:
    """A TrainerService over a small trainer (batch 64, any other TrainerConfig fields given),
    checkpointing to `ckpt_dir`."""
    tcfg = TrainerConfig(**{"seed": seed, "batch_size": 64, **trainer_fields})
    trainer = OnlineTrainer(small_model_config(), tcfg)
    return TrainerService(trainer, CheckpointManager(ckpt_dir), full_every=10, first_version=1)


def synthetic_units(path: Path, events: int, per_unit: int = 100) -> list[IngestUnit]:
    """A seeded synthetic stream as the ingest units a reader would hand the trainer."""
    build_synthetic_recording(path, events=events, users=40, items=200, seed=5)
    out = []
    for b in iter_event_batches(path, batch_size=per_unit):
        nxt = {
            int(p): int(b.kafka_offset[b.kafka_partition == p].max()) + 1
            for p in np.unique(b.kafka_partition)
        }
        out.append(IngestUnit(events=b.to_arrow(), rejects=(), next_offsets=nxt))
    return out


async def asgi_post(app, headers: dict[str, str], chunks, path: str) -> tuple[int, int]:
    """One POST straight through ASGI, its body sent in `chunks`; returns (status, how many
    times the app asked for body): how the tests see that a body was refused unread."""
    calls, status, sent = 0, [], iter(chunks)

    async def receive():
        nonlocal calls
        calls += 1
        chunk = next(sent, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(msg):
        if msg["type"] == "http.response.start":
            status.append(msg["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return status[0], calls
