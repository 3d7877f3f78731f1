"""kafka-python clients tuned for this project, and topic administration.

`client_options` everywhere are extra kafka-python settings passed through
unchanged (security_protocol, sasl_*, ssl_*, client_id, ...), so the same code
talks to the local Tansu broker and to a secured production cluster.

Throughput note: kafka-python checksums every record batch with CRC-32C. Without
the `crc32c` C extension it falls back to pure Python, which caps a producer at
~18k messages/s here; with it the same producer does ~60-70k/s. When it is
missing, producers compress with gzip (zlib is C), so the pure-Python checksum
runs over fewer bytes.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from stream.errors import MemstreamError

log = logging.getLogger(__name__)

HAS_FAST_CRC = importlib.util.find_spec("crc32c") is not None


class TopicError(MemstreamError):
    pass


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def bulk_producer(bootstrap: str, **client_options: Any):
    """A producer for bulk sends (replay): large batches, leader-only acks.

    Batches are closed by size or after `linger_ms`; nothing here flushes per
    message. acks=1 is the replay trade-off (a leader crash can lose the tail);
    pass acks='all' in client_options for a durable replay.
    """
    from kafka import KafkaProducer

    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": 1,
        "linger_ms": 100,
        "batch_size": 4 * 1024 * 1024,
        "max_request_size": 16 * 1024 * 1024,
        "compression_type": None if HAS_FAST_CRC else "gzip",
        # Per-partition order must survive retries: replay promises offset order.
        "max_in_flight_requests_per_connection": 1,
        "retries": 5,
    }
    config.update(options_for(KafkaProducer, client_options))
    return KafkaProducer(**config)


def admin_client(bootstrap: str, **client_options: Any):
    from kafka import KafkaAdminClient

    return KafkaAdminClient(bootstrap_servers=bootstrap, **options_for(KafkaAdminClient, client_options))


def options_for(client_class: type, client_options: dict[str, Any]) -> dict[str, Any]:
    """The subset of `client_options` that `client_class` accepts.

    One options dict serves producer, consumer and admin: connection and security
    settings are shared, while e.g. linger_ms would make the admin client refuse.
    """
    accepted = client_class.DEFAULT_CONFIG
    return {k: v for k, v in client_options.items() if k in accepted}


def topic_partition_count(bootstrap: str, topic: str, **client_options: Any) -> int | None:
    """Partitions of `topic`, or None if it does not exist."""
    admin = admin_client(bootstrap, **client_options)
    try:
        if topic not in admin.list_topics():
            return None
        (desc,) = admin.describe_topics([topic])
        return len(desc["partitions"])
    finally:
        admin.close()


def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    *,
    replication_factor: int = 1,
    topic_configs: dict[str, str] | None = None,
    **client_options: Any,
) -> tuple[int, bool]:
    """Create `topic` with `partitions` if missing; returns (partition count, created).

    An existing topic is left as it is (its partition count is returned, whatever
    was asked): changing partitions of a live topic reshuffles keys.
    """
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    existing = topic_partition_count(bootstrap, topic, **client_options)
    if existing is not None:
        return existing, False
    admin = admin_client(bootstrap, **client_options)
    try:
        admin.create_topics(
            [NewTopic(topic, partitions, replication_factor, topic_configs=topic_configs or {})]
        )
    except TopicAlreadyExistsError:
        pass  # created concurrently: fine, use it
    except Exception as e:
        raise TopicError(
            f"could not create topic {topic!r} with {partitions} partitions on {bootstrap}: {e}. "
            "Create it yourself (kafka-topics.sh --create ...) or check the client's ACLs"
        ) from e
    finally:
        admin.close()
    count = topic_partition_count(bootstrap, topic, **client_options)
    if count is None:
        raise TopicError(f"topic {topic!r} was created on {bootstrap} but is not listed")
    return count, True


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java and kafka-python) picks for `key`."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions
