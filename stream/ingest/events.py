"""The interaction event: schema, limits, and batch decoding of raw Kafka values.

One JSON object per Kafka message (README "Events and their schema"), or a team's own
format mapped onto it (`kafka.event_format`, stream/ingest/event_format.py). `decode_batch` turns a list
of raw values into a columnar `EventBatch` plus a list of `Reject`s; it never
raises on input, whatever the bytes, so one hostile message cannot stop a
consumer. Rejects carry a coarse `category` (for counting and alerting) and a
human-readable `reason` (for the dead-letter header).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Self

import numpy as np
import pyarrow as pa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_serializer,
    model_validator,
)

from models.ids import MAX_WORDS, EventCodes, default_encoder

if TYPE_CHECKING:
    from stream.ingest.event_format import EventMapping

# Reason categories, stable strings: dashboards and the DLQ consumers key on them.
REJECT_CATEGORIES = (
    "too_large",
    "empty",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "unknown_field",
    "limit_exceeded",
    "non_finite_label",
    "label_out_of_range",
    "bad_timestamp",
    "duplicate_event_id",
    # A team's own format (kafka.event_format, stream/ingest/event_format.py): a value whose
    # fields do not map (the reason names the path), or one that is not Avro of the schema.
    "mapping_failed",
    "invalid_avro",
)


class LabelSpec(BaseModel):
    """The values one task's label may take: `binary` (0 or 1) or a closed range.

    Written in config as the string `binary` or a mapping `{min: a, max: b}` (either
    bound may be left out, not both). A value outside is rejected as label_out_of_range:
    one `rating: 1e6` would otherwise dominate every gradient for the rest of the stream.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    binary: bool = False
    min: float | None = Field(None, allow_inf_nan=False)
    max: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _from_word(cls, data: Any) -> Any:
        if isinstance(data, str):
            if data != "binary":
                raise ValueError(f"expected 'binary' or a range {{min: a, max: b}}, got {data!r}")
            return {"binary": True}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.binary:
            if self.min is not None or self.max is not None:
                raise ValueError("a binary label takes no min/max")
        elif self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both (or write 'binary')")
        elif self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min={self.min} is greater than max={self.max}")
        return self

    @model_serializer(mode="plain")
    def _dump(self) -> str | dict[str, float]:
        if self.binary:
            return "binary"
        return {k: v for k, v in (("min", self.min), ("max", self.max)) if v is not None}

    def describe(self) -> str:
        if self.binary:
            return "{0, 1}"
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"


def _default_label_specs() -> dict[str, LabelSpec | None]:
    # The default model's tasks (models/config.py FeatureConfig like_task / rating_task);
    # MovieLens and the synthetic recordings give like in {0, 1} and rating in 1..5.
    return {"like": LabelSpec(binary=True), "rating": LabelSpec(min=1.0, max=5.0)}


class EventLimits(BaseModel):
    """Bounds on a single event; anything outside goes to the DLQ."""

    model_config = ConfigDict(extra="forbid")

    max_message_bytes: int = Field(64 * 1024, gt=0)
    max_id_len: int = Field(128, gt=0)
    max_text_len: int = Field(4096, gt=0)
    max_labels: int = Field(16, gt=0)
    max_features: int = Field(64, gt=0)
    max_feature_key_len: int = Field(64, gt=0)
    max_feature_value_len: int = Field(256, gt=0)
    min_ts_ms: int = Field(0, ge=0)
    # Events stamped further than this into the future (vs. the wall clock at
    # decode time) are clock bugs upstream; training on them would poison TTLs.
    max_future_skew_ms: int = Field(24 * 3600 * 1000, ge=0)
    allow_unknown_fields: bool = False
    # task -> the values its label may take. A task without a spec (or with `null`, which
    # removes a default one: config files are merged over these defaults) is only
    # checked finite.
    labels: dict[str, LabelSpec | None] = Field(default_factory=_default_label_specs)


_Id = Annotated[str, StringConstraints(min_length=1, strip_whitespace=False)]


class Event(BaseModel):
    """One interaction. Extend with new optional fields; never rename."""

    model_config = ConfigDict(extra="forbid", strict=True)

    event_id: _Id
    ts_ms: int
    user_id: _Id
    item_id: _Id
    scenario: _Id = "feed"
    labels: dict[str, float]
    user_features: dict[str, str | float] = Field(default_factory=dict)
    item_text: str | None = None
    query: str | None = None


