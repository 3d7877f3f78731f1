"""Recorded topics: write a topic to a Parquet recording, replay one into a broker, and the builders of recordings from real data sets (`data/`)."""
