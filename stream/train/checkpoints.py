"""Atomic, self-verifying checkpoints of the trainer's whole state.

A checkpoint is a directory `ckpt-<seq>` in the work dir. It is written as
`.tmp-ckpt-<seq>-<uuid>`, its files fsynced, then `manifest.json` (sizes and
sha256 of every file, plus the caller's metadata: per-partition next offsets,
events applied, train step) is written last, and the directory is renamed into
place. A crash at any point leaves either the previous checkpoints untouched or
a temp dir that `latest()` ignores and the next save removes. Consumer-group
offsets are committed by the caller only after `save` returns, i.e. after the
checkpoint is durable.

Damage (a missing or unparseable manifest, a missing file, a size or sha256
mismatch) is found by `latest()` at restore: the damaged directory is renamed into
`quarantine/ckpt-<seq>-<reason>-<UTC time>` (out of the `ckpt-*` namespace, kept for a
post-mortem, the newest `quarantine_keep` of them), the fall back to an older one is
logged, and the manager keeps a bounded record of it for reports (`health()`).
`latest(quarantine=False)` is the read-only variant for callers that only inspect.

Numbering never reuses a name: the next seq is 1 + the highest seq of anything named
`ckpt-<digits>...` in the dir or in `quarantine/` (complete, damaged, half-written, a
stray file) or handed out earlier by this manager.

Retention keeps the newest `keep` complete checkpoints and never the one just saved;
an old one is first renamed out of the `ckpt-*` namespace (`.del-ckpt-...`) and only
then removed, so a reader never sees a half-deleted checkpoint.

Save failures are counted (`saves`, `save_failures`, `consecutive_failures`,
`last_error`, `last_durable`); once `max_consecutive_failures` saves in a row have
failed, `save` raises `CheckpointDurabilityError` (chained to the last error) so the
caller can stop the job instead of running on with nothing durable.

Checkpoints are local/POSIX paths (a mounted shared volume on a cluster): the
atomic directory rename is what makes them safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREFIX = "ckpt-"
QUARANTINE = "quarantine"  # subdirectory for damaged checkpoints (not matched by ckpt-*)
_SEQ_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)")
_STALE_GLOBS = (f".tmp-{PREFIX}*", f".del-{PREFIX}*")
QUARANTINE_RECORD = 20  # how many quarantined checkpoints the in-memory record keeps


class CheckpointError(Exception):
    pass


class CheckpointCorruptError(CheckpointError):
    """A checkpoint that does not verify; `reason` is a short slug (e.g. sha256-mismatch)."""

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


class CheckpointDurabilityError(CheckpointError):
    """`max_consecutive_failures` saves in a row failed: nothing new is durable; stop."""


class CheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str = ""  # empty = <work_dir>/checkpoints (POSIX: a shared volume on a cluster)
    interval_s: float = Field(30.0, gt=0)
    keep: int = Field(3, ge=1)
    # save() raises CheckpointDurabilityError once this many saves in a row failed
    max_consecutive_failures: int = Field(5, gt=0)
    # damaged checkpoints kept on disk under <dir>/quarantine (the newest by seq)
    quarantine_keep: int = Field(3, ge=1)


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _seq_of(name: str) -> int | None:
    m = _SEQ_RE.match(name)
    return int(m.group(1)) if m else None


def _summary(ckpt: Checkpoint) -> dict[str, Any]:
    """The JSON-safe part of a checkpoint's meta that reports need."""
    meta = ckpt.meta
    return {
        "seq": ckpt.seq,
        "path": str(ckpt.path),
        "offsets": {str(p): o for p, o in (meta.get("offsets") or {}).items()},
        "events_applied": meta.get("events_applied"),
        "train_step": meta.get("train_step"),
        "created_at": meta.get("created_at"),
    }


