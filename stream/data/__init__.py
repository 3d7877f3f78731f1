"""Recordings built from datasets: MovieLens-1M (ml1m.py) and a seeded synthetic stream (synthetic.py)."""