class EventLoose(Event):
    model_config = ConfigDict(extra="ignore", strict=True)


def event_json_schema() -> dict[str, Any]:
    return Event.model_json_schema()


@dataclass(frozen=True)
class Reject:
    raw: bytes
    category: str
    reason: str


@dataclass
class EventBatch:
    """Columnar micro-batch of valid events, row-aligned arrays.

    labels[task] is float64 with NaN where the event has no label for that task.
    user_cat[name] is object (str or None); user_num[name] float64 (NaN = missing).
    kafka_* are -1 when the batch did not come from Kafka.
    codes: the ids as integers (models.ids), computed where the batch is decoded (ingest,
    the eval reader) and carried with it; `id_codes()` computes them for a batch built
    elsewhere (a serving request, a test).
    """

    event_id: np.ndarray  # (n,) object
    ts_ms: np.ndarray  # (n,) int64
    user_id: np.ndarray  # (n,) object
    item_id: np.ndarray  # (n,) object
    scenario: np.ndarray  # (n,) object
    item_text: np.ndarray  # (n,) object, str or None
    query: np.ndarray  # (n,) object, str or None
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    user_cat: dict[str, np.ndarray] = field(default_factory=dict)
    user_num: dict[str, np.ndarray] = field(default_factory=dict)
    kafka_partition: np.ndarray | None = None  # (n,) int32
    kafka_offset: np.ndarray | None = None  # (n,) int64
    kafka_ts_ms: np.ndarray | None = None  # (n,) int64
    codes: EventCodes | None = None

    def __post_init__(self) -> None:
        n = len(self.event_id)
        if self.kafka_partition is None:
            self.kafka_partition = np.full(n, -1, dtype=np.int32)
        if self.kafka_offset is None:
            self.kafka_offset = np.full(n, -1, dtype=np.int64)
        if self.kafka_ts_ms is None:
            self.kafka_ts_ms = np.full(n, -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.event_id)

    def id_codes(self) -> EventCodes:
        """The integer ids of this batch (computed once, then carried)."""
        if self.codes is None:
            self.codes = default_encoder().encode(
                self.user_id, self.item_id, self.scenario, self.item_text, self.user_cat
            )
        return self.codes

    @classmethod
    def empty(cls) -> EventBatch:
        return cls.from_events([])

    @classmethod
    def from_events(
        cls,
        events: Sequence[Event],
        kafka_partition: Sequence[int] | None = None,
        kafka_offset: Sequence[int] | None = None,
        kafka_ts_ms: Sequence[int] | None = None,
    ) -> EventBatch:
        n = len(events)
        obj = lambda xs: np.array(xs, dtype=object) if n else np.empty(0, dtype=object)
        label_names = sorted({k for e in events for k in e.labels})
        labels = {
            t: np.array([e.labels.get(t, math.nan) for e in events], dtype=np.float64) for t in label_names
        }
        cat_names = sorted({k for e in events for k, v in e.user_features.items() if isinstance(v, str)})
        num_names = sorted({k for e in events for k, v in e.user_features.items() if not isinstance(v, str)})
        user_cat = {}
        for k in cat_names:
            vals = [e.user_features.get(k) for e in events]
            user_cat[k] = obj([v if isinstance(v, str) else None for v in vals])
        user_num = {}
        for k in num_names:
            vals = [e.user_features.get(k) for e in events]
            user_num[k] = np.array(
                [float(v) if (v is not None and not isinstance(v, str)) else math.nan for v in vals],
                dtype=np.float64,
            )
        as_arr = lambda xs, dt: None if xs is None else np.asarray(xs, dtype=dt)
        return cls(
            event_id=obj([e.event_id for e in events]),
            ts_ms=np.array([e.ts_ms for e in events], dtype=np.int64),
            user_id=obj([e.user_id for e in events]),
            item_id=obj([e.item_id for e in events]),
            scenario=obj([e.scenario for e in events]),
            item_text=obj([e.item_text for e in events]),
            query=obj([e.query for e in events]),
            labels=labels,
            user_cat=user_cat,
            user_num=user_num,
            kafka_partition=as_arr(kafka_partition, np.int32),
            kafka_offset=as_arr(kafka_offset, np.int64),
            kafka_ts_ms=as_arr(kafka_ts_ms, np.int64),
        )

    def take(self, idx: np.ndarray) -> EventBatch:
        """Rows `idx` (any integer index array or boolean mask), same columns."""
        return EventBatch(
            event_id=self.event_id[idx],
            ts_ms=self.ts_ms[idx],
            user_id=self.user_id[idx],
            item_id=self.item_id[idx],
            scenario=self.scenario[idx],
            item_text=self.item_text[idx],
            query=self.query[idx],
            labels={k: v[idx] for k, v in self.labels.items()},
            user_cat={k: v[idx] for k, v in self.user_cat.items()},
            user_num={k: v[idx] for k, v in self.user_num.items()},
            kafka_partition=self.kafka_partition[idx],
            kafka_offset=self.kafka_offset[idx],
            kafka_ts_ms=self.kafka_ts_ms[idx],
            codes=None if self.codes is None else self.codes.take(idx),
        )

    @classmethod
    def concat(cls, batches: Sequence[EventBatch]) -> EventBatch:
        batches = [b for b in batches if len(b)]
        if not batches:
            return cls.empty()
        if len(batches) == 1:
            return batches[0]
        total = sum(len(b) for b in batches)

        def cat(get, fill_dtype, fill):
            parts = []
            for b in batches:
                v = get(b)
                parts.append(v if v is not None else np.full(len(b), fill, dtype=fill_dtype))
            return np.concatenate(parts) if parts else np.empty(total, dtype=fill_dtype)

        def cat_dict(attr, fill_dtype, fill):
            names = sorted({k for b in batches for k in getattr(b, attr)})
            return {k: cat(lambda b, k=k: getattr(b, attr).get(k), fill_dtype, fill) for k in names}

        return cls(
            event_id=cat(lambda b: b.event_id, object, None),
            ts_ms=cat(lambda b: b.ts_ms, np.int64, 0),
            user_id=cat(lambda b: b.user_id, object, None),
            item_id=cat(lambda b: b.item_id, object, None),
            scenario=cat(lambda b: b.scenario, object, None),
            item_text=cat(lambda b: b.item_text, object, None),
            query=cat(lambda b: b.query, object, None),
            labels=cat_dict("labels", np.float64, math.nan),
            user_cat=cat_dict("user_cat", object, None),
            user_num=cat_dict("user_num", np.float64, math.nan),
            kafka_partition=cat(lambda b: b.kafka_partition, np.int32, -1),
            kafka_offset=cat(lambda b: b.kafka_offset, np.int64, -1),
            kafka_ts_ms=cat(lambda b: b.kafka_ts_ms, np.int64, -1),
            codes=EventCodes.concat([b.id_codes() for b in batches])
            if any(b.codes is not None for b in batches)
            else None,
        )

    # Arrow round trip: how batches cross process boundaries (Ray object store).
    def to_arrow(self) -> pa.Table:
        cols: dict[str, pa.Array] = {
            "event_id": pa.array(self.event_id, type=pa.string()),
            "ts_ms": pa.array(self.ts_ms, type=pa.int64()),
            "user_id": pa.array(self.user_id, type=pa.string()),
            "item_id": pa.array(self.item_id, type=pa.string()),
            "scenario": pa.array(self.scenario, type=pa.string()),
            "item_text": pa.array(self.item_text, type=pa.string()),
            "query": pa.array(self.query, type=pa.string()),
            "kafka_partition": pa.array(self.kafka_partition, type=pa.int32()),
            "kafka_offset": pa.array(self.kafka_offset, type=pa.int64()),
            "kafka_ts_ms": pa.array(self.kafka_ts_ms, type=pa.int64()),
        }
        for k, v in self.labels.items():
            cols[f"label.{k}"] = pa.array(v, type=pa.float64())
        for k, v in self.user_cat.items():
            cols[f"ucat.{k}"] = pa.array(v, type=pa.string())
        for k, v in self.user_num.items():
            cols[f"unum.{k}"] = pa.array(v, type=pa.float64())
        if self.codes is not None:  # integers cross with the strings: the trainer hashes nothing
            c = self.codes
            for name in EventCodes.COLUMNS:
                if name != "words":
                    cols[f"code.{name}"] = pa.array(getattr(c, name), type=pa.int64())
            flat = pa.array(c.words.reshape(-1), type=pa.int64())
            cols["code.words"] = pa.FixedSizeListArray.from_arrays(flat, MAX_WORDS)
            for k, v in c.user_cat.items():
                cols[f"code.ucat.{k}"] = pa.array(v, type=pa.int64())
        return pa.table(cols)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> EventBatch:
        def obj(name):
            return np.array(table.column(name).to_pylist(), dtype=object)

        def num(name, dt):
            return table.column(name).to_numpy(zero_copy_only=False).astype(dt, copy=False)

        prefixed = lambda p: [c for c in table.column_names if c.startswith(p)]
        codes = None
        if "code.user" in table.column_names:
            words = table.column("code.words").combine_chunks().flatten()
            codes = EventCodes(
                **{n: num(f"code.{n}", np.int64) for n in EventCodes.COLUMNS if n != "words"},
                words=words.to_numpy().astype(np.int64, copy=False).reshape(-1, MAX_WORDS),
                user_cat={c[len("code.ucat.") :]: num(c, np.int64) for c in prefixed("code.ucat.")},
            )
        return cls(
            event_id=obj("event_id"),
            ts_ms=num("ts_ms", np.int64),
            user_id=obj("user_id"),
            item_id=obj("item_id"),
            scenario=obj("scenario"),
            item_text=obj("item_text"),
            query=obj("query"),
            labels={c[len("label.") :]: num(c, np.float64) for c in prefixed("label.")},
            user_cat={c[len("ucat.") :]: obj(c) for c in prefixed("ucat.")},
            user_num={c[len("unum.") :]: num(c, np.float64) for c in prefixed("unum.")},
            kafka_partition=num("kafka_partition", np.int32),
            kafka_offset=num("kafka_offset", np.int64),
            kafka_ts_ms=num("kafka_ts_ms", np.int64),
            codes=codes,
        )


