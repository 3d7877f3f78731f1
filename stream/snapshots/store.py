"""Snapshot store: versioned model state for serving, on any pyarrow filesystem.

Layout under the store root (docs/CONTRACTS.md, README "Snapshots and checkpoints"):

    v000001/manifest.json      written last inside a version: a version without
                               one is half-written and invisible
    v000001/dense.safetensors  dense weights, always full
    v000001/mem.<name>.safetensors + mem.<name>.json     (full: each memory's export_state)
    v000001/delta.<name>.<table>.parquet                 (delta: changed rows)
    v000001/ids.<name>.<key>.parquet                     (delta: strings a memory ships)
    v000020/base/manifest.json + the files of a full    (a base: see below)
    LATEST                      the newest published version, replaced atomically

A delta version names its parent; loading version v walks parents back to the
newest full snapshot or base and applies the deltas in order. A base is a full
copy of a delta version, written beside it after the version went live: only a
replica that starts (or rolls back) reads it, so live replicas follow by deltas
alone and never stall on a large load, while chains stay short for newcomers
and retention can drop everything before the newest base. Every file is checked
against the sha256 and size in its manifest before it is used; nothing is ever
unpickled (safetensors, Parquet and JSON only).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memory_bank.base import DeltaState, FullState, MemoryDelta

# 2: the memories are the model state's components (models/state.py): the id tables and
# the doc encoder's word table are one component, "embeddings". 3: the item bank and the
# user histories keyed by integer keys (models.ids), their deltas by row / slot number
# (serving mirrors them). Versions of other formats are refused with a message that says
# so (serving keeps what it has).
FORMAT_VERSION = 3
LATEST = "LATEST"
MANIFEST = "manifest.json"
BASE = "base"  # v<version>/base/: a full copy of a delta version


class SnapshotError(Exception):
    """Base class for snapshot store errors."""


class SnapshotNotFound(SnapshotError):
    pass


class SnapshotCorrupt(SnapshotError):
    """A file is missing, truncated or does not match its manifest hash."""


@dataclass
class SnapshotChain:
    """What a serving replica needs to materialise `version`: one full + deltas."""

    version: int
    manifest: dict[str, Any]
    full: FullState
    deltas: list[DeltaState] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    from_base: bool = False  # the first of `versions` was loaded from its base copy


# -- states across processes (Ray) ----------------------------------------------


def state_to_wire(state: FullState | DeltaState) -> FullState | DeltaState:
    """The same state with numpy arrays in place of its CPU tensors, for Ray calls.

    Ray pickles a torch tensor through its storage with the GIL held (0.30 s for a 111 MB
    full state, stalling the trainer's training thread meanwhile); numpy arrays travel as
    out-of-band buffers (0.017 s). Tensors numpy cannot hold (bfloat16) stay tensors.
    """
    return _map_tensors(state, _to_np)


def state_from_wire(state: FullState | DeltaState) -> FullState | DeltaState:
    """Inverse of `state_to_wire` (zero-copy: the arrays are read, never written)."""
    return _map_tensors(state, _to_torch)


def _map_tensors(state: FullState | DeltaState, fn: Callable[[Any], Any]) -> FullState | DeltaState:
    """`state` with `fn` applied to every tensor-valued field (row indices and ids as they are)."""
    each = lambda ts: {k: fn(v) for k, v in ts.items()}
    if isinstance(state, FullState):
        return FullState(each(state.dense), {m: (each(ts), meta) for m, (ts, meta) in state.memories.items()})
    memories = {
        m: MemoryDelta({t: (rows, fn(v)) for t, (rows, v) in d.tables.items()}, d.ids)
        for m, d in state.memories.items()
    }
    return DeltaState(each(state.dense), memories)


def _to_np(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.dtype != torch.bfloat16:
        return t.detach().cpu().numpy()
    return t


def _to_torch(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        with warnings.catch_warnings():  # Ray's buffers are read-only; nothing writes them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)
    return a


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local path or a URI (s3://, gs://, hdfs://, file://)."""
    if "://" not in uri:
        import os

        path = os.path.abspath(uri)
        os.makedirs(path, exist_ok=True)
        return pafs.LocalFileSystem(), path
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _vdir(version: int) -> str:
    return f"v{version:06d}"


# -- row deltas <-> Parquet ---------------------------------------------------


def delta_table_to_parquet(rows: np.ndarray, values: torch.Tensor, ids: list[str] | None) -> bytes:
    """Rows (M,) + values (M, ...) [+ ids] -> Parquet bytes; trailing shape and dtype in metadata."""
    values = values.detach().cpu().contiguous()
    scalar = values.dim() == 0  # e.g. BatchNorm's num_batches_tracked: one row, no shape
    if scalar:
        values = values.reshape(1)
    m = int(values.shape[0])
    tail = list(values.shape[1:])
    width = int(np.prod(tail)) if tail else 1
    if values.dtype == torch.bfloat16:
        flat = values.view(torch.int16).reshape(m, width).numpy()
    else:
        flat = values.reshape(m, width).numpy()
    arrow_values = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)
    cols = {"row": pa.array(np.asarray(rows, dtype=np.int64)), "value": arrow_values}
    if ids is not None:
        cols["id"] = pa.array(list(ids), type=pa.string())
    table = pa.table(cols).replace_schema_metadata(
        {
            "dtype": str(values.dtype).removeprefix("torch."),
            "shape_tail": json.dumps(tail),
            "scalar": "1" if scalar else "0",
        }
    )
    buf = io.BytesIO()
    # Changed rows are distinct ids and float values: dictionary encoding finds nothing
    # to share and cost 15x the write time (19 vs 1.3 ms for 3,000 x 64 floats, and a
    # 50% larger file); compression gains little on float noise.
    pq.write_table(table, buf, use_dictionary=False, compression="none", write_statistics=False)
    return buf.getvalue()


