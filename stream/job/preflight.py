"""Preflight: the first errors a user meets, found in seconds and before Ray starts.

`memstream run` and `memstream serve` check what they were pointed at (the config file,
the recording, the Kafka bootstrap and topic and the credentials, the snapshot store)
before anything slow starts. Each failure is a `PreflightError`: one line that says what
failed, where, and what to do; the CLI prints it and exits 2. Without these checks the
same mistakes surfaced after Ray and Serve had started, as a minute of kafka-python
reconnect warnings and a traceback.

The checks are cheap on purpose: a TCP connect to each bootstrap server (a closed port
answers at once), then one metadata request with a short timeout. What they pass is
not a promise (a broker can go down a second later): the job's own errors stay as they
are.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from stream.errors import MemstreamError

CONNECT_TIMEOUT_S = 3.0
METADATA_TIMEOUT_MS = 5000


class PreflightError(MemstreamError):
    """Something `memstream run`/`serve` was pointed at is missing, unreachable or refused."""


def check_config_file(path: str | None) -> None:
    """The config file exists, is readable and is YAML (its fields are load_config's)."""
    if path is None:
        return
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PreflightError(
            f"cannot read config {path}: {reason}; pass --config an existing YAML file "
            "(configs/default.yaml shows every field)"
        ) from None
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PreflightError(f"config {path} is not valid YAML{at}: {problem}") from None


def check_recording(path: str) -> None:
    """An existing recording is a readable Parquet file (a missing one is built from ML-1M)."""
    p = Path(path)
    if not p.exists():
        return
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(p)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise PreflightError(
            f"cannot read recording {path}: {str(e).splitlines()[0]}; rebuild it "
            "(memstream data ml-1m --out ...) or point job.recording at another file"
        ) from None


def parse_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    servers = []
    for item in (s.strip() for s in bootstrap.split(",")):
        host, sep, port = item.rpartition(":")
        if not item or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise PreflightError(
                f"bootstrap {bootstrap!r}: {item!r} is not host:port; pass --bootstrap host:port[,host:port]"
            )
        servers.append((host.strip("[]"), int(port)))
    return servers


def _connect_error(host: str, port: int) -> str | None:
    """Why a TCP connection to host:port fails, or None when it opens."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except socket.gaierror:
        return f"host {host!r} does not resolve"
    except ConnectionRefusedError:
        return f"nothing listens on {host}:{port} (connection refused)"
    except TimeoutError:
        return f"{host}:{port} did not answer within {CONNECT_TIMEOUT_S:g} s"
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"


def check_kafka(bootstrap: str, topic: str, client_options: dict[str, Any]) -> int:
    """The broker answers, accepts the credentials, and has `topic`; its partition count.

    kafka-python logs every reconnect attempt at WARNING: those lines go to the log file
    (stream/job/display.py's ConsoleLog), this one error to the user."""
    servers = parse_bootstrap(bootstrap)
    errors = [e for e in (_connect_error(h, p) for h, p in servers) if e is not None]
    if len(errors) == len(servers):
        raise PreflightError(
            f"Kafka broker {bootstrap} unreachable: {'; '.join(errors)}. Start it "
            "(memstream broker start, or make broker) or pass --bootstrap the broker's host:port"
        )
    from kafka.errors import (
        KafkaConnectionError,
        KafkaError,
        KafkaTimeoutError,
        UnrecognizedBrokerVersion,
    )

    from stream.ingest.kafka_io import admin_client

    # Seconds, not the client's 30 s: a preflight that hangs is what it is there to avoid.
    options = {
        **client_options,
        "request_timeout_ms": METADATA_TIMEOUT_MS,
        "bootstrap_timeout_ms": METADATA_TIMEOUT_MS,
    }
    try:
        admin = admin_client(bootstrap, **options)
    except (KafkaConnectionError, KafkaTimeoutError, UnrecognizedBrokerVersion):
        raise PreflightError(
            f"Kafka broker {bootstrap} accepts connections but does not answer as Kafka; "
            "check --bootstrap (the port of the broker's client listener) and "
            "security_protocol in --client-config"
        ) from None
    except KafkaError as e:
        raise PreflightError(_kafka_refusal(bootstrap, e)) from None
    try:
        topics = admin.list_topics()
        if topic not in topics:
            raise PreflightError(
                f"topic {topic!r} does not exist on {bootstrap}: create it "
                "(infra/create_topics.sh, or memstream replay a recording into it) "
                "or pass --topic an existing one"
            )
        (desc,) = admin.describe_topics([topic])
        if desc.get("error_code"):
            raise PreflightError(
                f"topic {topic!r} on {bootstrap} cannot be described (Kafka error code "
                f"{desc['error_code']}): check the client's ACLs for it"
            )
        return len(desc["partitions"])
    except KafkaError as e:
        raise PreflightError(_kafka_refusal(bootstrap, e)) from None
    finally:
        admin.close()


def _kafka_refusal(bootstrap: str, e: Exception) -> str:
    name = type(e).__name__
    text = str(e).splitlines()[0] if str(e) else name
    if "Authentication" in name or "Sasl" in name or "SSL" in name or "ssl" in text.lower():
        return (
            f"Kafka broker {bootstrap} refused the credentials ({name}: {text}); check "
            "sasl_*/ssl_* in --client-config (or kafka.client in the config)"
        )
    if "Authorization" in name:
        return f"Kafka broker {bootstrap} denied access ({name}: {text}); check the client's ACLs"
    return f"Kafka broker {bootstrap}: {name}: {text}"


def check_store(uri: str) -> None:
    """The snapshot store URI opens with pyarrow, and its root is a directory or absent
    (an empty store is waited for; a file where the store should be is not)."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:
        raise PreflightError(
            f"snapshot store {uri!r} cannot be opened: {str(e).splitlines()[0]}; pass --snapshots "
            "a local path or a pyarrow filesystem URI (s3://bucket/path, gs://..., file:///...)"
        ) from None
    try:
        info = fs.get_file_info(root)
    except OSError as e:
        raise PreflightError(
            f"snapshot store {uri!r} is not reachable: {str(e).splitlines()[0]}; check the "
            "credentials of its filesystem (AWS_*, GOOGLE_APPLICATION_CREDENTIALS) and the path"
        ) from None
    if info.type == pyarrow.fs.FileType.File:
        raise PreflightError(f"snapshot store {uri!r} is a file; pass --snapshots the store's directory")


def check_job(cfg) -> None:
    """`memstream run`'s checks for a loaded MemstreamConfig: the recording an embedded run
    replays, or the broker, credentials and topic of one that consumes a real topic."""
    if cfg.kafka.bootstrap is None:
        check_recording(cfg.job.recording)
    else:
        check_kafka(cfg.kafka.bootstrap, cfg.kafka.topic, cfg.kafka.client_options)
    if cfg.snapshots.uri:
        check_store(cfg.snapshots.uri)
