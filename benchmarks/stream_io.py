"""Throughput of the event path outside the trainer: build, replay, record, decode.

Builds the ML-1M recording, starts a local Tansu broker, replays the recording
into it with --speed max, records the topic back, and decodes values with
stream.ingest.events.decode_batch; prints one table (markdown) and optionally writes it.

    .venv/bin/python benchmarks/stream_io.py                    # full ML-1M (1,000,209 events)
    .venv/bin/python benchmarks/stream_io.py --limit 200000 --out /tmp/io.md

Numbers depend on the machine and its load (the reference runs share 2 cores);
the replay rate depends on the `crc32c` C extension (see stream/ingest/kafka_io.py).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq

from infra.broker import LocalBroker
from stream.ingest.events import decode_batch
from stream.ingest.kafka_io import HAS_FAST_CRC
from stream.recordings.data.movielens import build_ml1m_recording
from stream.recordings.recording import record, replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, help="first N ML-1M events (default: all)")
    parser.add_argument("--decode-events", type=int, default=100_000)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()

    rows: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="memstream-io-") as tmp:
        recording = Path(tmp) / "ml1m.parquet"
        started = time.perf_counter()
        build_ml1m_recording(recording, limit=args.limit)
        events = pq.ParquetFile(recording).metadata.num_rows
        rows.append(("build ML-1M recording", events, time.perf_counter() - started))

        with LocalBroker() as broker:
            stats = replay(recording, broker.bootstrap, "interactions", speed="max")
            rows.append(("replay --speed max (kafka-python)", stats.rows, stats.seconds))
            stats = record(broker.bootstrap, "interactions", Path(tmp) / "back.parquet")
            rows.append(("record back (static assignment)", stats.rows, stats.seconds))

        values = pq.read_table(recording, columns=["value"]).column("value")
        values = values.slice(0, args.decode_events).to_pylist()
        started = time.perf_counter()
        for i in range(0, len(values), 2000):
            decode_batch(values[i : i + 2000])
        rows.append(("decode_batch (batches of 2000)", len(values), time.perf_counter() - started))

    lines = [
        f"Stream I/O on {platform.node()} ({platform.machine()}, Python {platform.python_version()}, "
        f"crc32c C extension: {'yes' if HAS_FAST_CRC else 'no'})",
        "",
        "| step | events | seconds | events/s |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {n:,} | {s:.1f} | {n / s:,.0f} |" for name, n, s in rows),
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
