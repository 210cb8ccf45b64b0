"""Shared fixtures: settings on SQLite (default) or PostgreSQL (MODELMETER_DATABASE_URL), the app, factories."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from modelmeter import clock, db
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import Services, services_of
from modelmeter.settings import Settings
from modelmeter.tables import import_all_tables
from tests.support.alerts import Receiver
from tests.support.live_server import LiveServer, serve_in_thread
from tests.support.shared_data import missing_reason, shared_data_dir

ADMIN_TOKEN = "mmadmin_test-token-0123456789abcdef0123"
PG_URL = os.environ.get("MODELMETER_DATABASE_URL", "")
REDIS_URL = os.environ.get("MODELMETER_REDIS_URL", "")
ON_POSTGRES = PG_URL.startswith("postgresql")

import_all_tables()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny forwards on a shared 2-core machine are far faster (and steadier) without OpenMP fan-out."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (migrating once is much faster)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def pg_ready() -> None:
    engine = db.make_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    db.upgrade(engine)
    engine.dispose()


def _truncate_pg() -> None:
    engine = db.make_engine(PG_URL)
    with engine.begin() as conn:
        names = [r[0] for r in conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        ))]
        if names:
            conn.execute(text(f"TRUNCATE {', '.join(names)} CASCADE"))
    engine.dispose()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database for this test."""
    if ON_POSTGRES:
        request.getfixturevalue("pg_ready")
        _truncate_pg()
        yield PG_URL
        return
    template: Path = request.getfixturevalue("sqlite_template")
    target = tmp_path / "modelmeter.db"
    shutil.copy(template, target)
    yield f"sqlite:///{target}"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        redis_url=REDIS_URL or None,
        admin_token=ADMIN_TOKEN,
        start_worker=False,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
def app_factory(settings: Settings) -> Callable[..., Any]:
    def make(**overrides: Any) -> Any:
        return create_app(settings.model_copy(update=overrides))

    return make


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def make_tenant(client: TestClient) -> Callable[..., dict[str, Any]]:
    counter = iter(range(1, 10_000))

    def make(**fields: Any) -> dict[str, Any]:
        n = next(counter)
        body = {"name": f"Tenant {n}", "email": f"t{n}@example.com", "plan": "payg", **fields}
        response = client.post("/admin/tenants", json=body, headers=ADMIN)
        assert response.status_code == 201, response.text
        return dict(response.json())

    return make


@pytest.fixture
def make_key(client: TestClient) -> Callable[..., dict[str, Any]]:
    def make(tenant_id: str, **fields: Any) -> dict[str, Any]:
        response = client.post(f"/admin/tenants/{tenant_id}/keys", json=fields, headers=ADMIN)
        assert response.status_code == 201, response.text
        return dict(response.json())

    return make


class FakeClock:
    """A controllable clock for expiry, grace periods and billing periods."""

    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def fake_clock() -> Iterator[FakeClock]:
    fake = FakeClock(clock.now())
    clock.set_source(fake)
    yield fake
    clock.set_source(None)


def assert_envelope(response: Any, status: int, *, type_: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The response is ``status`` with the contract's error envelope (and the given type/code)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    if type_ is not None:
        assert error["type"] == type_, error
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


@pytest.fixture
def register_model(client: TestClient, services: Services) -> Callable[..., str]:
    """Save a tiny random BERT and register it (a tenant's model, or a platform model when tenant is None)."""
    from modelmeter.models.registry import MlModel
    from tests.tiny_bert import make_tiny_bert

    counter = iter(range(1, 10_000))

    def register(tenant_id: str | None, *, task: str = "text-classification", labels: list[str] | None = None,
                 model_id: str | None = None) -> str:
        model_id = model_id or f"tiny-{task.split('-')[0]}-{next(counter)}"
        relative = Path("models") / (tenant_id or "platform") / model_id
        make_tiny_bert(services.settings.data_dir / relative, task, labels)
        with services.sessions() as session:
            session.add(MlModel(
                id=model_id, owner_tenant_id=tenant_id, base_model="tiny-bert", task=task,
                labels_json=(json.dumps(labels or ["negative", "positive"]) if task == "text-classification"
                             else json.dumps(["LOC", "ORG", "PER"]) if task == "token-classification" else None),
                artifact=str(relative), created=clock.now_s(),
            ))
            session.commit()
        services.models.invalidate()
        return model_id

    return register


@pytest.fixture
def register_adapter(client: TestClient, register_model: Callable[..., str], services: Services) -> Callable[..., str]:
    """Save a tiny LoRA adapter on a tiny platform base (registered on first use) and register it for a tenant."""
    from modelmeter.models.registry import MlModel, artifact_path
    from tests.tiny_bert import make_tiny_adapter

    counter = iter(range(1, 10_000))
    bases: dict[str, Path] = {}

    def register(tenant_id: str, *, labels: list[str] | None = None, rank: int = 4, base: str = "tiny-base",
                 model_id: str | None = None) -> str:
        if base not in bases:
            register_model(None, task="feature-extraction", model_id=base)
            with services.sessions() as session:
                row = session.get(MlModel, base)
                assert row is not None
                bases[base] = artifact_path(row.artifact, services.settings.data_dir)
        n = next(counter)
        model_id = model_id or f"ft:{base}:lora:{n:08d}"
        names = labels or ["negative", "positive"]
        relative = Path("models") / tenant_id / f"adapter-{n}"
        make_tiny_adapter(services.settings.data_dir / relative, bases[base], names, rank=rank, seed=n)
        with services.sessions() as session:
            session.add(MlModel(
                id=model_id, owner_tenant_id=tenant_id, base_model=base, task="text-classification",
                labels_json=json.dumps(names), artifact=str(relative), created=clock.now_s(), training_type="lora",
            ))
            session.commit()
        services.models.invalidate()
        return model_id

    return register


@pytest.fixture
def live_server(client: TestClient) -> Iterator[LiveServer]:
    """The same app (and database) as ``client``, also served by uvicorn on a loopback port."""
    with serve_in_thread(create_app(services_of(client.app).settings), timeout_s=30) as server:
        yield server


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (``../shared/data``, or MODELMETER_SHARED_DATA): a test that reads it takes this
    fixture, and is skipped, with the same reason everywhere, under CI too, when the data is absent."""
    path = shared_data_dir()
    reason = missing_reason(path)
    if reason is not None:
        pytest.skip(reason)
    return path


@pytest.fixture
def receiver() -> Iterator[Callable[[list[int | str]], Receiver]]:
    """Make scripted webhook receivers (see :class:`tests.support.alerts.Receiver`); all are closed afterwards."""
    made: list[Receiver] = []

    def make(script: list[int | str]) -> Receiver:
        made.append(Receiver(script))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def anyio_backend() -> str:
    """The event loop every async test runs on."""
    return "asyncio"


@pytest.fixture
def services(client: TestClient) -> Services:
    """The platform's services behind ``client`` (database sessions, the model server, limits, telemetry)."""
    return services_of(client.app)
