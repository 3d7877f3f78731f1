"""The Ray Serve deployment: `POST /rank` over a SnapshotFollower.

Each replica watches the snapshot store in a background thread and hot-swaps
versions (stream/serving/follower.py), reports activations and refusals to the
serving ledger (the publisher actor of the job writing that store, found by a
name derived from the store URI: freshness, /v1/serving), and takes
`reconfigure({"pin_version": v})` to pin a version (rollback) or follow the
store again (`null`).

`build_app(args)` is the application builder (Serve config files, a RayService,
`memstream serve`, and the job's embedded serving all deploy through it): the
app depends on nothing but the store, so it outlives, scales apart from and
follows stores of any training job.

The request handling is `RankService`, a plain class the deployment calls (and
the tests drive in process through `rank_api`): a bound on requests in flight
per replica (503 + Retry-After past it, at once), a deadline per request (503 if
it never started in time, 504 if it started and did not finish), a body limit
checked before the body is read in full (413), and strict JSON (a duplicate key
is a 422 naming it; NaN, Infinity and 1e400 are a 422 naming the field).

Module level on purpose, and without postponed annotations: Serve ships the
class to the replicas by reference and FastAPI reads the route signatures.
"""

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.serve import Application

from stream.http import (
    ErrorBody,
    invalid,
    parse_json,
    read_body,
    retry_after,
    scrub,
    validation_errors,
)
from stream.messages import ServingEvent
from stream.serving.follower import (
    ServingConfig,
    ServingReporter,
    SnapshotFollower,
    normalize_store_uri,
    replica_identity,
    serving_ledger_name,
)
from stream.serving.model import NonFiniteScores, RankRequest, ServedModel
from stream.snapshots.store import SnapshotStore

log = logging.getLogger(__name__)

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}


def _inline_refs(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` inlined (`#/$defs/...` does not resolve
    inside an OpenAPI document)."""
    defs = schema.pop("$defs", {})

    def walk(x):
        if isinstance(x, dict):
            if set(x) == {"$ref"} and x["$ref"].startswith("#/$defs/"):
                return walk(defs[x["$ref"].rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(schema)


def rank_route(max_candidates: int | None = None) -> dict:
    """The /rank route's options; `max_candidates` (serving.max_candidates) tightens the
    documented bound where the replica's config is known when the route is made."""
    schema = _inline_refs(RankRequest.model_json_schema())
    if max_candidates is not None:
        schema["properties"]["candidates"]["maxItems"] = max_candidates
    return {
        "openapi_extra": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        },
        "responses": {
            408: {"model": ErrorBody, "description": "body not received within serving.request_timeout_s"},
            413: {"model": ErrorBody, "description": "body over serving.max_body_bytes"},
            422: {
                "model": ErrorBody,
                "description": "invalid JSON (duplicate keys included), invalid fields, or more "
                "candidates than serving.max_candidates",
            },
            503: {
                "model": ErrorBody,
                "description": "replica busy (serving.max_in_flight), request not started within "
                "serving.request_timeout_s, no model version loaded yet, or the loaded version "
                "gives non-finite scores (the message names it and the candidates)",
                "headers": _RETRY_AFTER,
            },
            504: {"model": ErrorBody, "description": "not answered within serving.request_timeout_s"},
        },
    }


