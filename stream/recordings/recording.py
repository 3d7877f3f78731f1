"""Recordings: a Kafka topic captured to Parquet, and replayed back into a topic.

File format (docs/CONTRACTS.md): one row per Kafka message with columns
topic string, partition int32, offset int64, timestamp_ms int64, key binary,
value binary, headers list<struct<key string, value binary>>. The file's
key-value metadata holds `memstream.partitions`, the partition count of the
recorded topic (a partition may have no rows, so it cannot be inferred).

Row order is the order to replay and evaluate in. `record()` writes partitions
merged by event time: each partition stays in offset order, and rows of
different partitions are interleaved by timestamp (exactly time-sorted when
every partition's timestamps are non-decreasing, as with a producer that stamps
at send time). Builders (stream/recordings/data/) write event-time order directly.

`replay()` produces rows in file order, preserving key, value, headers and
timestamp. When the target topic has the recording's partition count, each row
goes to its recorded partition, so per-partition order and content are
reproduced exactly; otherwise rows are partitioned by key with Kafka's default
partitioner (murmur2), and keyless rows go to a partition of the producer's
choosing. Pacing: `speed='max'` sends as fast as possible; a factor F replays the
recorded inter-event gaps divided by F; `rate=R` sends R events/s evenly.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stream.errors import MemstreamError
from stream.ingest.kafka_io import (
    bulk_producer,
    ensure_topic,
    key_partition,
    options_for,
    topic_partition_count,
)

HEADER_TYPE = pa.struct([("key", pa.string()), ("value", pa.binary())])
RECORDING_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp_ms", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("headers", pa.list_(HEADER_TYPE)),
    ]
)
PARTITIONS_META_KEY = b"memstream.partitions"
DEFAULT_BATCH_ROWS = 65_536


class RecordingError(MemstreamError):
    pass


@dataclass(frozen=True)
class RecordingInfo:
    path: Path
    rows: int
    partitions: int


@dataclass(frozen=True)
class TransferStats:
    """What a record or replay moved, and how fast."""

    rows: int
    seconds: float
    partitions: int

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class ReplayStats(TransferStats):
    topic_created: bool = False
    # True when rows went to their recorded partitions; False = partitioned by key.
    kept_partitions: bool = True


# -- the file -----------------------------------------------------------------


def write_recording(out: str | Path, table: pa.Table, partitions: int) -> Path:
    """Write `table` (RECORDING_SCHEMA columns, rows in replay order) atomically."""
    out = Path(out)
    try:
        table = table.select(RECORDING_SCHEMA.names).cast(RECORDING_SCHEMA)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RecordingError(f"table does not fit the recording schema: {e}") from e
    table = table.replace_schema_metadata({PARTITIONS_META_KEY: str(partitions).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        # zstd: ML-1M's JSON values shrink ~8x; row groups of one read batch each.
        pq.write_table(table, tmp, compression="zstd", row_group_size=DEFAULT_BATCH_ROWS)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def recording_info(path: str | Path) -> RecordingInfo:
    pf = _open(path)
    meta = pf.schema_arrow.metadata or {}
    if PARTITIONS_META_KEY in meta:
        partitions = int(meta[PARTITIONS_META_KEY])
    else:  # a file written by another tool: the best guess is the highest partition seen
        col = pf.read(columns=["partition"]).column("partition")
        partitions = (int(pc.max(col).as_py()) + 1) if len(col) else 1
    return RecordingInfo(Path(path), pf.metadata.num_rows, partitions)


def iter_recording(path: str | Path, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The recording's rows in file (= replay) order, `batch_rows` at most per batch."""
    yield from _open(path).iter_batches(batch_size=batch_rows)


