"""Stress streams: seeded synthetic recordings that each make one memory NECESSARY.

The memory-value benchmark (benchmarks/memory_value.py) runs the model with each memory
switched off on these streams; each stream is built so that one mechanism carries a
signal the others cannot, and the benchmark's slices (item evidence, user evidence,
short/long history) say where it shows:

- `stress-cold-items` (the LEMUR bank + doc encoder): items keep arriving and each is
  popular for a short while (~40% of events are on an item with < 5 earlier events).
  A user's like depends on the affinity between the user's latent taste and the item's
  topic; the topic is visible only through the item's words (drawn from a per-topic
  vocabulary, plus noise words). An id-only model knows nothing about a new item's id;
  a model that reads content does.
- `stress-long-taste` (the LMN user memory): persons with long histories (hundreds of
  events for many of them) and a stable taste over 16 topics that decides whether they
  like an item when one comes up outside a session (p = sigmoid(3 * taste - 0.8)); 60% of
  their events are sessions (~60 events) on a random topic whose items are liked at about
  the base rate, whatever the taste. The last L = 50 items are dominated by the current
  session and hold ~1 taste-driven item per topic, so a model that reads only the recent
  history sees little of the taste; a long-term per-user memory holds it (a per-(user,
  topic) like rate over the whole history beats the same rate over the last L items).
  What carries the long-term taste in this model: LMN's query is built from the user id
  embedding and the user features (models/ranker.py), so LMN cannot know anything those
  embeddings do not determine; renaming users across a boundary (new session ids) would
  cut LMN off exactly as it cuts off the id table. The stream therefore keeps person ids
  stable and makes them many (2,000 persons, ~125 events each on average, 16 taste
  values each) so one id row learns the taste only slowly from the ranking loss, and
  makes the recent window uninformative. The long-term carriers that remain are the id
  embedding, LMN (its memory loss writes every history summary the user ever had into
  its slots: a second, denser training signal) and the per-(user, word) feedback counter
  (`model.features.use_word_affinity`, an exact long-term count): the benchmark's extra
  variants switch that counter off to separate it from LMN.
- `stress-capacity` (the MSN product-key memory): 1,000 user clusters x 1,000 item
  clusters; each user cluster meets 40 item clusters, and each of those 40,000 cells has
  its own random outcome (like p = 0.85 or 0.15), balanced so no cluster's own like rate
  says anything. The clusters are revealed by features (user feature `ucluster`, item
  word `ic<k>`), so the signal is all in memorising cell outcomes: a rank-32 embedding
  interaction cannot hold 40,000 random cells, a table of 65k+ slots can.

Every stream: labels `like` (0/1) and `rating` (1..5, >= 4 exactly when liked, like
ML-1M), `item_text`, user features, scenario `feed`, event ids `<name>-<seed>-<n>`,
timestamps increasing over about a day from START_MS; keys are user ids and partitions
Kafka's default partitioner (stream.recordings.data.common). One numpy Generator per
build, so a seed fixes the bytes. `generate(name, events, seed)` returns the stream with
its latents (the true like probability of each event, the oracle) for tests.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stream.recordings.data.common import DataError, json_fragment, write_keyed_recording
from stream.recordings.data.synthetic import _zipf_draw

START_MS = 1_700_000_000_000
SPAN_MS = 86_400_000  # the events spread over one day of event time
TOPICS = 16
TOPIC_VOCAB = 12  # words per topic vocabulary
NOISE_VOCAB = 300  # words shared by all topics, carrying nothing
# The history window the long-taste stream hides the taste from; benchmarks/memory_value.py
# runs that stream at model.history.length = HISTORY_L whatever the default window.
HISTORY_L = 50


@dataclass(frozen=True)
class StressStream:
    """One generated stream: events in time order, and what generated them."""

    name: str
    seed: int
    user_ids: list[str]
    item_ids: list[str]
    item_text: list[str]  # per item
    user_features: list[dict[str, str | float]]  # per user
    event_user: np.ndarray  # (n,) int64 rows of user_ids
    event_item: np.ndarray  # (n,) int64 rows of item_ids
    ts_ms: np.ndarray  # (n,) int64, non-decreasing
    like: np.ndarray  # (n,) float64 0/1
    rating: np.ndarray  # (n,) float64 1..5
    oracle_p: np.ndarray  # (n,) the true P(like) of each event
    latents: dict[str, np.ndarray] = field(default_factory=dict)  # per-stream generative state

    def __len__(self) -> int:
        return len(self.event_user)


# -- the shared vocabulary, labels and time -------------------------------------------------


def _vocabulary(count: int, tag: str) -> list[str]:
    """`count` distinct pronounceable pseudo-words, fixed (not seeded): the same for every build."""
    rng = np.random.default_rng(zlib.crc32(tag.encode()))  # hash() is salted per process
    cons, vow = list("bdfgklmnprstvz"), list("aeiou")
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        w = "".join(str(rng.choice(cons)) + str(rng.choice(vow)) for _ in range(int(rng.integers(2, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


TOPIC_WORDS: list[list[str]] = [
    _vocabulary(TOPICS * TOPIC_VOCAB, "topics")[t * TOPIC_VOCAB : (t + 1) * TOPIC_VOCAB]
    for t in range(TOPICS)
]
NOISE_WORDS: list[str] = [
    w for w in _vocabulary(NOISE_VOCAB + 400, "noise") if w not in {x for ws in TOPIC_WORDS for x in ws}
][:NOISE_VOCAB]


def _topic_text(rng: np.random.Generator, topic: int, topic_words: int = 3, noise_words: int = 3) -> str:
    words = list(rng.choice(TOPIC_WORDS[topic], size=topic_words, replace=False))
    words += list(rng.choice(NOISE_WORDS, size=noise_words, replace=False))
    rng.shuffle(words)
    return " ".join(str(w) for w in words).capitalize()


def _labels(rng: np.random.Generator, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """like ~ Bernoulli(p); rating 4..5 when liked (5 more likely for high p), else 1..3."""
    n = len(p)
    like = (rng.random(n) < p).astype(np.float64)
    liked = 4.0 + (rng.random(n) < p)
    disliked = 1.0 + np.minimum(2.0, np.floor(rng.random(n) * 3.0 * (0.4 + p)))
    return like, np.where(like == 1.0, liked, disliked)


def _timestamps(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Event order (argsort of unit times `t`, stable) and ms timestamps spreading them over SPAN_MS."""
    order = np.argsort(t, kind="stable")
    ts = np.sort(t)
    ts = (ts - ts[0]) / max(float(ts[-1] - ts[0]), 1e-12) if len(ts) else ts
    return order, START_MS + np.floor(ts * SPAN_MS).astype(np.int64)