@dataclass
class DecodeResult:
    batch: EventBatch
    rejects: list[Reject]
    # Positions (in the input list) of the rows of `batch`, and of each reject.
    accepted_positions: np.ndarray
    rejected_positions: np.ndarray


_PYDANTIC_TYPE_TO_CATEGORY = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "json_invalid": "invalid_json",
    "json_type": "invalid_json",
    "model_type": "not_an_object",
    "model_attributes_type": "not_an_object",
    "string_too_short": "missing_field",
}


def _category_of(err: ValidationError) -> tuple[str, str]:
    errors = err.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"type": "unknown", "loc": (), "msg": str(err)}
    etype = first.get("type", "unknown")
    loc = ".".join(str(p) for p in first.get("loc", ()))
    category = _PYDANTIC_TYPE_TO_CATEGORY.get(etype, "wrong_type")
    if category == "invalid_json" and loc == "":
        pass
    elif loc == "" and etype.endswith("_type"):
        category = "not_an_object"
    msg = first.get("msg", "")
    extra = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f"{loc}: " if loc else ""
    return category, f"{where}{msg} [{etype}]{extra}"[:500]


class _DupDict(dict):
    """A parsed JSON object that had a duplicate key: `dup` is its path, from this object."""

    __slots__ = ("dup",)


