"""Admin API auth, validation and paging, over an in-memory JobView (pure logic).

The end-to-end test (tests/integration) queries the same app over the real job.
"""

import pytest
from fastapi.testclient import TestClient

from stream.admin.app import AdminConfig, AdminConfigError, NotFound, create_app, resolve_token

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

    def snapshots(self):
        return [{"version": v} for v in range(250, 0, -1)]

    def rollback(self, version):
        if version > 250:
            raise NotFound(f"version {version} does not exist")
        return {"pinned": version}

    def unpin(self):
        return {"pinned": None}

    def serving(self):
        return [{"replica": "r1", "version": 3}]

    def ingest_lag(self):
        return {"total": 0}

    def metrics_text(self):
        return b"memstream_events_trained_total 1\n"


@pytest.fixture()
def client():
    return TestClient(create_app(_View(), AdminConfig(rate_limit_per_s=1000, rate_limit_burst=1000), TOKEN))


H = {"Authorization": f"Bearer {TOKEN}"}


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
    app = create_app(_View(), AdminConfig(rate_limit_per_s=1000, rate_limit_burst=1000), TOKEN)
    c = TestClient(app)
    spec = c.get("/openapi.json").json()
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
    assert checked >= 3 * 10


def test_schemathesis_finds_no_5xx_and_no_schema_violation():
    """Property-based run over the OpenAPI spec, in process, bounded (~seconds)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    app = create_app(_View(), AdminConfig(rate_limit_per_s=1e6, rate_limit_burst=10**6), TOKEN)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(headers=H)

        try:
            run()
        except Exception as e:
            failures.append(f"{operation.method.upper()} {operation.path}: {e}"[:2000])
    assert not failures, "\n\n".join(failures)
