"""Avro values: a schema file, and the Confluent wire format with a schema registry.

Two layouts of a Kafka value, chosen by `kafka.event_format.avro`:

- `raw`: the value is one Avro datum (schemaless binary) written with the schema
  in `schema_file`.
- `confluent`: magic byte 0, a 4-byte big-endian schema id, then the datum written
  with that schema, which is fetched once per id from the registry
  (`GET <registry_url>/schemas/ids/<id>`) and cached for the life of the decoder.
  With a `schema_file` too, it is the reader schema: Avro schema resolution maps
  the writer's fields onto it (renamed-with-alias, defaulted, promoted), so the
  mapping's paths stay valid across the producers' schema versions.

`AvroDecoder.decode` returns the datum as Python values (records are dicts) or
raises `AvroValueError` with a reason; the event mapping turns that into a reject
(`invalid_avro`). A registry that cannot be reached is retried a few times within
the call, then the value is rejected (dead-lettered with the reason, so nothing is
lost; it can be re-produced once the registry is back). An id the registry does
not know is remembered as unknown for `UNKNOWN_ID_RETRY_S`, so a burst of such
values does not become a burst of HTTP requests.
"""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from stream.errors import MemstreamError

MAGIC = 0
HEADER_BYTES = 5  # magic byte + 4-byte schema id
UNKNOWN_ID_RETRY_S = 60.0
REGISTRY_ATTEMPTS = 3


class AvroValueError(ValueError):
    """One value that cannot be decoded; the message is the reject's reason."""


class AvroSchemaError(MemstreamError, ValueError):
    """A schema file that does not load (a ValueError: at config load pydantic names the field)."""


def load_schema_file(path: str | Path) -> Any:
    """The parsed schema of an `.avsc` file, or AvroSchemaError saying what is wrong."""
    import fastavro

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise AvroSchemaError(f"cannot read Avro schema {path}: {e.strerror}") from None
    try:
        return fastavro.parse_schema(json.loads(text))
    except ValueError as e:  # JSON syntax, and fastavro's SchemaParseException
        raise AvroSchemaError(f"{path} is not an Avro schema: {e}") from None
    except Exception as e:  # fastavro raises assorted types for malformed schemas
        raise AvroSchemaError(f"{path} is not an Avro schema: {type(e).__name__}: {e}") from None


def record_field_names(schema: Any) -> set[str] | None:
    """Top-level field names (and aliases) of a record schema; None for any other schema."""
    if isinstance(schema, dict) and schema.get("type") == "record":
        names = set()
        for f in schema.get("fields", []):
            names.add(f["name"])
            names.update(f.get("aliases", []))
        return names
    return None


