"""Serving: a model version built from a snapshot chain (`model`), the follower that hot-swaps versions into replicas (`follower`), and the Ray Serve deployment (`app`)."""