def _nested_dup(v: Any) -> tuple | None:
    if isinstance(v, _DupDict):
        return v.dup
    if isinstance(v, list):
        for i, x in enumerate(v):
            inner = _nested_dup(x)
            if inner is not None:
                return (i, *inner)
    return None


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    dup: tuple | None = None
    for k, v in pairs:
        if dup is None:
            if k in out:
                dup = (k,)
            else:
                inner = _nested_dup(v)
                if inner is not None:
                    dup = (k, *inner)
        out[k] = v
    if dup is None:
        return out
    marked = _DupDict(out)
    marked.dup = dup
    return marked


def _duplicate_key(raw: bytes) -> tuple[str, str] | None:
    """Exact check: (where, key) of the first duplicate object key in `raw`, or None."""
    doc = json.loads(raw, object_pairs_hook=_pairs_hook)
    path = _nested_dup(doc)
    if path is None:
        return None
    where = ""
    for seg in path[:-1]:
        where += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if where else seg)
    return where, path[-1]


def _check_duplicate_keys(raw: bytes, ev: Event) -> tuple[str, str] | None:
    """Reject a JSON object with a repeated key: pydantic keeps the last one silently,
    so a second `event_id` would bypass dedup and tracing, a second label the range check
    of the first.

    Cheap first, by counting quote bytes: `raw` has 2 per key and per string value, plus
    one per escaped quote. Every key and string value the validated Event kept came from
    its own token in `raw` (top-level fields, labels, user_features: nothing else may be
    an object, and strict mode turns no string into a number), so if `raw` has exactly
    2 x (kept keys + kept strings) quotes, it has no other key: none was repeated. Any
    other count (escaped quotes, ignored unknown fields, or a repeat) takes the exact
    check, a second parse with a pairs hook.
    """
    fields = ev.model_fields_set
    feats = ev.user_features
    strings = 3 + ("scenario" in fields) + (ev.item_text is not None) + (ev.query is not None)
    for v in feats.values():
        if v.__class__ is str:
            strings += 1
    if raw.count(b'"') == 2 * (len(fields) + len(ev.labels) + len(feats) + strings):
        return None
    try:
        found = _duplicate_key(raw)
    except (ValueError, RecursionError) as e:  # what pydantic parsed, Python's json should too
        return "invalid_json", f"not parseable for the duplicate-key check: {e}"[:500]
    if found is None:
        return None
    where, key = found
    return "invalid_json", f"{where + ': ' if where else ''}duplicate key {key!r}"[:500]


