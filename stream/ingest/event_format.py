"""A team's own event format: `kafka.event_format` maps its JSON (or Avro) onto the Event.

The default, `kind: native`, is memstream's own JSON event (stream/ingest/events.py)
and none of this runs. With `kind: json` or `kind: avro` each Kafka value is parsed
(JSON, or Avro with stream/ingest/avro.py), then every Event field is read from the
parsed document by a declared source:

    user_id: payload.user.id                 # a dotted path (list indices: items[0].id)
    scenario: {const: feed}                  # a constant
    ts_ms: {path: meta.time, unit: iso}      # ms | s | iso | auto
    labels: {like: {path: payload.liked, coerce: bool}}
    item_text: {parts: [item.title, {path: item.genres, prefix: "genres: "}], separator: " | "}
    event_id: {derive: position}             # topic/partition/offset, when events have none

A value that does not fit is a reject with category `mapping_failed` and a reason
naming the source path (`mapping: payload.user.id: missing`); the mapped event then
goes through the same validation as a native one (limits, label specs).

Cost: paths are compiled once into tuples of keys and each field into one closure,
so mapping an event is a few dict lookups per field (no regex, no pydantic
validation of the intermediate dict).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stream.ingest.events import Event, EventLimits, Reject, check_limits, precheck, unexpected_reject

MISSING: Any = object()
Scalar = str | int | float | bool


# -- paths --------------------------------------------------------------------


def parse_path(text: str) -> tuple[str | int, ...]:
    """`a.b[0].c` -> ("a", "b", 0, "c"); ValueError saying what is wrong otherwise.

    Runs once per path at config load; keys containing `.` or `[` cannot be written.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a path must be a non-empty string like payload.user.id")
    keys: list[str | int] = []
    for segment in text.split("."):
        name, bracket, rest = segment.partition("[")
        if not name and not (bracket and keys):
            raise ValueError(f"path {text!r}: empty key (two dots, or a leading/trailing dot)")
        if name:
            keys.append(name)
        while bracket:
            index, close, rest = rest.partition("]")
            try:
                keys.append(int(index))
            except ValueError:
                raise ValueError(f"path {text!r}: [{index}] is not a list index") from None
            if not close:
                raise ValueError(f"path {text!r}: [ without ]")
            if rest and not rest.startswith("["):
                raise ValueError(f"path {text!r}: unexpected {rest!r} after ]")
            bracket, rest = (rest[:1], rest[1:]) if rest else ("", "")
    return tuple(keys)


def compile_getter(keys: tuple[str | int, ...]) -> Callable[[Any], Any]:
    """doc -> the value at `keys`, or MISSING (an absent key, an index out of range, or
    a step into something that is not an object/list)."""
    if len(keys) == 1 and isinstance(keys[0], str):
        (key,) = keys
        return lambda doc: doc.get(key, MISSING) if doc.__class__ is dict else MISSING

    def get(doc: Any) -> Any:
        for k in keys:
            if doc.__class__ is dict:
                if k.__class__ is int:
                    return MISSING
                doc = doc.get(k, MISSING)
                if doc is MISSING:
                    return MISSING
            elif doc.__class__ is list and k.__class__ is int and -len(doc) <= k < len(doc):
                doc = doc[k]
            else:
                return MISSING
        return doc

    return get


class MappingFailed(Exception):
    """One field that could not be mapped; str() is the reject reason."""


def _fail(path: str, what: str) -> MappingFailed:
    return MappingFailed(f"mapping: {path}: {what}")


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", type(None): "null"}.get(
        v.__class__, f"a {type(v).__name__}"
    )


# -- coercions: value -> what the Event field holds, or raise ValueError(what is wrong) --


def to_id(v: Any) -> str:
    """String and number ids become strings; 12.0 -> "12" (JSON writers emit those)."""
    cls = v.__class__
    if cls is str:
        if not v:
            raise ValueError("empty string")
        return v
    if cls is int:
        return str(v)
    if cls is float and math.isfinite(v) and v.is_integer():
        return str(int(v))
    raise ValueError(f"{_kind(v)} ({v!r:.40}), expected a string or integer id")


