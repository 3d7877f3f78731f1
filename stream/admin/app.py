"""Admin API: what the memories hold, how fresh serving is, how far behind ingest is.

A FastAPI app over a `JobView` (the driver's window onto its actors). Every
route but `/healthz` needs `Authorization: Bearer <token>`, compared in constant
time, `/openapi.json` included (there is no `/docs` UI: a browser page cannot
send the token). The token is checked before a request body is read. Bad input
is a 4xx with a message (404 unknown id, 413 body too large, 415 not JSON, 422
bad parameter, 429 rate limited or too many wrong tokens, with Retry-After),
never a 500, and no error detail carries an absolute path. The server binds
127.0.0.1 unless configured otherwise and refuses to bind anything else without
a configured token.

The request-body helpers (`read_body`, `parse_json`, `validation_errors`,
`scrub_paths`) live in stream/http.py, shared with the serving app.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from stream.http import (
    ErrorBody,
    invalid,
    parse_json,
    read_body,
    require_json,
    retry_after,
    scrub,
    scrub_paths,
    validation_errors,
)

log = logging.getLogger(__name__)

MAX_PAGE = 100
ID_PATTERN = r"^[^\x00-\x1f]{1,256}$"


class AdminConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)  # 0 = pick a free port
    # Empty = read MEMSTREAM_ADMIN_TOKEN; on loopback with neither, a random token
    # is generated and written to <work_dir>/admin_token (mode 0600).
    token: str = ""
    rate_limit_per_s: float = Field(50.0, gt=0)
    rate_limit_burst: int = Field(100, ge=1)
    # Wrong tokens per client address: `auth_fail_burst` of them, then one more every
    # 1/`auth_fail_per_s` s; past that every request from the address is a 429 (with
    # Retry-After) until the bucket refills, whatever token it carries.
    auth_fail_burst: int = Field(10, ge=1)
    auth_fail_per_s: float = Field(0.1, gt=0)
    # Largest request body (the rollback body is a few bytes): larger is a 413, refused
    # from Content-Length unread, or while a chunked body streams.
    max_body_bytes: int = Field(16_384, ge=64)


class AdminConfigError(Exception):
    pass


class NotFound(Exception):
    """Raised by a JobView for an unknown id; becomes a 404 (absolute paths in the
    message are cut to their last component: the store's location is not for clients)."""


class _UnknownId(NotFound):
    """A 404 the app words itself (it echoes the client's id, which is not scrubbed)."""


class JobView(Protocol):
    def bank_item(self, item_id: str) -> dict[str, Any] | None: ...
    def bank_neighbors(self, item_id: str, k: int) -> list[dict[str, Any]] | None: ...
    def memory_stats(self, name: str) -> dict[str, Any] | None: ...
    def user_history(self, user_id: str, limit: int) -> dict[str, Any] | None: ...
    def trainer_health(self) -> dict[str, Any]: ...
    def snapshots(self) -> list[dict[str, Any]]: ...
    def rollback(self, version: int) -> dict[str, Any]: ...
    def unpin(self) -> dict[str, Any]: ...
    def serving(self) -> list[dict[str, Any]]: ...
    def ingest_lag(self) -> dict[str, Any]: ...
    def metrics_text(self) -> bytes: ...


# -- the trainer's answers (stream/job/actors.py calls these under the trainer's lock) ----------
# The memories are keyed by integer keys (models.ids.key64 of the string id); the API
# answers by the string ids its clients know.


def bank_item(bank, item_id: str) -> dict[str, Any] | None:
    """What the item bank holds for `item_id` (None when absent)."""
    from models.ids import key64

    return None if bank is None else bank.lookup(key64(item_id))


def bank_neighbors(bank, item_id: str, k: int) -> list[dict[str, Any]] | None:
    """The k nearest items of `item_id` in the bank by cosine (None when it is absent).
    Items the bank never learned the name of are shown by their key in decimal."""
    from models.ids import key64

    key = key64(item_id)
    if bank is None or bank.lookup(key) is None:
        return None
    return [{"item_id": i, "cosine": float(c)} for i, c in bank.neighbors(key, k)]


def user_history(history, bank, user_id: str, limit: int) -> dict[str, Any] | None:
    """`user_id`'s last `limit` events, most recent first (None for an unknown user): each
    item's id (its key in decimal when the bank does not know its name), its key, whether
    its bank row still holds it, the event time and the feedback signal."""
    import numpy as np

    from models.ids import key64

    key = key64(user_id)
    if key not in history.slots:
        return None
    view = history.get(np.array([key], dtype=np.int64), touch=False)  # a look, not a use
    cols = {f: getattr(view, f)[0].cpu().numpy() for f in ("item_key", "bank_row", "ts_ms", "signal", "mask")}
    held = np.full(len(cols["mask"]), False)
    if bank is not None:
        rows = cols["bank_row"]
        held = (rows >= 0) & (bank.keys[np.maximum(rows, 0)] == cols["item_key"])
    keep = np.flatnonzero(cols["mask"])[::-1][:limit]  # most recent first
    name = bank.name_of if bank is not None else (lambda k: str(int(k)))
    return {
        "user_id": user_id,
        "length": int(cols["mask"].sum()),
        "items": [
            {
                "item_id": name(cols["item_key"][j]),
                "item_key": int(cols["item_key"][j]),
                "in_bank": bool(held[j]),
                "ts_ms": int(cols["ts_ms"][j]),
                "signal": float(cols["signal"][j]),
            }
            for j in keep.tolist()
        ],
    }


def resolve_token(cfg: AdminConfig, work_dir: Path | None) -> str:
    token = cfg.token or os.environ.get("MEMSTREAM_ADMIN_TOKEN", "")
    if token:
        if len(token) < 16:
            raise AdminConfigError("admin.token must be at least 16 characters")
        return token
    if not _is_loopback(cfg.host):
        raise AdminConfigError(
            f"admin.host={cfg.host!r} is not loopback: set admin.token (or MEMSTREAM_ADMIN_TOKEN) "
            "before exposing the admin API"
        )
    token = secrets.token_urlsafe(32)
    if work_dir is not None:
        path = Path(work_dir) / "admin_token"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.info("admin token written to %s", path)
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _RateLimiter:
    """Token bucket per client address."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000):
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _level(self, client: str, now: float) -> float:
        tokens, last = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.rate)

    def allow(self, client: str) -> bool:
        """Take a token; False (and none taken) when `client`'s bucket is empty."""
        now = time.monotonic()
        with self._lock:
            tokens = self._level(client, now)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                return False
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_clients:
                self._bound(now)
            return True

    def wait_s(self, client: str) -> float:
        """Seconds until `client` has a token again; 0 if it has one now."""
        with self._lock:
            tokens = self._level(client, time.monotonic())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _bound(self, now: float) -> None:
        """Bound memory under address spraying: drop the buckets that refilled (the same
        as absent); if that is not enough, drop them all (fail open, not grow)."""
        for c in [c for c, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.burst]:
            del self._buckets[c]
        if len(self._buckets) > self.max_clients:
            self._buckets.clear()


# Documented on every secured route so clients (and schemathesis) know the error shapes.
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    429: {
        "model": ErrorBody,
        "description": "rate limit exceeded, or too many wrong tokens (per client address)",
        "headers": _RETRY_AFTER,
    },
}
_NOT_FOUND = {404: {"model": ErrorBody, "description": "unknown id or version"}}
_BODY_ERRORS = {
    413: {"model": ErrorBody, "description": "request body over admin.max_body_bytes"},
    415: {"model": ErrorBody, "description": "body not sent as application/json"},
    422: {"model": ErrorBody, "description": "invalid JSON (duplicate keys included) or invalid fields"},
}


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Strict: `true` or 3.0 is a 422, not version 1 or 3. At most 2**53 - 1, the largest
    # integer every JSON client (a double) holds exactly.
    version: StrictInt = Field(..., ge=1, le=2**53 - 1)


