"""`POST /rank` request handling (RankService) in process, over a fake model: bad bodies
are 4xx with a message naming the field or key, never a 500; big bodies are refused
before they are read; load past the in-flight bound is shed at once; no paths leak.

The Ray Serve deployment calls the same RankService (tests/integration covers it).
"""

import asyncio
import json
import math
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from stream.serving.app import RankService, rank_api
from stream.serving.follower import ServingConfig, SnapshotFollower
from tests.stream.conftest import asgi_post


class _Store:
    def __init__(self, latest=1):
        self.latest = latest

    def latest_version(self):
        return self.latest

    def pinned_version(self):
        return None

    def manifest(self, v):
        return {"kind": "full", "parent": None}

    def load_chain(self, v):
        if v == 2:
            raise OSError("cannot read /srv/secret/snapshots/v2/dense.npz: no such file")
        return [v]


class _Model:
    """Answers like ServedModel; `gate` (if set) holds each request until it is set."""

    gate: threading.Event | None = None
    sleep_s = 0.0

    def __init__(self, chain):
        self.version = chain[-1]

    def rank(self, req):
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.sleep_s)
        n = len(req.candidates)
        return {
            "version": self.version,
            "scores": {"like": [0.5] * n, "rating": [3.0] * n},
            "item_ids": [c.item_id for c in req.candidates],
        }


def _service(loaded=True, **cfg) -> RankService:
    f = SnapshotFollower(_Store(), build=_Model)
    if loaded:
        assert f.poll()
    return RankService(f, ServingConfig(**cfg))


@pytest.fixture()
def client():
    return TestClient(rank_api(_service()))


BODY = {"user_id": "1m_1", "user_features": {"age": "25"}, "candidates": [{"item_id": "Heat (1995)"}]}


def test_valid_request_ranks(client):
    r = client.post("/rank", json=BODY)
    assert r.status_code == 200 and r.json()["item_ids"] == ["Heat (1995)"]


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_user_feature_is_422_naming_the_field(client, number):
    raw = f'{{"user_id": "u", "user_features": {{"age": {number}}}, "candidates": [{{"item_id": "a"}}]}}'
    r = client.post("/rank", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"][:2] == ["body", "user_features"] and "user_features.age" in err["msg"]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ('{"user_id": "a", "user_id": "b", "candidates": [{"item_id": "x"}]}', "user_id"),
        ('{"user_id": "a", "candidates": [{"item_id": "x", "item_id": "y"}]}', "item_id"),
        ('{"user_id": "a", "user_features": {"k": 1, "k": "2"}, "candidates": [{"item_id": "x"}]}', "k"),
    ],
)
def test_duplicate_keys_are_422_naming_the_key(client, raw, key):
    r = client.post("/rank", content=raw)
    assert r.status_code == 422
    assert f"duplicate key {key!r}" in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"\xff\xfe", b"[" * 100_000, b'{"user_id": 1' + b"0" * 5000 + b"}"]
)
def test_malformed_json_is_422(client, raw):
    assert client.post("/rank", content=raw).status_code == 422


def test_too_many_candidates_is_422():
    c = TestClient(rank_api(_service(max_candidates=2)))
    r = c.post("/rank", json={**BODY, "candidates": [{"item_id": str(i)} for i in range(3)]})
    assert r.status_code == 422 and "at most 2" in r.json()["detail"]


def test_no_model_yet_is_503_with_retry_after():
    r = TestClient(rank_api(_service(loaded=False))).post("/rank", json=BODY)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1


# ---- body size: refused before it is read in full ------------------------------------------


MB = 1 << 20


def test_50_mb_body_with_content_length_is_413_unread():
    app = rank_api(_service(max_body_bytes=MB))
    status, calls = asyncio.run(asgi_post(app, {"content-length": str(50 * MB)}, [b"x" * MB] * 50, "/rank"))
    assert status == 413 and calls == 0


def test_50_mb_chunked_body_is_413_after_reading_just_past_the_limit():
    app = rank_api(_service(max_body_bytes=MB))
    status, calls = asyncio.run(
        asgi_post(app, {"transfer-encoding": "chunked"}, [b"x" * (MB // 4)] * 200, "/rank")
    )
    assert status == 413
    assert calls <= 5  # 4 chunks fill the limit, the 5th passes it: 195 chunks never read


def test_50_mb_body_through_the_client_is_413(client):
    r = client.post("/rank", content=b" " * (50 * MB))
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]


# ---- load shedding -------------------------------------------------------------------------


def _async_client(svc):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=rank_api(svc)), base_url="http://t")