def delta_table_from_parquet(data: bytes) -> tuple[np.ndarray, torch.Tensor, list[str] | None]:
    table = pq.read_table(io.BytesIO(data))
    meta = table.schema.metadata or {}
    dtype_name = meta.get(b"dtype", b"float32").decode()
    tail = json.loads(meta.get(b"shape_tail", b"[]").decode())
    rows = table.column("row").to_numpy().astype(np.int64)
    flat = table.column("value").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if dtype_name == "bfloat16":
        values = torch.from_numpy(flat.astype(np.int16).copy()).view(torch.bfloat16)
    else:
        values = torch.from_numpy(flat.copy()).to(getattr(torch, dtype_name))
    values = values.reshape(len(rows), *tail)
    if meta.get(b"scalar") == b"1":
        values = values.reshape(())
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    return rows, values, ids


def _ids_to_parquet(ids: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(list(ids), type=pa.string())}), buf)
    return buf.getvalue()


def _ids_from_parquet(data: bytes) -> list[str]:
    return pq.read_table(io.BytesIO(data)).column("id").to_pylist()


# -- the store -------------------------------------------------------------------


class SnapshotStore:
    def __init__(self, uri: str, keep_versions: int = 20):
        self.uri = uri
        self.fs, self.root = open_filesystem(uri)
        self.keep_versions = keep_versions
        # Bases are written beside newer deltas (another thread of the publisher):
        # retention must not delete a version while its base is being written.
        self._lock = threading.Lock()
        self._writing_bases: set[int] = set()

    # paths
    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _read(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, OSError) as e:
            raise SnapshotCorrupt(f"cannot read {path}: {e}") from e

    # listing
    def versions(self) -> list[int]:
        """Complete versions (manifest present), ascending."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError:
            return []
        out = []
        for info in infos:
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.Directory and name.startswith("v") and name[1:].isdigit():
                if self.fs.get_file_info(self._p(name, MANIFEST)).type == pafs.FileType.File:
                    out.append(int(name[1:]))
        return sorted(out)

    def latest_version(self) -> int | None:
        info = self.fs.get_file_info(self._p(LATEST))
        if info.type != pafs.FileType.File:
            return None
        text = self._read(self._p(LATEST)).decode().strip()
        return int(text) if text.isdigit() else None

    def manifest(self, version: int) -> dict[str, Any]:
        path = self._p(_vdir(version), MANIFEST)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise SnapshotNotFound(f"version {version} has no manifest under {self.uri}")
        try:
            m = json.loads(self._read(path))
        except json.JSONDecodeError as e:
            raise SnapshotCorrupt(f"version {version}: manifest is not valid JSON: {e}") from e
        _check_format(m, version)
        if m.get("version") != version:
            raise SnapshotCorrupt(f"version {version}: manifest has wrong version field")
        return m

    # publishing
    def publish_full(
        self, version: int, state: FullState, meta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return self._publish(version, None, "full", _full_files(state), meta or {})

    def publish_base(
        self, version: int, state: FullState, meta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write a full copy of the existing delta `version` beside it (`state` must be
        that version's content). LATEST does not move: serving already runs it."""
        if self.manifest(version)["kind"] != "delta":
            raise SnapshotError(f"version {version} is full already; a base is for a delta version")
        if self.has_base(version):
            raise SnapshotError(f"version {version} already has a base under {self.uri}")
        with self._lock:
            self._writing_bases.add(version)
        try:
            return self._write_version_dir(
                self._p(_vdir(version), BASE), version, None, BASE, _full_files(state), meta or {}
            )
        finally:
            with self._lock:
                self._writing_bases.discard(version)

    def has_base(self, version: int) -> bool:
        return self.fs.get_file_info(self._p(_vdir(version), BASE, MANIFEST)).type == pafs.FileType.File

    def base_manifest(self, version: int) -> dict[str, Any]:
        try:
            m = json.loads(self._read(self._p(_vdir(version), BASE, MANIFEST)))
        except json.JSONDecodeError as e:
            raise SnapshotCorrupt(f"version {version}: base manifest is not valid JSON: {e}") from e
        _check_format(m, version)
        if m.get("version") != version or m.get("kind") != BASE:
            raise SnapshotCorrupt(f"version {version}: base manifest has wrong version/kind fields")
        return m

    def publish_delta(
        self, version: int, parent: int, state: DeltaState, meta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        files: dict[str, bytes] = {"dense.safetensors": st_save(_contig(state.dense))}
        for name, delta in state.memories.items():
            for table, (rows, values) in delta.tables.items():
                files[f"delta.{name}.{table}.parquet"] = delta_table_to_parquet(rows, values, None)
            for key, ids in delta.ids.items():
                files[f"ids.{name}.{key}.parquet"] = _ids_to_parquet(ids)
        return self._publish(version, parent, "delta", files, meta or {})

    def _publish(
        self, version: int, parent: int | None, kind: str, files: dict[str, bytes], meta: dict
    ) -> dict[str, Any]:
        if version in self.versions():
            raise SnapshotError(f"version {version} already exists under {self.uri}")
        manifest = self._write_version_dir(self._p(_vdir(version)), version, parent, kind, files, meta)
        self._set_latest(version)
        self._apply_retention()
        return manifest

    def _write_version_dir(
        self, vdir: str, version: int, parent: int | None, kind: str, files: dict[str, bytes], meta: dict
    ) -> dict[str, Any]:
        self.fs.create_dir(vdir, recursive=True)
        for name, data in files.items():
            self._write(posixpath.join(vdir, name), data)
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": version,
            "parent": parent,
            "kind": kind,
            "created_at": time.time(),
            "files": {n: {"sha256": _sha256(d), "size": len(d)} for n, d in files.items()},
            **meta,
        }
        # The manifest makes the version (or base) visible; LATEST makes a version current.
        self._write(posixpath.join(vdir, MANIFEST), json.dumps(manifest, indent=1).encode())
        return manifest

    def _set_latest(self, version: int) -> None:
        tmp = self._p(f".{LATEST}.{uuid.uuid4().hex}")
        self._write(tmp, f"{version}\n".encode())
        self.fs.move(tmp, self._p(LATEST))  # atomic rename on local/HDFS; S3 is copy+delete

    def set_latest(self, version: int) -> None:
        """Point LATEST at an existing complete version (rollback)."""
        self.manifest(version)
        self._set_latest(version)

    def _apply_retention(self) -> None:
        versions = self.versions()
        if len(versions) <= self.keep_versions:
            return
        keep = set(versions[-self.keep_versions :])
        # Keep every version the retained ones need to load (their chain to a full or a
        # base), and any whose base is being written now.
        for v in list(keep):
            keep.update(self._chain_versions(v)[0])
        with self._lock:
            keep.update(self._writing_bases)
            for v in versions:
                if v not in keep:
                    self.fs.delete_dir(self._p(_vdir(v)))

    def _chain_versions(self, version: int) -> tuple[list[int], bool]:
        """The versions serving loads for `version`, oldest first, and whether the first
        is read from its base (else it is a full version)."""
        chain = []
        v: int | None = version
        seen = set()
        while v is not None:
            if v in seen:
                raise SnapshotCorrupt(f"version {version}: cycle in parent links at {v}")
            seen.add(v)
            m = self.manifest(v)
            chain.append(v)
            if m["kind"] == "full":
                return chain[::-1], False
            if self.has_base(v):
                return chain[::-1], True
            v = m.get("parent")
        raise SnapshotCorrupt(f"delta version {chain[-1]} has no parent")

    # loading
    def _verified_files(self, version: int, manifest: dict[str, Any], base: bool = False) -> dict[str, bytes]:
        vdir = self._p(_vdir(version), BASE) if base else self._p(_vdir(version))
        out = {}
        for name, info in manifest["files"].items():
            data = self._read(posixpath.join(vdir, name))
            if len(data) != info["size"]:
                raise SnapshotCorrupt(
                    f"version {version}: {name} is {len(data)} bytes, manifest says {info['size']}"
                )
            if _sha256(data) != info["sha256"]:
                raise SnapshotCorrupt(f"version {version}: {name} sha256 does not match manifest")
            out[name] = data
        return out

    def verify(self, version: int) -> None:
        """Raise SnapshotCorrupt unless every file of the chain of `version` is intact."""
        for _ in self._verified_chain(self._chain_versions(version)):
            pass

    def _verified_chain(
        self, chain: tuple[list[int], bool]
    ) -> Iterator[tuple[int, dict[str, Any], dict[str, bytes]]]:
        """(version, manifest, verified files) along a chain, the first from its base if so."""
        versions, from_base = chain
        for i, v in enumerate(versions):
            base = from_base and i == 0
            m = self.base_manifest(v) if base else self.manifest(v)
            yield v, m, self._verified_files(v, m, base)

    def load_delta(self, version: int) -> DeltaState:
        """Verify and decode one delta version (a replica already on its parent)."""
        m = self.manifest(version)
        if m["kind"] != "delta":
            raise SnapshotError(f"version {version} is a {m['kind']} snapshot, not a delta")
        files = self._verified_files(version, m)
        try:
            return _decode_delta(files)
        except Exception as e:
            raise SnapshotCorrupt(f"version {version}: cannot decode: {type(e).__name__}: {e}") from e

    def set_pinned(self, version: int | None) -> None:
        """Pin serving to `version` (rollback), or follow LATEST again with None."""
        path = self._p("PINNED")
        if version is None:
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                self.fs.delete_file(path)
            return
        self.verify(version)
        tmp = self._p(f".PINNED.{uuid.uuid4().hex}")
        self._write(tmp, f"{version}\n".encode())
        self.fs.move(tmp, path)

    def pinned_version(self) -> int | None:
        path = self._p("PINNED")
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        text = self._read(path).decode().strip()
        return int(text) if text.isdigit() else None

    def load_chain(self, version: int | None = None) -> SnapshotChain:
        """Verify and decode everything serving needs for `version` (default LATEST)."""
        if version is None:
            version = self.latest_version()
            if version is None:
                raise SnapshotNotFound(f"no LATEST under {self.uri}")
        chain_versions, from_base = chain = self._chain_versions(version)
        full: FullState | None = None
        deltas: list[DeltaState] = []
        for v, m, files in self._verified_chain(chain):
            try:
                if m["kind"] in ("full", BASE):
                    full = _decode_full(files)
                else:
                    deltas.append(_decode_delta(files))
            except SnapshotError:
                raise
            except Exception as e:  # a file that hashes right but does not decode
                raise SnapshotCorrupt(f"version {v}: cannot decode: {type(e).__name__}: {e}") from e
        assert full is not None
        return SnapshotChain(version, self.manifest(version), full, deltas, chain_versions, from_base)


