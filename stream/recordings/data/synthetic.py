"""A seeded synthetic interaction stream with a signal a model can learn.

Generative story (all draws from one numpy Generator, so a seed fixes the bytes):
- each item belongs to one of TOPICS topics; its latent vector is the topic's
  centroid plus noise, and its text is words of that topic's vocabulary plus
  shared filler words, so the text predicts the item's latent;
- each user has a latent vector (a mix of two topic centroids) and categorical
  features (age band, gender, country) and a numeric one (tenure_days);
- item popularity is Zipf (exponent ZIPF_ITEMS over a random item ranking),
  user activity Zipf with a milder exponent;
- like ~ Bernoulli(sigmoid(AFFINITY * <user, item> + item bias)), rating is the
  affinity mapped to 1..5 with noise;
- timestamps increase by exponential gaps (mean 1/events_per_s), starting at
  START_MS: a Poisson stream whose recorded rate replay pacing can be checked
  against.
Keys are user ids; partitions by Kafka's default partitioner, like ML-1M.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stream.recordings.data.common import DataError, json_fragment, write_keyed_recording

TOPICS = 8
LATENT_DIM = 8
ZIPF_ITEMS = 1.1
ZIPF_USERS = 0.7
AFFINITY = 2.5
START_MS = 1_700_000_000_000
TOPIC_WORDS = [
    ["galaxy", "orbit", "rocket", "alien", "nebula", "starship", "planet", "comet"],
    ["detective", "murder", "clue", "alibi", "suspect", "verdict", "witness", "case"],
    ["romance", "wedding", "kiss", "heart", "letter", "summer", "dance", "promise"],
    ["dragon", "sword", "castle", "wizard", "quest", "kingdom", "spell", "knight"],
    ["laugh", "prank", "roommate", "party", "disaster", "roadtrip", "sitcom", "blunder"],
    ["war", "soldier", "battle", "general", "trench", "medal", "siege", "frontline"],
    ["ghost", "haunted", "scream", "cellar", "curse", "shadow", "ritual", "midnight"],
    ["chef", "recipe", "kitchen", "bakery", "spice", "market", "harvest", "feast"],
]
_FILLER_WORDS = ["story", "new", "classic", "edition", "part", "the", "great", "little", "city", "night"]
_AGE_BANDS = ["18-24", "25-34", "35-44", "45-54", "55+"]
_COUNTRIES = ["us", "de", "fr", "br", "in", "jp", "ng", "mx"]


def build_synthetic_recording(
    out: str | Path,
    events: int,
    users: int,
    items: int,
    seed: int,
    partitions: int = 4,
    topic: str = "interactions",
    events_per_s: float = 100.0,
) -> Path:
    """Write `events` synthetic events (deterministic for `seed`) as a recording."""
    if events < 0 or users < 1 or items < 1 or not events_per_s > 0:
        raise DataError(
            f"need events >= 0, users >= 1, items >= 1, events_per_s > 0; got events={events}, "
            f"users={users}, items={items}, events_per_s={events_per_s}"
        )
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(TOPICS, LATENT_DIM))

    item_topic = rng.integers(0, TOPICS, size=items)
    item_vec = centroids[item_topic] + 0.5 * rng.normal(size=(items, LATENT_DIM))
    item_bias = 0.5 * rng.normal(size=items)
    item_text = [_item_text(rng, int(t)) for t in item_topic]

    mix = rng.integers(0, TOPICS, size=(users, 2))
    weight = rng.uniform(0.5, 1.0, size=(users, 1))
    user_vec = weight * centroids[mix[:, 0]] + (1 - weight) * centroids[mix[:, 1]]
    user_vec /= np.linalg.norm(user_vec, axis=1, keepdims=True) + 1e-9
    user_features = [
        {"age": str(a), "gender": str(g), "country": str(c), "tenure_days": float(d)}
        for a, g, c, d in zip(
            rng.choice(_AGE_BANDS, size=users), rng.choice(["f", "m", "x"], size=users),
            rng.choice(_COUNTRIES, size=users), rng.integers(0, 2000, size=users),
        )
    ]

    event_item = _zipf_draw(rng, items, ZIPF_ITEMS, events)
    event_user = _zipf_draw(rng, users, ZIPF_USERS, events)
    affinity = np.einsum("ij,ij->i", user_vec[event_user], item_vec[event_item])
    logit = AFFINITY * affinity / np.sqrt(LATENT_DIM) + item_bias[event_item]
    like = (rng.random(events) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)
    rating = np.clip(np.rint(3.0 + logit + 0.5 * rng.normal(size=events)), 1, 5)
    gaps_ms = rng.exponential(1000.0 / events_per_s, size=events)
    ts_ms = START_MS + np.floor(np.cumsum(gaps_ms)).astype(np.int64)

    user_ids = [f"u{u}" for u in range(users)]
    user_json = [json_fragment(u) for u in user_ids]
    features_json = [json_fragment(f) for f in user_features]
    item_json = [json_fragment(f"i{i}") for i in range(items)]
    text_json = [json_fragment(t) for t in item_text]
    values = [
        f'{{"event_id":"syn{seed}-{n}","ts_ms":{ts},"user_id":{user_json[u]},'
        f'"item_id":{item_json[i]},"scenario":"feed",'
        f'"labels":{{"like":{lk!r},"rating":{rt!r}}},'
        f'"user_features":{features_json[u]},"item_text":{text_json[i]}}}'
        for n, (ts, u, i, lk, rt) in enumerate(zip(
            ts_ms.tolist(), event_user.tolist(), event_item.tolist(), like.tolist(), rating.tolist()
        ))
    ]
    return write_keyed_recording(
        out, topic=topic, user_ids=user_ids, event_user=event_user,
        values=values, ts_ms=ts_ms, partitions=partitions,
    )


def _zipf_draw(rng: np.random.Generator, n: int, exponent: float, size: int) -> np.ndarray:
    """`size` draws from 0..n-1, P(rank r) ~ 1/(r+1)^exponent over a random ranking."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    ranking = rng.permutation(n)
    return ranking[rng.choice(n, size=size, p=weights / weights.sum())]


def _item_text(rng: np.random.Generator, topic: int) -> str:
    words = list(rng.choice(TOPIC_WORDS[topic], size=3, replace=False))
    words += list(rng.choice(_FILLER_WORDS, size=2, replace=False))
    rng.shuffle(words)
    return " ".join(str(w) for w in words).capitalize()

