"""Admin API auth, validation and paging, over an in-memory JobView (pure logic).

The end-to-end test (tests/integration) queries the same app over the real job.
"""

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from stream.admin.app import AdminConfig, AdminConfigError, NotFound, create_app, resolve_token
from tests.stream.conftest import asgi_post

TOKEN = "t" * 32


class _View:
    def bank_item(self, item_id):
        return {"item_id": item_id, "present": True} if item_id == "Toy Story (1995)" else None

    def bank_neighbors(self, item_id, k):
        return [{"item_id": "x", "cosine": 0.9}][:k] if item_id == "Toy Story (1995)" else None

    def memory_stats(self, name):
        return {"bank": {"size": 1}, "pkm": {"slot_usage": 0.5}, "lmn": {"enabled": False}}.get(name)

    def user_history(self, user_id, limit):
        return {"user_id": user_id, "items": []} if user_id == "1m_1" else None

    def trainer_health(self):
        return {"status": "ok", "steps": 7}

    def snapshots(self):
        return [{"version": v} for v in range(250, 0, -1)]

    def rollback(self, version):
        if version > 250:  # worded as DriverJobView.rollback words a SnapshotNotFound
            raise NotFound(
                f"version {version} cannot be served: version {version} has no manifest "
                "under /var/lib/memstream/runs/prod/snapshots"
            )
        return {"pinned": version}

    def unpin(self):
        return {"pinned": None}

    def serving(self):
        reason = "SnapshotCorrupt: cannot read /var/lib/memstream/snapshots/v4/dense.npz: gone"
        return [{"replica": "r1", "version": 3, "refusals": [{"version": 4, "reason": reason}]}]

    def ingest_lag(self):
        return {"total": 0}

    def metrics_text(self):
        return b"memstream_events_trained_total 1\n"


# Generous limits, for the tests that are not about them.
LOOSE = {"rate_limit_per_s": 1e6, "rate_limit_burst": 10**6, "auth_fail_per_s": 1e6, "auth_fail_burst": 10**6}


@pytest.fixture()
def client():
    return TestClient(create_app(_View(), AdminConfig(**LOOSE), TOKEN))


H = {"Authorization": f"Bearer {TOKEN}"}
J = {**H, "Content-Type": "application/json"}


def test_auth_required_everywhere_but_healthz(client):
    assert client.get("/healthz").status_code == 200
    for path in ["/metrics", "/v1/bank/stats", "/v1/serving", "/v1/ingest/lag", "/v1/snapshots"]:
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(path, headers={"Authorization": TOKEN}).status_code == 401
        assert client.get(path, headers=H).status_code == 200


def test_not_found_and_validation(client):
    assert client.get("/v1/bank/items/Toy Story (1995)", headers=H).json()["present"]
    assert client.get("/v1/bank/items/nope", headers=H).status_code == 404
    assert client.get("/v1/bank/items/nope/neighbors", headers=H).status_code == 404
    assert client.get("/v1/bank/items/Toy Story (1995)/neighbors?k=0", headers=H).status_code == 422
    assert client.get("/v1/bank/items/Toy Story (1995)/neighbors?k=abc", headers=H).status_code == 422
    assert client.get("/v1/bank/items/Toy Story (1995)/neighbors?k=1000", headers=H).status_code == 422
    assert client.get("/v1/users/1m_1/history?limit=-1", headers=H).status_code == 422
    assert client.get("/v1/users/ghost/history", headers=H).status_code == 404
    assert client.post("/v1/snapshots/rollback", json={"version": 999}, headers=H).status_code == 404
    assert client.post("/v1/snapshots/rollback", json={"version": "x"}, headers=H).status_code == 422
    assert client.post("/v1/snapshots/rollback", json={"version": 3}, headers=H).json() == {"pinned": 3}


@pytest.mark.parametrize(
    "version", ["true", "false", "3.0", '"3"', "0", "-1", "null", "NaN", "Infinity", "1e400"]
)
def test_rollback_version_is_a_strict_integer(client, version):
    r = client.post("/v1/snapshots/rollback", content=f'{{"version": {version}}}', headers=J)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "version"]


