"""The fast lane (gateway/fastlane.py) answers exactly as the FastAPI routes do: the same requests, sent through an
app with the lane and one without it (same database, same models), get the same status, body and headers, and the
same usage rows; requests the lane cannot prove acceptable reach the routes, which refuse them as before."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway import fastlane
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import services_of
from modelmeter.settings import Settings
from tests.conftest import ADMIN, bearer

# Headers that differ between two answers to one request by nature: ids, timings, the limiter's clock.
VOLATILE = {"x-request-id", "x-queue-time", "x-inference-time", "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens", "ratelimit",
            "date"}


@pytest.fixture
def lane_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The endpoint of every request the lane itself served."""
    calls: list[str] = []
    real = fastlane.serve

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["endpoint"])
        return await real(*args, **kwargs)

    monkeypatch.setattr(fastlane, "serve", counting)
    return calls


@pytest.fixture
def routes_only(client: TestClient, settings: Settings) -> Iterator[TestClient]:
    """A second app on the same database and data directory, without the lane."""
    app = create_app(settings.model_copy(update={"fast_lane": False}))
    with TestClient(app, raise_server_exceptions=False) as other:
        yield other


@pytest.fixture
def world(client: TestClient, make_tenant: Any, make_key: Any, register_model: Any) -> dict[str, Any]:
    tenant = make_tenant()
    made = {"full": make_key(tenant["id"]), "billing_only": make_key(tenant["id"], scopes=["billing:read"]),
            "revoked": make_key(tenant["id"])}
    classifier = register_model(tenant["id"], labels=["neg", "pos"])
    embedder = register_model(tenant["id"], task="feature-extraction")
    return {"tenant": tenant["id"], "keys": {name: k["key"] for name, k in made.items()},
            "revoked_id": made["revoked"]["id"], "classifier": classifier, "embedder": embedder}


def _cases(world: dict[str, Any], dims: int) -> list[tuple[str, str, dict[str, Any]]]:
    c, e, key = world["classifier"], world["embedder"], world["keys"]["full"]
    auth = bearer(key)
    long_text = "word " * 5000
    return [
        # The lane's own: accepted bodies, and refusals the pipeline makes after the body is read.
        ("classify one", "/v1/classify", {"json": {"model": c, "input": "a fine film"}, "headers": auth}),
        ("classify many", "/v1/classify", {"json": {"model": c, "input": ["a", "b c", "d e f"], "truncate": True},
                                           "headers": auth}),
        ("embed float", "/v1/embeddings", {"json": {"model": e, "input": "hello"}, "headers": auth}),
        ("embed base64", "/v1/embeddings", {"json": {"model": e, "input": ["x", "y"], "encoding_format": "base64",
                                                     "user": "u-1", "dimensions": dims}, "headers": auth}),
        ("embed null fields", "/v1/embeddings", {"json": {"model": e, "input": "z", "dimensions": None,
                                                          "user": None}, "headers": auth}),
        ("charset", "/v1/embeddings", {"content": b'{"model": "%s", "input": "q"}' % e.encode(),
                                       "headers": {**auth, "Content-Type": "application/json; charset=utf-8"}}),
        ("unknown model", "/v1/classify", {"json": {"model": "nope", "input": "a"}, "headers": auth}),
        ("wrong task", "/v1/classify", {"json": {"model": e, "input": "a"}, "headers": auth}),
        ("wrong task 2", "/v1/embeddings", {"json": {"model": c, "input": "a"}, "headers": auth}),
        ("wrong dimensions", "/v1/embeddings", {"json": {"model": e, "input": "a", "dimensions": dims + 1},
                                                "headers": auth}),
        ("too many inputs", "/v1/classify", {"json": {"model": c, "input": ["a"] * 257}, "headers": auth}),
        ("too long", "/v1/classify", {"json": {"model": c, "input": long_text}, "headers": auth}),
        # The routes' own: everything the lane passes on.
        ("integral float", "/v1/embeddings", {"json": {"model": e, "input": "a", "dimensions": float(dims)},
                                              "headers": auth}),
        ("unknown field", "/v1/classify", {"json": {"model": c, "input": "a", "temperature": 1}, "headers": auth}),
        ("empty list", "/v1/classify", {"json": {"model": c, "input": []}, "headers": auth}),
        ("empty text", "/v1/classify", {"json": {"model": c, "input": ""}, "headers": auth}),
        ("bool as int", "/v1/classify", {"json": {"model": c, "input": "a", "truncate": 1}, "headers": auth}),
        ("token ids", "/v1/embeddings", {"json": {"model": e, "input": [1, 2, 3]}, "headers": auth}),
        ("long model", "/v1/classify", {"json": {"model": "m" * 129, "input": "a"}, "headers": auth}),
        ("malformed", "/v1/classify", {"content": b'{"model": ', "headers": {**auth, "Content-Type": JSON}}),
        ("not utf-8", "/v1/classify", {"content": b'{"model": "\xff", "input": "a"}',
                                       "headers": {**auth, "Content-Type": JSON}}),
        ("lone surrogate", "/v1/classify", {"content": b'{"model": "%s", "input": "\\ud800"}' % c.encode(),
                                            "headers": {**auth, "Content-Type": JSON}}),
        ("no body type", "/v1/classify", {"content": b'{"model": "%s", "input": "a"}' % c.encode(),
                                          "headers": auth}),
        ("two content types", "/v1/classify", {"content": b'{"model": "%s", "input": "a"}' % c.encode(),
                                               "headers": [("authorization", auth["Authorization"]),
                                                           ("content-type", "text/plain"),
                                                           ("content-type", JSON)]}),
        ("NUL in model", "/v1/classify", {"json": {"model": "a\u0000b", "input": "a"}, "headers": auth}),
        ("text/plain", "/v1/classify", {"content": b'{"model": "%s", "input": "a"}' % c.encode(),
                                        "headers": {**auth, "Content-Type": "text/plain"}}),
        ("no key", "/v1/classify", {"json": {"model": c, "input": "a"}}),
        ("unknown key", "/v1/classify", {"json": {"model": c, "input": "a"}, "headers": bearer("mm_" + "x" * 40)}),
        ("no scope", "/v1/classify", {"json": {"model": c, "input": "a"},
                                      "headers": bearer(world["keys"]["billing_only"])}),
        ("revoked", "/v1/classify", {"json": {"model": c, "input": "a"}, "headers": bearer(world["keys"]["revoked"])}),
        ("key in query", "/v1/classify?k=" + key, {"json": {"model": c, "input": "a"}, "headers": auth}),
        ("idempotent", "/v1/classify", {"json": {"model": c, "input": "a"},
                                        "headers": {**auth, "Idempotency-Key": "lane-1"}}),
        ("idempotent again", "/v1/classify", {"json": {"model": c, "input": "a"},
                                              "headers": {**auth, "Idempotency-Key": "lane-1"}}),
    ]