class SchemaRegistry:
    """Schemas by id from a Confluent-compatible registry, each fetched once."""

    def __init__(self, url: str, timeout_s: float = 5.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._schemas: dict[int, Any] = {}
        self._unknown: dict[int, tuple[float, str]] = {}  # id -> (monotonic time, reason)
        self._lock = threading.Lock()
        self.fetches = 0

    def get(self, schema_id: int) -> Any:
        schema = self._schemas.get(schema_id)
        if schema is not None:
            return schema
        with self._lock:  # one fetch per id, even with several poll threads
            schema = self._schemas.get(schema_id)
            if schema is not None:
                return schema
            seen = self._unknown.get(schema_id)
            if seen is not None and time.monotonic() - seen[0] < UNKNOWN_ID_RETRY_S:
                raise AvroValueError(seen[1])
            schema = self._fetch(schema_id)
            self._schemas[schema_id] = schema
            return schema

    def _fetch(self, schema_id: int) -> Any:
        import fastavro

        where = f"{self.url}/schemas/ids/{schema_id}"
        last = ""
        for attempt in range(REGISTRY_ATTEMPTS):
            try:
                with urllib.request.urlopen(where, timeout=self.timeout_s) as resp:
                    body = json.loads(resp.read())
                self.fetches += 1
                break
            except urllib.error.HTTPError as e:
                reason = f"schema id {schema_id}: the registry answered {e.code} ({where})"
                if e.code == 404 or 400 <= e.code < 500:
                    self._unknown[schema_id] = (time.monotonic(), reason)
                    raise AvroValueError(reason) from None
                last = reason
            except (OSError, ValueError) as e:  # refused, timeout, DNS, a non-JSON body
                last = f"schema id {schema_id}: registry {self.url} not usable: {e}"
            time.sleep(0.2 * 2**attempt)
        else:
            raise AvroValueError(f"{last} (after {REGISTRY_ATTEMPTS} attempts)")
        kind = body.get("schemaType", "AVRO") if isinstance(body, dict) else None
        if kind != "AVRO" or not isinstance(body.get("schema"), str):
            reason = f"schema id {schema_id} is not an Avro schema (schemaType {kind!r})"
            self._unknown[schema_id] = (time.monotonic(), reason)
            raise AvroValueError(reason)
        try:
            return fastavro.parse_schema(json.loads(body["schema"]))
        except Exception as e:
            reason = f"schema id {schema_id} from the registry does not parse: {e}"
            self._unknown[schema_id] = (time.monotonic(), reason)
            raise AvroValueError(reason) from None


class AvroDecoder:
    """Kafka value bytes -> the Avro datum (a dict for a record schema)."""

    def __init__(self, reader_schema: Any | None, registry: SchemaRegistry | None, wire_format: str):
        if wire_format == "raw" and reader_schema is None:
            raise ValueError("the raw Avro layout needs a schema file")
        if wire_format == "confluent" and registry is None and reader_schema is None:
            raise ValueError("the Confluent layout needs a registry or a schema file")
        self.reader_schema = reader_schema
        self.registry = registry
        self.confluent = wire_format == "confluent"

    def decode(self, raw: bytes) -> Any:
        from fastavro import schemaless_reader

        if self.confluent:
            if len(raw) < HEADER_BYTES or raw[0] != MAGIC:
                raise AvroValueError(
                    f"not the Confluent wire format: expected magic byte 0 and a 4-byte schema id, "
                    f"got {raw[:HEADER_BYTES].hex() or 'nothing'}"
                )
            schema_id = int.from_bytes(raw[1:HEADER_BYTES], "big")
            # Without a registry, every id is read with the schema file (one known writer).
            writer = self.registry.get(schema_id) if self.registry is not None else self.reader_schema
            body = io.BytesIO(raw)
            body.seek(HEADER_BYTES)
        else:
            writer = self.reader_schema
            body = io.BytesIO(raw)
        reader = self.reader_schema if self.registry is not None else None
        try:
            datum = schemaless_reader(body, writer, reader)
        except Exception as e:  # truncated data, bad unions, resolution errors: all one reject
            raise AvroValueError(f"does not decode with the schema: {type(e).__name__}: {e}"[:300]) from None
        left = len(raw) - body.tell()
        if left:
            # A datum that ends early was written with another schema: trust none of it.
            raise AvroValueError(f"{left} bytes left after the datum: written with another schema?")
        return datum


def encode(record: Any, schema: Any, schema_id: int | None = None) -> bytes:
    """`record` as one Avro datum; with `schema_id`, in the Confluent wire format (what a
    Confluent producer writes: for test data and local replays of an Avro topic)."""
    import fastavro

    out = io.BytesIO()
    if schema_id is not None:
        out.write(bytes([MAGIC]) + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return out.getvalue()


class LocalSchemaRegistry:
    """A minimal schema registry on localhost, for development and tests: it answers
    `GET /schemas/ids/<id>` as Confluent's does (the schema as a JSON string) and 404 for
    an unknown id; `requests` lists the paths asked. Use it as a context manager."""

    def __init__(self, schemas: dict[int, Any], port: int = 0):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.schemas = dict(schemas)
        self.requests: list[str] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                registry.requests.append(self.path)
                prefix = "/schemas/ids/"
                sid = self.path[len(prefix) :] if self.path.startswith(prefix) else ""
                schema = registry.schemas.get(int(sid)) if sid.isdigit() else None
                if schema is None:
                    body, code = {"error_code": 40403, "message": "Schema not found"}, 404
                else:
                    body, code = {"schema": json.dumps(schema)}, 200
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # no access log on stderr
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LocalSchemaRegistry:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="schema-registry", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