def test_rollback_body_must_be_json_without_duplicate_keys(client):
    r = client.post("/v1/snapshots/rollback", content='{"version": 3, "version": 4}', headers=J)
    assert r.status_code == 422 and "duplicate key 'version'" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/snapshots/rollback", content='{"version": 3', headers=J)
    assert r.status_code == 422
    r = client.post("/v1/snapshots/rollback", content='{"version": 3}', headers=H)  # curl -d's default
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = client.post("/v1/snapshots/rollback", json={"version": 3, "extra": 1}, headers=H)
    assert r.status_code == 422


def test_not_found_details_carry_no_absolute_path(client):
    r = client.post("/v1/snapshots/rollback", json={"version": 999}, headers=H)
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert "/var" not in detail and "/snapshots" not in detail
    assert detail == "version 999 cannot be served: version 999 has no manifest under snapshots"
    assert "/var" not in client.get("/v1/serving", headers=H).text  # refusal reasons too


def test_trainer_health_route(client):
    assert client.get("/v1/trainer/health").status_code == 401
    assert client.get("/v1/trainer/health", headers=H).json() == {"status": "ok", "steps": 7}


def test_openapi_needs_the_token_and_there_are_no_open_docs(client):
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers={"Authorization": "Bearer " + "u" * 32}).status_code == 401
    assert "/v1/snapshots/rollback" in client.get("/openapi.json", headers=H).json()["paths"]
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404
        assert client.get(path, headers=H).status_code == 404


# ---- bodies: auth first, then a bounded read -----------------------------------------------


MB = 1 << 20


def test_auth_runs_before_the_body_is_read():
    app = create_app(_View(), AdminConfig(**LOOSE), TOKEN)
    for headers in ({}, {"Authorization": "Bearer " + "u" * 32}):
        status, calls = asyncio.run(
            asgi_post(
                app, {**headers, "Content-Type": "application/json"}, [b"{"] * 50, "/v1/snapshots/rollback"
            )
        )
        assert status == 401 and calls == 0
    c = TestClient(app)
    assert (
        c.post(
            "/v1/snapshots/rollback", content=b"{not json", headers={"Content-Type": "application/json"}
        ).status_code
        == 401
    )


