"""Serving: replicas that follow the snapshot store and hot-swap model versions.

`SnapshotFollower` is the swap logic, independent of Ray: it watches the store
(`PINNED` if an operator pinned a version, else `LATEST`), verifies and loads
what changed, and swaps the live model in one reference assignment. It keeps
two copies (live and standby) so a delta is applied to the standby while the
live copy keeps answering; a version that fails to verify or load is refused,
counted, and the live version keeps serving.

Requests take the live model through `serving()`, which counts them in flight
per model object; before a delta is applied to the standby (the previous live
copy, which requests that started before the last swap may still be using),
the follower waits for that count to reach zero. Without it, a slow request
could read a model half-way through an in-place update.

The Ray Serve deployment around it lives in stream/serving/app.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from stream.messages import ServingEvent
from stream.snapshots.store import (
    DeltaState,
    SnapshotChain,
    SnapshotStore,
)

log = logging.getLogger(__name__)


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    replicas: int = Field(1, ge=1)
    route_prefix: str = "/"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    watch_interval_s: float = Field(0.1, gt=0)
    max_candidates: int = Field(1000, ge=1)
    num_cpus: float = Field(0.5, gt=0)
    # Load shedding, per replica: past `max_in_flight` requests in the handler a request is
    # a 503 with Retry-After at once; one not answered within `request_timeout_s` of its
    # arrival is a 503 if it never started (waited for a thread) or a 504 if it did.
    max_in_flight: int = Field(8, ge=1)
    request_timeout_s: float = Field(2.0, gt=0)
    retry_after_s: int = Field(1, ge=1)
    # Largest /rank body: 413 past it, refused from Content-Length unread or while a chunked
    # body streams. 8 MiB holds max_candidates=1000 with 4 KB item texts.
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)


class Servable(Protocol):
    """A loaded model version that can answer rank requests."""

    version: int

    def apply_delta(self, delta: DeltaState, version: int) -> None: ...
    def load_chain(self, chain: SnapshotChain) -> None: ...
    def fits(self, chain: SnapshotChain) -> bool: ...
    def rank(self, request: dict[str, Any]) -> dict[str, Any]: ...


class ServingDrainTimeout(Exception):
    """Requests on the standby copy did not finish in time; the delta was not applied
    (the version is not refused: the next poll tries again)."""


class SnapshotFollower:
    # How long a swap waits for requests still running on the standby copy.
    drain_timeout_s = 30.0
    # Deltas a replica applies to catch up before it reloads the chain instead.
    max_catch_up = 50

    def __init__(self, store: SnapshotStore, build: Callable[[SnapshotChain], Servable]):
        self.store = store
        self._build = build  # chain -> fresh Servable
        self._live: Servable | None = None
        self._standby: Servable | None = None
        # What the standby lacks of the live version: deltas, or a whole chain to load.
        self._standby_missing: list[tuple[int, DeltaState | SnapshotChain]] = []
        self._lock = threading.Lock()  # one swap at a time
        self.pinned: int | None = None  # set by reconfigure; overrides the PINNED file
        self.refusals: list[dict[str, Any]] = []
        self.refused_versions: set[int] = set()
        self.activations: list[tuple[int, float]] = []
        # id(model) -> requests using it; guarded by _inflight_cv, which also guards
        # the live/standby swap so "read live + count it" is atomic against a swap.
        self._inflight: dict[int, int] = {}
        self._inflight_cv = threading.Condition()

    @property
    def live(self) -> Servable | None:
        """The live model, for a look; requests must use `serving()` instead."""
        return self._live

    @contextmanager
    def serving(self) -> Iterator[Servable | None]:
        """The live model for one request (None before the first version), counted in
        flight until the block ends so no update touches it meanwhile."""
        with self._inflight_cv:
            model = self._live
            if model is not None:
                self._inflight[id(model)] = self._inflight.get(id(model), 0) + 1
        try:
            yield model
        finally:
            if model is not None:
                with self._inflight_cv:
                    left = self._inflight[id(model)] - 1
                    if left:
                        self._inflight[id(model)] = left
                    else:
                        del self._inflight[id(model)]
                        self._inflight_cv.notify_all()

    def in_flight(self, model: Servable | None) -> int:
        with self._inflight_cv:
            return self._inflight.get(id(model), 0) if model is not None else 0

    def _drain(self, model: Servable) -> None:
        """Wait until no request uses `model` (it is the standby: no new ones can start)."""
        deadline = time.monotonic() + self.drain_timeout_s
        with self._inflight_cv:
            while self._inflight.get(id(model), 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServingDrainTimeout(
                        f"{self._inflight[id(model)]} requests still use version {model.version} after "
                        f"{self.drain_timeout_s:.0f} s; not updating it under them (rank requests that slow "
                        "point at an overloaded replica: add replicas or lower max_candidates)"
                    )
                self._inflight_cv.wait(left)

    def _swap(self, live: Servable, standby: Servable | None) -> None:
        with self._inflight_cv:
            self._live, self._standby = live, standby

    @property
    def version(self) -> int | None:
        return self._live.version if self._live is not None else None

    def target_version(self) -> int | None:
        if self.pinned is not None:
            return self.pinned
        pinned = self.store.pinned_version()
        return pinned if pinned is not None else self.store.latest_version()

    def poll(self) -> bool:
        """Move to the target version if it differs. True if a new version went live."""
        target = self.target_version()
        if target is None or target == self.version or target in self.refused_versions:
            return False
        with self._lock:
            try:
                self._move_to(target)
            except ServingDrainTimeout as e:
                log.warning("version %s not applied yet: %s", target, e)
                return False
            except Exception as e:  # corrupt or undecodable: refuse, keep serving the old one
                self.refused_versions.add(target)
                self.refusals.append(
                    {"version": target, "at": time.time(), "reason": f"{type(e).__name__}: {e}"[:500]}
                )
                log.warning("refused snapshot version %s: %s", target, e)
                return False
        self.activations.append((target, time.time()))
        return True

    def _deltas_since(self, live_version: int, target: int) -> list[int] | None:
        """The delta versions leading from `live_version` to `target` (oldest first), or
        None when a full snapshot lies between them (then the chain is loaded afresh)."""
        path: list[int] = []
        v: int | None = target
        while v != live_version:
            if v is None or v < live_version or len(path) >= self.max_catch_up:
                return None
            m = self.store.manifest(v)
            if m["kind"] != "delta":
                return None
            path.append(v)
            v = m.get("parent")
        return path[::-1]

    def _move_to(self, target: int) -> None:
        live = self._live
        steps = (
            self._deltas_since(live.version, target)
            if live is not None and self._standby is not None and target > live.version
            else None
        )
        if steps:
            # Verify and decode only the new deltas (a replica that fell a few versions
            # behind catches up by deltas, not by reloading the whole chain).
            deltas = [(v, self.store.load_delta(v)) for v in steps]
            standby = self._standby
            # The standby was live until the last swap: requests that took it then
            # may still be running on it. Mutating it under them is the race.
            self._drain(standby)
            self._bring_up(standby, self._standby_missing + deltas)
            self._swap(standby, live)
            self._standby_missing = deltas
            return
        chain = self.store.load_chain(target)
        standby = self._standby
        if live is not None and standby is not None and standby.fits(chain):
            # A new full version: load it into the standby copy in place (no second model
            # to build); the old live copy loads it when it is the standby again.
            self._drain(standby)
            self._bring_up(standby, [(target, chain)])
            self._swap(standby, live)
            self._standby_missing = [(target, chain)]
            return
        fresh = self._build(chain)
        standby = self._build(chain)
        self._swap(fresh, standby)
        self._standby_missing = []

    def _bring_up(self, model: Servable, updates: list[tuple[int, DeltaState | SnapshotChain]]) -> None:
        """Apply `updates` to the standby `model`. If one fails half-way the copy is in an
        unknown state: drop it, so the next version builds two fresh copies."""
        try:
            for v, u in updates:
                if isinstance(u, SnapshotChain):
                    model.load_chain(u)
                else:
                    model.apply_delta(u, v)
        except Exception:
            with self._inflight_cv:
                self._standby = None
            self._standby_missing = []
            raise


def normalize_store_uri(uri: str) -> str:
    """A store URI as every process names it: a local path made absolute (a replica's
    working directory is not the command's), any other URI (s3://, gs://, file://) as is."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def serving_ledger_name(store_uri: str) -> str:
    """The Ray actor name of a snapshot store's serving ledger (the job's publisher actor).

    Derived from the store alone, so the job that writes a store and replicas that follow
    it find each other however each was started (`memstream run`, `memstream serve`,
    `serve deploy`, a RayService) and across restarts of either, with nothing to pass."""
    digest = hashlib.sha1(normalize_store_uri(store_uri).encode()).hexdigest()[:12]
    return f"memstream-ledger-{digest}"


class ServingReporter:
    """Where a replica reports what it activated or refused: the ledger actor named after
    its store (`serving_ledger_name`), when a job writing that store runs in this Ray
    cluster. With none, reports are dropped: serving does not depend on a job.

    The name is looked up again every `resolve_every_s`; a ledger that appears (a job
    started or restarted after the replica) is told the replica's live version at once
    (its activation replayed with its own time: the ledger counts a version's first
    activation only), not at the next swap, so the admin API's view holds every replica.
    """

    resolve_every_s = 5.0

    def __init__(self, ledger_name: str | None, namespace: str | None):
        self._handle = None
        self._name, self._namespace = ledger_name, namespace
        self._resolved_at = -math.inf
        self._last_activation: tuple[str, ServingEvent] | None = None

    def _ledger(self):
        now = time.monotonic()
        if not self._name or now - self._resolved_at < self.resolve_every_s:
            return self._handle
        self._resolved_at = now
        import ray

        try:
            handle = ray.get_actor(self._name, namespace=self._namespace)
        except ValueError:  # no job writes this store in this cluster (now)
            self._handle = None
            return None
        if self._handle is None or handle._actor_id != self._handle._actor_id:
            self._handle = handle
            if self._last_activation is not None:
                handle.report_serving.remote(*self._last_activation)
        return self._handle

    def tick(self) -> None:
        """Look for a (new) ledger; called from the replica's watch loop."""
        self._ledger()

    def report(self, replica_id: str, event: ServingEvent) -> None:
        h = self._ledger()
        if h is not None:
            h.report_serving.remote(replica_id, event)
        if event.kind == "activated":
            self._last_activation = (replica_id, event)


def replica_identity(app_name: str | None = None) -> str:
    """host:pid:random, prefixed with the Serve application (`memstream-serving@...`)
    so the admin API's view says which deployment each replica belongs to."""
    ident = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    return f"{app_name}@{ident}" if app_name else ident