def _check_format(manifest: dict[str, Any], version: int) -> None:
    got = manifest.get("format_version")
    if got != FORMAT_VERSION:
        raise SnapshotCorrupt(
            f"version {version}: snapshot format {got}, this release reads format {FORMAT_VERSION} "
            "(written by another release: publish a fresh full version from a trainer of this one)"
        )


def _full_files(state: FullState) -> dict[str, bytes]:
    files: dict[str, bytes] = {"dense.safetensors": st_save(_contig(state.dense))}
    for name, (tensors, mmeta) in state.memories.items():
        files[f"mem.{name}.safetensors"] = st_save(_contig(tensors))
        files[f"mem.{name}.json"] = json.dumps(mmeta, sort_keys=True).encode()
    return files


def _contig(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _decode_full(files: dict[str, bytes]) -> FullState:
    dense = st_load(files["dense.safetensors"])
    memories = {}
    for name in files:
        if name.startswith("mem.") and name.endswith(".safetensors"):
            mem = name[len("mem.") : -len(".safetensors")]
            meta = json.loads(files[f"mem.{mem}.json"])
            memories[mem] = (st_load(files[name]), meta)
    return FullState(dense, memories)


def _decode_delta(files: dict[str, bytes]) -> DeltaState:
    dense = st_load(files["dense.safetensors"])
    memories: dict[str, MemoryDelta] = {}
    for name, data in files.items():
        if name.startswith("delta.") and name.endswith(".parquet"):
            mem, table = name[len("delta.") : -len(".parquet")].split(".", 1)
            rows, values, _ = delta_table_from_parquet(data)
            memories.setdefault(mem, MemoryDelta()).tables[table] = (rows, values)
        elif name.startswith("ids.") and name.endswith(".parquet"):
            mem, key = name[len("ids.") : -len(".parquet")].split(".", 1)
            memories.setdefault(mem, MemoryDelta()).ids[key] = _ids_from_parquet(data)
    return DeltaState(dense, memories)