JSON = "application/json"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _own(request: dict[str, Any], lane: str) -> dict[str, Any]:
    """The request with an Idempotency-Key of this lane's own (the two apps share the store of kept answers)."""
    if isinstance(request.get("headers"), list):
        return request
    headers = dict(request.get("headers", {}))
    if "Idempotency-Key" in headers:
        headers["Idempotency-Key"] += "-" + lane
    return {**request, "headers": headers}


def _usage_rows(client: TestClient) -> int:
    services = services_of(client.app)
    with services.sessions() as session:
        return int(session.exec(select(func.count()).select_from(UsageEvent)).one()[0])  # type: ignore[call-overload]


def test_both_lanes_give_the_same_answers_and_usage(client: TestClient, routes_only: TestClient,
                                                    world: dict[str, Any], lane_calls: list[str]) -> None:
    keys = world["keys"]
    # Warm both apps' key caches (a cache miss takes the routes: the lane never waits on the database).
    for app_client in (client, routes_only):
        for key in keys.values():
            app_client.post("/v1/classify", json={"model": world["classifier"], "input": "warm"},
                            headers=bearer(key))
    # Revoked through one app: the other (a second replica) drops its cached entry as its TTL would.
    assert client.delete(f"/admin/keys/{world['revoked_id']}", headers=ADMIN).status_code == 200
    services_of(routes_only.app).auth.invalidate()
    dims = len(client.post("/v1/embeddings", json={"model": world["embedder"], "input": "d"},
                           headers=bearer(keys["full"])).json()["data"][0]["embedding"])
    routes_only.post("/v1/embeddings", json={"model": world["embedder"], "input": "d"}, headers=bearer(keys["full"]))
    lane_calls.clear()
    rows_before = _usage_rows(client)
    answered = 0
    for name, path, request in _cases(world, dims):
        fast = client.post(path, **_own(request, "fast"))
        slow = routes_only.post(path, **_own(request, "slow"))
        assert fast.status_code == slow.status_code, (name, fast.text, slow.text)
        assert _same(fast.json(), slow.json()), (name, fast.text, slow.text)
        fast_headers = {k: v for k, v in fast.headers.items() if k not in VOLATILE}
        slow_headers = {k: v for k, v in slow.headers.items() if k not in VOLATILE}
        assert fast_headers == slow_headers, name
        answered += 2 * (fast.status_code == 200)
    # The lane served exactly its own cases (the first twelve: six answered, six refused by the pipeline; and the
    # NUL in a model name, which the pipeline refuses: 404 on SQLite, 400 invalid_text on PostgreSQL, both lanes)...
    assert len(lane_calls) == 13, lane_calls
    # ...and every 200 has its usage row, once (the idempotent replay is the first answer, not a new row).
    assert _usage_rows(client) - rows_before == answered - 2
