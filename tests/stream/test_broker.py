"""The local broker: lifecycle, typed errors, no leftover processes, and Tansu's behaviour."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from infra.broker import (
    BINARY_ENV,
    BrokerBinaryNotFound,
    BrokerError,
    BrokerStartTimeout,
    LocalBroker,
    PortInUse,
    _is_tansu_alive,
    find_tansu_binary,
    status,
)
from stream.ingest.kafka_io import admin_client, ensure_topic

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stream.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_local_broker_serves_and_leaves_nothing_behind(tmp_path):
    with LocalBroker(state_dir=tmp_path) as broker:
        pid = broker.pid
        assert _is_tansu_alive(pid)
        assert (tmp_path / "tansu.pid").read_text().strip() == str(pid)
        assert status(tmp_path).running
        admin = admin_client(broker.bootstrap)
        assert isinstance(admin.list_topics(), list)
        admin.close()
    assert not _is_tansu_alive(pid)
    assert not (tmp_path / "tansu.pid").exists()
    assert (tmp_path / "tansu.log").read_text().startswith("tansu broker")


def test_local_broker_stops_when_the_block_raises():
    with pytest.raises(RuntimeError), LocalBroker() as broker:
        pid = broker.pid
        raise RuntimeError("test body failed")
    assert not _is_tansu_alive(pid)


def test_session_fixture_stops_the_broker_even_when_its_tests_fail(tmp_path):
    """Run a failing test that uses `broker` in a child pytest; its broker must be gone."""
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    pid_file = tmp_path / "pid"
    (tmp_path / "test_child.py").write_text(
        textwrap.dedent(f"""
        def test_uses_broker(local_broker, broker):
            assert broker == local_broker.bootstrap
            open({str(pid_file)!r}, "w").write(str(local_broker.pid))
            assert False, "fails on purpose"
    """)
    )
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.returncode == 1, child.stdout + child.stderr
    assert "fails on purpose" in child.stdout
    assert not _is_tansu_alive(int(pid_file.read_text()))


def test_port_in_use_is_a_typed_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PortInUse, match="already in use"):
            LocalBroker(port=taken.getsockname()[1]).start()


def test_missing_binary_names_the_fix(monkeypatch):
    monkeypatch.setenv(BINARY_ENV, "/nonexistent/tansu")
    with pytest.raises(BrokerBinaryNotFound, match=BINARY_ENV):
        find_tansu_binary()
    monkeypatch.delenv(BINARY_ENV)
    assert find_tansu_binary().name == "tansu"


def test_a_broker_that_never_answers_times_out_with_its_log(tmp_path, monkeypatch):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'pretending to start'\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv(BINARY_ENV, str(fake))
    broker = LocalBroker(state_dir=tmp_path / "state", start_timeout_s=1.0)
    with pytest.raises(BrokerStartTimeout, match="pretending to start"):
        broker.start()
    assert not (tmp_path / "state" / "tansu.pid").exists()


def test_a_broker_that_exits_at_start_reports_its_log(tmp_path, monkeypatch):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'bad storage url' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv(BINARY_ENV, str(fake))
    with pytest.raises(BrokerError, match="code 3(.|\n)*bad storage url"):
        LocalBroker(state_dir=tmp_path / "state").start()


def test_cli_start_status_stop(tmp_path):
    state = str(tmp_path / "state")
    started = cli("broker", "start", "--state-dir", state)
    assert started.returncode == 0, started.stderr
    try:
        info = status(state).info
        assert info is not None and _is_tansu_alive(info.pid)
        assert cli("broker", "status", "--state-dir", state).returncode == 0
        again = cli("broker", "start", "--state-dir", state)
        assert again.returncode == 2 and "already running" in again.stderr
        taken = cli("broker", "start", "--state-dir", str(tmp_path / "other"), "--port", str(info.port))
        assert taken.returncode == 2
        assert "already in use" in taken.stderr and "Traceback" not in taken.stderr
    finally:
        stopped = cli("broker", "stop", "--state-dir", state)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    deadline = time.monotonic() + 5
    while _is_tansu_alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _is_tansu_alive(info.pid)
    assert cli("broker", "status", "--state-dir", state).returncode == 1


def test_cli_missing_binary_exits_2_without_traceback(tmp_path):
    out = cli("broker", "start", "--state-dir", str(tmp_path), env={BINARY_ENV: "/nonexistent"})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_tansu_topics_partitions_and_offsets(broker):
    """What the rest of the code relies on (and works around) in this Tansu build."""
    admin = admin_client(broker)
    try:
        admin.create_topics([NewTopic("tansu-behaviour", 3, 1)])
        with pytest.raises(TopicAlreadyExistsError):
            admin.create_topics([NewTopic("tansu-behaviour", 3, 1)])
    finally:
        admin.close()
    assert ensure_topic(broker, "tansu-behaviour", 5) == (3, False)

    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=50)
    for i in range(10):  # one record batch
        producer.send("tansu-behaviour", value=b"%d" % i, partition=1, timestamp_ms=1000 + i)
    producer.send("tansu-auto-created", value=b"x")
    producer.flush()
    assert producer.partitions_for("tansu-auto-created") == {0, 1, 2, 3}
    producer.close()

    tp = TopicPartition("tansu-behaviour", 1)
    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    try:
        consumer.assign([tp])
        # ListOffsets(latest) answers the last batch's base offset + 1 here, not 10.
        assert 1 <= consumer.end_offsets([tp])[tp] <= 10
        consumer.seek_to_beginning()
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 10 and time.monotonic() < deadline:
            got += [r for rs in consumer.poll(timeout_ms=200).values() for r in rs]
        assert [(r.offset, r.timestamp) for r in got] == [(i, 1000 + i) for i in range(10)]
        assert consumer.highwater(tp) == 10
    finally:
        consumer.close()


def test_tansu_keeps_group_offsets_committed_under_static_assignment(broker):
    """How the trainer commits: assign (no group join), commit after a checkpoint, restart."""
    producer = KafkaProducer(bootstrap_servers=broker)
    for i in range(10):
        producer.send("tansu-groups", value=b"v", partition=i % 2)
    producer.flush()
    producer.close()
    tps = [TopicPartition("tansu-groups", 0), TopicPartition("tansu-groups", 1)]
    for expected in (None, {0: 3, 1: 5}):
        consumer = KafkaConsumer(bootstrap_servers=broker, group_id="g", enable_auto_commit=False)
        try:
            consumer.assign(tps)
            if expected is None:
                consumer.commit({tps[0]: OffsetAndMetadata(3, "", -1), tps[1]: OffsetAndMetadata(5, "", -1)})
            else:
                assert {tp.partition: consumer.committed(tp) for tp in tps} == expected
                assert {tp.partition: consumer.position(tp) for tp in tps} == expected
        finally:
            consumer.close()