def test_past_max_in_flight_is_503_with_retry_after_at_once():
    svc = _service(max_in_flight=3, request_timeout_s=10)
    gate = threading.Event()
    svc.follower.live.gate = gate

    async def run():
        async with _async_client(svc) as c:
            held = [asyncio.create_task(c.post("/rank", json=BODY)) for _ in range(3)]
            for _ in range(200):
                if svc.in_flight == 3:
                    break
                await asyncio.sleep(0.01)
            assert svc.in_flight == 3
            t0 = time.perf_counter()
            over = await c.post("/rank", json=BODY)
            shed_s = time.perf_counter() - t0
            gate.set()
            return over, shed_s, await asyncio.gather(*held)

    over, shed_s, held = asyncio.run(run())
    assert over.status_code == 503 and int(over.headers["retry-after"]) >= 1
    assert "busy" in over.json()["detail"] and shed_s < 1.0
    assert [r.status_code for r in held] == [200, 200, 200]
    assert svc.in_flight == 0 and svc.shed == 1


def test_past_the_deadline_is_504_and_the_slot_is_held_until_the_work_ends():
    svc = _service(max_in_flight=1, request_timeout_s=0.2)
    svc.follower.live.sleep_s = 0.8

    async def run():
        async with _async_client(svc) as c:
            t0 = time.perf_counter()
            late = await c.post("/rank", json=BODY)
            late_s = time.perf_counter() - t0
            busy = await c.post("/rank", json=BODY)  # the late one still runs in its thread
            await asyncio.sleep(1.0)
            svc.follower.live.sleep_s = 0.0
            again = await c.post("/rank", json=BODY)
            return late, late_s, busy, again

    late, late_s, busy, again = asyncio.run(run())
    assert late.status_code == 504 and late_s < 0.6
    assert busy.status_code == 503 and "retry-after" in busy.headers
    assert again.status_code == 200 and svc.in_flight == 0


# ---- no paths in what clients see ----------------------------------------------------------


def test_refusal_reasons_in_version_carry_no_paths():
    svc = _service()
    svc.follower.store.latest = 2
    assert not svc.follower.poll()  # refused: the loader's error names a file
    body = TestClient(rank_api(svc)).get("/version").json()
    assert body["refusals"] and "/srv" not in json.dumps(body) and "dense.npz" in json.dumps(body)
    assert TestClient(rank_api(svc)).get("/nope").json() == {"detail": "Not Found"}


# ---- property-based ------------------------------------------------------------------------


def test_schemathesis_finds_no_5xx_and_no_schema_violation():
    """Over the /rank app's OpenAPI spec, in process, bounded (~seconds)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_asgi("/openapi.json", rank_api(_service(max_candidates=20)))
    failures = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate()

        try:
            run()
        except Exception as e:
            failures.append(f"{operation.method.upper()} {operation.path}: {e}"[:2000])
    assert not failures, "\n\n".join(failures)


def test_any_float_feature_is_200_or_422_never_5xx():
    """Schemathesis sends JSON-valid numbers only; NaN and infinities, sent here as Python's
    json writes them, and 1e400-style literals must be a 422 naming the field."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = TestClient(rank_api(_service()))
    literal = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(lambda x: json.dumps(x)),
        st.integers(300, 5000).map(lambda e: f"{'-' if e % 2 else ''}1e{e}"),
        st.integers(-(10**30), 10**30).map(str),
    )

    @given(values=st.dictionaries(st.sampled_from(["age", "x", "n"]), literal, max_size=3))
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(values):
        feats = ", ".join(f'"{k}": {v}' for k, v in values.items())
        raw = f'{{"user_id": "u", "user_features": {{{feats}}}, "candidates": [{{"item_id": "a"}}]}}'
        r = client.post("/rank", content=raw)
        finite = all(math.isfinite(float(v)) for v in values.values())
        assert r.status_code == (200 if finite else 422), (raw, r.text)
        if not finite:
            assert "user_features." in r.json()["detail"][0]["msg"]

    run()


# -- the application builder's args (Serve config files, RayService, memstream serve) -----


def test_builder_args_validate_and_name_the_field():
    from pydantic import ValidationError

    from stream.serving.app import ServingAppArgs, build_app

    args = ServingAppArgs.model_validate({"snapshots": "runs/x/snapshots", "replicas": 3})
    assert args.snapshots.startswith("/") and args.snapshots.endswith("runs/x/snapshots")
    assert args.serving_config().replicas == 3 and args.serving.replicas == 1
    assert build_app({"snapshots": "s3://bucket/snaps"}) is not None
    for bad, field in (
        ({"snapshots": "/s", "serving": {"max_in_flight": 0}}, "max_in_flight"),
        ({"snapshots": "/s", "replica": 2}, "replica"),
        ({"snapshots": "nosuchscheme://x"}, "snapshots"),
        ({}, "snapshots"),
    ):
        with pytest.raises(ValidationError, match=field):
            ServingAppArgs.model_validate(bad)


