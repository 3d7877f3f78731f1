"""Recordings built from datasets: MovieLens-1M and -100K (movielens.py) and a seeded synthetic stream (synthetic.py)."""
