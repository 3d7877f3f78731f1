"""HTTP helpers both servers share (the admin API and the /rank app): bodies read under a
size limit, strict JSON (no duplicate keys), JSON-safe validation errors, Retry-After,
and error details without absolute paths."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError


class ErrorBody(BaseModel):
    detail: Any


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 past `limit` bytes before it is read in full:
    a Content-Length over the limit is refused unread, and a body without one (chunked)
    is counted as it streams and refused at the first chunk past the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, "Content-Length is not a number") from None
        if size > limit:
            raise HTTPException(413, f"request body of {size} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def require_json(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise HTTPException(415, "send the body as JSON, with 'Content-Type: application/json'")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _body_error(msg: str) -> HTTPException:
    return HTTPException(422, [{"type": "json_invalid", "loc": ["body"], "msg": msg}])


def parse_json(raw: bytes) -> Any:
    """A JSON body, strictly: an object with a key twice is a 422 naming the key (not
    last-wins). NaN, Infinity and numbers past float range (1e400) parse as non-finite
    floats, for the model's validation to refuse by field name."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise _body_error(f"duplicate key {e.args[0][:100]!r} in a JSON object") from None
    except RecursionError:
        raise _body_error("JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of >4300 digits
        raise _body_error(f"invalid JSON: {e}"[:300]) from None


def validation_errors(errors: list[Any], prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic errors as JSON-safe details: type, location and message only (the input,
    which may be NaN, and the context, which may hold an exception, are left out)."""
    return [
        {"type": str(e.get("type", "")), "loc": [*prefix, *e.get("loc", ())], "msg": str(e.get("msg", ""))}
        for e in errors
    ]


def invalid(e: ValidationError) -> HTTPException:
    return HTTPException(422, validation_errors(e.errors(include_url=False), ("body",)))


_PATH = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\",;()\[\]{}<>]*"  # a URI: s3://bucket/snapshots/v3
    r"|(?<![\w.~-])/[^\s'\",;:()\[\]{}<>]+"  # an absolute POSIX path
    r"|\b[A-Za-z]:\\[^\s'\",;()\[\]{}<>]*"  # a Windows one
)


def _last_component(m: re.Match) -> str:
    parts = [p for p in re.split(r"[/\\]", m.group()) if p and not p.endswith(":")]
    return parts[-1] if parts else "<path>"


def scrub_paths(text: str) -> str:
    """`text` with each absolute path or URI cut to its last component."""
    return _PATH.sub(_last_component, text)


def scrub(obj: Any) -> Any:
    """`scrub_paths` over every string in a JSON-like value."""
    if isinstance(obj, str):
        return scrub_paths(obj)
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub(v) for v in obj]
    return obj
