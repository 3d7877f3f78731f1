#!/usr/bin/env bash
# Create memstream's topics on a real Kafka cluster with Kafka's own CLI.
#   BOOTSTRAP=kafka:9092 PARTITIONS=32 RETENTION_DAYS=7 infra/create_topics.sh [--command-config client.properties]
# Partitions bound the ingest parallelism (one reader per partition at most);
# retention must cover the longest outage you want to recover from by replay
# from the last checkpoint's offsets (plus the checkpoint interval).
set -euo pipefail
BOOTSTRAP=${BOOTSTRAP:?set BOOTSTRAP=host:port}
TOPIC=${TOPIC:-interactions}
PARTITIONS=${PARTITIONS:-32}
REPLICATION=${REPLICATION:-3}
RETENTION_DAYS=${RETENTION_DAYS:-7}
DLQ_RETENTION_DAYS=${DLQ_RETENTION_DAYS:-30}
KAFKA_TOPICS=${KAFKA_TOPICS:-kafka-topics.sh}
ms() { echo $(( $1 * 24 * 3600 * 1000 )); }

"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" "$@" --create --if-not-exists \
  --topic "$TOPIC" --partitions "$PARTITIONS" --replication-factor "$REPLICATION" \
  --config retention.ms="$(ms "$RETENTION_DAYS")" \
  --config message.timestamp.type=CreateTime \
  --config max.message.bytes=1048576 \
  --config min.insync.replicas=2

# Dead letters: few partitions, long retention, kept for forensics and re-drive.
"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" "$@" --create --if-not-exists \
  --topic "$TOPIC.dlq" --partitions 3 --replication-factor "$REPLICATION" \
  --config retention.ms="$(ms "$DLQ_RETENTION_DAYS")" \
  --config max.message.bytes=16777216

"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" "$@" --describe --topic "$TOPIC"
