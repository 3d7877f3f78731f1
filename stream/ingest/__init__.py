"""Kafka in: the event schema and its decoder, the partition readers the ingest actors run, the dead-letter writer, and the Kafka helpers (topics, producers) the other parts share."""
