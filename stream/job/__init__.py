"""The streaming job on Ray: the driver that owns the topology, the actors (thin shells over ingest, train and snapshots), the job's metrics, its report and the live display."""
