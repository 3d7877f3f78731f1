"""The Ray Serve deployment: `POST /rank` over a SnapshotFollower.

Each replica watches the snapshot store in a background thread and hot-swaps
versions (stream/serving/follower.py), reports activations and refusals to the
publisher (freshness, /v1/serving), and takes `reconfigure({"pin_version": v})`
to pin a version (rollback) or follow the store again (`null`).

Module level on purpose, and without postponed annotations: Serve ships the
class to the replicas by reference and FastAPI reads the route signatures.
"""

import asyncio
import logging
import threading
import time

from fastapi import FastAPI, HTTPException, Request
from pydantic import ValidationError
from ray import serve

from stream.messages import ServingEvent
from stream.serving.follower import (
    ServingConfig,
    ServingReporter,
    SnapshotFollower,
    replica_identity,
)
from stream.serving.model import RankRequest, ServedModel
from stream.snapshots.store import SnapshotStore

log = logging.getLogger(__name__)

api = FastAPI(title="memstream serving", version="1")

RANK_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RankRequest.model_json_schema()}},
    }
}


@serve.deployment(user_config={"pin_version": None}, health_check_period_s=5)
@serve.ingress(api)
class RankingDeployment:
    def __init__(self, store_uri: str, cfg: dict, publisher_name: str, namespace: str) -> None:
        import torch

        # One thread per replica: replicas are scaled by count (num_cpus each), and a request
        # is one small batch, where intra-op threads cost more than they bring. The process is
        # the replica's, so the setting is made here, not by the model it serves.
        torch.set_num_threads(1)
        self.cfg = ServingConfig.model_validate(cfg)
        self.replica_id = replica_identity()
        self.follower = SnapshotFollower(SnapshotStore(store_uri), build=ServedModel)
        self.reporter = ServingReporter(publisher_name, namespace)
        self._wake = threading.Event()
        self._closed = False
        self._reported_refusals = 0
        threading.Thread(target=self._watch, name="snapshot-watch", daemon=True).start()

    def reconfigure(self, user_config: dict) -> None:
        pin = user_config.get("pin_version")
        self.follower.pinned = int(pin) if pin is not None else None
        self._wake.set()

    def _watch(self) -> None:
        while not self._closed:
            self._wake.wait(self.cfg.watch_interval_s)
            self._wake.clear()
            try:
                moved = self.follower.poll()
            except Exception as e:  # the store unreachable: keep serving, try again
                log.warning("snapshot watch failed: %s", e)
                continue
            if moved:
                self.reporter.report(
                    self.replica_id, ServingEvent("activated", self.follower.version, time.time())
                )
            while self._reported_refusals < len(self.follower.refusals):
                r = self.follower.refusals[self._reported_refusals]
                self._reported_refusals += 1
                self.reporter.report(
                    self.replica_id, ServingEvent("refused", r["version"], r["at"], r["reason"])
                )

    @api.post("/rank", openapi_extra=RANK_BODY)
    async def rank(self, request: Request) -> dict:
        try:
            req = RankRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise HTTPException(422, e.errors(include_url=False, include_input=False)) from None
        if len(req.candidates) > self.cfg.max_candidates:
            raise HTTPException(422, f"at most {self.cfg.max_candidates} candidates per request")
        return await asyncio.to_thread(self._rank, req)

    def _rank(self, req: RankRequest) -> dict:
        # One version for the whole request, held in flight so the swap thread does
        # not apply the next delta to it while we read it (SnapshotFollower.serving).
        with self.follower.serving() as live:
            if live is None:
                raise HTTPException(503, "no model version loaded yet; retry shortly")
            return live.rank(req)

    @api.get("/version")
    def version(self) -> dict:
        return {
            "replica": self.replica_id,
            "version": self.follower.version,
            "pinned": self.follower.pinned,
            "refusals": self.follower.refusals[-10:],
        }

    def __del__(self) -> None:
        self._closed = True
        self._wake.set()


def build_serving_app(store_uri: str, cfg: ServingConfig, publisher_name: str, namespace: str):
    """The Serve application: `serve.run(app, name=..., route_prefix=cfg.route_prefix)`."""
    return RankingDeployment.options(
        num_replicas=cfg.replicas, ray_actor_options={"num_cpus": cfg.num_cpus}
    ).bind(store_uri, cfg.model_dump(), publisher_name, namespace)
