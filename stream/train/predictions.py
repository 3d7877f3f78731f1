"""Per-event predictions: every scored event with its labels, scores and evidence, to Parquet.

`memstream eval --predictions F.parquet` and `memstream run --predictions F.parquet`
write one row per trained event, as the model scored it before learning from it
(the same numbers the report's metrics saw), so any slice can be evaluated later:

  seq                 int64   position of the event among the events trained in this
                              lineage (0, 1, ...: the trainer's events_applied before it)
  event_id, user_id, item_id  string
  ts_ms               int64   event time
  kafka_partition     int32   where it came from (-1: not from Kafka)
  kafka_offset        int64
  label.<like>        double  the like label (0/1), null when the event has none
  label.<rating>      double  the rating label, null when absent
  score.<like>        float   the like logit (what the AUC ranks)
  prob.<like>         float   sigmoid of it
  score.<rating>      float   the predicted rating
  item_evidence       int64   events of the item strictly before this one (stream order,
                              earlier events of the same micro-batch included)
  user_evidence       int64   the same for the user (>= model.history.length: "long")

(<like>, <rating>: model.features.like_task / rating_task, "like" / "rating" by default.)
The file's key-value metadata holds `memstream.start_seq`, `memstream.incarnation`,
`memstream.restored_from_checkpoint`, the task names and `memstream.history_length`.

Rows are buffered and written in row groups of `row_group_rows` (64k): memory stays
bounded whatever the stream's length. The writer is closed on a stop and on an error,
so the file is readable with every row written until then; a process killed outright
(SIGKILL, out of memory) leaves its file without a footer, unreadable.

`memstream run`: the trainer actor writes the file, on the trainer's filesystem (the
driver makes the path absolute). A restarted trainer (a crash, or a new job on the same
work dir) never touches an earlier file: each incarnation writes the next free name,
`F`, `F.1.parquet`, `F.2.parquet`... (for F = `F.parquet`), and resumes from its
checkpoint, so it scores again the events after that checkpoint: their `seq` repeat
those of the previous incarnation's last rows. `read_predictions(F)` gives the final
lineage, each event once: every incarnation's rows below the next one's start_seq.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stream.errors import MemstreamError

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 1 << 16
_META = "memstream."


class PredictionsError(MemstreamError):
    """The predictions file cannot be written or read."""


def prediction_schema(like_task: str, rating_task: str) -> pa.Schema:
    return pa.schema(
        [
            ("seq", pa.int64()),
            ("event_id", pa.string()),
            ("ts_ms", pa.int64()),
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("kafka_partition", pa.int32()),
            ("kafka_offset", pa.int64()),
            (f"label.{like_task}", pa.float64()),
            (f"label.{rating_task}", pa.float64()),
            (f"score.{like_task}", pa.float32()),
            (f"prob.{like_task}", pa.float32()),
            (f"score.{rating_task}", pa.float32()),
            ("item_evidence", pa.int64()),
            ("user_evidence", pa.int64()),
        ]
    )


def incarnation_path(path: str | Path) -> tuple[Path, int]:
    """The first free name of `path`'s series: (path, 0), else (stem.N.suffix, N)."""
    path = Path(path)
    if not path.exists():
        return path, 0
    n = 1
    while (p := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    return p, n


class PredictionWriter:
    """Streams scored events to one Parquet file (see the module docstring for the schema)."""

    def __init__(
        self,
        path: str | Path,
        like_task: str,
        rating_task: str,
        *,
        start_seq: int = 0,
        incarnation: int = 0,
        restored_from: int | None = None,
        history_length: int | None = None,
        row_group_rows: int = ROW_GROUP_ROWS,
    ) -> None:
        self.path = Path(path)
        self.like_task, self.rating_task = like_task, rating_task
        self.row_group_rows = row_group_rows
        meta = {
            "start_seq": start_seq,
            "incarnation": incarnation,
            "restored_from_checkpoint": "" if restored_from is None else restored_from,
            "like_task": like_task,
            "rating_task": rating_task,
            "history_length": "" if history_length is None else history_length,
        }
        self.schema = prediction_schema(like_task, rating_task).with_metadata(
            {f"{_META}{k}": str(v) for k, v in meta.items()}
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.path, self.schema)
        except OSError as e:
            raise PredictionsError(f"cannot write predictions to {self.path}: {e}") from e
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows_written = 0  # rows in the file (flushed)

    def write(self, batch: Any, result: Any, seq_start: int) -> None:
        """One trained micro-batch (an EventBatch) and its OnlineTrainer.StepResult;
        `seq_start` is the trainer's events_applied before the step."""
        if self._writer is None:
            raise PredictionsError(f"predictions file {self.path} is closed")
        n = len(batch)
        if n == 0:
            return
        like = batch.labels.get(self.like_task)
        rating = batch.labels.get(self.rating_task)
        logit = np.asarray(result.like_logit, dtype=np.float32)
        cols = [
            np.arange(seq_start, seq_start + n, dtype=np.int64),
            pa.array(batch.event_id, pa.string()),
            np.asarray(batch.ts_ms, dtype=np.int64),
            pa.array(batch.user_id, pa.string()),
            pa.array(batch.item_id, pa.string()),
            np.asarray(batch.kafka_partition, dtype=np.int32),
            np.asarray(batch.kafka_offset, dtype=np.int64),
            _nullable(like, n),
            _nullable(rating, n),
            logit,
            (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32),
            np.asarray(result.rating_pred, dtype=np.float32),
            np.asarray(result.item_evidence, dtype=np.int64),
            np.asarray(result.user_evidence, dtype=np.int64),
        ]
        self._buffer.append(pa.RecordBatch.from_arrays(cols, schema=self.schema))
        self._buffered += n
        if self._buffered >= self.row_group_rows:
            self.flush()

    @property
    def buffered(self) -> int:
        """Rows written but not yet in the file."""
        return self._buffered

    def flush(self) -> None:
        """Write what is buffered (row groups of at most row_group_rows)."""
        if self._writer is None or not self._buffered:
            return
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        self._buffer, self._buffered = [], 0
        try:
            self._writer.write_table(table, row_group_size=self.row_group_rows)
        except OSError as e:
            raise PredictionsError(f"writing predictions to {self.path} failed: {e}") from e
        self.rows_written += table.num_rows

    def close(self) -> None:
        """Flush and write the footer (idempotent): the file is complete and readable."""
        if self._writer is None:
            return
        try:
            self.flush()
        finally:
            writer, self._writer = self._writer, None
            writer.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nullable(values: np.ndarray | None, n: int) -> pa.Array:
    if values is None:
        return pa.nulls(n, pa.float64())
    v = np.asarray(values, dtype=np.float64)
    return pa.array(v, pa.float64(), mask=np.isnan(v))


def prediction_files(path: str | Path) -> list[Path]:
    """`path` and the files later trainer incarnations wrote beside it, oldest first."""
    path = Path(path)
    found = []
    for p in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        middle = p.name[len(path.stem) + 1 : len(p.name) - len(path.suffix)]
        if middle.isdigit():
            found.append((int(middle), p))
    return ([path] if path.exists() else []) + [p for _, p in sorted(found)]


def read_predictions(path: str | Path) -> pa.Table:
    """The predictions of the final lineage, each trained event once, in `seq` order.

    A restarted trainer scores again the events after its checkpoint: of each file,
    only the rows below the start_seq of every later file are its lineage's. A file
    that cannot be read (its writer was killed) is an error naming it.
    """
    files = prediction_files(path)
    if not files:
        raise PredictionsError(f"no predictions file at {path}")
    tables = []
    for p in files:
        try:
            tables.append(pq.read_table(p))
        except (OSError, pa.ArrowInvalid) as e:
            raise PredictionsError(
                f"predictions file {p} is unreadable ({e}); its trainer was probably killed "
                "before closing it: move it aside to read the others"
            ) from e
    kept, limit = [], None
    for t in reversed(tables):  # newest first: each bounds the ones before it
        if limit is not None:
            t = t.filter(pc.less(t["seq"], limit))
        kept.append(t)
        start = int(t.schema.metadata[f"{_META}start_seq".encode()])
        limit = start if limit is None else min(limit, start)
    out = pa.concat_tables(kept[::-1])
    return out.take(pc.sort_indices(out, [("seq", "ascending")]))
