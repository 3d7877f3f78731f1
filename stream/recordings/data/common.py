"""What the dataset builders share: their error type and the Kafka layout of their rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from stream.errors import MemstreamError
from stream.ingest.kafka_io import key_partition
from stream.recordings.recording import HEADER_TYPE, write_recording


class DataError(MemstreamError):
    pass


def write_keyed_recording(
    out: str | Path,
    *,
    topic: str,
    user_ids: list[str],
    event_user: np.ndarray,
    values: list[str],
    ts_ms: np.ndarray,
    partitions: int,
) -> Path:
    """Write events (in event-time order) laid out as a producer keyed by user would have.

    Row i is `values[i]` (an event's JSON) of user `user_ids[event_user[i]]`, the
    Kafka key. The partition (Kafka's default partitioner on the key) is computed
    once per user, not per row; offsets count up from 0 within each partition in
    row order; the Kafka timestamp is the event's ts_ms.
    """
    if partitions < 1:
        raise DataError(f"partitions must be >= 1, got {partitions}")
    user_keys = [u.encode() for u in user_ids]
    user_partition = np.array([key_partition(k, partitions) for k in user_keys], np.int32)
    partition = user_partition[event_user] if len(event_user) else np.empty(0, np.int32)
    offset = np.empty(len(partition), np.int64)
    for p in range(partitions):
        rows = np.flatnonzero(partition == p)
        offset[rows] = np.arange(len(rows), dtype=np.int64)
    n = len(partition)
    no_headers = pa.ListArray.from_arrays(
        pa.array(np.zeros(n + 1, np.int32)), pa.array([], HEADER_TYPE)
    )
    table = pa.table(
        {
            "topic": pa.array([topic] * n, pa.string()),
            "partition": partition,
            "offset": offset,
            "timestamp_ms": np.asarray(ts_ms, np.int64),
            "key": pa.array([user_keys[u] for u in event_user.tolist()], pa.binary()),
            # str -> binary is a zero-copy cast: no per-row encode().
            "value": pa.array(values, pa.string()).cast(pa.binary()),
            "headers": no_headers,
        }
    )
    return write_recording(out, table, partitions)


def json_fragment(value) -> str:
    """Compact JSON for splicing into an event's text (builders format events by hand:
    ~1M json.dumps calls of whole events would dominate build time)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
