"""Chaos run: the streaming job under faults, checked for lost and twice-applied events.

Real components only: a Tansu broker on loopback (infra.broker.LocalBroker, so it
can be SIGSTOPped), real local Ray, the real model, an ML-1M prefix.

1. Undisturbed run: the recording replayed into topic `<prefix>-base` at the
   chaos run's pace while one job reads it to the end. Its AUC is the reference.
2. Chaos run on topic `<prefix>-chaos`: the recording is replayed *while* the job
   runs (paced at `--rate` events/s), and a seeded schedule of faults fires at
   points of the trainer's progress (events applied):
   - SIGKILL of the trainer actor `--trainer-kills` times (Ray restarts it, it
     restores its newest checkpoint, the readers are sought back);
   - SIGKILL of one ingest actor (Ray restarts it; the trainer re-seeks it);
   - a broker outage: SIGSTOP for `--outage-s` seconds, then SIGCONT;
   - a restart of the whole job from its work dir (graceful stop, then a new
     StreamingJob on the same config: restores the checkpoint, continues);
   - a damaged checkpoint: at the first trainer kill, once the process is gone, the
     newest checkpoint's largest file is truncated to half, so the restart must fall back
     past it, quarantine it, and save again after it;
   - a poison event (`--poison`, on by default): one event of the recording is
     replaced by a schema-valid copy whose rating is -1e300 (finite in JSON, infinite
     in float32), with the label contract off for `rating` in both runs so that it
     reaches the trainer. It must be dead-lettered as `poison`, cause no restart, and
     every other event must train.
3. The final lineage is read from the newest checkpoint of the chaos work dir:
   per partition, how many offsets were applied and their sum and sum of squares
   (stream/train/service.py). Count == produced and both sums equal to those of
   0..n-1 means every produced event applied exactly once. The model's own count
   of scored events (metrics n.like) must equal the events trained (produced minus
   the poison event). The DLQ topic is read back for the poison event; the snapshot
   store (every version kept) is read for how many full versions were written: one,
   the first, when restarts go on with the delta chain.

Prints a table and writes it (with the command) to benchmarks/results/reliability.md
(`--out`). The test suite runs `run_chaos` small (tests/integration/test_chaos.py).

    .venv/bin/python benchmarks/chaos.py --events 50000 --seed 0
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("chaos")


@dataclass
class ChaosPlan:
    events: int = 50_000
    seed: int = 0
    # Events/s produced during the chaos run: below the trainer's throughput so the
    # faults fire while the stream is still being produced (they fire on progress).
    rate: float = 400.0
    trainer_kills: int = 5
    ingest_kills: int = 1
    outage_s: float = 15.0
    job_restart: bool = True
    ingest_actors: int = 2
    # A checkpoint of the default model on ML-1M is ~240 MB written while training
    # waits: every 3 s cost most of the trainer's time; 10 s keeps re-application short.
    checkpoint_interval_s: float = 10.0
    # One event replaced by a poison copy, at this fraction of the stream (None: none).
    poison_at: float | None = 0.3
    # Truncate the newest checkpoint right before the first trainer kill.
    damage_checkpoint: bool = True
    # The undisturbed reference run (its AUC only; the CI test skips it for time).
    reference: bool = True


@dataclass
class ChaosResult:
    plan: ChaosPlan
    produced: int
    applied: int  # events trained + dead-lettered in the final lineage (checkpoint)
    trained: int
    dlq: int
    scored: int  # the model's own count of scored events (metrics n.like)
    lost: int
    applied_twice: int
    lineage_exact: bool  # per partition: count, sum and sum of squares of 0..n-1
    partitions: dict[int, dict[str, int]]
    auc_chaos: float | None
    auc_base: float | None
    faults: list[dict[str, Any]] = field(default_factory=list)
    trainer_restarts: int = 0
    duration_s: float = 0.0
    base_duration_s: float = 0.0
    poison_event_id: str | None = None
    poison_in_ledger: int = 0  # rejects_applied["poison"] of the final lineage
    poison_dlq_copies: int = 0  # poison dead letters of that event in the DLQ topic (>= 1)
    damaged_checkpoint: int | None = None  # seq of the checkpoint truncated before a kill
    damaged_quarantined: bool = False  # found under checkpoints/quarantine/ afterwards
    saves_after_fallback: int = 0  # complete checkpoints numbered after the damaged one
    # Summed over every trainer incarnation seen (each counts its own).
    checkpoint_saves: int = 0
    checkpoint_failures: int = 0
    checkpoint_quarantined: int = 0
    full_versions: int = 0  # full snapshots in the store (every version kept)
    delta_versions: int = 0

    @property
    def restarts_unexplained(self) -> int:
        """Trainer restarts beyond the kills injected (a poison event causing one would show)."""
        kills = sum(1 for f in self.faults if f["fault"] == "kill_trainer" and "skipped" not in f)
        return self.trainer_restarts - kills

    @property
    def auc_delta(self) -> float | None:
        if self.auc_chaos is None or self.auc_base is None:
            return None
        return self.auc_chaos - self.auc_base


def _recording(events: int, cache: Path) -> Path:
    from stream.recordings.data.movielens import build_ml1m_recording

    path = cache / f"ml1m_{events}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_ml1m_recording(path, limit=events)
    return path


POISON_RATING = -1e300  # finite in JSON, -inf in float32: the step's loss is not finite


def _poisoned_recording(recording: Path, at: float, out: Path) -> tuple[Path, str]:
    """A copy of `recording` with the event at fraction `at` replaced (same key and
    partition, so the offsets and counts are the recording's) by a poison copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stream.recordings.recording import recording_info, write_recording

    table = pq.read_table(recording)
    i = int(at * table.num_rows)
    values = table.column("value").to_pylist()
    event = json.loads(values[i])
    event["event_id"] = f"chaos-poison-{i}"
    event["labels"]["rating"] = POISON_RATING
    values[i] = json.dumps(event).encode()
    table = table.set_column(table.schema.get_field_index("value"), "value", pa.array(values, pa.binary()))
    write_recording(out, table, recording_info(recording).partitions)
    return out, event["event_id"]


def _config(bootstrap: str, topic: str, work_dir: Path, plan: ChaosPlan):
    from stream.config import load_config

    return load_config(
        ROOT / "configs" / "default.yaml",
        [
            f'kafka.bootstrap="{bootstrap}"',
            f"kafka.topic={topic}",
            f"kafka.ingest_actors={plan.ingest_actors}",
            f"job.work_dir={work_dir}",
            f"job.max_events={plan.events}",
            "job.live_display=false",
            "serving.enabled=false",
            "admin.enabled=false",
            f"checkpoints.interval_s={plan.checkpoint_interval_s}",
            "snapshots.interval_s=2",
            # The faults are the point: the restart budget must not end the run.
            f"job.max_trainer_restarts={plan.trainer_kills + 5}",
            # Every version kept: the store tells how many full versions were written.
            "snapshots.keep_versions=100000",
            # The poison event must pass decoding: no label contract on `rating`.
            *(["kafka.limits.labels.rating=null"] if plan.poison_at is not None else []),
        ],
    )


def _run_thread(job) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target():
        try:
            out["report"] = job.run().to_json()
        except BaseException as e:
            out["error"] = e

    th = threading.Thread(target=target, daemon=True, name="chaos-job")
    th.start()
    return th, out


def _join(th: threading.Thread, out: dict, timeout_s: float) -> dict:
    th.join(timeout_s)
    if th.is_alive():
        raise TimeoutError(f"job did not finish within {timeout_s:.0f} s")
    if "error" in out:
        raise out["error"]
    return out["report"]


def _schedule(plan: ChaosPlan) -> list[tuple[int, str]]:
    """(events applied at which to fire, fault) in order; seeded."""
    rng = random.Random(plan.seed)
    n = plan.events
    # All within the first 70% of the stream: a trainer that catches up after an outage
    # (the readers' prefetch buffers hold thousands of events) can reach the end before a
    # late fault comes due, and a fault after the end tests nothing.
    faults = [(rng.randint(int(0.05 * n), int(0.7 * n)), "kill_trainer") for _ in range(plan.trainer_kills)]
    faults += [(rng.randint(int(0.1 * n), int(0.6 * n)), "kill_ingest") for _ in range(plan.ingest_kills)]
    if plan.outage_s > 0:
        faults.append((rng.randint(int(0.2 * n), int(0.5 * n)), "broker_outage"))
    if plan.job_restart:
        faults.append((rng.randint(int(0.5 * n), int(0.7 * n)), "restart_job"))
    return sorted(faults)


def _progress(job) -> dict[str, Any] | None:
    import ray

    topo = getattr(job, "topo", None)
    if topo is None:
        return None
    try:
        return ray.get(topo.trainer.progress.remote(), timeout=5)
    except Exception:
        return None


def _applied(p) -> int:
    return p.events_applied + p.events_dlq


def _wait_gone(pid: int, timeout_s: float = 5.0) -> None:
    """Block until process `pid` has exited (gone, or a zombie its parent has yet to
    reap): after that it cannot write a file."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            # the state field follows the parenthesised command name
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(0.005)
    raise TimeoutError(f"process {pid} still alive {timeout_s} s after SIGKILL")


def _damage_newest_checkpoint(ckpt_dir: Path) -> dict[str, Any] | None:
    """Truncate the largest file of the newest complete checkpoint to half its size (a
    disk that lost the tail of a write); returns what was damaged."""
    from stream.train.checkpoints import CheckpointManager

    newest = CheckpointManager(ckpt_dir).latest(verify=False, quarantine=False)
    if newest is None:
        return None
    victim = max((p for p in newest.path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    os.truncate(victim, size // 2)
    return {"seq": newest.seq, "file": str(victim.relative_to(newest.path)), "bytes": size, "kept": size // 2}


def _dead_letters(bootstrap: str, topic: str) -> list[tuple[dict[str, bytes], bytes]]:
    """Every message of the DLQ topic: (headers, value)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out: list[tuple[dict[str, bytes], bytes]] = []
        deadline = time.time() + 60
        while any(consumer.position(tp) < end[tp] for tp in tps) and time.time() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out += [(dict(r.headers), r.value) for r in records]
        return out
    finally:
        consumer.close()


class _Incarnations:
    """The checkpoint counters of every trainer incarnation seen (each restart starts its
    own at zero): the last values polled of each, keyed by its start time."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, int]] = {}

    def note(self, p) -> None:
        if p is None:
            return
        started = round(time.time() - p.uptime_s)
        c = p.checkpoints
        self.seen[started] = {
            "saves": c.get("saves", 0),
            "failures": c.get("save_failures", 0),
            "quarantined": c.get("quarantined", 0),
        }

    def total(self, key: str) -> int:
        return sum(v[key] for v in self.seen.values())


def run_chaos(plan: ChaosPlan, cache: Path, *, broker=None, keep_dir: Path | None = None) -> ChaosResult:
    import ray

    from infra.broker import LocalBroker
    from stream.ingest.dlq import CATEGORY_HEADER
    from stream.ingest.kafka_io import dlq_topic
    from stream.job.driver import StreamingJob, init_local_ray
    from stream.recordings.recording import recording_info, replay
    from stream.train.checkpoints import CheckpointManager

    recording = _recording(plan.events, cache)
    work = Path(keep_dir or tempfile.mkdtemp(prefix="chaos-"))
    if keep_dir is None:  # 2.5 to 3.5 GB per run of topics, snapshots and checkpoints
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    poison_id = None
    if plan.poison_at is not None:
        recording, poison_id = _poisoned_recording(recording, plan.poison_at, work / "poisoned.parquet")
    info = recording_info(recording)
    own_broker = broker is None
    if own_broker:
        broker = LocalBroker(state_dir=work / "broker").start()
    started_ray = not ray.is_initialized()
    if started_ray:
        init_local_ray(num_cpus=4, namespace="memstream-chaos", logging_level="WARNING", log_to_driver=False)
    prefix = f"chaos-{plan.seed}-{int(time.time())}"
    try:
        # 1. undisturbed reference, produced at the same pace as the chaos run: the
        # pace sets the units' sizes, hence the micro-batches and the prequential AUC
        # (a max-speed reference differed by ~0.01 AUC before any fault).
        from stream.ingest.kafka_io import ensure_topic

        t0 = time.time()
        base: dict[str, Any] = {}
        if plan.reference:
            ensure_topic(broker.bootstrap, f"{prefix}-base", info.partitions)
            base_producer = threading.Thread(
                target=replay,
                args=(recording, broker.bootstrap, f"{prefix}-base"),
                kwargs={"rate": plan.rate, "retime": True},
                daemon=True,
                name="base-replay",
            )
            base_producer.start()
            base = (
                StreamingJob(_config(broker.bootstrap, f"{prefix}-base", work / "base", plan)).run().to_json()
            )
            base_producer.join(60)
        base_s = time.time() - t0

        # 2. chaos: replay paced while the job runs, faults on a schedule
        topic = f"{prefix}-chaos"
        cfg = _config(broker.bootstrap, topic, work / "chaos", plan)
        ensure_topic(broker.bootstrap, topic, info.partitions)
        replay_err: list[BaseException] = []

        def produce():
            try:
                replay(
                    recording,
                    broker.bootstrap,
                    topic,
                    rate=plan.rate,
                    retime=True,
                    request_timeout_ms=60_000,
                    max_block_ms=120_000,
                )
            except BaseException as e:
                replay_err.append(e)

        t1 = time.time()
        producer = threading.Thread(target=produce, daemon=True, name="chaos-replay")
        producer.start()
        job = StreamingJob(cfg)
        th, out = _run_thread(job)
        faults_done: list[dict[str, Any]] = []
        restarts = 0
        outage: threading.Timer | None = None
        incarnations = _Incarnations()
        damaged: dict[str, Any] | None = None
        for at, fault in _schedule(plan):
            while True:
                if not th.is_alive():
                    break
                p = _progress(job)
                incarnations.note(p)
                if p is not None and _applied(p) >= at:
                    break
                time.sleep(0.2)
            if not th.is_alive() or _applied(p) >= plan.events:
                # Faults lag their thresholds while the trainer restarts; one that comes
                # due after everything was applied would test nothing: say so.
                faults_done.append({"fault": fault, "at": at, "skipped": "stream already fully applied"})
                continue
            rec = {"fault": fault, "at": at, "applied_then": _applied(p), "t": round(time.time() - t1, 1)}
            if fault == "kill_trainer":
                pid = ray.get(job.topo.trainer.pid.remote(), timeout=10)
                os.kill(pid, signal.SIGKILL)
                if plan.damage_checkpoint and damaged is None:
                    # Kill, wait until the process is gone, then damage the newest
                    # checkpoint: a save in flight (a 100+ MB state takes most of a
                    # second) could otherwise land a newer one between the damage and
                    # the kill, and the restore would never look at the damaged one.
                    # The driver waits its restart backoff (1 s) before restoring.
                    _wait_gone(pid)
                    damaged = _damage_newest_checkpoint(work / "chaos" / "checkpoints")
                    rec["damaged_checkpoint"] = damaged
            elif fault == "kill_ingest":
                victim = random.Random(plan.seed + at).randrange(len(job.topo.readers))
                os.kill(ray.get(job.topo.readers[victim].pid.remote(), timeout=10), signal.SIGKILL)
                rec["reader"] = victim
            elif fault == "broker_outage":
                # The broker stays stopped for outage_s while the schedule goes on: the
                # faults after it may land inside the outage, as they would in production.
                broker.pause()
                outage = threading.Timer(plan.outage_s, broker.resume)
                outage.start()
            elif fault == "restart_job":
                if outage is not None:
                    outage.join()  # an operator restarts the job against a reachable broker
                incarnations.note(_progress(job))
                job.request_stop()
                report = _join(th, out, 600)
                restarts += report["trainer_restarts"]
                rec["applied_at_stop"] = report["events_consumed"]
                job = StreamingJob(cfg)
                th, out = _run_thread(job)
            faults_done.append(rec)
            log.warning("fault %s", rec)
        if outage is not None:
            outage.join()  # the broker is back before the run may end
        while th.is_alive():  # the last incarnation's counters, until the job ends
            incarnations.note(_progress(job))
            th.join(1.0)
        report = _join(th, out, 1800)
        restarts += report["trainer_restarts"]
        producer.join(300)
        if replay_err:
            raise RuntimeError(f"the chaos replay failed: {replay_err[0]!r}")
        chaos_s = time.time() - t1

        # 3. the final lineage, from the newest checkpoint
        ckpt = CheckpointManager(work / "chaos" / "checkpoints").latest()
        lineage = {int(p): v for p, v in ckpt.meta["lineage"].items()}
        per_partition = _partition_rows(recording)
        parts: dict[int, dict[str, int]] = {}
        lost = twice = 0
        exact = True
        for p, n in sorted(per_partition.items()):
            count, s1, s2 = lineage.get(p, [0, 0, 0])
            want1, want2 = n * (n - 1) // 2, (n - 1) * n * (2 * n - 1) // 6
            ok = count == n and s1 == want1 and s2 == want2
            exact &= ok
            lost += max(0, n - count)
            twice += max(0, count - n)
            nxt = int(ckpt.meta["offsets"].get(str(p), 0))
            parts[p] = {"produced": n, "applied": count, "next_offset": nxt, "exact": int(ok)}
        if not exact and lost == 0 and twice == 0:
            lost = twice = -1  # counts agree but the sums do not: some lost and as many twice
        metrics = report  # the last job's report: the final lineage's metrics
        scored_like = _scored(work / "chaos")
        letters = _dead_letters(broker.bootstrap, dlq_topic(topic)) if poison_id else []
        poison_copies = sum(
            1
            for h, v in letters
            if h.get(CATEGORY_HEADER) == b"poison" and json.loads(v).get("event_id") == poison_id
        )
        ckpt_dir = work / "chaos" / "checkpoints"
        kinds = [
            json.loads(m.read_text())["kind"] for m in (work / "chaos" / "snapshots").glob("v*/manifest.json")
        ]
        return ChaosResult(
            plan=plan,
            produced=info.rows,
            applied=int(ckpt.meta["events_applied"]) + sum(ckpt.meta["rejects_applied"].values()),
            trained=int(ckpt.meta["events_applied"]),
            dlq=sum(ckpt.meta["rejects_applied"].values()),
            scored=scored_like,
            lost=lost,
            applied_twice=twice,
            lineage_exact=exact,
            partitions=parts,
            auc_chaos=metrics.get("auc.like"),
            auc_base=base.get("auc.like"),
            faults=faults_done,
            trainer_restarts=restarts,
            duration_s=chaos_s,
            base_duration_s=base_s,
            poison_event_id=poison_id,
            poison_in_ledger=int(ckpt.meta["rejects_applied"].get("poison", 0)),
            poison_dlq_copies=poison_copies,
            damaged_checkpoint=None if damaged is None else damaged["seq"],
            damaged_quarantined=damaged is not None
            and any((ckpt_dir / "quarantine").glob(f"ckpt-{damaged['seq']:08d}*")),
            saves_after_fallback=0
            if damaged is None
            else sum(1 for c in CheckpointManager(ckpt_dir).list() if c.seq > damaged["seq"]),
            checkpoint_saves=incarnations.total("saves"),
            checkpoint_failures=incarnations.total("failures"),
            checkpoint_quarantined=incarnations.total("quarantined"),
            full_versions=kinds.count("full"),
            delta_versions=kinds.count("delta"),
        )
    finally:
        if started_ray:
            ray.shutdown()
        if own_broker:
            broker.stop()


def _partition_rows(recording: Path) -> dict[int, int]:
    import numpy as np
    import pyarrow.parquet as pq

    parts = pq.read_table(recording, columns=["partition"]).column("partition").to_numpy()
    values, counts = np.unique(parts, return_counts=True)
    return {int(p): int(c) for p, c in zip(values, counts)}


def _scored(work_dir: Path) -> int:
    """Events the final model scored (metrics n.like), from the newest checkpoint's state."""
    from models.online import OnlineTrainer
    from stream.config import load_config
    from stream.train.checkpoints import CheckpointManager

    cfg = load_config(ROOT / "configs" / "default.yaml", [])
    trainer = OnlineTrainer(cfg.model, cfg.trainer)
    trainer.load(CheckpointManager(work_dir / "checkpoints").latest().path / "state")
    return int(trainer.metrics.summary().get("n.like", -1))


def table(r: ChaosResult) -> str:
    fmt = lambda x: "n/a" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))
    kinds: dict[str, int] = {}
    for f in r.faults:
        if "skipped" not in f:
            kinds[f["fault"]] = kinds.get(f["fault"], 0) + 1
    rows = [
        ("events produced", r.produced),
        ("events applied (checkpointed lineage: trained + DLQ)", r.applied),
        ("events trained", r.trained),
        ("events in the DLQ", r.dlq),
        ("events scored by the final model (metrics n.like)", r.scored),
        ("events lost", r.lost),
        ("events applied twice", r.applied_twice),
        ("per-partition lineage exact (count, sum, sum of squares of offsets)", r.lineage_exact),
        ("trainer restarts seen by the driver", r.trainer_restarts),
        ("trainer restarts beyond the kills injected", r.restarts_unexplained),
        ("faults injected", ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))),
        ("poison event", r.poison_event_id or "none"),
        ("poison events in the final ledger (category poison)", r.poison_in_ledger),
        ("its dead letters in the DLQ topic (category poison)", r.poison_dlq_copies),
        ("checkpoint truncated before a kill (seq)", fmt(r.damaged_checkpoint)),
        ("it was quarantined at the restart", r.damaged_quarantined),
        ("complete checkpoints saved after the fallback", r.saves_after_fallback),
        (
            "checkpoint_saves / checkpoint_failures / checkpoint_quarantined (all incarnations)",
            f"{r.checkpoint_saves} / {r.checkpoint_failures} / {r.checkpoint_quarantined}",
        ),
        ("snapshot versions written: full / delta", f"{r.full_versions} / {r.delta_versions}"),
        ("AUC (like), undisturbed run", fmt(r.auc_base)),
        ("AUC (like), chaos run", fmt(r.auc_chaos)),
        ("AUC difference (chaos - undisturbed)", fmt(r.auc_delta)),
        ("wall time, undisturbed / chaos (s)", f"{r.base_duration_s:.0f} / {r.duration_s:.0f}"),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "| partition | produced | applied | next offset | exact |", "|---|---|---|---|---|"]
    lines += [
        f"| {p} | {d['produced']} | {d['applied']} | {d['next_offset']} | {bool(d['exact'])} |"
        for p, d in sorted(r.partitions.items())
    ]
    lines += ["", "Fault schedule (events applied when fired):", ""]
    lines += [f"- {json.dumps(f)}" for f in r.faults]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=400.0, help="events/s produced during the chaos run")
    ap.add_argument("--trainer-kills", type=int, default=5)
    ap.add_argument("--outage-s", type=float, default=15.0)
    ap.add_argument("--checkpoint-interval-s", type=float, default=10.0)
    ap.add_argument(
        "--poison-at",
        type=float,
        default=0.3,
        help="fraction of the stream where one event is poison; <0: none",
    )
    ap.add_argument("--no-damage", action="store_true", help="do not truncate a checkpoint before a kill")
    ap.add_argument("--cache", default=str(ROOT / ".memstream" / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.md"))
    ap.add_argument("--json", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    plan = ChaosPlan(
        events=args.events,
        seed=args.seed,
        rate=args.rate,
        trainer_kills=args.trainer_kills,
        outage_s=args.outage_s,
        checkpoint_interval_s=args.checkpoint_interval_s,
        poison_at=args.poison_at if args.poison_at >= 0 else None,
        damage_checkpoint=not args.no_damage,
    )
    result = run_chaos(plan, Path(args.cache))
    text = table(result)
    print(text)
    cmd = "benchmarks/chaos.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    heading = "## Chaos run with a poison event and a damaged checkpoint"
    section = f"{heading}\n\nCommand: `.venv/bin/python {cmd}`\n\n{text}\n"
    _write_section(Path(args.out), heading, section)
    if args.json:
        Path(args.json).write_text(json.dumps(result.__dict__, default=lambda o: o.__dict__, indent=1))
    return 0 if not problems(result) else 1


def problems(r: ChaosResult) -> list[str]:
    """What of the targets the run missed (empty: all met)."""
    out = []
    if r.lost or r.applied_twice or not r.lineage_exact:
        out.append(f"exactly-once: {r.lost} lost, {r.applied_twice} applied twice, exact={r.lineage_exact}")
    if r.applied != r.produced or r.scored != r.trained:
        out.append(f"applied {r.applied} of {r.produced}; scored {r.scored} of {r.trained} trained")
    if r.restarts_unexplained:
        out.append(f"{r.restarts_unexplained} trainer restarts beyond the kills")
    if r.poison_event_id is not None:
        if r.poison_in_ledger != 1 or r.poison_dlq_copies < 1 or r.trained != r.produced - 1:
            out.append(
                f"poison: {r.poison_in_ledger} in the ledger, {r.poison_dlq_copies} dead letters, "
                f"{r.trained} trained of {r.produced}"
            )
    if r.plan.damage_checkpoint:
        if r.damaged_checkpoint is None or not r.damaged_quarantined or r.saves_after_fallback < 1:
            out.append(
                f"damaged checkpoint {r.damaged_checkpoint}: quarantined={r.damaged_quarantined}, "
                f"{r.saves_after_fallback} saves after the fallback"
            )
    if r.checkpoint_failures:
        out.append(f"{r.checkpoint_failures} checkpoint saves failed")
    # The first version is full; a restart may go full safely when the killed trainer's last
    # publish lands after the new one read the store (PRODUCTION.md), but not every restart.
    if r.full_versions < 1 or r.full_versions > max(1, r.trainer_restarts):
        out.append(
            f"{r.full_versions} full snapshot versions for {r.trainer_restarts} restarts "
            "(restarts should go on with deltas)"
        )
    return out


def _write_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) one `## ` section of the results file, keeping the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else "# Reliability results\n\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip() + "\n\n" + section
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + section + ("" if end < 0 else old[end:])
    path.write_text(new)


if __name__ == "__main__":
    raise SystemExit(main())