def _demographics(rng: np.random.Generator, users: int) -> list[dict[str, str | float]]:
    """Uninformative user features (the signal never depends on them)."""
    ages = rng.choice(["18-24", "25-34", "35-44", "45-54", "55+"], size=users)
    countries = rng.choice(["us", "de", "fr", "br", "in", "jp"], size=users)
    return [{"age": str(a), "country": str(c)} for a, c in zip(ages, countries)]


def _assemble(
    rng: np.random.Generator,
    name: str,
    seed: int,
    t: np.ndarray,
    events: tuple[np.ndarray, np.ndarray, np.ndarray],
    id_prefixes: tuple[str, str],
    item_text: list[str],
    user_features: list[dict[str, str | float]],
    latents: dict[str, np.ndarray],
    event_latents: dict[str, np.ndarray] | None = None,
) -> StressStream:
    """The stream from its events (user row, item row, P(like)) at unit times `t`: labels
    drawn from P(like), events put in time order and stamped, ids `<prefix><row>`;
    `event_latents` are per-event arrays, reordered with the events."""
    event_user, event_item, p = events
    like, rating = _labels(rng, p)
    order, ts_ms = _timestamps(t)
    return StressStream(
        name=name,
        seed=seed,
        user_ids=[f"{id_prefixes[0]}{u}" for u in range(len(user_features))],
        item_ids=[f"{id_prefixes[1]}{i}" for i in range(len(item_text))],
        item_text=item_text,
        user_features=user_features,
        event_user=event_user[order],
        event_item=event_item[order],
        ts_ms=ts_ms,
        like=like[order],
        rating=rating[order],
        oracle_p=p[order],
        latents={**latents, **{k: v[order] for k, v in (event_latents or {}).items()}},
    )


# -- stress-cold-items ----------------------------------------------------------------------