def test_the_ledger_name_depends_on_the_store_alone(tmp_path, monkeypatch):
    from stream.serving.follower import serving_ledger_name

    absolute = serving_ledger_name(str(tmp_path / "snaps"))
    monkeypatch.chdir(tmp_path)
    assert serving_ledger_name("snaps") == absolute  # relative or not, one store, one name
    assert serving_ledger_name("s3://b/snaps") != serving_ledger_name("s3://b/other")


def test_a_ledger_that_appears_late_is_told_the_live_version(monkeypatch):
    """The reporter's bookkeeping over a stand-in for ray.get_actor (pure logic)."""
    import ray

    from stream.messages import ServingEvent
    from stream.serving.follower import ServingReporter

    class Ledger:
        def __init__(self, actor_id):
            self._actor_id, self.got = actor_id, []
            self.report_serving = self

        def remote(self, replica, event):
            self.got.append((replica, event))

    ledgers: dict = {"now": None}

    def get_actor(name, namespace=None):
        if ledgers["now"] is None:
            raise ValueError(name)
        return ledgers["now"]

    monkeypatch.setattr(ray, "get_actor", get_actor)
    rep = ServingReporter("memstream-ledger-x", "memstream")
    rep.resolve_every_s = 0.0
    live = ServingEvent("activated", 7, 100.0)
    rep.report("r1", live)  # no job yet: dropped, remembered
    first = ledgers["now"] = Ledger("a")
    rep.tick()
    assert first.got == [("r1", live)]  # the version it went live on, with its own time
    rep.tick()
    assert first.got == [("r1", live)]  # the same ledger is not told twice
    second = ledgers["now"] = Ledger("b")  # the job restarted: a new publisher
    rep.report("r1", refused := ServingEvent("refused", 8, 101.0, "bad checksum"))
    assert second.got == [("r1", live), ("r1", refused)]


# -- a real model version: extreme numbers, a broken version ------------------------------------


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """A store with a trained small model as version 1 and a copy with NaN weights as 2."""
    import torch

    from memory_bank.base import FullState
    from models.config import TrainerConfig
    from models.online import OnlineTrainer
    from stream.recordings.data.synthetic import build_synthetic_recording
    from stream.snapshots.store import SnapshotStore
    from stream.train.evaluate import iter_event_batches
    from tests.stream.conftest import small_model_config

    d = tmp_path_factory.mktemp("real")
    build_synthetic_recording(d / "s.parquet", events=400, users=40, items=100, seed=3)
    trainer = OnlineTrainer(small_model_config(), TrainerConfig(seed=1))
    for b in iter_event_batches(d / "s.parquet", batch_size=128):
        trainer.step(b)
    store = SnapshotStore(str(d / "snaps"))
    meta = {"model_config": trainer.cfg.model_dump(mode="json"), "train_step": trainer.steps}
    full = trainer.state.full_snapshot()
    store.publish_full(1, full, meta)
    broken = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in full.dense.items()}
    store.publish_full(2, FullState(broken, full.memories), meta)
    return store


def _real_client(store, version: int) -> TestClient:
    from stream.serving.model import ServedModel

    store.set_pinned(version)
    f = SnapshotFollower(store, build=ServedModel)
    assert f.poll() and f.version == version
    return TestClient(rank_api(RankService(f, ServingConfig())))


@pytest.mark.parametrize("x", [1.7976931348623157e308, -1.7976931348623157e308, 3.5e38, -1e300, 5e-324, 0.0])
def test_extreme_finite_features_give_finite_scores(real_store, x):
    """A finite number, however large, gives a finite score (signed_log bounds the
    features' transform by ~710): a known numeric feature and a name the model never saw."""
    client = _real_client(real_store, 1)
    cands = [{"item_id": "a"}, {"item_id": "never-seen", "item_text": "w " * 2000}]
    body = {"user_id": "u1", "user_features": {"tenure_days": x, "brand_new": x}, "candidates": cands}
    r = client.post("/rank", json=body)
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert all(math.isfinite(s) for s in scores["like"] + scores["rating"])


def test_a_version_giving_non_finite_scores_is_503_naming_it_and_the_candidates(real_store):
    client = _real_client(real_store, 2)
    r = client.post("/rank", json={"user_id": "u1", "candidates": [{"item_id": "a"}, {"item_id": "b"}]})
    assert r.status_code == 503 and "Retry-After" in r.headers
    msg = r.json()["detail"]
    assert "model version 2 gives non-finite scores" in msg and "'a', 'b'" in msg
    assert client.get("/version").json()["non_finite"] == 1
