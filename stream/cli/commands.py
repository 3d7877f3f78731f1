"""Handlers of the foundation's subcommands (see stream/cli/main.py for how they are wired).

Each imports what it needs inside the function: this module is imported for
any of them, and `memstream schema` should not start Kafka clients' imports.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stream.errors import MemstreamError


class CliError(MemstreamError):
    pass


# -- broker -------------------------------------------------------------------


def broker_start(args: argparse.Namespace) -> int:
    from infra import broker

    info = broker.start(port=args.port, state_dir=args.state_dir, timeout_s=args.timeout)
    print(f"broker running at {info.bootstrap} (pid {info.pid}); log: {info.log_path}")
    print(f"stop it with: memstream broker stop --state-dir {args.state_dir}")
    return 0


def broker_stop(args: argparse.Namespace) -> int:
    from infra import broker

    if broker.stop(args.state_dir):
        print("broker stopped")
    else:
        print(f"no broker was running (state dir {args.state_dir})")
    return 0


def broker_status(args: argparse.Namespace) -> int:
    """Exit 0 when running, 1 when not (scripts can test it)."""
    from infra import broker

    status = broker.status(args.state_dir)
    if status.running:
        assert status.info is not None
        print(f"running at {status.info.bootstrap} (pid {status.info.pid}); log: {status.info.log_path}")
        return 0
    if status.stale:
        print(
            f"not running (stale state in {args.state_dir}: pid "
            f"{status.info.pid if status.info else '?'} is gone; `memstream broker stop` cleans it)"
        )
    else:
        print(f"not running (state dir {args.state_dir})")
    return 1


# -- record / replay ----------------------------------------------------------


def record(args: argparse.Namespace) -> int:
    from stream.recordings.recording import record as record_topic

    bootstrap, options = _kafka_client(args)
    stats = record_topic(
        bootstrap,
        args.topic,
        args.out,
        max_messages=args.max_messages,
        progress=not args.no_progress,
        **options,
    )
    print(
        f"recorded {stats.rows:,} messages from {args.topic} ({stats.partitions} partitions) "
        f"to {args.out} in {stats.seconds:.1f} s: {stats.rate:,.0f} events/s"
    )
    return 0


def replay(args: argparse.Namespace) -> int:
    from stream.recordings.recording import replay as replay_recording

    bootstrap, options = _kafka_client(args)
    stats = replay_recording(
        args.recording,
        bootstrap,
        args.topic,
        speed=args.speed,
        rate=args.rate,
        partitions=args.partitions,
        progress=not args.no_progress,
        retime=args.retime,
        **options,
    )
    layout = "recorded partitions" if stats.kept_partitions else "partitioned by key"
    created = ", created" if stats.topic_created else ""
    print(
        f"replayed {stats.rows:,} events to {args.topic} ({stats.partitions} partitions{created}, "
        f"{layout}) in {stats.seconds:.1f} s: {stats.rate:,.0f} events/s"
    )
    return 0


def _kafka_client(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Bootstrap (given, or the local broker's) and extra kafka-python settings."""
    options = _read_client_config(args.client_config) if args.client_config else {}
    if args.bootstrap:
        return args.bootstrap, options
    from infra import broker

    status = broker.status(args.state_dir)
    if not status.running or status.info is None:
        raise CliError(
            f"no --bootstrap given and no local broker runs (state dir {args.state_dir}): "
            "start one with `memstream broker start`, or pass --bootstrap HOST:PORT"
        )
    return status.info.bootstrap, options


def _read_client_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise CliError(f"cannot read --client-config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise CliError(f"--client-config {path} is not YAML/JSON: {e}") from e
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise CliError(f"--client-config {path} must be a mapping of kafka-python settings")
    return loaded


# -- data ---------------------------------------------------------------------


def data_movielens(args: argparse.Namespace) -> int:
    from stream.recordings.data.movielens import build_movielens_recording

    return _build(
        args.dataset.upper(),
        lambda: build_movielens_recording(
            args.dataset, args.out, limit=args.limit, partitions=args.partitions, topic=args.topic
        ),
    )


def data_synthetic(args: argparse.Namespace) -> int:
    from stream.recordings.data.synthetic import build_synthetic_recording

    return _build(
        "synthetic",
        lambda: build_synthetic_recording(
            args.out,
            events=args.events,
            users=args.users,
            items=args.items,
            seed=args.seed,
            partitions=args.partitions,
            topic=args.topic,
            events_per_s=args.events_per_s,
        ),
    )


def data_stress(args: argparse.Namespace) -> int:
    from stream.recordings.data.stress import build_stress_recording

    return _build(
        args.dataset,
        lambda: build_stress_recording(
            args.dataset,
            args.out,
            events=args.events,
            seed=args.seed,
            partitions=args.partitions,
            topic=args.topic,
        ),
    )


def _build(kind: str, build) -> int:
    import time

    from stream.recordings.recording import recording_info

    started = time.perf_counter()
    info = recording_info(build())
    print(
        f"wrote {info.rows:,} {kind} events ({info.partitions} partitions) to {info.path} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0
