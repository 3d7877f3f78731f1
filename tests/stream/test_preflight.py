"""Preflight: the first mistakes a user makes are one line, exit 2, in seconds, before Ray.

Through the real command line (a subprocess, as a user runs it) against a closed local
port and the session's real broker; the checks' finer cases in process.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream.job.preflight import (
    PreflightError,
    check_config_file,
    check_kafka,
    check_recording,
    check_store,
    parse_bootstrap,
)

ROOT = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once the socket is closed


def _memstream(*args: str, cwd: Path) -> tuple[int, list[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return proc.returncode, lines, time.monotonic() - t0


def _assert_one_line(code: int, lines: list[str], took: float, *words: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines  # no kafka-python retries, no traceback, no Ray banner
    assert lines[0].startswith("memstream run: error: "), lines
    for w in words:
        assert w in lines[0], lines
    # Ray never started (the one line says so too). The bound leaves room for the interpreter's
    # imports on a loaded 2-core machine (seen: 15 s with two benchmarks beside the suite).
    assert took < 30, f"{took:.1f} s"


@pytest.mark.timeout(60)
def test_unreachable_bootstrap_is_one_line_exit_2(tmp_path):
    port = _closed_port()
    code, lines, took = _memstream(
        "run", "--bootstrap", f"127.0.0.1:{port}", "--work-dir", str(tmp_path / "w"), cwd=ROOT
    )
    _assert_one_line(code, lines, took, f"127.0.0.1:{port}", "connection refused", "--bootstrap")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_missing_topic_on_the_real_broker_is_one_line_exit_2(tmp_path, broker):
    code, lines, took = _memstream(
        "run",
        "--bootstrap",
        broker,
        "--topic",
        "no-such-topic-preflight",
        "--work-dir",
        str(tmp_path / "w"),
        cwd=ROOT,
    )
    _assert_one_line(code, lines, took, "'no-such-topic-preflight' does not exist", broker, "--topic")


@pytest.mark.timeout(60)
def test_unreadable_config_is_one_line_exit_2(tmp_path):
    code, lines, took = _memstream("run", "--config", str(tmp_path / "missing.yaml"), cwd=ROOT)
    _assert_one_line(code, lines, took, "cannot read config", "missing.yaml", "--config")


@pytest.mark.timeout(60)
def test_unreadable_recording_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "rec.parquet"
    bad.write_bytes(b"not parquet at all")
    code, lines, took = _memstream(
        "run", "--work-dir", str(tmp_path / "w"), "--set", f"job.recording={bad}", cwd=ROOT
    )
    _assert_one_line(code, lines, took, "cannot read recording", str(bad))


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_existing_topic_passes_with_its_partition_count(broker):
    from stream.ingest.kafka_io import ensure_topic

    ensure_topic(broker, "preflight-ok", 3)
    assert check_kafka(broker, "preflight-ok", {}) == 3


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka:\n  topic: [unclosed\n")
    with pytest.raises(PreflightError, match=r"not valid YAML at line \d+, column \d+"):
        check_config_file(str(cfg))


@pytest.mark.parametrize("bootstrap", ["localhost", "host:notaport", ":9092", "a:1,", "h:70000"])
def test_malformed_bootstrap_names_the_bad_entry(bootstrap):
    with pytest.raises(PreflightError, match="is not host:port"):
        parse_bootstrap(bootstrap)


def test_bootstrap_list_parses():
    assert parse_bootstrap("a:1, b:2,[::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]


def test_unresolvable_host_says_so():
    with pytest.raises(PreflightError, match="does not resolve"):
        check_kafka("no-such-host.invalid:9092", "t", {})


def test_missing_recording_is_fine_it_is_built(tmp_path):
    check_recording(str(tmp_path / "not-yet.parquet"))


def test_store_checks(tmp_path):
    check_store(str(tmp_path / "empty-store-not-created-yet"))  # waited for, not an error
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PreflightError, match="is a file"):
        check_store(str(tmp_path / "afile"))
    with pytest.raises(PreflightError, match="cannot be opened"):
        check_store("nosuchscheme://bucket/path")
