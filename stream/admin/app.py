"""Admin API: what the memories hold, how fresh serving is, how far behind ingest is.

A FastAPI app over a `JobView` (the driver's window onto its actors). Every
route but `/healthz` needs `Authorization: Bearer <token>`, compared in constant
time. Bad input is a 4xx with a message (404 unknown id, 422 bad parameter,
429 rate limited), never a 500. The server binds 127.0.0.1 unless configured
otherwise and refuses to bind anything else without a configured token.
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
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

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


class AdminConfigError(Exception):
    pass


class NotFound(Exception):
    """Raised by a JobView for an unknown id; becomes a 404."""


class JobView(Protocol):
    def bank_item(self, item_id: str) -> dict[str, Any] | None: ...
    def bank_neighbors(self, item_id: str, k: int) -> list[dict[str, Any]] | None: ...
    def memory_stats(self, name: str) -> dict[str, Any] | None: ...
    def user_history(self, user_id: str, limit: int) -> dict[str, Any] | None: ...
    def snapshots(self) -> list[dict[str, Any]]: ...
    def rollback(self, version: int) -> dict[str, Any]: ...
    def unpin(self) -> dict[str, Any]: ...
    def serving(self) -> list[dict[str, Any]]: ...
    def ingest_lag(self) -> dict[str, Any]: ...
    def metrics_text(self) -> bytes: ...


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

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                return False
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:  # bound memory under address spraying
                self._buckets.clear()
            return True


class ErrorBody(BaseModel):
    detail: Any


# Documented on every secured route so clients (and schemathesis) know the error shapes.
_ERRORS = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    429: {"model": ErrorBody, "description": "rate limit exceeded (per client address)"},
}
_NOT_FOUND = {404: {"model": ErrorBody, "description": "unknown id or version"}}


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(..., ge=1)


def create_app(view: JobView, cfg: AdminConfig, token: str) -> FastAPI:
    app = FastAPI(
        title="memstream admin",
        version="1",
        description="Memory-bank, PKM, LMN, snapshot, serving and ingest state of a memstream job.",
    )
    limiter = _RateLimiter(cfg.rate_limit_per_s, cfg.rate_limit_burst)
    expected = token.encode()

    def auth(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)
        if not ok:
            raise HTTPException(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        client = request.client.host if request.client else "unknown"
        if not limiter.allow(client):
            raise HTTPException(429, "rate limit exceeded; slow down")

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc) or "not found"}, status_code=404)

    # Route options: the auth dependency, and the error answers it adds to the spec.
    secured: dict[str, Any] = {"dependencies": [Depends(auth)], "responses": _ERRORS}
    secured_or_404: dict[str, Any] = {**secured, "responses": {**_ERRORS, **_NOT_FOUND}}
    ItemId = PathParam(..., pattern=ID_PATTERN, description="item id (URL-encoded)")

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
            raise NotFound(f"item {item_id!r} is not in the bank")
        return row

    @app.get("/v1/bank/items/{item_id}/neighbors", **secured_or_404)
    def bank_neighbors(item_id: str = ItemId, k: int = Query(10, ge=1, le=MAX_PAGE)) -> dict:
        found = view.bank_neighbors(item_id, k)
        if found is None:
            raise NotFound(f"item {item_id!r} is not in the bank")
        return {"item_id": item_id, "k": k, "neighbors": found}

    @app.get("/v1/{component}/stats", **secured_or_404)
    def component_stats(component: str = PathParam(..., pattern=r"^[a-z_]{1,32}$")) -> dict[str, Any]:
        """Any component of the model state: bank, pkm, lmn, history, features, embeddings."""
        found = view.memory_stats(component)
        if found is None:
            raise NotFound(f"the model has no component {component!r}")
        return found

    @app.get("/v1/users/{user_id}/history", **secured_or_404)
    def user_history(
        user_id: str = PathParam(..., pattern=ID_PATTERN),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
    ) -> dict[str, Any]:
        found = view.user_history(user_id, limit)
        if found is None:
            raise NotFound(f"user {user_id!r} has no history")
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

    @app.post("/v1/snapshots/rollback", **secured_or_404)
    def rollback(req: RollbackRequest) -> dict[str, Any]:
        """Pin serving to `version` (it must still be in the store); see DELETE /v1/snapshots/pin."""
        return view.rollback(req.version)

    @app.delete("/v1/snapshots/pin", **secured)
    def unpin() -> dict[str, Any]:
        """Undo a rollback: serving follows the newest published version again."""
        return view.unpin()

    @app.get("/v1/serving", **secured)
    def serving() -> dict[str, Any]:
        return {"replicas": view.serving()}

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