def _number(v: Any) -> float:
    if v.__class__ in (int, float):
        return v
    if v.__class__ is str:
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{v!r:.40} is not a number") from None
    raise ValueError(f"{_kind(v)}, expected a number")


def _iso_ms(text: str) -> int:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r:.40} is not an ISO-8601 timestamp") from None
    return _datetime_ms(dt)


def _datetime_ms(dt: datetime) -> int:
    if dt.tzinfo is None:  # a timestamp without an offset is read as UTC
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _epoch_ms(x: float, scale: float) -> int:
    try:
        ms = x * scale
        if not math.isfinite(ms):
            raise ValueError(f"{x!r} is not a finite timestamp")
        return int(round(ms))
    except OverflowError:  # an integer beyond float range
        raise ValueError(f"{x!r:.40} is out of range for a timestamp") from None


# Seconds vs milliseconds for `unit: auto`: 1e11 ms is March 1973, 1e11 s the year 5138.
_AUTO_MS_FROM = 1e11


def timestamp_coercion(unit: str) -> Callable[[Any], int]:
    def coerce(v: Any) -> int:
        if v.__class__ is bool:
            raise ValueError("a boolean, expected a timestamp")
        if isinstance(v, datetime):  # Avro timestamp-millis/-micros logical types
            return _datetime_ms(v)
        if unit == "iso":
            if v.__class__ is not str:
                raise ValueError(f"{_kind(v)}, expected an ISO-8601 string")
            return _iso_ms(v)
        if v.__class__ is str and unit == "auto":
            try:
                x = float(v)
            except ValueError:
                return _iso_ms(v)
        else:
            x = _number(v)
        if unit == "s":
            return _epoch_ms(x, 1000.0)
        if unit == "ms":
            return _epoch_ms(x, 1.0)
        return _epoch_ms(x, 1.0 if abs(x) >= _AUTO_MS_FROM else 1000.0)

    return coerce


