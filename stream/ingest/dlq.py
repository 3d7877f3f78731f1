"""Dead-letter writer: rejected messages go to `<topic>.dlq`, never dropped silently.

Each dead letter keeps the original bytes as its value (so it can be fixed and
re-produced as is) and the original key when known, and says why in headers:

- `memstream.reason`: the human-readable reason (stream.ingest.events.Reject.reason)
- `memstream.category`: one of stream.ingest.events.REJECT_CATEGORIES, to count and alert on
- `memstream.source`: `topic/partition/offset` of the original message, or just
  the topic when its position is unknown
- `memstream.truncated_from`: only on a value longer than `max_value_bytes`
  (a 10 MB poison message): the original size; the value is its first
  `max_value_bytes` bytes, so the dead letter fits the broker's and the
  producer's request limits and the reader's memory stays bounded

Sends are batched by the producer (linger); nothing flushes per message. A
failed send is logged and counted (`failed`), and `flush()` raises
DeadLetterError if any send failed since the last flush, so a caller that
flushes before committing offsets never commits past a lost dead letter.

Poison events (PoisonDeadLetters, the trainer's port) are dead-lettered exactly once
across trainer restarts: the letter is written when the event is found, before the
checkpoint that moves past it, so a restart replays the event and finds it again.
The restarted trainer reads back the letters written since its checkpoint was
captured and skips the positions already there (see the class).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, Self

from stream.errors import MemstreamError
from stream.ingest.events import Reject
from stream.ingest.kafka_io import TopicError, dlq_topic, ensure_topic, options_for

log = logging.getLogger(__name__)

REASON_HEADER = "memstream.reason"
CATEGORY_HEADER = "memstream.category"
SOURCE_HEADER = "memstream.source"
TRUNCATED_HEADER = "memstream.truncated_from"
KEY_TRUNCATED_HEADER = "memstream.key_truncated_from"  # the key's length before it was cut
MAX_KEY_BYTES = 64 * 1024
POISON_CATEGORY = "poison"  # events whose training step fails (stream.train.service.POISON)
# Below kafka-python's default max_request_size (1 MiB) with room for key and headers.
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024 - 64 * 1024

__all__ = [
    "DeadLetterError",
    "DeadLetterWriter",
    "PoisonDeadLetters",
    "dead_lettered_positions",
    "dlq_topic",
    "source_label",
]


class DeadLetterError(MemstreamError):
    pass


def source_label(topic: str, partition: int | None = None, offset: int | None = None) -> str:
    if partition is None or partition < 0:
        return topic
    if offset is None or offset < 0:
        return f"{topic}/{partition}"
    return f"{topic}/{partition}/{offset}"


class DeadLetterWriter:
    """Writes rejects to one dead-letter topic (the `.dlq` topic itself, see dlq_topic())."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        **client_options: Any,
    ) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.max_value_bytes = max_value_bytes
        self._ensure_topic(bootstrap, client_options)
        config: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            # Dead letters are the only copy of what we refused: wait for all replicas.
            "acks": "all",
            "linger_ms": 50,
            # Fail a send within seconds when the topic cannot be reached, not a minute.
            "max_block_ms": 10_000,
        }
        config.update(options_for(KafkaProducer, client_options))
        self._producer = KafkaProducer(**config)
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self.sent = 0
        self.failed = 0

    def _ensure_topic(self, bootstrap: str, client_options: dict[str, Any]) -> None:
        try:
            ensure_topic(bootstrap, self.topic, 1, **client_options)
        except TopicError as e:
            # Maybe no CreateTopics ACL but the topic exists or auto-creates: sends will tell.
            log.warning("dead-letter topic %s not ensured: %s", self.topic, e)

    def send(
        self,
        reject: Reject,
        *,
        key: bytes | None = None,
        source: tuple[str, int | None, int | None] | str | None = None,
    ) -> None:
        """Queue one dead letter; `source` is (topic, partition, offset) or a label."""
        if isinstance(source, tuple):
            source = source_label(*source)
        headers = [
            (REASON_HEADER, reject.reason.encode("utf-8", errors="replace")),
            (CATEGORY_HEADER, reject.category.encode()),
        ]
        if source:
            headers.append((SOURCE_HEADER, source.encode("utf-8", errors="replace")))
        value = reject.raw
        if len(value) > self.max_value_bytes:
            headers.append((TRUNCATED_HEADER, str(len(value)).encode()))
            value = value[: self.max_value_bytes]
        if key is not None and len(key) > MAX_KEY_BYTES:
            headers.append((KEY_TRUNCATED_HEADER, str(len(key)).encode()))
            key = key[:MAX_KEY_BYTES]  # a hostile key must not make the letter unsendable
        try:
            future = self._producer.send(self.topic, value=value, key=key, headers=headers)
        except Exception as e:
            # (size, serialization); the caller is a poll thread that must not die.
            self._on_error(reject.category, source, e)
            return
        future.add_errback(self._on_error, reject.category, source)
        with self._lock:
            self.sent += 1

    def _on_error(self, category: str, source: str | None, exc: BaseException) -> None:
        log.error("dead letter (%s from %s) not written to %s: %r", category, source, self.topic, exc)
        with self._lock:
            self.failed += 1
            self._errors.append(exc)

    def flush_async(self) -> None:
        """Nothing to do: queued letters leave within linger_ms. Kept for callers that
        mark the end of a burst; use flush() where delivery must be confirmed."""

    def flush(self, timeout_s: float | None = 30.0) -> None:
        """Wait until every queued letter is acknowledged; raise if any was lost."""
        self._producer.flush(timeout=timeout_s)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise DeadLetterError(
                f"{len(errors)} dead letters could not be written to {self.topic!r} "
                f"(first: {errors[0]!r}); check the topic exists and the client may write it"
            )

    def close(self, timeout_s: float = 30.0) -> None:
        try:
            self.flush(timeout_s)
        finally:
            self._producer.close(timeout=timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def dead_lettered_positions(
    bootstrap: str,
    topic: str,
    *,
    source_topic: str,
    category: str,
    since_ms: int,
    timeout_s: float = 30.0,
    **client_options: Any,
) -> set[tuple[int, int]]:
    """(partition, offset) of the `source_topic` messages dead-lettered to `topic` as
    `category` by letters written at or after `since_ms` (their Kafka timestamps), up to
    the topic's end as of this call. Reads only that tail: what a restarted trainer's
    checkpoint does not cover."""
    from kafka import KafkaConsumer, TopicPartition

    from stream.ingest.kafka_io import topic_partition_count

    partitions = topic_partition_count(bootstrap, topic, **client_options) or 0
    if not partitions:
        return set()
    config: dict[str, Any] = {"bootstrap_servers": bootstrap, "enable_auto_commit": False}
    config.update(options_for(KafkaConsumer, client_options))
    consumer = KafkaConsumer(**config)
    found: set[tuple[int, int]] = set()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        starts = consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
        left = {}
        for tp in tps:
            at = starts.get(tp)
            # None, or -1 (or a timestamp of -1: what Tansu answers): nothing since since_ms
            if at is not None and at.timestamp >= 0 and 0 <= at.offset < ends[tp]:
                consumer.seek(tp, at.offset)
                left[tp] = ends[tp]
            else:
                consumer.pause(tp)
        deadline = time.monotonic() + timeout_s
        while left:
            if time.monotonic() > deadline:
                raise DeadLetterError(
                    f"reading back {topic!r} did not reach its end within {timeout_s:g} s "
                    f"({len(left)} partition(s) left); is the broker reachable?"
                )
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    if r.timestamp < since_ms:  # a broker may start a bit early
                        continue
                    pos = _position(r.headers, source_topic, category)
                    if pos is not None:
                        found.add(pos)
            for tp in [tp for tp, end in left.items() if consumer.position(tp) >= end]:
                del left[tp]
                consumer.pause(tp)
    finally:
        consumer.close()
    return found


def _position(
    headers: Iterable[tuple[str, bytes]], source_topic: str, category: str
) -> tuple[int, int] | None:
    """The (partition, offset) a letter names, if it is a `category` letter of `source_topic`."""
    h = dict(headers or ())
    if h.get(CATEGORY_HEADER) != category.encode():
        return None
    topic, _, rest = (h.get(SOURCE_HEADER) or b"").decode(errors="replace").rpartition("/")
    topic, _, partition = topic.rpartition("/")
    if topic != source_topic or not partition.isdigit() or not rest.isdigit():
        return None
    return int(partition), int(rest)


class PoisonDeadLetters:
    """The trainer's dead-letter port for poison events: each one written once, across restarts.

    The letter of a poison event is written (and flushed) when the trainer finds it,
    which is before the checkpoint that moves past it: after a crash, the restored
    trainer replays it, finds it poisoned again, and would write it a second time. So a
    trainer restored from a checkpoint captured at `resumed_at_s` reads back, at its
    first poison event, the poison letters of `source_topic` written since then (less
    `skew_s`, for clocks of another node), and skips the positions already there. What
    it reads is the tail since its checkpoint (the checkpoint interval's letters), and
    what it keeps is only the positions at or past the checkpoint's offsets (`floor`),
    each dropped once matched.

    Exactly once holds from a lineage's first checkpoint on; a trainer that crashes before
    its first checkpoint has nothing to bound the read-back with, and writes again what
    its replay finds (at least once, the letter's `memstream.source` header is the key a
    consumer dedups on).
    """

    def __init__(
        self,
        bootstrap: str,
        dlq: str,
        source_topic: str,
        *,
        resumed_at_s: float | None = None,
        floor: dict[int, int] | None = None,
        skew_s: float = 60.0,
        **client_options: Any,
    ) -> None:
        self.bootstrap, self.dlq, self.source_topic = bootstrap, dlq, source_topic
        self.client_options = client_options
        self._since_ms = None if resumed_at_s is None else int((resumed_at_s - skew_s) * 1000)
        self._floor = dict(floor or {})
        self._written: set[tuple[int, int]] | None = None  # read back at the first poison event
        self._writer: DeadLetterWriter | None = None
        self.skipped = 0  # poison events found again after a restart, already in the topic

    def _already_written(self) -> set[tuple[int, int]]:
        if self._written is None:
            written: set[tuple[int, int]] = set()
            if self._since_ms is not None:  # a failed read raises and is tried again next time
                back = dead_lettered_positions(
                    self.bootstrap,
                    self.dlq,
                    source_topic=self.source_topic,
                    category=POISON_CATEGORY,
                    since_ms=self._since_ms,
                    **self.client_options,
                )
                written = {(p, o) for p, o in back if o >= self._floor.get(p, 0)}
                log.info("%d poison letters since the checkpoint are in %s already", len(written), self.dlq)
            self._written = written
        return self._written

    def __call__(self, poisoned: list) -> None:
        """Write the letters of `poisoned` (stream.messages.PoisonedEvent) not already in
        the topic, and flush: raises DeadLetterError if one was not written."""
        written = self._already_written()
        fresh = []
        for ev in poisoned:
            pos = (ev.partition, ev.offset)
            if pos in written:
                written.discard(pos)  # the replay finds each one once
                self.skipped += 1
                log.info("poison event at partition %d offset %d is in %s already", *pos, self.dlq)
            else:
                fresh.append(ev)
        if not fresh:
            return
        if self._writer is None:
            self._writer = DeadLetterWriter(self.bootstrap, self.dlq, **self.client_options)
        for ev in fresh:
            raw = json.dumps(ev.event, separators=(",", ":")).encode()
            self._writer.send(
                Reject(raw, POISON_CATEGORY, ev.error),
                key=str(ev.event.get("user_id", "")).encode(),
                source=(self.source_topic, ev.partition, ev.offset),
            )
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
