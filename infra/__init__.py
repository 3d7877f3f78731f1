"""Deployment-side helpers: the local broker lifecycle (broker.py), cluster manifests, topic configs."""
