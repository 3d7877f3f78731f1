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
"""

from __future__ import annotations

import logging
import threading
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
# Below kafka-python's default max_request_size (1 MiB) with room for key and headers.
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024 - 64 * 1024

__all__ = ["DeadLetterError", "DeadLetterWriter", "dlq_topic", "source_label"]


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