_TRUE = {"true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0, "yes": 1.0, "no": 0.0}


def label_coercion(coerce: str | None, values: dict[str, float] | None) -> Callable[[Any], float]:
    def plain(v: Any) -> float:
        if v.__class__ in (int, float):
            return float(v)
        hint = (
            "; add coerce: bool"
            if v.__class__ is bool
            else "; add coerce: number"
            if v.__class__ is str
            else ""
        )
        raise ValueError(f"{_kind(v)}, expected a number{hint}")

    def number(v: Any) -> float:
        if v.__class__ is bool:
            raise ValueError("a boolean, expected a number; use coerce: bool")
        return float(_number(v))

    def boolean(v: Any) -> float:
        if v.__class__ is bool:
            return 1.0 if v else 0.0
        if v.__class__ in (int, float) and v in (0, 1):
            return float(v)
        if v.__class__ is str and v.lower() in _TRUE:
            return _TRUE[v.lower()]
        raise ValueError(f"{v!r:.40} is not a boolean (true/false, 1/0, yes/no)")

    base = {"bool": boolean, "number": number, None: plain}[coerce]
    if values is None:
        return base

    def lookup(v: Any) -> float:
        if v.__class__ is str:
            x = values.get(v)
            if x is None:
                raise ValueError(f"{v!r:.40} is not one of {sorted(values)}")
            return x
        return base(v)

    return lookup


def feature_coercion(kind: str) -> Callable[[Any], str | float]:
    def auto(v: Any) -> str | float:
        cls = v.__class__
        if cls is str:
            return v
        if cls is bool:
            return "true" if v else "false"
        if cls in (int, float):
            return float(v)
        raise ValueError(f"{_kind(v)}, expected a string or a number")

    def category(v: Any) -> str:
        if v.__class__ is bool:
            return "true" if v else "false"
        if v.__class__ in (str, int):
            return str(v)
        return to_id(v)

    def number(v: Any) -> float:
        if v.__class__ is bool:
            return 1.0 if v else 0.0
        return float(_number(v))

    return {"auto": auto, "category": category, "number": number}[kind]


def to_text(v: Any) -> str:
    """A string, a number, or a list of those (joined by ', ': a genres list)."""
    cls = v.__class__
    if cls is str:
        return v
    if cls in (int, float):
        return str(v)
    if cls is list and all(x.__class__ in (str, int, float) for x in v):
        return ", ".join(str(x) for x in v)
    raise ValueError(f"{_kind(v)}, expected text")


# -- the config ----------------------------------------------------------------


class Source(BaseModel):
    """Where one field's value comes from: `path` (with an optional `default` when it is
    missing or null) or `const`. Written as a bare string, it is a path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None
    const: Scalar | None = None
    default: Scalar | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data

    @field_validator("path")
    @classmethod
    def _parses(cls, v: str | None) -> str | None:
        if v is not None:
            parse_path(v)
        return v

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        self.check_source()
        return self

    def check_source(self) -> None:
        if (self.path is None) == (self.const is None):
            raise ValueError("give exactly one of path (a dotted path) or const (a value)")
        if self.const is not None and self.default is not None:
            raise ValueError("default goes with path, not with const")

    def describe(self) -> str:
        if self.const is not None:
            return f"constant {self.const!r}"
        return self.path + (f" (default {self.default!r})" if self.default is not None else "")


class TimestampSource(Source):
    # ms | s: epoch numbers (or numeric strings); iso: ISO-8601 strings (no offset = UTC);
    # auto: numbers >= 1e11 are ms, smaller ones seconds, other strings ISO-8601.
    unit: Literal["ms", "s", "iso", "auto"] = "ms"

    def describe(self) -> str:
        return f"{super().describe()} [{self.unit}]"


class EventIdSource(Source):
    """A path or const like any source, or `derive`: `position` is topic/partition/offset
    (unique per message, but a replay into another topic or offset gives new ids);
    `content` is a hash of the value bytes (stable across replays; byte-identical
    messages, e.g. a producer's retries, get one id and the repeats are dropped as
    duplicates)."""

    derive: Literal["position", "content"] | None = None

    def check_source(self) -> None:
        if self.derive is not None:
            if self.path is not None or self.const is not None:
                raise ValueError("give derive, or a path, not both")
            return
        if self.const is not None:
            raise ValueError("a constant event_id would make every event a duplicate; use derive")
        super().check_source()

    def describe(self) -> str:
        if self.derive == "position":
            return "derived: <topic>/<partition>/<offset>"
        if self.derive == "content":
            return "derived: hash of the value bytes"
        return super().describe()


class LabelSource(Source):
    # None: numbers only; number: numeric strings too; bool: true/false, 1/0, yes/no -> 1/0.
    coerce: Literal["number", "bool"] | None = None
    # String values -> label values, e.g. {click: 1, skip: 0}; other values use `coerce`.
    values: dict[str, float] | None = None

    def describe(self) -> str:
        extra = f" as {self.coerce}" if self.coerce else ""
        extra += f" mapped {self.values}" if self.values else ""
        return super().describe() + extra


class FeatureSource(Source):
    # auto: strings stay categorical, numbers numeric, booleans "true"/"false".
    kind: Literal["auto", "category", "number"] = "auto"

    def describe(self) -> str:
        return super().describe() + ("" if self.kind == "auto" else f" as {self.kind}")


class TextPart(Source):
    prefix: str = ""
    suffix: str = ""


class TextSource(BaseModel):
    """Text concatenated from parts (a path or a const each), `separator` between them;
    a part that is missing, null or empty is skipped with its prefix and suffix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parts: list[TextPart] = Field(min_length=1)
    separator: str = " "

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: Any) -> Any:
        return {"parts": [data]} if isinstance(data, str) else data

    def describe(self) -> str:
        """A template: `{title} | genres: {tags}` (missing parts are skipped)."""
        parts = (f"{p.prefix}{{{p.path}}}{p.suffix}" if p.path else str(p.const) for p in self.parts)
        return f"{self.separator.join(parts)!r} (missing parts skipped)"


class AvroOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The `.avsc` the values were written with (raw), or the reader schema (confluent).
    schema_file: str | None = None
    # A Confluent-compatible schema registry; set = the Confluent wire format by default.
    registry_url: str | None = None
    # raw: a bare Avro datum; confluent: magic byte 0 + 4-byte schema id + datum.
    wire_format: Literal["raw", "confluent"] | None = None
    registry_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _usable(self) -> Self:
        if self.schema_file is None and self.registry_url is None:
            raise ValueError("give schema_file (an .avsc), registry_url, or both")
        if self.layout == "raw" and self.schema_file is None:
            raise ValueError("wire_format raw needs schema_file")
        if self.registry_url is not None and not self.registry_url.startswith(("http://", "https://")):
            raise ValueError(f"registry_url {self.registry_url!r} must start with http:// or https://")
        if self.schema_file is not None:
            from stream.ingest.avro import load_schema_file

            load_schema_file(self.schema_file)  # AvroSchemaError is a ValueError: names the field
        return self

    @property
    def layout(self) -> str:
        return self.wire_format or ("confluent" if self.registry_url else "raw")


_MAPPED_FIELDS = (
    "event_id",
    "ts_ms",
    "user_id",
    "item_id",
    "scenario",
    "labels",
    "user_features",
    "item_text",
    "query",
)