def _open(path: str | Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError as e:
        raise RecordingError(f"no recording at {path}") from e
    except pa.ArrowInvalid as e:
        raise RecordingError(f"{path} is not a Parquet recording: {e}") from e
    missing = set(RECORDING_SCHEMA.names) - set(pf.schema_arrow.names)
    if missing:
        raise RecordingError(f"{path} is not a recording: missing columns {sorted(missing)}")
    return pf


def event_time_order(partition: np.ndarray, offset: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Row order merging partitions by timestamp, each partition kept in offset order.

    Sorting by each partition's running-max timestamp (non-decreasing along the
    partition, so a stable sort cannot reorder it) is a vectorised k-way merge.
    """
    by_offset = np.lexsort((offset, partition))
    p, t = partition[by_offset], ts[by_offset]
    running_max = t.copy()
    starts = np.r_[0, np.flatnonzero(np.diff(p)) + 1, len(p)]
    for lo, hi in itertools.pairwise(starts):
        np.maximum.accumulate(running_max[lo:hi], out=running_max[lo:hi])
    merged = np.lexsort((offset[by_offset], p, running_max))
    return by_offset[merged]


# -- record -------------------------------------------------------------------


def record(
    bootstrap: str,
    topic: str,
    out: str | Path,
    max_messages: int | None = None,
    *,
    idle_timeout_s: float = 30.0,
    progress: bool = False,
    **client_options: Any,
) -> TransferStats:
    """Capture `topic` from the beginning up to its end at start (or `max_messages`).

    Static assignment (assign + seek_to_beginning): no consumer group, no commits.
    With `max_messages`, which messages of which partitions come first depends on
    fetch timing; the file is still in the order described in the module doc.
    The end of each partition is the larger of ListOffsets(latest) and the high
    watermark of the first fetch (Tansu under-reports the former).
    """
    from kafka import KafkaConsumer, TopicPartition

    partitions = topic_partition_count(bootstrap, topic, **client_options)
    if partitions is None:
        raise RecordingError(f"topic {topic!r} does not exist on {bootstrap}")
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=20_000,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_wait_ms=100,
        **options_for(KafkaConsumer, client_options),
    )
    started = time.perf_counter()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        limit = max_messages if max_messages is not None else float("inf")
        rows = _consume_to_end(consumer, tps, limit, idle_timeout_s, progress)
    finally:
        consumer.close()
    seconds = time.perf_counter() - started
    write_recording(out, _recorded_table(topic, rows), partitions)
    return TransferStats(rows=len(rows["offset"]), seconds=seconds, partitions=partitions)


def _consume_to_end(consumer, tps: list, limit: float, idle_timeout_s: float, progress: bool):
    """Column lists of every message from the beginning to the end offsets at start."""
    rows: dict[str, list] = {c: [] for c in ("partition", "offset", "ts", "key", "value", "headers")}
    consumer.assign(tps)
    begin = consumer.beginning_offsets(tps)
    end = consumer.end_offsets(tps)
    consumer.seek_to_beginning()
    remaining = {tp for tp in tps if end[tp] > begin[tp]}
    unreconciled = set(remaining)  # ends not yet checked against a fetch's high watermark
    total = min(limit, sum(end[tp] - begin[tp] for tp in tps))
    count = 0
    last_progress = time.monotonic()
    with _ProgressBar(progress, "record", total) as bar:
        while remaining and count < limit:
            polled = consumer.poll(timeout_ms=200)
            for tp in list(unreconciled):
                high = consumer.highwater(tp)
                if high is not None:
                    end[tp] = max(end[tp], high)
                    unreconciled.discard(tp)
                    total = min(limit, sum(end[t] - begin[t] for t in tps))
            for tp, records in polled.items():
                for r in records:
                    if r.offset >= end[tp] or count >= limit:
                        break
                    rows["partition"].append(tp.partition)
                    rows["offset"].append(r.offset)
                    rows["ts"].append(r.timestamp)
                    rows["key"].append(r.key)
                    rows["value"].append(r.value)
                    rows["headers"].append([{"key": k, "value": v} for k, v in r.headers or ()])
                    count += 1
            for tp in list(remaining):
                if tp not in unreconciled and consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
                    consumer.pause(tp)
            if polled:
                last_progress = time.monotonic()
                bar(count, total)
            elif time.monotonic() - last_progress > idle_timeout_s:
                stuck = {tp.partition: (consumer.position(tp), end[tp]) for tp in remaining}
                raise RecordingError(
                    f"no messages for {idle_timeout_s:.0f} s while partitions "
                    f"(partition: (position, end)) {stuck} were unfinished; is the broker up?"
                )
    return rows


def _recorded_table(topic: str, rows: dict[str, list]) -> pa.Table:
    part = np.asarray(rows["partition"], dtype=np.int32)
    off = np.asarray(rows["offset"], dtype=np.int64)
    ts = np.asarray(rows["ts"], dtype=np.int64)
    order = event_time_order(part, off, ts)
    return pa.table(
        {
            "topic": pa.array([topic] * len(order), pa.string()),
            "partition": part[order],
            "offset": off[order],
            "timestamp_ms": ts[order],
            "key": pa.array(rows["key"], pa.binary()).take(order),
            "value": pa.array(rows["value"], pa.binary()).take(order),
            "headers": pa.array(rows["headers"], pa.list_(HEADER_TYPE)).take(order),
        }
    )


# -- replay -------------------------------------------------------------------


def replay(
    path: str | Path,
    bootstrap: str,
    topic: str,
    speed: str | float = "max",
    *,
    rate: float | None = None,
    partitions: int | None = None,
    progress: bool = False,
    retime: bool = False,
    stop: threading.Event | None = None,
    **client_options: Any,
) -> ReplayStats:
    """Produce the recording's rows into `topic` (created if missing); see the module doc.

    `partitions` is the partition count for a topic that has to be created
    (default: the recording's). Raises RecordingError if any send failed: a
    replay either delivers every row or says it did not.

    `retime`: stamp each message with the time it is sent instead of its recorded
    timestamp (pacing still follows the recorded ones). A live job measures
    freshness from the Kafka timestamp; the event's own `ts_ms` is in the value.

    `stop`: set it to end the replay early (between sends); what was sent is flushed.
    """
    info = recording_info(path)
    stop = stop or threading.Event()
    pacer = _Pacer.of(speed, rate)
    count, created = ensure_topic(bootstrap, topic, partitions or info.partitions, **client_options)
    kept_partitions = count == info.partitions
    # Paced replays are latency-sensitive (freshness is measured on them): short linger.
    tuning = {} if pacer.unpaced else {"linger_ms": 5}
    producer = bulk_producer(bootstrap, **{**tuning, **client_options})
    failures: list[BaseException] = []
    sent = 0
    started = time.perf_counter()
    try:
        with _ProgressBar(progress, "replay", info.rows) as bar:
            # Paced: small batches, so the progress bar moves while we wait between sends.
            batch_rows = DEFAULT_BATCH_ROWS if pacer.unpaced else 1024
            for batch in iter_recording(path, batch_rows):
                _check_producible(batch, path)
                keys = batch.column("key").to_pylist()
                values = batch.column("value").to_pylist()
                stamps = batch.column("timestamp_ms").to_numpy(zero_copy_only=False)
                if kept_partitions:
                    targets = batch.column("partition").to_pylist()
                else:
                    targets = _key_partitions(keys, count)
                headers = _headers_of(batch.column("headers"))
                due = pacer.due(stamps, sent)
                send_stamps = [None] * len(keys) if retime else stamps.tolist()
                sent += _send_rows(
                    producer, topic, keys, values, send_stamps, targets, headers, due, started, failures, stop
                )
                bar(sent)
                if failures or stop.is_set():
                    break
            producer.flush()
    finally:
        producer.close()
    seconds = time.perf_counter() - started
    if failures:
        raise RecordingError(
            f"{len(failures)} sends to {topic!r} on {bootstrap} failed (first: {failures[0]!r}); "
            "the topic holds a partial replay: delete and recreate it before retrying"
        )
    return ReplayStats(
        rows=sent,
        seconds=seconds,
        partitions=count,
        topic_created=created,
        kept_partitions=kept_partitions,
    )


def _send_rows(producer, topic, keys, values, stamps, targets, headers, due, started, failures, stop) -> int:
    """The hot loop of replay: one send per row, no flush, pacing only when asked.
    Returns the rows sent (fewer than given when `stop` is set while pacing)."""
    send = producer.send
    on_error = failures.append
    no_headers = headers is None
    if due is None:
        for i, value in enumerate(values):
            send(
                topic,
                value=value,
                key=keys[i],
                partition=targets[i],
                timestamp_ms=stamps[i],
                headers=None if no_headers else headers[i],
            ).add_errback(on_error)
        return len(values)
    now = time.perf_counter() - started
    for i, value in enumerate(values):
        if due[i] > now:
            now = time.perf_counter() - started
            if due[i] > now:
                if stop.wait(due[i] - now):
                    return i
                now = due[i]
        send(
            topic,
            value=value,
            key=keys[i],
            partition=targets[i],
            timestamp_ms=stamps[i],
            headers=None if no_headers else headers[i],
        ).add_errback(on_error)
    return len(values)


def _check_producible(batch: pa.RecordBatch, path: str | Path) -> None:
    # Kafka stores records with neither key nor value, but kafka-python cannot send one.
    empty = pc.and_(pc.is_null(batch.column("key")), pc.is_null(batch.column("value")))
    if pc.any(empty).as_py():
        row = batch.slice(pc.index(empty, True).as_py(), 1).to_pylist()[0]
        raise RecordingError(
            f"{path} has a record with neither key nor value (partition {row['partition']}, "
            f"offset {row['offset']}), which kafka-python cannot produce; drop such rows first"
        )


def _headers_of(column: pa.ListArray) -> list[list[tuple[str, bytes]]] | None:
    """Per-row header tuples, or None when no row of the batch has any (the common case)."""
    if not pc.sum(pc.list_value_length(column)).as_py():
        return None
    return [[(h["key"], h["value"]) for h in row] if row else [] for row in column.to_pylist()]


def _key_partitions(keys: list[bytes | None], partitions: int) -> list[int | None]:
    cache: dict[bytes, int] = {}
    out: list[int | None] = []
    for k in keys:
        if k is None:
            out.append(None)  # the producer's partitioner spreads keyless rows
            continue
        p = cache.get(k)
        if p is None:
            p = cache[k] = key_partition(k, partitions)
        out.append(p)
    return out


@dataclass
class _Pacer:
    """Wall-clock send times, in seconds after the replay started, for each row."""

    speed: float | None  # None = as fast as possible
    rate: float | None
    first_ts: int | None = None
    running_max: int | None = None

    @classmethod
    def of(cls, speed: str | float, rate: float | None) -> _Pacer:
        if rate is not None:
            if not rate > 0:
                raise RecordingError(f"--rate must be > 0 events/s, got {rate}")
            return cls(speed=None, rate=float(rate))
        if speed in ("max", None):
            return cls(speed=None, rate=None)
        try:
            factor = float(speed)
        except ValueError as e:
            raise RecordingError(f"--speed must be 'max' or a positive factor, got {speed!r}") from e
        if not factor > 0:
            raise RecordingError(f"--speed must be 'max' or a positive factor, got {speed!r}")
        return cls(speed=factor, rate=None)

    @property
    def unpaced(self) -> bool:
        return self.speed is None and self.rate is None

    def due(self, stamps: np.ndarray, rows_before: int) -> np.ndarray | None:
        if self.rate is not None:
            return (rows_before + np.arange(len(stamps))) / self.rate
        if self.speed is None or len(stamps) == 0:
            return None
        if self.first_ts is None:
            self.first_ts = self.running_max = int(stamps[0])
        # Running max: a timestamp that goes backwards is sent at once, never waited for.
        running = np.maximum.accumulate(np.maximum(stamps, self.running_max))
        self.running_max = int(running[-1])
        return (running - self.first_ts) / 1000.0 / self.speed


class _ProgressBar:
    """A rich progress bar on stderr, or nothing; called with the count done so far."""

    def __init__(self, enabled: bool, label: str, total: float) -> None:
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>10,.0f} events/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            total_or_none = None if total == float("inf") else int(total)
            self._task = self._progress.add_task(label, total=total_or_none, rate=0.0)
            self._started = time.perf_counter()

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __call__(self, done: int, total: float | None = None) -> None:
        if self._progress is not None:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            self._progress.update(self._task, completed=done, rate=done / elapsed)
            if total is not None and total != float("inf"):
                self._progress.update(self._task, total=int(total))

    def __exit__(self, *exc_info) -> None:
        if self._progress is not None:
            self._progress.stop()