def test_a_body_over_the_limit_is_413_before_it_is_read():
    app = create_app(_View(), AdminConfig(**LOOSE, max_body_bytes=1024), TOKEN)
    big = {**H, "Content-Type": "application/json", "Content-Length": str(50 * MB)}
    assert asyncio.run(asgi_post(app, big, [b" " * MB] * 50, "/v1/snapshots/rollback")) == (413, 0)
    chunked = {**H, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    status, calls = asyncio.run(
        asgi_post(app, chunked, [b" " * 512] * 100_000, "/v1/snapshots/rollback")
    )  # 50 MB in 512 B chunks
    assert status == 413 and calls <= 3  # two chunks fill the limit, the third passes it
    r = TestClient(app).post("/v1/snapshots/rollback", content=b" " * (50 * MB), headers=J)
    assert r.status_code == 413


def test_component_stats_by_name(client):
    assert client.get("/v1/pkm/stats", headers=H).json() == {"slot_usage": 0.5}
    assert client.get("/v1/lmn/stats", headers=H).json() == {"enabled": False}  # switched off: 200
    r = client.get("/v1/nope/stats", headers=H)
    assert r.status_code == 404 and "no component 'nope'" in r.json()["detail"]
    assert client.get("/v1/BANK;drop/stats", headers=H).status_code == 422


def test_snapshots_paginated_with_max_page(client):
    r = client.get("/v1/snapshots?offset=10&limit=100", headers=H).json()
    assert r["total"] == 250 and len(r["items"]) == 100 and r["items"][0]["version"] == 240
    assert client.get("/v1/snapshots?limit=101", headers=H).status_code == 422


def test_rate_limit_per_client():
    c = TestClient(create_app(_View(), AdminConfig(rate_limit_per_s=0.001, rate_limit_burst=3), TOKEN))
    codes = [c.get("/v1/bank/stats", headers=H).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert int(c.get("/v1/bank/stats", headers=H).headers["retry-after"]) >= 1


def test_wrong_tokens_are_rate_limited_per_client():
    app = create_app(_View(), AdminConfig(auth_fail_burst=3, auth_fail_per_s=0.01), TOKEN)
    guesser, other = TestClient(app, client=("10.0.0.1", 1)), TestClient(app, client=("10.0.0.2", 1))
    wrong = {"Authorization": "Bearer " + "g" * 32}
    codes = [guesser.get("/v1/bank/stats", headers=wrong).status_code for _ in range(5)]
    assert codes == [401, 401, 401, 429, 429]
    r = guesser.get("/v1/bank/stats", headers=H)  # even the right token: the answer tells nothing
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 100
    # without a credential nothing is guessed, so nothing is counted
    assert all(other.get("/v1/serving").status_code == 401 for _ in range(5))
    assert other.get("/v1/serving", headers=H).status_code == 200


def test_wrong_token_lockout_ends_when_the_bucket_refills():
    app = create_app(_View(), AdminConfig(auth_fail_burst=1, auth_fail_per_s=20), TOKEN)
    c = TestClient(app)
    wrong = {"Authorization": "Bearer " + "g" * 32}
    assert [c.get("/v1/serving", headers=wrong).status_code for _ in range(2)] == [401, 429]
    time.sleep(0.1)
    assert c.get("/v1/serving", headers=H).status_code == 200


def test_token_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMSTREAM_ADMIN_TOKEN", raising=False)
    with pytest.raises(AdminConfigError):
        resolve_token(AdminConfig(host="0.0.0.0"), tmp_path)
    with pytest.raises(AdminConfigError):
        resolve_token(AdminConfig(token="short"), tmp_path)
    tok = resolve_token(AdminConfig(), tmp_path)
    assert (tmp_path / "admin_token").read_text().strip() == tok
    assert oct((tmp_path / "admin_token").stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("MEMSTREAM_ADMIN_TOKEN", "e" * 20)
    assert resolve_token(AdminConfig(host="0.0.0.0"), None) == "e" * 20


def test_unpin_route():
    c = TestClient(create_app(_View(), AdminConfig(), TOKEN))
    assert c.delete("/v1/snapshots/pin").status_code == 401
    assert c.delete("/v1/snapshots/pin", headers=H).json() == {"pinned": None}


def test_every_route_but_healthz_needs_the_token():
    """From the OpenAPI spec itself, so a route added later is covered too."""
    app = create_app(_View(), AdminConfig(**LOOSE), TOKEN)
    c = TestClient(app)
    spec = c.get("/openapi.json", headers=H).json()
    spec["paths"]["/openapi.json"] = {"get": {}}  # served outside the spec, behind the token too
    checked = 0
    for path, ops in spec["paths"].items():
        url = (
            path.replace("{item_id}", "Toy Story (1995)")
            .replace("{user_id}", "1m_1")
            .replace("{component}", "bank")
        )
        for method in ops:
            for headers in ({}, {"Authorization": "Bearer " + "u" * 32}, {"Authorization": "Basic " + TOKEN}):
                r = c.request(method, url, headers=headers, json={"version": 1})
                if path == "/healthz":
                    assert r.status_code == 200
                else:
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.headers["www-authenticate"] == "Bearer"
                checked += 1
    assert checked >= 3 * 12


def test_schemathesis_finds_no_5xx_and_no_schema_violation():
    """Property-based run over the OpenAPI spec, in process, bounded (~seconds)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    app = create_app(_View(), AdminConfig(**LOOSE), TOKEN)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=H)
    failures = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case):
            # JSON Schema counts 3.0 as an integer; the rollback version is strict (a 422).
            body = case.body if isinstance(case.body, dict) else {}
            integral_float = isinstance(body.get("version"), float)
            excluded = [positive_data_acceptance] if integral_float else []
            r = case.call_and_validate(headers=H, excluded_checks=excluded)
            if integral_float:
                assert r.status_code == 422

        try:
            run()
        except Exception as e:
            failures.append(f"{operation.method.upper()} {operation.path}: {e}"[:2000])
    assert not failures, "\n\n".join(failures)


def _memories():
    """A real item bank and history store as the trainer keeps them (integer keys), holding
    two items with names, one written without a name, and one user's history over them."""
    import numpy as np
    import torch

    from memory_bank.history import HistoryConfig, UserHistoryStore
    from memory_bank.lemur import BankConfig, ItemMemoryBank
    from models.ids import crc_code, key64

    torch.manual_seed(0)
    bank = ItemMemoryBank(BankConfig(dim=4, capacity=2))
    names = ["Heat (1995)", "Toy Story (1995)"]
    keys = np.array([key64(n) for n in names])
    bank.write_rows(keys, torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0]]), step=1, now_s=0.0, item_ids=names)
    history = UserHistoryStore(HistoryConfig(length=4, max_users=4))
    items = [*names, "Unknown (2001)"]
    ikeys = np.array([key64(n) for n in items])
    history.append(
        np.array([key64("1m_1")] * 3),
        np.array([crc_code(n, "item") for n in items]),
        ikeys,
        bank.rows_of(ikeys),
        np.array([10, 20, 30]),
        np.array([1.0, -1.0, 0.5]),
    )
    return bank, history