class CheckpointManager:
    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        max_consecutive_failures: int = 5,
        quarantine_keep: int = 3,
    ):
        if keep < 1:
            raise CheckpointError("checkpoints.keep must be >= 1")
        if max_consecutive_failures < 1:
            raise CheckpointError("checkpoints.max_consecutive_failures must be >= 1")
        if quarantine_keep < 1:
            raise CheckpointError("checkpoints.quarantine_keep must be >= 1")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.max_consecutive_failures = max_consecutive_failures
        self.quarantine_keep = quarantine_keep
        # Saves are serialised; the ckpt-* namespace (rename into place, retention,
        # quarantine, and latest()'s scan) is guarded separately so that a reader does
        # not wait for a whole write_state.
        self._save_lock = threading.Lock()
        self._dir_lock = threading.RLock()
        self._high_seq = 0  # the highest seq this manager handed out
        self._unmovable: set[str] = set()  # damaged ones a quarantine rename failed for
        # counters (health())
        self.saves = 0
        self.save_failures = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.last_durable: dict[str, Any] | None = None  # _summary() of the newest durable one
        self.quarantined = 0
        self.fallbacks = 0  # restores that had to skip damaged newer checkpoints
        self._quarantine_record: deque[dict[str, Any]] = deque(maxlen=QUARANTINE_RECORD)

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, default_dir: str | os.PathLike) -> CheckpointManager:
        """A manager for `cfg` (`cfg.dir`, or `default_dir` when that is empty)."""
        return cls(
            Path(cfg.dir) if cfg.dir else Path(default_dir),
            keep=cfg.keep,
            max_consecutive_failures=cfg.max_consecutive_failures,
            quarantine_keep=cfg.quarantine_keep,
        )

    # -- reading ---------------------------------------------------------------------------------
    def _entries(self) -> list[tuple[int, Path]]:
        """Everything named ckpt-<digits> at the top level (any kind), oldest first."""
        out = []
        for p in self.dir.glob(f"{PREFIX}*"):
            suffix = p.name[len(PREFIX) :]
            if suffix.isdigit():
                out.append((int(suffix), p))
        return sorted(out)

    def _load(self, seq: int, path: Path) -> Checkpoint:
        """The checkpoint at `path` with its manifest; CheckpointCorruptError if it has none."""
        if not path.is_dir():
            raise CheckpointCorruptError(path, "not-a-directory", "not a directory")
        mf = path / MANIFEST
        if not mf.is_file():
            raise CheckpointCorruptError(path, "manifest-missing", f"{MANIFEST} missing")
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError
            raise CheckpointCorruptError(path, "manifest-unparseable", f"{MANIFEST} unparseable: {e}") from e
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CheckpointCorruptError(path, "manifest-invalid", f"{MANIFEST} has no file table")
        return Checkpoint(path, seq, manifest)

    def _complete(self) -> list[Checkpoint]:
        out = []
        for seq, p in self._entries():
            try:
                out.append(self._load(seq, p))
            except (CheckpointCorruptError, OSError):
                continue
        return out

    def list(self) -> list[Checkpoint]:
        """The checkpoints with a readable manifest, oldest first (not verified; read-only)."""
        return self._complete()

    def verify(self, ckpt: Checkpoint) -> None:
        """Raise CheckpointCorruptError unless every file the manifest names is intact."""
        for name, info in ckpt.meta.get("files", {}).items():
            f = ckpt.path / name
            try:
                size, digest = int(info["size"]), str(info["sha256"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointCorruptError(
                    ckpt.path, "manifest-invalid", f"{MANIFEST}: bad entry for {name}"
                ) from e
            if not f.is_file():
                raise CheckpointCorruptError(ckpt.path, "file-missing", f"{name} missing")
            if f.stat().st_size != size:
                raise CheckpointCorruptError(
                    ckpt.path, "size-mismatch", f"{name} is {f.stat().st_size} bytes, manifest says {size}"
                )
            if _file_sha256(f) != digest:
                raise CheckpointCorruptError(ckpt.path, "sha256-mismatch", f"{name} sha256 mismatch")

    def latest(self, verify: bool = True, quarantine: bool = True) -> Checkpoint | None:
        """The newest complete checkpoint that verifies (older ones are fallbacks).

        With `quarantine` (the default: this is the restore path), every damaged checkpoint
        newer than the one returned, and any older one without a readable manifest, is
        renamed into `quarantine/` with a WARNING, and a fall back is logged and counted.
        `quarantine=False` is read-only: damage is skipped and logged, nothing moves and no
        counter changes (for callers that only inspect, e.g. a benchmark's final look).
        With `verify=False` only the manifests are checked, not the files' sha256.
        """
        with self._dir_lock:
            damaged: list[tuple[int, CheckpointCorruptError]] = []
            found: Checkpoint | None = None
            entries = self._entries()
            for i in range(len(entries) - 1, -1, -1):
                seq, path = entries[i]
                try:
                    ckpt = self._load(seq, path)
                    if verify:
                        self.verify(ckpt)
                except CheckpointCorruptError as e:
                    if os.path.lexists(path):  # else removed under us: not damage
                        damaged.append((seq, e))
                    continue
                except OSError as e:  # unreadable: damage as far as a restore can tell
                    if os.path.lexists(path):
                        damaged.append((seq, CheckpointCorruptError(path, "unreadable", str(e))))
                    continue
                found = ckpt
                if quarantine:  # older ones without a manifest: cheap to find, never useful
                    for oseq, opath in entries[:i]:
                        try:
                            self._load(oseq, opath)
                        except CheckpointCorruptError as e:
                            damaged.append((oseq, e))
                        except OSError:
                            pass
                break
            newer = [(s, e) for s, e in damaged if found is None or s > found.seq]
            if quarantine:
                for seq, e in damaged:
                    self._quarantine(seq, e)
            self._report(found, newer, quarantine)
            if quarantine and found is not None:
                if self.last_durable is None or found.seq > self.last_durable["seq"]:
                    self.last_durable = _summary(found)
            return found

    def _report(
        self, found: Checkpoint | None, newer: list[tuple[int, CheckpointCorruptError]], quarantine: bool
    ) -> None:
        if not newer:
            return
        what = ", ".join(f"{s} ({e.reason})" for s, e in newer)
        if quarantine:
            self.fallbacks += 1
        if found is not None:
            log.warning(
                "checkpoint fallback in %s: newest usable is %d (offsets %s); skipped %d damaged newer: %s",
                self.dir,
                found.seq,
                found.meta.get("offsets"),
                len(newer),
                what,
            )
        else:
            log.error(
                "no usable checkpoint in %s: all %d damaged (%s); restoring nothing",
                self.dir,
                len(newer),
                what,
            )

    def _quarantine(self, seq: int, err: CheckpointCorruptError) -> None:
        src = err.path
        if str(src) in self._unmovable:
            return  # already reported and counted
        qdir = self.dir / QUARANTINE
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = qdir / f"{PREFIX}{seq:08d}-{err.reason}-{stamp}"
        if os.path.lexists(target):
            target = target.with_name(f"{target.name}-{uuid.uuid4().hex[:6]}")
        try:
            qdir.mkdir(exist_ok=True)
            os.rename(src, target)
        except OSError as e:
            if not os.path.lexists(src):
                return  # removed under us (retention of a concurrent save): not damage
            moved: Path | None = None
            why = str(e)
        else:
            moved, why = target, ""
        self.quarantined += 1
        self._quarantine_record.append(
            {
                "seq": seq,
                "reason": err.reason,
                "detail": err.detail,
                "path": str(moved or src),
                "quarantined": moved is not None,
                "at": time.time(),
            }
        )
        if moved is None:
            self._unmovable.add(str(src))
            log.warning(
                "damaged checkpoint %s (%s: %s) could not be quarantined (%s); left in place, "
                "new checkpoints are numbered past it",
                src,
                err.reason,
                err.detail,
                why,
            )
            return
        log.warning("quarantined damaged checkpoint %s -> %s (%s: %s)", src, moved, err.reason, err.detail)
        self._prune_quarantine()

    def _quarantined_entries(self) -> list[tuple[int, str, Path]]:
        qdir = self.dir / QUARANTINE
        if not qdir.is_dir():
            return []
        out = []
        for p in qdir.iterdir():
            seq = _seq_of(p.name)
            if seq is not None:
                out.append((seq, p.name, p))
        return sorted(out)

    def _prune_quarantine(self) -> None:
        for _, _, p in self._quarantined_entries()[: -self.quarantine_keep]:
            _remove(p)

    def quarantine_record(self) -> list[tuple[int, str]]:
        """(seq, reason) of the last quarantined checkpoints (at most QUARANTINE_RECORD)."""
        return [(r["seq"], r["reason"]) for r in self._quarantine_record]

    # -- writing ---------------------------------------------------------------------------------
    def next_seq(self) -> int:
        """1 + the highest seq of anything named ckpt-<digits>* here or in quarantine/."""
        high = self._high_seq
        for p in self.dir.glob(f"{PREFIX}*"):
            seq = _seq_of(p.name)
            if seq is not None:
                high = max(high, seq)
        for seq, _, _ in self._quarantined_entries():
            high = max(high, seq)
        return high + 1

    def save(self, write_state: Callable[[Path], None], meta: dict[str, Any]) -> Checkpoint:
        """Write a checkpoint: `write_state(dir)` fills a fresh temp dir; then the manifest.

        Raises the failure (counted) as it is, or CheckpointDurabilityError, chained to it,
        once `max_consecutive_failures` saves in a row have failed."""
        with self._save_lock:
            try:
                ckpt = self._save(write_state, meta)
            except Exception as e:
                self.save_failures += 1
                self.consecutive_failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning(
                    "checkpoint save failed (%d in a row, %d in all): %s",
                    self.consecutive_failures,
                    self.save_failures,
                    self.last_error,
                )
                if self.consecutive_failures >= self.max_consecutive_failures:
                    raise CheckpointDurabilityError(self._durability_message()) from e
                raise
            self.saves += 1
            self.consecutive_failures = 0
            self.last_durable = _summary(ckpt)
            return ckpt

    def _durability_message(self) -> str:
        if self.last_durable is None:
            since = "no checkpoint is durable yet"
        else:
            since = (
                f"the newest durable checkpoint is {self.last_durable['seq']} "
                f"(offsets {self.last_durable['offsets']})"
            )
        return (
            f"{self.consecutive_failures} checkpoint saves in a row failed "
            f"(max_consecutive_failures={self.max_consecutive_failures}); last error: {self.last_error}; "
            f"{since}, no offsets are committed past it. Check free disk space and write "
            f"permissions on {self.dir}."
        )

    def _save(self, write_state: Callable[[Path], None], meta: dict[str, Any]) -> Checkpoint:
        for pattern in _STALE_GLOBS:
            for stale in self.dir.glob(pattern):
                _remove(stale)
        seq = self.next_seq()
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
            manifest = {**meta, "seq": seq, "created_at": time.time(), "files": files}
            with open(tmp / MANIFEST, "w") as fh:
                json.dump(manifest, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            final = self.dir / f"{PREFIX}{seq:08d}"
            with self._dir_lock:
                if os.path.lexists(final):  # appeared since numbering: the next save skips it
                    raise CheckpointError(f"{final} already exists")
                os.rename(tmp, final)
                _fsync_dir(self.dir)
                self._high_seq = max(self._high_seq, seq)
                ckpt = Checkpoint(final, seq, manifest)
                self._retain(ckpt)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ckpt

    def _retain(self, newest: Checkpoint) -> None:
        """Keep the newest `keep` complete checkpoints, `newest` (just saved) always."""
        try:
            complete = [c for c in self._complete() if c.seq != newest.seq]
            for old in complete[: max(0, len(complete) - (self.keep - 1))]:
                doomed = self.dir / f".del-{old.path.name}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(old.path, doomed)
                except OSError:
                    continue
                shutil.rmtree(doomed, ignore_errors=True)
        except Exception as e:  # the new checkpoint is durable; cleanup is best effort
            log.warning("checkpoint retention in %s failed: %s", self.dir, e)

    # -- reports ---------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The counters, JSON-safe (for the job's status and reports)."""
        return {
            "dir": str(self.dir),
            "saves": self.saves,
            "save_failures": self.save_failures,
            "consecutive_failures": self.consecutive_failures,
            "max_consecutive_failures": self.max_consecutive_failures,
            "last_error": self.last_error,
            "last_durable": None if self.last_durable is None else dict(self.last_durable),
            "quarantined": self.quarantined,
            "fallbacks": self.fallbacks,
            "quarantine_record": [dict(r) for r in self._quarantine_record],
        }