def generate_cold_items(
    events: int, seed: int, events_per_item: float = 10.0, lifetime_events: int = 3000
) -> StressStream:
    """Items born uniformly over the stream, each drawing a lognormal share of the events
    within ~`lifetime_events` events of its birth; like from the user's taste for the
    item's topic, which only the item's words reveal."""
    rng = np.random.default_rng(seed)
    items = max(1, int(round(events / events_per_item)))
    users = max(1, events // 40)
    item_topic = rng.integers(0, TOPICS, size=items)
    item_bias = 0.3 * rng.normal(size=items)
    item_text = [_topic_text(rng, int(t)) for t in item_topic]
    # Taste centred over topics per user: a user's own like rate says little about an item.
    taste = rng.normal(size=(users, TOPICS))
    taste = (taste - taste.mean(1, keepdims=True)) / (taste.std(1, keepdims=True) + 1e-9)

    weight = rng.lognormal(0.0, 1.0, size=items)
    per_item = rng.multinomial(events, weight / weight.sum()) if events else np.zeros(items, np.int64)
    event_item = np.repeat(np.arange(items), per_item)
    birth = (np.arange(items) + rng.random(items)) / items  # item k is born in the k-th slot
    tau = lifetime_events / max(events, 1)
    t = birth[event_item] + rng.exponential(tau, size=events)
    event_user = _zipf_draw(rng, users, 0.7, events)

    logit = 2.2 * taste[event_user, item_topic[event_item]] + item_bias[event_item] - 0.4
    p = 1.0 / (1.0 + np.exp(-logit))
    features = _demographics(rng, users)
    latents = {"item_topic": item_topic, "taste": taste}
    events_ = (event_user, event_item, p)
    return _assemble(rng, "stress-cold-items", seed, t, events_, ("u", "ci"), item_text, features, latents)


# -- stress-long-taste ----------------------------------------------------------------------

SESSION_SHARE = 0.6  # of a person's events: sessions on a random topic
_P_SESSION = 0.3  # like rate of session items, whatever the taste: about the base rate


def generate_long_taste(
    events: int, seed: int, persons: int = 2000, items_per_topic: int = 250, session_mean: int = 60
) -> StressStream:
    """Per person a stable taste over the TOPICS topics (standard normal); 60% of the events
    are sessions (~`session_mean` events, at least L/2, on a random topic) liked at
    _P_SESSION, the other 40% items of any topic liked at sigmoid(3 * taste - 0.8)."""
    rng = np.random.default_rng(seed)
    persons = max(1, min(persons, max(events, 1)))
    item_topic = np.repeat(np.arange(TOPICS), items_per_topic)
    item_text = [_topic_text(rng, int(t)) for t in item_topic]
    taste = rng.normal(size=(persons, TOPICS))

    activity = rng.gamma(2.0, 1.0, size=persons)
    per_person = rng.multinomial(events, activity / activity.sum()) if events else np.zeros(persons, np.int64)
    event_user = np.repeat(np.arange(persons), per_person)  # each person's events in their order
    in_session = rng.random(events) < SESSION_SHARE
    topic = rng.integers(0, TOPICS, size=events)
    start = 0
    for n in per_person.tolist():
        # Sessions: lengths L/2 + geometric, each on a random topic; a session's events are
        # the in-session events within its span (the others interleave with it).
        lengths = HISTORY_L // 2 + rng.geometric(
            1.0 / max(session_mean - HISTORY_L // 2, 1), size=n // 10 + 2
        )
        session_topic = rng.integers(0, TOPICS, size=len(lengths))[
            np.repeat(np.arange(len(lengths)), lengths)[:n]
        ]
        sl = slice(start, start + n)
        topic[sl] = np.where(in_session[sl], session_topic, topic[sl])
        start += n
    event_item = topic * items_per_topic + rng.integers(0, items_per_topic, size=events)
    p_taste = 1.0 / (1.0 + np.exp(-(3.0 * taste[event_user, topic] - 0.8)))
    p = np.where(in_session, _P_SESSION, p_taste)
    # Each person's events keep their order (sorted uniform times), persons interleave.
    t = np.concatenate([np.sort(rng.random(n)) for n in per_person.tolist()]) if events else np.zeros(0)
    features = _demographics(rng, persons)
    latents = {"taste": taste, "item_topic": item_topic}
    per_event = {"in_session": in_session}
    events_ = (event_user, event_item, p)
    return _assemble(
        rng, "stress-long-taste", seed, t, events_, ("p", "li"), item_text, features, latents, per_event
    )


# -- stress-capacity ------------------------------------------------------------------------


def generate_capacity(
    events: int,
    seed: int,
    clusters: int = 1000,
    active: int = 40,
    users_per_cluster: int = 10,
    items_per_cluster: int = 10,
) -> StressStream:
    """`clusters` user clusters x `clusters` item clusters; each user cluster meets `active`
    item clusters, each such cell liked at 0.85 or 0.15 (half of each cluster's cells each
    way, so no cluster's marginal like rate carries anything)."""
    if not 1 <= active <= clusters:
        raise DataError(f"need 1 <= active <= clusters, got active={active}, clusters={clusters}")
    rng = np.random.default_rng(seed)
    users = clusters * users_per_cluster
    cells = np.stack([rng.choice(clusters, size=active, replace=False) for _ in range(clusters)])  # (C, A)
    signs = np.stack([rng.permutation(np.arange(active) % 2) for _ in range(clusters)])  # (C, A) balanced
    cell_p = np.where(signs == 1, 0.85, 0.15)
    user_cluster = np.repeat(np.arange(clusters), users_per_cluster)
    item_cluster = np.repeat(np.arange(clusters), items_per_cluster)
    item_text = [
        f"ic{c} " + " ".join(str(w) for w in rng.choice(NOISE_WORDS, size=3, replace=False))
        for c in item_cluster.tolist()
    ]
    features: list[dict[str, str | float]] = [{"ucluster": f"uc{c}"} for c in user_cluster.tolist()]

    event_user = rng.integers(0, users, size=events)
    cell = rng.integers(0, active, size=events)
    uc = user_cluster[event_user]
    ic = cells[uc, cell]
    event_item = ic * items_per_cluster + rng.integers(0, items_per_cluster, size=events)
    p = cell_p[uc, cell]
    latents = {"user_cluster": user_cluster, "item_cluster": item_cluster, "cells": cells, "cell_p": cell_p}
    t, events_ = rng.random(events), (event_user, event_item, p)
    return _assemble(rng, "stress-capacity", seed, t, events_, ("cu", "ki"), item_text, features, latents)


# -- the registry and the writer ------------------------------------------------------------


@dataclass(frozen=True)
class StressSpec:
    name: str
    default_events: int
    generate: Callable[[int, int], StressStream]
    help: str


STREAMS: dict[str, StressSpec] = {
    s.name: s
    for s in (
        StressSpec(
            "stress-cold-items",
            200_000,
            generate_cold_items,
            "new items keep arriving; only their text reveals the topic (the bank's case)",
        ),
        StressSpec(
            "stress-long-taste",
            250_000,
            generate_long_taste,
            "long histories whose core taste the last 50 items hide (LMN's case)",
        ),
        StressSpec(
            "stress-capacity",
            250_000,
            generate_capacity,
            "40,000 random (user cluster, item cluster) cells to memorise (PKM's case)",
        ),
    )
}


def generate(name: str, events: int | None = None, seed: int = 0) -> StressStream:
    """The stress stream `name` (a key of STREAMS) with `events` events (default: its size)."""
    spec = STREAMS.get(name)
    if spec is None:
        raise DataError(f"unknown stress stream {name!r}: one of {sorted(STREAMS)}")
    events = spec.default_events if events is None else events
    if events < 0:
        raise DataError(f"--events must be >= 0, got {events}")
    return spec.generate(events, seed)


def write_stress_recording(
    stream: StressStream, out: str | Path, partitions: int = 4, topic: str = "interactions"
) -> Path:
    """The stream as a recording: one event JSON per row, keyed by user id."""
    user_json = [json_fragment(u) for u in stream.user_ids]
    features_json = [json_fragment(f) for f in stream.user_features]
    item_json = [json_fragment(i) for i in stream.item_ids]
    text_json = [json_fragment(t) for t in stream.item_text]
    prefix = f"{stream.name}-{stream.seed}"
    values = [
        f'{{"event_id":"{prefix}-{n}","ts_ms":{ts},"user_id":{user_json[u]},'
        f'"item_id":{item_json[i]},"scenario":"feed",'
        f'"labels":{{"like":{lk!r},"rating":{rt!r}}},'
        f'"user_features":{features_json[u]},"item_text":{text_json[i]}}}'
        for n, (ts, u, i, lk, rt) in enumerate(
            zip(
                stream.ts_ms.tolist(),
                stream.event_user.tolist(),
                stream.event_item.tolist(),
                stream.like.tolist(),
                stream.rating.tolist(),
            )
        )
    ]
    return write_keyed_recording(
        out,
        topic=topic,
        user_ids=stream.user_ids,
        event_user=stream.event_user,
        values=values,
        ts_ms=stream.ts_ms,
        partitions=partitions,
    )


def build_stress_recording(
    name: str,
    out: str | Path,
    events: int | None = None,
    seed: int = 0,
    partitions: int = 4,
    topic: str = "interactions",
) -> Path:
    """Generate the stress stream `name` and write it to `out`."""
    return write_stress_recording(generate(name, events, seed), out, partitions, topic)


def earlier_counts(keys: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same key: an item's or a
    user's evidence at scoring time (the benchmark's slices use the same definition)."""
    keys = np.asarray(keys)
    out = np.empty(len(keys), np.int64)
    if not len(keys):
        return out
    order = np.argsort(keys, kind="stable")  # each key's positions, in stream order
    k = keys[order]
    starts = np.r_[0, np.flatnonzero(k[1:] != k[:-1]) + 1]
    run = np.diff(np.r_[starts, len(k)])
    out[order] = np.arange(len(k)) - np.repeat(starts, run)
    return out