async def _rollback_body(request: Request) -> RollbackRequest:
    """The body, read only once auth (a route dependency, solved first) has passed."""
    require_json(request)
    obj = parse_json(await read_body(request, request.app.state.max_body_bytes))
    try:
        return RollbackRequest.model_validate(obj)
    except ValidationError as e:
        raise invalid(e) from None


RollbackBody = Annotated[RollbackRequest, Depends(_rollback_body)]
_ROLLBACK_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RollbackRequest.model_json_schema()}},
    }
}


def create_app(view: JobView, cfg: AdminConfig, token: str) -> FastAPI:
    app = FastAPI(
        title="memstream admin",
        version="1",
        description="Memory-bank, PKM, LMN, snapshot, serving and ingest state of a memstream job.",
        # No open docs: /openapi.json is a route below, behind the token like the rest.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.max_body_bytes = cfg.max_body_bytes
    limiter = _RateLimiter(cfg.rate_limit_per_s, cfg.rate_limit_burst)
    failures = _RateLimiter(cfg.auth_fail_per_s, cfg.auth_fail_burst)
    expected = token.encode()

    def auth(request: Request) -> None:
        """Runs before anything else of a route (its body is not read yet)."""
        client = request.client.host if request.client else "unknown"
        # Checked before the token is compared, so a locked-out guesser learns nothing.
        wait = failures.wait_s(client)
        if wait > 0:
            raise HTTPException(429, "too many wrong tokens from this address", retry_after(wait))
        header = request.headers.get("authorization")
        scheme, _, given = (header or "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)
        if not ok:
            if header is not None:  # a credential was tried (no header at all is no guess)
                failures.allow(client)
            raise HTTPException(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        if not limiter.allow(client):
            raise HTTPException(429, "rate limit exceeded; slow down", retry_after(limiter.wait_s(client)))

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        text = str(exc) or "not found"
        return JSONResponse({"detail": text if isinstance(exc, _UnknownId) else scrub_paths(text)}, 404)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_errors(list(exc.errors()))}, 422)

    # Route options: the auth dependency, and the error answers it adds to the spec.
    secured: dict[str, Any] = {"dependencies": [Depends(auth)], "responses": _ERRORS}
    secured_or_404: dict[str, Any] = {**secured, "responses": {**_ERRORS, **_NOT_FOUND}}
    ItemId = PathParam(..., pattern=ID_PATTERN, description="item id (URL-encoded)")

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(auth)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", **secured, response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(view.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/bank/items/{item_id}", **secured_or_404)
    def bank_item(item_id: str = ItemId) -> dict[str, Any]:
        row = view.bank_item(item_id)
        if row is None:
            raise _UnknownId(f"item {item_id!r} is not in the bank")
        return row

    @app.get("/v1/bank/items/{item_id}/neighbors", **secured_or_404)
    def bank_neighbors(item_id: str = ItemId, k: int = Query(10, ge=1, le=MAX_PAGE)) -> dict:
        found = view.bank_neighbors(item_id, k)
        if found is None:
            raise _UnknownId(f"item {item_id!r} is not in the bank")
        return {"item_id": item_id, "k": k, "neighbors": found}

    @app.get("/v1/{component}/stats", **secured_or_404)
    def component_stats(component: str = PathParam(..., pattern=r"^[a-z_]{1,32}$")) -> dict[str, Any]:
        """Any component of the model state: bank, pkm, lmn, history, features, embeddings."""
        found = view.memory_stats(component)
        if found is None:
            raise _UnknownId(f"the model has no component {component!r}")
        return found

    @app.get("/v1/trainer/health", **secured)
    def trainer_health() -> dict[str, Any]:
        return view.trainer_health()

    @app.get("/v1/users/{user_id}/history", **secured_or_404)
    def user_history(
        user_id: str = PathParam(..., pattern=ID_PATTERN),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
    ) -> dict[str, Any]:
        found = view.user_history(user_id, limit)
        if found is None:
            raise _UnknownId(f"user {user_id!r} has no history")
        return found

    @app.get("/v1/snapshots", **secured)
    def snapshots(
        offset: int = Query(0, ge=0, le=1_000_000),
        limit: int = Query(20, ge=1, le=MAX_PAGE),
    ) -> dict[str, Any]:
        items = view.snapshots()  # newest first
        return {
            "total": len(items),
            "offset": offset,
            "limit": limit,
            "items": items[offset : offset + limit],
        }

    @app.post(
        "/v1/snapshots/rollback",
        dependencies=secured["dependencies"],
        responses={**_ERRORS, **_NOT_FOUND, **_BODY_ERRORS},
        openapi_extra=_ROLLBACK_BODY,
    )
    def rollback(req: RollbackBody) -> dict[str, Any]:
        """Pin serving to `version` (it must still be in the store); see DELETE /v1/snapshots/pin."""
        return view.rollback(req.version)

    @app.delete("/v1/snapshots/pin", **secured)
    def unpin() -> dict[str, Any]:
        """Undo a rollback: serving follows the newest published version again."""
        return view.unpin()

    @app.get("/v1/serving", **secured)
    def serving() -> dict[str, Any]:
        """Every serving replica following this job's store in its Ray cluster, however it
        was started (the job, `memstream serve`, `serve deploy`): each reports to the
        store's ledger actor. `replica` is `<Serve app>@host:pid:id`."""
        return {"replicas": scrub(view.serving())}  # refusal reasons name store files

    @app.get("/v1/ingest/lag", **secured)
    def ingest_lag() -> dict[str, Any]:
        return view.ingest_lag()

    return app


class AdminServer:
    """uvicorn in a background thread of the driver process."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        self._server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        )
        self._thread = threading.Thread(target=self._server.run, name="admin-api", daemon=True)

    def start(self, timeout_s: float = 10.0) -> int:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AdminConfigError("admin API did not start (port taken?)")
            time.sleep(0.05)
        return self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
