"""Atomic, self-verifying checkpoints of the trainer's whole state.

A checkpoint is a directory `ckpt-<seq>` in the work dir. It is written as
`.tmp-ckpt-<seq>-<uuid>`, its files fsynced, then `manifest.json` (sizes and
sha256 of every file, plus the caller's metadata: per-partition next offsets,
events applied, train step) is written last, and the directory is renamed into
place. A crash at any point leaves either the previous checkpoints untouched or
a temp dir that `latest()` ignores and the next save removes. Consumer-group
offsets are committed by the caller only after `save` returns, i.e. after the
checkpoint is durable.

Checkpoints are local/POSIX paths (a mounted shared volume on a cluster): the
atomic directory rename is what makes them safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "manifest.json"
PREFIX = "ckpt-"


class CheckpointError(Exception):
    pass


class CheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str = ""  # empty = <work_dir>/checkpoints (POSIX: a shared volume on a cluster)
    interval_s: float = Field(30.0, gt=0)
    keep: int = Field(3, ge=1)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    seq: int
    meta: dict[str, Any]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise CheckpointError("checkpoints.keep must be >= 1")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def _complete(self) -> list[Checkpoint]:
        out = []
        for p in self.dir.glob(f"{PREFIX}*"):
            suffix = p.name[len(PREFIX) :]
            if not (p.is_dir() and suffix.isdigit() and (p / MANIFEST).is_file()):
                continue
            try:
                manifest = json.loads((p / MANIFEST).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            out.append(Checkpoint(p, int(suffix), manifest))
        return sorted(out, key=lambda c: c.seq)

    def list(self) -> list[Checkpoint]:
        return self._complete()

    def verify(self, ckpt: Checkpoint) -> None:
        for name, info in ckpt.meta.get("files", {}).items():
            f = ckpt.path / name
            if not f.is_file() or f.stat().st_size != info["size"]:
                raise CheckpointError(f"{ckpt.path}: {name} missing or wrong size")
            if _file_sha256(f) != info["sha256"]:
                raise CheckpointError(f"{ckpt.path}: {name} sha256 mismatch")

    def latest(self, verify: bool = True) -> Checkpoint | None:
        """The newest complete checkpoint that verifies (older ones are fallbacks)."""
        for ckpt in reversed(self._complete()):
            if not verify:
                return ckpt
            try:
                self.verify(ckpt)
                return ckpt
            except CheckpointError:
                continue
        return None

    def save(self, write_state: Callable[[Path], None], meta: dict[str, Any]) -> Checkpoint:
        """Write a checkpoint: `write_state(dir)` fills a fresh temp dir; then the manifest."""
        for stale in self.dir.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        done = self._complete()
        seq = (done[-1].seq + 1) if done else 1
        tmp = self.dir / f".tmp-{PREFIX}{seq:08d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write_state(tmp)
            files = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                rel = str(f.relative_to(tmp))
                files[rel] = {"size": f.stat().st_size, "sha256": _file_sha256(f)}
            manifest = {"seq": seq, "created_at": time.time(), "files": files, **meta}
            with open(tmp / MANIFEST, "w") as fh:
                json.dump(manifest, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            final = self.dir / f"{PREFIX}{seq:08d}"
            os.rename(tmp, final)
            _fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        return Checkpoint(final, seq, manifest)
