"""The top-level config of a memstream deployment and how it is loaded.

One YAML file, one pydantic model, one section per subsystem. Sections are added
by the subsystems that own them (kafka, ray, checkpoints, snapshots, serving,
admin); each is an `extra="forbid"` model so a typo names the offending field.
`load_config(path, ["model.use_pkm=false", ...])` applies dotted overrides to
the raw YAML before validation, so an override is checked like the file is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.config import ModelConfig, TrainerConfig
from stream.admin.app import AdminConfig
from stream.errors import MemstreamError
from stream.ingest.reader import KafkaConfig
from stream.serving.follower import ServingConfig
from stream.snapshots.publisher import SnapshotConfig
from stream.train.checkpoints import CheckpointConfig


class ConfigError(MemstreamError, ValueError):
    """A config file or override that does not validate; the message names the field."""


class JobConfig(BaseModel):
    """The streaming job as a whole (`memstream run`); CLI flags override these."""

    model_config = ConfigDict(extra="forbid")

    ray_address: str | None = None  # None: start a local Ray; "auto": join the running cluster
    # Niceness of the Ray workers of a local Ray this job starts (Ray's default is 15:
    # then every ordinary process on the machine, the broker included, preempts the
    # trainer; on a shared node that halves its throughput). A cluster sets it on its
    # raylets (RAY_worker_niceness, infra/k8s).
    worker_niceness: int = Field(0, ge=0, le=19)
    namespace: str = "memstream"
    work_dir: str = "runs/default"  # checkpoints, default snapshot store, report, plots
    max_events: int | None = Field(None, gt=0)  # stop after this many messages are applied
    duration_s: float | None = Field(None, gt=0)
    # Stop once every partition is consumed to its end (replayed recordings).
    stop_at_end: bool = False
    # The embedded default (no kafka.bootstrap): a local broker fed from a recording.
    recording: str = ".memstream/data/ml1m.parquet"  # built from ML-1M when missing
    replay_speed: str = "max"  # "max" or a factor of the recorded pace
    replay_rate: float | None = Field(None, gt=0)  # events/s, overrides replay_speed
    live_display: bool = True
    progress_interval_s: float = Field(1.0, gt=0)
    # Trainer restarts (a crash, or run() raising): each waits restart_backoff_s, doubled per
    # restart in the window (at most 60 s); more than max_trainer_restarts within
    # restart_window_s stops the job with a non-zero exit and the last error.
    max_trainer_restarts: int = Field(5, ge=0)
    # The trainer's ordered (score, label) log (auc_last20.like in the report): 5 bytes per
    # event, in every checkpoint. Off for a long-lived job; `memstream eval` keeps it.
    score_log: bool = False
    restart_window_s: float = Field(600.0, gt=0)
    restart_backoff_s: float = Field(1.0, ge=0)


class MemstreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    job: JobConfig = Field(default_factory=JobConfig)


def _parse_value(text: str) -> Any:
    """'3' -> 3, 'false' -> False, '[1, 2]' -> [1, 2], 'abc' -> 'abc' (YAML scalars)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted `a.b.c=value` in the raw (pre-validation) dict, creating sections."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r}: empty key")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = _parse_value(text)
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e.get("loc", ())) or "<root>"
        lines.append(f"  {loc}: {e.get('msg')}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> MemstreamConfig:
    try:
        return MemstreamConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> MemstreamConfig:
    """Read YAML at `path` (None = all defaults), apply overrides, validate.

    The file and the overrides are laid over the dumped defaults of MemstreamConfig,
    so setting one field of a nested section (`model.pkm.k=8`) keeps that section's
    other fields at the defaults the model chose (a nested model built from a partial
    dict would otherwise fall back to its own class defaults).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        loaded = yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"invalid config ({path}): top level must be a mapping")
        raw = loaded
    raw = apply_overrides(raw, list(overrides or []))
    raw = _deep_merge(MemstreamConfig().model_dump(mode="json"), raw)
    return config_from_dict(raw, str(path) if path is not None else "<defaults>")
