"""Versioned model state for serving: the snapshot store on a pyarrow filesystem (full, delta and base versions, LATEST) and the publisher that writes it and measures freshness."""