class EventFormat(BaseModel):
    """How a topic's values become events (README "Your event format")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["native", "json", "avro"] = "native"
    avro: AvroOptions | None = None
    event_id: EventIdSource | None = None
    ts_ms: TimestampSource | None = None
    user_id: Source | None = None
    item_id: Source | None = None
    scenario: Source | None = None  # None: the constant "feed", the native default
    labels: dict[str, LabelSource] = Field(default_factory=dict)
    user_features: dict[str, FeatureSource] = Field(default_factory=dict)
    item_text: TextSource | None = None
    query: Source | None = None

    @model_validator(mode="after")
    def _complete(self) -> Self:
        # What differs from the defaults: a config file is merged over a dump of them.
        defaults = EventFormat.model_fields
        given = {
            f
            for f in _MAPPED_FIELDS
            if getattr(self, f) != defaults[f].get_default(call_default_factory=True)
        }
        if self.kind == "native":
            if given or self.avro is not None:
                raise ValueError(
                    f"{', '.join(sorted(given | ({'avro'} if self.avro else set())))}: a mapping needs "
                    "kind: json or kind: avro (kind: native is memstream's own event, unmapped)"
                )
            return self
        missing = [f for f in ("event_id", "ts_ms", "user_id", "item_id") if getattr(self, f) is None]
        if not self.labels:
            missing.append("labels")
        if missing:
            raise ValueError(f"kind {self.kind} needs a source for {', '.join(missing)}")
        if (self.kind == "avro") != (self.avro is not None):
            raise ValueError("kind: avro goes with an avro: section (schema_file / registry_url), only")
        if self.avro is not None and self.avro.schema_file is not None:
            self._check_paths_in_schema()
        EventMapping(self)  # a const or default the field cannot hold fails here, at load
        return self

    def _check_paths_in_schema(self) -> None:
        """Each path's first key must be a field of the schema file's record: a typo fails at load."""
        from stream.ingest.avro import load_schema_file, record_field_names

        names = record_field_names(load_schema_file(self.avro.schema_file))
        if names is None:
            return
        for target, src in self.sources():
            if src.path is not None and parse_path(src.path)[0] not in names:
                raise ValueError(
                    f"{target}: path {src.path!r} starts with a field the schema {self.avro.schema_file} "
                    f"does not have (it has {', '.join(sorted(names))})"
                )

    def sources(self) -> list[tuple[str, Source]]:
        """(target field, source) for every declared source, in Event field order."""
        out: list[tuple[str, Source]] = []
        for name in ("event_id", "ts_ms", "user_id", "item_id", "scenario"):
            src = getattr(self, name)
            if src is not None or name == "scenario":
                out.append((name, src or _FEED))
        out += [(f"labels.{k}", v) for k, v in self.labels.items()]
        out += [(f"user_features.{k}", v) for k, v in self.user_features.items()]
        if self.item_text is not None:
            out += [(f"item_text[{i}]", p) for i, p in enumerate(self.item_text.parts)]
        if self.query is not None:
            out.append(("query", self.query))
        return out

    @property
    def native(self) -> bool:
        return self.kind == "native"

    def mapping(self) -> EventMapping | None:
        """The compiled mapping, or None for the native format. Compile once per consumer
        and keep it (it holds the Avro schema cache); the config itself stays plain data,
        so it pickles to the ingest actors."""
        return None if self.native else EventMapping(self)

    def describe(self) -> str:
        """The mapping in readable form (`memstream schema`)."""
        if self.native:
            return "kind: native (memstream's own JSON event; `memstream schema` without a mapping prints it)"
        lines = [f"kind: {self.kind}"]
        if self.avro is not None:
            a = self.avro
            lines.append(
                f"avro: {a.layout} layout"
                + (f", schema file {a.schema_file}" if a.schema_file else "")
                + (f", registry {a.registry_url}" if a.registry_url else "")
            )
        width = max(len(t) for t, _ in self.sources()) if self.sources() else 0
        for target, src in self.sources():
            if target.startswith("item_text[") and target != "item_text[0]":
                continue
            text = self.item_text.describe() if target == "item_text[0]" else src.describe()
            name = "item_text" if target == "item_text[0]" else target
            lines.append(f"  {name:<{width}} <- {text}")
        return "\n".join(lines)


# -- the compiled mapping --------------------------------------------------------


def _field(target: str, src: Source, coerce: Callable[[Any], Any], required: bool):
    """doc -> the coerced value (None when optional and absent), raising MappingFailed."""
    if src.const is not None:
        try:
            value = coerce(src.const)
        except ValueError as e:  # a const that cannot be this field: say so at load
            raise ValueError(f"{target}: constant {src.const!r}: {e}") from None
        return lambda doc: value
    get = compile_getter(parse_path(src.path))
    path = src.path
    default = src.default
    if default is not None:
        try:
            default = coerce(default)
        except ValueError as e:
            raise ValueError(f"{target}: default {src.default!r}: {e}") from None

    def read(doc: Any) -> Any:
        v = get(doc)
        if v is MISSING or v is None:
            if default is not None:
                return default
            if required:
                raise _fail(path, "missing" if v is MISSING else "null")
            return None
        try:
            return coerce(v)
        except (ValueError, OverflowError) as e:  # OverflowError: float(10**400)
            raise _fail(path, str(e)) from None

    return read


def _text_field(spec: TextSource):
    parts = [(_field("item_text", p, to_text, required=False), p.prefix, p.suffix) for p in spec.parts]
    sep = spec.separator

    def read(doc: Any) -> str | None:
        out = []
        for get, prefix, suffix in parts:
            v = get(doc)
            if v:
                out.append(f"{prefix}{v}{suffix}" if prefix or suffix else v)
        return sep.join(out) if out else None

    return read


_FEED = Source(const="feed")


class EventMapping:
    """A compiled EventFormat: raw value -> (Event, None) or (None, Reject)."""

    def __init__(self, fmt: EventFormat):
        self.format = fmt
        self._parse = self._parser(fmt)
        eid = fmt.event_id
        self._derive = eid.derive
        self._event_id = None if eid.derive else _field("event_id", eid, to_id, required=True)
        self._ts = _field("ts_ms", fmt.ts_ms, timestamp_coercion(fmt.ts_ms.unit), required=True)
        self._user = _field("user_id", fmt.user_id, to_id, required=True)
        self._item = _field("item_id", fmt.item_id, to_id, required=True)
        self._scenario = _field("scenario", fmt.scenario or _FEED, to_id, required=True)
        self._labels = [
            (k, _field(f"labels.{k}", s, label_coercion(s.coerce, s.values), required=False))
            for k, s in fmt.labels.items()
        ]
        self._features = [
            (k, _field(f"user_features.{k}", s, feature_coercion(s.kind), required=False))
            for k, s in fmt.user_features.items()
        ]
        self._text = _text_field(fmt.item_text) if fmt.item_text is not None else None
        self._query = _field("query", fmt.query, to_text, required=False) if fmt.query else None

    @staticmethod
    def _parser(fmt: EventFormat) -> Callable[[bytes], Any]:
        if fmt.kind == "json":
            return _parse_json
        from stream.ingest.avro import AvroDecoder, SchemaRegistry, load_schema_file

        a = fmt.avro
        reader = load_schema_file(a.schema_file) if a.schema_file else None
        registry = SchemaRegistry(a.registry_url, a.registry_timeout_s) if a.registry_url else None
        return AvroDecoder(reader, registry, a.layout).decode

    def event_from(self, doc: Any, raw: bytes, topic: str, partition: int, offset: int) -> Event:
        """The Event the mapping makes of a parsed document; MappingFailed if a field does not fit."""
        if doc.__class__ is not dict:
            raise MappingFailed(f"mapping: the value is {_kind(doc)}, expected an object (a record)")
        if self._derive == "position":
            if partition < 0:
                raise MappingFailed("mapping: event_id: derive position needs the Kafka position")
            event_id = f"{topic}/{partition}/{offset}"
        elif self._derive == "content":
            event_id = hashlib.blake2b(raw, digest_size=12).hexdigest()
        else:
            event_id = self._event_id(doc)
        labels = {}
        for k, read in self._labels:
            v = read(doc)
            if v is not None:
                labels[k] = v
        features = {}
        for k, read in self._features:
            v = read(doc)
            if v is not None:
                features[k] = v
        # model_construct: every value above already has the Event field's type, and the
        # limits below check the rest; a second validation would double the cost.
        return Event.model_construct(
            event_id=event_id,
            ts_ms=self._ts(doc),
            user_id=self._user(doc),
            item_id=self._item(doc),
            scenario=self._scenario(doc),
            labels=labels,
            user_features=features,
            item_text=self._text(doc) if self._text is not None else None,
            query=self._query(doc) if self._query is not None else None,
        )

    def decode_one(
        self,
        raw: Any,
        limits: EventLimits,
        now_ms: int,
        topic: str = "",
        partition: int = -1,
        offset: int = -1,
    ) -> tuple[Event | None, Reject | None]:
        """Like events.decode_one, for this format: never raises on input."""
        try:
            data, rej = precheck(raw, limits)
            if rej is not None:
                return None, rej
            try:
                doc = self._parse(data)
            except _ParseError as e:
                return None, Reject(data, e.category, str(e))
            except ValueError as e:  # AvroValueError
                return None, Reject(data, "invalid_avro", f"avro: {e}"[:500])
            try:
                ev = self.event_from(doc, data, topic, partition, offset)
            except MappingFailed as e:
                return None, Reject(data, "mapping_failed", str(e)[:500])
            bad = check_limits(ev, limits, now_ms)
        except Exception as e:  # never raise on input; an unexpected error is still a reject
            return None, unexpected_reject(raw, e, "mapping_failed")
        return (ev, None) if bad is None else (None, Reject(data, bad[0], bad[1]))


class _ParseError(ValueError):
    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category = category


def _no_constants(name: str) -> Any:
    raise _ParseError("invalid_json", f"{name} is not JSON")


def _parse_json(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _ParseError("invalid_utf8", f"not UTF-8: {e.reason} at byte {e.start}") from None
    try:
        doc = json.loads(text, parse_constant=_no_constants)
    except _ParseError:
        raise
    except (ValueError, RecursionError) as e:
        raise _ParseError("invalid_json", f"not JSON: {e}"[:500]) from None
    if doc.__class__ is not dict:
        raise _ParseError("not_an_object", f"the value is {_kind(doc)}, expected a JSON object")
    return doc
