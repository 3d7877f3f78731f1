"""`memstream schema` and `memstream check-format`: a topic's event format, shown and tried.

`schema` prints the JSON Schema of memstream's own event, or, given a mapping
(`--config` with a `kafka.event_format`, or `--format` a YAML file holding one), that
mapping in readable form: each Event field and where it comes from.

`check-format` runs the mapping over a sample, one value per line (JSONL; for an Avro
format, each line is the decoded record as plain JSON, unions unwrapped), and prints
for each line the event it becomes or why it is rejected: the same decoder and the
same limits as the readers. Exit 1 if any line is rejected, so it can gate a
producer's change in CI. Line N is decoded as if it were at offset N-1 of partition 0
(what a derived `position` event id shows).

Only argparse at import time (the arguments run for every `memstream` invocation).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream.errors import MemstreamError

if TYPE_CHECKING:
    from stream.ingest.event_format import EventFormat
    from stream.ingest.events import EventLimits


class FormatError(MemstreamError):
    pass


def _add_format_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="memstream config whose kafka.event_format (and limits) to use")
    p.add_argument(
        "--format",
        dest="format_file",
        metavar="F",
        help="YAML file with an event format: a memstream config, or just its event_format section",
    )


def add_schema_arguments(p: argparse.ArgumentParser) -> None:
    _add_format_source(p)


def add_check_format_arguments(p: argparse.ArgumentParser) -> None:
    _add_format_source(p)
    p.add_argument("--sample", required=True, metavar="F.jsonl", help="one value per line")
    p.add_argument("--topic", help="topic name for derived event ids (default: kafka.topic)")
    p.add_argument("--quiet", action="store_true", help="print rejected lines and the summary only")


def load_format(args: argparse.Namespace) -> tuple[EventFormat, EventLimits, str]:
    """The format, the limits and the topic named by --config / --format (defaults: native)."""
    from stream.config import MemstreamConfig, load_config

    if args.config and args.format_file:
        raise FormatError("give --config or --format, not both")
    if args.format_file:
        raw = _read_yaml(args.format_file)
        if "kafka" in raw or "model" in raw:  # a whole memstream config
            cfg = load_config(args.format_file)
        else:
            section = raw.get("event_format", raw)
            cfg = _config_with_format(section, args.format_file)
    elif args.config:
        cfg = load_config(args.config)
    else:
        cfg = MemstreamConfig()
    topic = getattr(args, "topic", None) or cfg.kafka.topic
    return cfg.kafka.event_format, cfg.kafka.limits, topic


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise FormatError(f"{path} is not YAML: {e}") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{path} must hold a mapping (an event_format section or a memstream config)")
    return raw


def _config_with_format(section: Any, source: str):
    """A default config with `section` as kafka.event_format: its errors name the field."""
    from stream.config import config_from_dict

    return config_from_dict({"kafka": {"event_format": section}}, source)


def schema(args: argparse.Namespace) -> int:
    import json

    from stream.ingest.events import event_json_schema

    fmt, _, _ = load_format(args)
    if fmt.native:
        print(json.dumps(event_json_schema(), indent=2))
    else:
        print(fmt.describe())
    return 0


def check_format(args: argparse.Namespace) -> int:
    import time

    fmt, limits, topic = load_format(args)
    try:
        lines = Path(args.sample).read_bytes().splitlines()
    except OSError as e:
        raise FormatError(f"cannot read --sample {args.sample}: {e.strerror}") from None
    decode = _line_decoder(fmt, limits, topic, int(time.time() * 1000))
    seen: set[str] = set()
    mapped = rejected = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        ev, rej = decode(line, number - 1)
        if ev is not None and ev.event_id in seen:
            ev, rej = None, _duplicate(line, ev.event_id)
        if ev is None:
            rejected += 1
            print(f"line {number}: rejected [{rej.category}] {rej.reason}")
        else:
            seen.add(ev.event_id)
            mapped += 1
            if not args.quiet:
                print(f"line {number}: ok {ev.model_dump_json(exclude_none=True)}")
    print(
        f"{args.sample}: {mapped + rejected} values, {mapped} mapped, {rejected} rejected ({fmt.kind} format)"
    )
    return 1 if rejected else 0


def _duplicate(line: bytes, event_id: str):
    from stream.ingest.events import Reject

    return Reject(line, "duplicate_event_id", f"event_id {event_id!r} repeated in the sample")


def _line_decoder(fmt: EventFormat, limits: EventLimits, topic: str, now_ms: int):
    """(line, offset) -> (Event, None) | (None, Reject), as the readers decode values."""
    from stream.ingest.events import decode_one

    if fmt.native:
        return lambda line, offset: decode_one(line, limits, now_ms)
    if fmt.kind == "avro":
        # Sample lines are the records as JSON: map them without the Avro decoding.
        fmt = fmt.model_copy(update={"kind": "json", "avro": None})
    mapping = fmt.mapping()
    return lambda line, offset: mapping.decode_one(line, limits, now_ms, topic, 0, offset)