class RankService:
    """`POST /rank` and `GET /version` of one replica, without Ray."""

    def __init__(self, follower: SnapshotFollower, cfg: ServingConfig, replica_id: str = "local"):
        self.follower, self.cfg, self.replica_id = follower, cfg, replica_id
        # One thread per admitted request: a request never waits for a thread unless
        # earlier ones that ran past their deadline still hold theirs (and their slots).
        self._pool = ThreadPoolExecutor(cfg.max_in_flight, thread_name_prefix="rank")
        self._lock = threading.Lock()
        self._in_flight = 0
        self.shed = 0  # 503: over max_in_flight
        self.expired = 0  # 503/504: past the deadline
        self.non_finite = 0  # 503: the model version gave a non-finite score

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _admit(self) -> bool:
        with self._lock:
            if self._in_flight >= self.cfg.max_in_flight:
                return False
            self._in_flight += 1
            return True

    def _release(self, *_: object) -> None:
        with self._lock:
            self._in_flight -= 1

    def _busy(self, msg: str) -> HTTPException:
        return HTTPException(503, msg, retry_after(self.cfg.retry_after_s))

    async def rank(self, request: Request) -> dict:
        arrived = time.monotonic()
        timeout = self.cfg.request_timeout_s
        if not self._admit():  # before the body is read: shedding costs next to nothing
            self.shed += 1
            raise self._busy(f"replica busy ({self.cfg.max_in_flight} requests in flight); retry")
        handed_over = False
        try:
            try:
                raw = await asyncio.wait_for(read_body(request, self.cfg.max_body_bytes), timeout)
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {timeout:g} s") from None
            work = self._pool.submit(self._rank, raw, arrived + timeout)
            # The slot goes with the work: a request answered 504 still holds it until its
            # thread is done, so the bound counts the work the replica is really doing.
            work.add_done_callback(self._release)
            handed_over = True
            try:
                left = arrived + timeout - time.monotonic()
                return await asyncio.wait_for(asyncio.wrap_future(work), max(left, 0.0))
            except TimeoutError:
                self.expired += 1
                if work.cancelled():  # never started: nothing was spent on it
                    raise self._busy(f"request not started within {timeout:g} s; retry") from None
                raise HTTPException(504, f"request not answered within {timeout:g} s") from None
        finally:
            if not handed_over:
                self._release()

    def _rank(self, raw: bytes, deadline: float) -> dict:
        if time.monotonic() > deadline:
            self.expired += 1
            raise self._busy("request not started within its deadline; retry")
        try:
            req = RankRequest.model_validate(parse_json(raw))
        except ValidationError as e:
            raise invalid(e) from None
        if len(req.candidates) > self.cfg.max_candidates:
            raise HTTPException(422, f"at most {self.cfg.max_candidates} candidates per request")
        # One version for the whole request, held in flight so the swap thread does
        # not apply the next delta to it while we read it (SnapshotFollower.serving).
        with self.follower.serving() as live:
            if live is None:
                raise self._busy("no model version loaded yet; retry shortly")
            try:
                return live.rank(req)
            except NonFiniteScores as e:
                # The version is broken, not the request: 503 (another replica, or this one
                # on the next version, may answer), never a 500 from serialising a NaN.
                self.non_finite += 1
                raise self._busy(str(e)) from None

    def version(self) -> dict:
        return {
            "replica": self.replica_id,
            "version": self.follower.version,
            "pinned": self.follower.pinned,
            "refusals": scrub(self.follower.refusals[-10:]),  # reasons name store files
            "in_flight": self._in_flight,
            "shed": self.shed,
            "expired": self.expired,
            "non_finite": self.non_finite,
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": validation_errors(list(exc.errors()))}, 422)


def _new_api() -> FastAPI:
    app = FastAPI(title="memstream serving", version="1")
    app.add_exception_handler(RequestValidationError, _invalid)
    return app


def rank_api(service: RankService) -> FastAPI:
    """The deployment's routes over `service`, as a plain ASGI app (tests, no Ray)."""
    app = _new_api()

    @app.post("/rank", **rank_route(service.cfg.max_candidates))
    async def rank(request: Request) -> dict:
        return await service.rank(request)

    @app.get("/version")
    def version() -> dict:
        return service.version()

    return app


api = _new_api()


@serve.deployment(user_config={"pin_version": None}, health_check_period_s=5)
@serve.ingress(api)
class RankingDeployment:
    def __init__(self, store_uri: str, cfg: dict, ledger_name: str, namespace: str) -> None:
        import torch

        # One thread per replica: replicas are scaled by count (num_cpus each), and a request
        # is one small batch, where intra-op threads cost more than they bring. The process is
        # the replica's, so the setting is made here, not by the model it serves.
        torch.set_num_threads(1)
        self.cfg = ServingConfig.model_validate(cfg)
        self.store_uri = store_uri
        self.replica_id = replica_identity(serve.get_replica_context().app_name)
        self.follower = SnapshotFollower(SnapshotStore(store_uri), build=ServedModel)
        self.service = RankService(self.follower, self.cfg, self.replica_id)
        self.reporter = ServingReporter(ledger_name, namespace)
        self._wake = threading.Event()
        self._closed = False
        self._reported_refusals = 0
        threading.Thread(target=self._watch, name="snapshot-watch", daemon=True).start()

    def reconfigure(self, user_config: dict) -> None:
        pin = user_config.get("pin_version")
        self.follower.pinned = int(pin) if pin is not None else None
        self._wake.set()

    def _watch(self) -> None:
        waiting_said = False
        while not self._closed:
            self._wake.wait(self.cfg.watch_interval_s)
            self._wake.clear()
            self.reporter.tick()
            try:
                moved = self.follower.poll()
            except Exception as e:  # the store unreachable: keep serving, try again
                log.warning("snapshot watch failed: %s", e)
                continue
            if self.follower.version is None and not waiting_said:
                # Serving may start before any job has written the store: say so once.
                log.warning("no snapshot in %s yet: /rank answers 503 until one is published", self.store_uri)
                waiting_said = True
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

    @api.post("/rank", **rank_route())
    async def rank(self, request: Request) -> dict:
        return await self.service.rank(request)

    @api.get("/version")
    def version(self) -> dict:
        return self.service.version()

    def __del__(self) -> None:
        self._closed = True
        self._wake.set()


# The URI schemes pyarrow.fs.FileSystem.from_uri opens ("" = a local path).
_STORE_SCHEMES = frozenset({"", "file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"})


class ServingAppArgs(BaseModel):
    """The arguments of the serving application (`build_app`), as a Serve config's `args:`.

    `snapshots` is the store to follow, any pyarrow filesystem URI (a local path is made
    absolute); `serving` the ServingConfig fields (stream/serving/follower.py); `replicas`
    a shorthand for serving.replicas; `namespace` the Ray namespace of the job whose
    publisher keeps the serving ledger (job.namespace; reports are dropped without one).
    """

    model_config = ConfigDict(extra="forbid")

    snapshots: str = Field(min_length=1)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    replicas: int | None = Field(None, ge=1)
    namespace: str = "memstream"

    @field_validator("snapshots")
    @classmethod
    def _store_uri(cls, uri: str) -> str:
        # The scheme only: opening the filesystem here would reach the network (s3:// resolves
        # the bucket's region) wherever the app is built; `memstream serve` opens it itself.
        scheme = urlparse(uri).scheme if "://" in uri else ""
        if scheme not in _STORE_SCHEMES:
            known = ", ".join(f"{s}://" for s in sorted(_STORE_SCHEMES - {""}))
            raise ValueError(f"unknown filesystem scheme {scheme!r}: a local path or one of {known}")
        return normalize_store_uri(uri)

    def serving_config(self) -> ServingConfig:
        if self.replicas is None:
            return self.serving
        return self.serving.model_copy(update={"replicas": self.replicas})


def build_app(args: dict) -> Application:
    """Ray Serve's application builder: the serving app over the store `args` name.

    `serve run stream.serving.app:build_app snapshots=s3://bucket/snapshots`, a Serve config
    or RayService (`import_path: stream.serving.app:build_app` with `args:`), `memstream
    serve` and the embedded `memstream run` all build it here. Invalid args raise a
    pydantic ValidationError naming the field."""
    parsed = ServingAppArgs.model_validate(args)
    cfg = parsed.serving_config()
    return RankingDeployment.options(
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus},
        # Serve's own bound (5 by default) would queue the excess in the proxy, unbounded
        # and unseen by the replica's deadline: let it through to be shed (503) at once,
        # and bound what still queues in the proxy (Serve answers 503 past that).
        max_ongoing_requests=4 * cfg.max_in_flight,
        max_queued_requests=4 * cfg.max_in_flight * cfg.replicas,
    ).bind(parsed.snapshots, cfg.model_dump(), serving_ledger_name(parsed.snapshots), parsed.namespace)