def check_limits(ev: Event, limits: EventLimits, now_ms: int) -> tuple[str, str] | None:
    for name in ("event_id", "user_id", "item_id", "scenario"):
        if len(getattr(ev, name)) > limits.max_id_len:
            return "limit_exceeded", f"{name}: longer than max_id_len={limits.max_id_len}"
    for name in ("item_text", "query"):
        v = getattr(ev, name)
        if v is not None and len(v) > limits.max_text_len:
            return "limit_exceeded", f"{name}: longer than max_text_len={limits.max_text_len}"
    if not ev.labels:
        return "missing_field", "labels: at least one label is required"
    if len(ev.labels) > limits.max_labels:
        return "limit_exceeded", f"labels: more than max_labels={limits.max_labels}"
    specs = limits.labels
    for k, v in ev.labels.items():
        if not math.isfinite(v):
            return "non_finite_label", f"labels.{k}: {v!r} is not finite"
        if len(k) > limits.max_feature_key_len:
            return "limit_exceeded", f"labels: key longer than {limits.max_feature_key_len}"
        spec = specs.get(k)  # checked inline: this runs for every label of every event
        if spec is not None and not (
            (v == 0.0 or v == 1.0)
            if spec.binary
            else (spec.min is None or v >= spec.min) and (spec.max is None or v <= spec.max)
        ):
            return "label_out_of_range", (
                f"labels.{k}: {v!r} is not in {spec.describe()}, the values allowed for task {k!r}"
            )
    if len(ev.user_features) > limits.max_features:
        return "limit_exceeded", f"user_features: more than max_features={limits.max_features}"
    for k, v in ev.user_features.items():
        if len(k) > limits.max_feature_key_len:
            return "limit_exceeded", f"user_features: key longer than {limits.max_feature_key_len}"
        if isinstance(v, str):
            if len(v) > limits.max_feature_value_len:
                return "limit_exceeded", f"user_features.{k}: value too long"
        elif not math.isfinite(v):
            return "wrong_type", f"user_features.{k}: {v!r} is not finite"
    if ev.ts_ms < limits.min_ts_ms:
        return "bad_timestamp", f"ts_ms: {ev.ts_ms} is before min_ts_ms={limits.min_ts_ms}"
    if ev.ts_ms > now_ms + limits.max_future_skew_ms:
        return "bad_timestamp", f"ts_ms: {ev.ts_ms} is more than {limits.max_future_skew_ms} ms in the future"
    return None


