"""Real local Ray and a real ML-1M prefix already in the broker, for the job's tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from stream.config import MemstreamConfig, load_config
from stream.recordings.data.movielens import build_ml1m_recording
from stream.recordings.recording import replay

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from stream.job.driver import init_local_ray

    init_local_ray(num_cpus=4, namespace="memstream-tests", logging_level="WARNING", log_to_driver=False)
    yield
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serving_port() -> int:
    return _free_port()


@pytest.fixture(scope="session")
def ml1m_20k(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ml1m_20k.parquet"
    build_ml1m_recording(path, limit=EVENTS)
    return path


@pytest.fixture()
def job_config(tmp_path, broker, ml1m_20k, serving_port, request):
    """A config for a job over a fresh topic holding the 20k ML-1M prefix."""
    topic = f"it-{request.node.name}".replace("[", "-").replace("]", "")[:100]
    replay(ml1m_20k, broker, topic, "max", retime=True)

    def make(**overrides) -> MemstreamConfig:
        base = [
            f'kafka.bootstrap="{broker}"',
            f"kafka.topic={topic}",
            "kafka.ingest_actors=2",
            f"job.work_dir={tmp_path / 'work'}",
            f"job.max_events={EVENTS}",
            "job.live_display=false",
            "snapshots.interval_s=0.5",
            "snapshots.full_every=5",
            "checkpoints.interval_s=2",
            "admin.port=0",
            f"admin.token={'t' * 32}",
            f"serving.http_port={serving_port}",
        ]
        return load_config(
            ROOT / "configs" / "default.yaml", base + [f"{k}={v}" for k, v in overrides.items()]
        )

    return make
