"""Serving: replicas that follow the snapshot store and hot-swap model versions.

`SnapshotFollower` is the swap logic, independent of Ray: it watches the store
(`PINNED` if an operator pinned a version, else `LATEST`), verifies and loads
what changed, and swaps the live model in one reference assignment. It keeps
two copies (live and standby) so a delta is applied to the standby while the
live copy keeps answering; a version that fails to verify or load is refused,
counted, and the live version keeps serving.

`RankingDeployment` is the Ray Serve deployment around it: `POST /rank`, a
background watcher, `reconfigure(user_config)` to pin or follow, and reports of
activations/refusals to the snapshot publisher (freshness, /v1/serving).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ConfigDict, Field

from stream.snapshots import (
    DeltaState,
    SnapshotChain,
    SnapshotError,
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


class Servable(Protocol):
    """A loaded model version that can answer rank requests."""

    version: int

    def apply_delta(self, delta: DeltaState, version: int) -> None: ...
    def rank(self, request: dict[str, Any]) -> dict[str, Any]: ...


class SnapshotFollower:
    def __init__(self, store: SnapshotStore, build: Callable[[SnapshotChain], Servable]):
        self.store = store
        self._build = build  # chain -> fresh Servable
        self._live: Servable | None = None
        self._standby: Servable | None = None
        self._standby_missing: list[tuple[int, DeltaState]] = []
        self._lock = threading.Lock()  # one swap at a time
        self.pinned: int | None = None  # set by reconfigure; overrides the PINNED file
        self.refusals: list[dict[str, Any]] = []
        self.refused_versions: set[int] = set()
        self.activations: list[tuple[int, float]] = []

    @property
    def live(self) -> Servable | None:
        return self._live

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
            except Exception as e:  # corrupt or undecodable: refuse, keep serving the old one
                self.refused_versions.add(target)
                self.refusals.append(
                    {"version": target, "at": time.time(), "reason": f"{type(e).__name__}: {e}"[:500]}
                )
                log.warning("refused snapshot version %s: %s", target, e)
                return False
        self.activations.append((target, time.time()))
        return True

    def _move_to(self, target: int) -> None:
        live = self._live
        manifest = self.store.manifest(target)
        incremental = (
            live is not None
            and self._standby is not None
            and manifest["kind"] == "delta"
            and manifest.get("parent") == live.version
        )
        if incremental:
            # Verify and decode only the new delta; bring the standby up to it.
            delta = self.store.load_delta(target)
            standby = self._standby
            for v, d in self._standby_missing:
                standby.apply_delta(d, v)
            standby.apply_delta(delta, target)
            self._live, self._standby = standby, live  # the swap: one assignment each
            self._standby_missing = [(target, delta)]
            return
        chain = self.store.load_chain(target)
        fresh = self._build(chain)
        standby = self._build(chain)
        self._live, self._standby = fresh, standby
        self._standby_missing = []


class ServingReporter:
    """Where a replica reports what it activated or refused (the publisher actor)."""

    def __init__(self, publisher_name: str | None, namespace: str | None):
        self._handle = None
        self._name, self._namespace = publisher_name, namespace

    def _publisher(self):
        if self._handle is None and self._name:
            import ray

            try:
                self._handle = ray.get_actor(self._name, namespace=self._namespace)
            except ValueError:
                return None
        return self._handle

    def report(self, replica_id: str, event: dict[str, Any]) -> None:
        h = self._publisher()
        if h is not None:
            h.report_serving.remote(replica_id, event)


def replica_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


# -- the Ray Serve deployment ----------------------------------------------------------------


def build_serving_app(
    store_uri: str,
    cfg: ServingConfig,
    publisher_name: str | None,
    namespace: str | None,
):
    """The Serve application: `serve.run(app, name=..., route_prefix=cfg.route_prefix)`."""
    from fastapi import FastAPI, HTTPException
    from ray import serve

    from stream.servable import RankRequest, ServedModel

    api = FastAPI(title="memstream serving", version="1")

    @serve.deployment(
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus},
        user_config={"pin_version": None},
        health_check_period_s=5,
    )
    @serve.ingress(api)
    class RankingDeployment:
        def __init__(self) -> None:
            self.replica_id = replica_identity()
            self.follower = SnapshotFollower(SnapshotStore(store_uri), build=ServedModel)
            self.reporter = ServingReporter(publisher_name, namespace)
            self._wake = threading.Event()
            self._closed = False
            self._reported_refusals = 0
            self._watcher = threading.Thread(target=self._watch, name="snapshot-watch", daemon=True)
            self._watcher.start()

        def reconfigure(self, user_config: dict[str, Any]) -> None:
            """Pin a version (rollback) or follow the store again (pin_version: null)."""
            pin = user_config.get("pin_version")
            self.follower.pinned = int(pin) if pin is not None else None
            self._wake.set()

        def _watch(self) -> None:
            while not self._closed:
                self._wake.wait(cfg.watch_interval_s)
                self._wake.clear()
                try:
                    moved = self.follower.poll()
                except Exception as e:  # the store unreachable: keep serving, try again
                    log.warning("snapshot watch failed: %s", e)
                    continue
                if moved:
                    self.reporter.report(self.replica_id, {
                        "type": "activated", "version": self.follower.version, "at": time.time(),
                    })
                while self._reported_refusals < len(self.follower.refusals):
                    r = self.follower.refusals[self._reported_refusals]
                    self._reported_refusals += 1
                    self.reporter.report(self.replica_id, {"type": "refused", **r})

        @api.post("/rank")
        def rank(self, req: RankRequest) -> dict[str, Any]:
            live = self.follower.live  # one read: this request uses one version throughout
            if live is None:
                raise HTTPException(503, "no model version loaded yet; retry shortly")
            if len(req.candidates) > cfg.max_candidates:
                raise HTTPException(422, f"at most {cfg.max_candidates} candidates per request")
            return live.rank(req)

        @api.get("/version")
        def version(self) -> dict[str, Any]:
            return {
                "replica": self.replica_id,
                "version": self.follower.version,
                "pinned": self.follower.pinned,
                "refusals": self.follower.refusals[-10:],
            }

        def __del__(self) -> None:
            self._closed = True
            self._wake.set()

    return RankingDeployment.bind()