def precheck(raw: Any, limits: EventLimits) -> tuple[bytes, None] | tuple[None, Reject]:
    """The value as bytes, or the reject of a null, empty, oversized or non-bytes value
    (the checks every format shares, before it is parsed)."""
    if raw is None:
        return None, Reject(b"", "empty", "value is null (tombstone or empty message)")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    elif not isinstance(raw, (bytes, bytearray, memoryview)):
        return None, Reject(
            repr(raw)[:1024].encode(), "wrong_type", f"value of type {type(raw).__name__}, expected bytes"
        )
    raw = bytes(raw)
    if len(raw) == 0:
        return None, Reject(raw, "empty", "value is empty")
    if len(raw) > limits.max_message_bytes:
        return None, Reject(
            raw, "too_large", f"value is {len(raw)} bytes, max_message_bytes={limits.max_message_bytes}"
        )
    return raw, None


def decode_one(
    raw: Any, limits: EventLimits, now_ms: int | None = None
) -> tuple[Event | None, Reject | None]:
    """Validate one raw Kafka value; exactly one of the results is not None."""
    try:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        raw, rej = precheck(raw, limits)
        if rej is not None:
            return None, rej
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, Reject(raw, "invalid_utf8", f"not UTF-8: {e.reason} at byte {e.start}")
        model = EventLoose if limits.allow_unknown_fields else Event
        try:
            ev = model.model_validate_json(raw)
        except ValidationError as e:
            cat, reason = _category_of(e)
            return None, Reject(raw, cat, reason)
        bad = _check_duplicate_keys(raw, ev) or check_limits(ev, limits, now_ms)
        if bad is not None:
            return None, Reject(raw, bad[0], bad[1])
        return ev, None
    except Exception as e:  # never raise on input; an unexpected error is still a reject
        return None, unexpected_reject(raw, e, "wrong_type")


def unexpected_reject(raw: Any, error: Exception, category: str) -> Reject:
    """The reject of a value whose decoding raised: a bug, but the consumer must go on."""
    data = raw if isinstance(raw, bytes) else repr(raw)[:1024].encode()
    return Reject(data, category, f"unexpected {type(error).__name__}: {error}"[:500])


def decode_batch(
    values: Sequence[Any],
    limits: EventLimits | None = None,
    *,
    kafka_partition: Sequence[int] | None = None,
    kafka_offset: Sequence[int] | None = None,
    kafka_ts_ms: Sequence[int] | None = None,
    now_ms: int | None = None,
    mapping: EventMapping | None = None,
    topic: str = "",
) -> DecodeResult:
    """Decode raw values into one columnar batch plus rejects. Never raises on input.

    `mapping` (EventFormat.mapping(): None for the native format) decodes a team's own
    format instead; `topic` and the Kafka positions feed its derived event ids.
    Duplicate event ids inside the batch are rejected after the first occurrence
    (cross-batch dedup is the consumer's job: it needs state).
    """
    limits = limits or EventLimits()
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    good: list[Event] = []
    pos_ok: list[int] = []
    rejects: list[Reject] = []
    pos_bad: list[int] = []
    seen: set[str] = set()
    positioned = kafka_partition is not None and kafka_offset is not None
    for i, raw in enumerate(values):
        if mapping is None:
            ev, rej = decode_one(raw, limits, now_ms)
        elif positioned:
            part, off = int(kafka_partition[i]), int(kafka_offset[i])  # type: ignore[index]
            ev, rej = mapping.decode_one(raw, limits, now_ms, topic, part, off)
        else:  # no positions: a derived event id says so in the reject
            ev, rej = mapping.decode_one(raw, limits, now_ms, topic)
        if ev is not None and ev.event_id in seen:
            data = raw.encode("utf-8", errors="surrogatepass") if isinstance(raw, str) else bytes(raw)
            ev, rej = None, Reject(data, "duplicate_event_id", f"event_id {ev.event_id!r} repeated in batch")
        if ev is None:
            rejects.append(rej)  # type: ignore[arg-type]
            pos_bad.append(i)
        else:
            seen.add(ev.event_id)
            good.append(ev)
            pos_ok.append(i)
    ok = np.asarray(pos_ok, dtype=np.int64)
    pick = lambda xs: None if xs is None else np.asarray(xs)[ok]
    batch = EventBatch.from_events(
        good,
        kafka_partition=pick(kafka_partition),
        kafka_offset=pick(kafka_offset),
        kafka_ts_ms=pick(kafka_ts_ms),
    )
    batch.id_codes()  # ids become integers here, once (the trainer's step hashes nothing)
    return DecodeResult(batch, rejects, ok, np.asarray(pos_bad, dtype=np.int64))