def test_the_trainers_answers_by_string_id_over_integer_keyed_memories():
    """stream/job/actors.py answers the admin routes with these: the client's string ids
    become keys (models.ids.key64); items are shown by name where the bank knows it."""
    import torch

    from models.ids import key64
    from stream.admin import app

    bank, history = _memories()
    item = app.bank_item(bank, "Toy Story (1995)")
    assert item["item_id"] == "Toy Story (1995)" and item["item_key"] == key64("Toy Story (1995)")
    assert app.bank_item(bank, "nope") is None and app.bank_item(None, "Heat (1995)") is None
    assert app.bank_neighbors(bank, "Heat (1995)", 3) == [
        {"item_id": "Toy Story (1995)", "cosine": pytest.approx(0.9939, abs=1e-3)}
    ]
    assert app.bank_neighbors(bank, "nope", 3) is None
    order = list(history.slots)
    h = app.user_history(history, bank, "1m_1", limit=2)
    assert list(history.slots) == order  # a look, not a use: the LRU order is unchanged
    assert h["user_id"] == "1m_1" and h["length"] == 3
    assert [(x["item_id"], x["in_bank"], x["ts_ms"], x["signal"]) for x in h["items"]] == [
        (str(key64("Unknown (2001)")), False, 30, 0.5),  # most recent first; never in the bank
        ("Toy Story (1995)", True, 20, -1.0),
    ]
    assert app.user_history(history, bank, "ghost", limit=5) is None
    # The item's row given to another item: the entry is no longer held by the bank.
    bank.read_targets([key64("Toy Story (1995)")])
    bank.write_rows([key64("Other")], torch.ones(1, 4), step=2, now_s=1.0)  # evicts Heat
    first = app.user_history(history, bank, "1m_1", limit=5)["items"][-1]
    assert first["item_key"] == key64("Heat (1995)") and not first["in_bank"]
    assert first["item_id"] == str(key64("Heat (1995)"))  # its name went with its row


def test_the_history_route_over_the_trainers_answer():
    """The route returns the trainer's answer as it is (over a JobView built on the real
    memories, as the driver's view forwards the actor's)."""
    bank, history = _memories()
    from stream.admin import app

    class _Real(_View):
        def user_history(self, user_id, limit):
            return app.user_history(history, bank, user_id, limit)

        def bank_item(self, item_id):
            return app.bank_item(bank, item_id)

    c = TestClient(create_app(_Real(), AdminConfig(**LOOSE), TOKEN))
    r = c.get("/v1/users/1m_1/history", params={"limit": 1}, headers=H)
    assert r.status_code == 200 and [x["ts_ms"] for x in r.json()["items"]] == [30]
    assert c.get("/v1/users/ghost/history", headers=H).status_code == 404
    assert c.get("/v1/bank/items/Heat (1995)", headers=H).json()["row"] == 0
