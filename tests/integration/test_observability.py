"""Observability end to end: metric values after known traffic (injected registry), bounded labels, the scrape-time
database gauges, two gateway processes aggregated (multiprocess mode), a real Prometheus scraping a running
gateway, promtool on deploy/, and Grafana dashboards that query only exported metrics."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func
from sqlmodel import select

from modelmeter import clock
from modelmeter.billing.tables import CreditDraw, StripeOutbox, UsageEvent
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import Services, services_of
from modelmeter.models.finetune.tables import FineTuningJob
from modelmeter.money import MICRO_PER_CENT
from modelmeter.settings import Settings
from tests.binaries import require_binary
from tests.conftest import ADMIN, ADMIN_TOKEN, FakeClock, bearer
from tests.processes import wait_until
from tests.support.gateways import two_fronts
from tests.support.live_server import LiveServer
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TEXTS = ["a fine film", "the worst, most tedious two hours I have spent in a cinema this year", "ok"]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def gateway(settings: Settings, registry: CollectorRegistry, client: TestClient) -> Iterator[TestClient]:
    """A gateway whose metrics live on ``registry`` (same database as ``client``, which the factories use)."""
    with TestClient(create_app(settings, registry=registry), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def caller(make_tenant: Any, make_key: Any, register_model: Any) -> dict[str, Any]:
    tenant = make_tenant(name="Observed Corp", email="secret-owner@example.com")
    key = make_key(tenant["id"])
    return {"tenant": tenant["id"], "key": key["key"], "key_id": key["id"], "model": register_model(tenant["id"]),
            "headers": bearer(key["key"])}


def classify(post: Callable[..., Any], headers: dict[str, str], model: str, text: str) -> int:
    response = post("/v1/classify", json={"model": model, "input": text}, headers=headers)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["total_tokens"])


def ledger_tokens(client: TestClient) -> int:
    services = services_of(client.app)
    with services.sessions() as session:
        return int(session.exec(select(func.coalesce(func.sum(UsageEvent.tokens), 0))).one())


def tenant_label_values(exposition: str) -> set[str]:
    return {sample.labels["tenant"] for family in text_string_to_metric_families(exposition)
            for sample in family.samples if "tenant" in sample.labels}


def test_metric_values_after_known_traffic(gateway: TestClient, registry: CollectorRegistry, client: TestClient,
                                           caller: dict[str, Any], settings: Settings) -> None:
    tenant, model, headers = caller["tenant"], caller["model"], caller["headers"]
    tokens = [classify(gateway.post, headers, model, text) for text in TEXTS]
    wrong_task = gateway.post("/v1/embeddings", json={"model": model, "input": "x"}, headers=headers)
    unknown = gateway.post("/v1/classify", json={"model": "no-such-model-123", "input": "x"}, headers=headers)
    assert (wrong_task.status_code, unknown.status_code) == (422, 404)
    assert gateway.get("/v1/fine_tuning/jobs/ftjob_doesnotexist", headers=headers).status_code == 404
    assert gateway.get("/nowhere/at-all").status_code == 404
    assert gateway.get("/metrics").status_code == 401  # it names every tenant: a bearer token is needed
    metrics = gateway.get("/metrics", headers=ADMIN)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")

    value = registry.get_sample_value
    assert value("modelmeter_billable_tokens_total", {"tenant": tenant, "model": model}) == sum(tokens) \
        == ledger_tokens(client)
    assert value("modelmeter_billable_requests_total", {"tenant": tenant, "model": model}) == 3
    assert value("modelmeter_compute_seconds_total", {"tenant": tenant, "model": model, "device": "cpu"}) > 0
    http = "modelmeter_http_requests_total"
    assert value(http, {"route": "/v1/classify", "method": "POST", "status": "200", "model": model}) == 3
    assert value(http, {"route": "/v1/embeddings", "method": "POST", "status": "422", "model": model}) == 1
    assert value(http, {"route": "/v1/classify", "method": "POST", "status": "404", "model": "none"}) == 1
    assert value(http, {"route": "/v1/fine_tuning/jobs/{job_id}", "method": "GET", "status": "404",
                        "model": "none"}) == 1
    assert value(http, {"route": "unmatched", "method": "GET", "status": "404", "model": "none"}) == 1
    assert value("modelmeter_http_request_duration_seconds_count", {"route": "/v1/classify", "method": "POST"}) == 4
    assert value("modelmeter_request_queue_seconds_count", {"model": model}) == 3
    assert value("modelmeter_request_inference_seconds_count", {"model": model}) == 3
    assert value("modelmeter_batch_size_sum", {"model": model}) == 3  # one input per request, served one by one
    assert value("modelmeter_batch_tokens_total", {"model": model, "kind": "real"}) == sum(tokens)
    assert value("modelmeter_model_loads_total", {"model": model}) == 1
    assert value("modelmeter_pool_models") == 1
    assert value("modelmeter_pool_bytes") > 0
    assert value("modelmeter_queue_capacity_requests", {"model": model}) == settings.max_queue_requests
    assert value("modelmeter_queue_depth", {"model": model}) == 0

    text = metrics.text
    for secret in (caller["key"], caller["key_id"], "no-such-model-123", "ftjob_doesnotexist", "nowhere",
                   "Observed Corp", "secret-owner@example.com"):
        assert secret not in text


def test_refusals_are_counted(gateway: TestClient, registry: CollectorRegistry, client: TestClient,
                              make_tenant: Any, make_key: Any, register_model: Any) -> None:
    limited, broke = make_tenant()["id"], make_tenant(plan="payg")["id"]
    client.patch(f"/admin/tenants/{limited}", json={"rpm_limit": 1}, headers=ADMIN)
    client.patch(f"/admin/tenants/{broke}", json={"monthly_budget_cents": 0}, headers=ADMIN)
    model = register_model(None)
    limited_key, broke_key = bearer(make_key(limited)["key"]), bearer(make_key(broke)["key"])
    classify(gateway.post, limited_key, model, "one")
    second = gateway.post("/v1/classify", json={"model": model, "input": "two"}, headers=limited_key)
    refused = gateway.post("/v1/classify", json={"model": model, "input": "two"}, headers=broke_key)
    assert (second.json()["error"]["type"], refused.json()["error"]["type"]) == ("rate_limit_exceeded",
                                                                                  "insufficient_quota")
    value = registry.get_sample_value
    assert value("modelmeter_rate_limit_refusals_total", {"tenant": limited, "reason": "requests"}) == 1
    assert value("modelmeter_quota_refusals_total", {"tenant": broke}) == 1
    assert value("modelmeter_http_requests_total",
                 {"route": "/v1/classify", "method": "POST", "status": "429", "model": model}) == 2
    assert value("modelmeter_billable_requests_total", {"tenant": broke, "model": model}) is None


def test_tenant_label_is_capped(settings: Settings, client: TestClient, make_tenant: Any, make_key: Any,
                                register_model: Any) -> None:
    registry = CollectorRegistry()
    model = register_model(None)
    keys = [bearer(make_key(make_tenant()["id"])["key"]) for _ in range(3)]
    with TestClient(create_app(settings.model_copy(update={"metrics_max_tenants": 1}), registry=registry)) as capped:
        tokens = [classify(capped.post, headers, model, "same words") for headers in keys]
        exposition = capped.get("/metrics", headers=ADMIN).text
    labels = tenant_label_values(exposition)
    assert OTHER_LABEL in labels
    assert len(labels - {OTHER_LABEL}) == 1
    (first,) = labels - {OTHER_LABEL}
    assert registry.get_sample_value("modelmeter_billable_tokens_total", {"tenant": first, "model": model}) \
        == tokens[0]
    assert registry.get_sample_value("modelmeter_billable_tokens_total", {"tenant": OTHER_LABEL, "model": model}) \
        == tokens[1] + tokens[2]


OTHER_LABEL = "other"


def test_evictions_and_pool_gauges(settings: Settings, client: TestClient, caller: dict[str, Any],
                                   register_model: Any) -> None:
    registry = CollectorRegistry()
    second = register_model(caller["tenant"])
    # A tiny BERT holds about 4 MB: a 6 MiB pool keeps one model at a time.
    with TestClient(create_app(settings.model_copy(update={"pool_memory_mb": 6}), registry=registry)) as small:
        for model in (caller["model"], second, caller["model"]):
            classify(small.post, caller["headers"], model, "hello")
        small.get("/metrics", headers=ADMIN)
    value = registry.get_sample_value
    assert value("modelmeter_model_loads_total", {"model": caller["model"]}) == 2
    assert value("modelmeter_model_evictions_total", {"model": caller["model"]}) == 1
    assert value("modelmeter_model_evictions_total", {"model": second}) == 1
    assert value("modelmeter_pool_models") == 1
    assert value("modelmeter_pool_budget_bytes") == 6 * 1024 * 1024
    assert value("modelmeter_queue_capacity_requests", {"model": second}) == 0


def test_database_gauges(gateway: TestClient, registry: CollectorRegistry, client: TestClient, make_tenant: Any,
                         make_key: Any, register_model: Any, services: Services) -> None:
    tenant = make_tenant(plan="free")["id"]
    used = classify(gateway.post, bearer(make_key(tenant)["key"]), register_model(None), "a few words here")
    now = clock.now_s()
    with services.sessions() as session:
        for i, status in enumerate(("queued", "running", "running", "succeeded")):
            session.add(FineTuningJob(id=f"ftjob_{i}", tenant_id=tenant, model="m", training_file="file_x",
                                      n_epochs=1, batch_size=8, learning_rate_multiplier=1.0, seed=0, status=status,
                                      created_at=now))
        session.add(StripeOutbox(kind="invoice", object_id="in_x", tenant_id=tenant, payload={},
                                 idempotency_key="mm-test-1", status="pending", next_attempt_at=now,
                                 created=now - 120))
        session.commit()
    value = registry.get_sample_value
    assert value("modelmeter_metrics_database_up") == 1
    jobs = {s: value("modelmeter_fine_tuning_jobs", {"state": s}) for s in ("queued", "running", "succeeded", "failed")}
    assert jobs == {"queued": 1, "running": 2, "succeeded": 1, "failed": 0}
    assert value("modelmeter_stripe_outbox_pending") == 1
    assert value("modelmeter_stripe_outbox_failed") == 0
    assert value("modelmeter_stripe_outbox_oldest_pending_age_seconds") >= 120
    # free: a hard limit of 100,000 tokens and 1,000 requests a month.
    ratio = "modelmeter_tenant_quota_utilisation_ratio"
    assert value(ratio, {"tenant": tenant, "resource": "tokens"}) == pytest.approx(used / 100_000)
    assert value(ratio, {"tenant": tenant, "resource": "requests"}) == pytest.approx(1 / 1000)
    assert value("modelmeter_tenants", {"plan": "free", "status": "active"}) == 1


OUTSTANDING = "modelmeter_credits_outstanding_cents"


def ledger_drawn(services: Services, tenant_id: str) -> int:
    with services.sessions() as session:
        return int(session.exec(select(func.coalesce(func.sum(CreditDraw.amount_micro), 0))
                                .where(CreditDraw.tenant_id == tenant_id)).one())


def test_outstanding_credits_after_a_grant_and_draws(settings: Settings, client: TestClient, make_tenant: Any,
                                                    make_key: Any, register_model: Any, services: Services) -> None:
    tenant = make_tenant(plan="payg")["id"]
    headers = bearer(make_key(tenant)["key"])
    model = register_model(None)
    registry = CollectorRegistry()
    with TestClient(create_app(settings.model_copy(update={"metrics_db_ttl_s": 0}), registry=registry)) as gateway:
        value = registry.get_sample_value
        assert value(OUTSTANDING, {"tenant": tenant}) is None  # no grant, no series
        granted = gateway.post(f"/admin/tenants/{tenant}/credits", json={"amount_cents": 500}, headers=ADMIN)
        assert granted.status_code == 201, granted.text
        assert value(OUTSTANDING, {"tenant": tenant}) == 500
        for text in TEXTS:
            classify(gateway.post, headers, model, text)
        drawn = ledger_drawn(services, tenant)
        assert drawn > 0  # payg: every request and token is charged, so each one drew its cost
        left = (500 * MICRO_PER_CENT - drawn) // MICRO_PER_CENT  # what is left, rounded down, as the tenant sees it
        assert value(OUTSTANDING, {"tenant": tenant}) == left
        balance = gateway.get("/v1/billing/credits", headers=headers).json()["balance_cents"]
        assert balance == left


def test_outstanding_credits_fold_beyond_the_tenant_cap(settings: Settings, client: TestClient, make_tenant: Any,
                                                       fake_clock: FakeClock) -> None:
    tenants = [make_tenant()["id"] for _ in range(4)]
    for tenant, cents in zip(tenants, (200, 300, 100, 50), strict=True):
        response = client.post(f"/admin/tenants/{tenant}/credits", json={"amount_cents": cents}, headers=ADMIN)
        assert response.status_code == 201, response.text
    expiring = {"amount_cents": 1000, "expires_at": int(fake_clock.t) + 60}
    assert client.post(f"/admin/tenants/{tenants[3]}/credits", json=expiring, headers=ADMIN).status_code == 201
    registry = CollectorRegistry()
    update = {"metrics_db_ttl_s": 0, "metrics_max_tenants": 2}
    with TestClient(create_app(settings.model_copy(update=update), registry=registry)):
        samples = {s.labels["tenant"]: s.value for m in registry.collect() if m.name == OUTSTANDING for s in m.samples}
        # The two largest balances by name; the rest summed, so the series add up to all that is held.
        assert samples == {tenants[3]: 1050, tenants[1]: 300, OTHER_LABEL: 200 + 100}
        fake_clock.t += 60  # the expiring grant lapses: it holds nothing any more
        samples = {s.labels["tenant"]: s.value for m in registry.collect() if m.name == OUTSTANDING for s in m.samples}
        assert samples == {tenants[1]: 300, tenants[0]: 200, OTHER_LABEL: 100 + 50}


# --- several processes -------------------------------------------------------------------------------------


def _per_process_tokens(metrics_dir: Path, scratch: Path) -> list[float]:
    """Billable tokens each process wrote, read from its own counter file."""
    totals = []
    for i, path in enumerate(sorted(metrics_dir.glob("counter_*.db"))):
        alone = scratch / str(i)
        alone.mkdir(parents=True)
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        samples = [s.value for m in registry.collect() if m.name == "modelmeter_billable_tokens"
                   for s in m.samples if s.name.endswith("_total")]
        totals.append(sum(samples))
    return totals


@pytest.fixture
def two_process_gateway(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``modelmeter serve --workers 2`` on a free port, on the test database."""
    with two_fronts(settings, tmp_path, signum=signal.SIGINT, stop_timeout_s=30) as fronts:
        yield fronts.url, fronts.metrics_dir


def test_two_gateway_processes_aggregate(client: TestClient, caller: dict[str, Any],
                                         two_process_gateway: tuple[str, Path], tmp_path: Path) -> None:
    url, metrics_dir = two_process_gateway

    def post(path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(url + path, timeout=60, **kwargs)  # a new connection each time: either process accepts

    sent = []
    with ThreadPoolExecutor(8) as pool:
        while len(sent) < 400:
            sent += pool.map(lambda t: classify(post, caller["headers"], caller["model"], t), TEXTS * 8)
            if len([x for x in _per_process_tokens(metrics_dir, tmp_path / f"s{len(sent)}") if x]) == 2:
                break
    per_process = _per_process_tokens(metrics_dir, tmp_path / "final")
    assert len([x for x in per_process if x]) == 2, "both processes must have served requests"

    exposition = httpx.get(f"{url}/metrics", headers=ADMIN, timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    total = sum(s.value for s in families["modelmeter_billable_tokens"].samples if s.name.endswith("_total"))
    assert total == sum(per_process) == sum(sent) == ledger_tokens(client)
    requests = sum(s.value for s in families["modelmeter_http_requests"].samples
                   if s.name.endswith("_total") and s.labels["route"] == "/v1/classify")
    assert requests == len(sent)
    assert "modelmeter_fine_tuning_jobs" in families  # the database gauges are exposed once, not per process


# --- a real Prometheus ---------------------------------------------------------------------------------------


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    body = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.fixture
def prometheus(live_server: LiveServer, tmp_path: Path) -> Iterator[int]:
    """Debian's Prometheus scraping ``live_server`` every second, with deploy/'s alert rules loaded."""
    binary = require_binary("prometheus")
    port = free_port()
    shutil.copy(DEPLOY / "prometheus" / "rules.yml", tmp_path / "rules.yml")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["rules.yml"],
              "scrape_configs": [{"job_name": "modelmeter-gateway", "metrics_path": "/metrics",
                                  "authorization": {"type": "Bearer", "credentials": ADMIN_TOKEN},
                                  "static_configs": [{"targets": [live_server.url.removeprefix("http://")]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).is_success, 60, "Prometheus")
        yield port
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_prometheus_scrapes_a_running_gateway(client: TestClient, live_server: LiveServer, caller: dict[str, Any],
                                              prometheus: int) -> None:
    with httpx.Client(base_url=live_server.url, timeout=60) as http:
        sent = sum(classify(http.post, caller["headers"], caller["model"], text) for text in TEXTS * 2)
    ledger = ledger_tokens(client)
    assert sent == ledger

    def scraped_total() -> float | None:
        result = _query(prometheus, "sum(modelmeter_billable_tokens_total)")
        return float(result[0]["value"][1]) if result and float(result[0]["value"][1]) == ledger else None

    assert wait_until(scraped_total, 60, "a scrape after the traffic") == ledger
    (up,) = _query(prometheus, 'up{job="modelmeter-gateway"}')
    assert up["value"][1] == "1"
    by_tenant = _query(prometheus, "sum by (tenant) (modelmeter_billable_tokens_total)")
    assert [(r["metric"]["tenant"], float(r["value"][1])) for r in by_tenant] == [(caller["tenant"], ledger)]

    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"http://127.0.0.1:{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    for rule in wait_until(rules_evaluated, 30, "the rules to be evaluated"):
        assert rule["health"] == "ok", rule


# --- deploy/ -------------------------------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_rules(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    # The config reads the metrics token from the container's secret file: here, a file of ours in its place.
    for name in ("rules.yml", "rules.test.yml"):
        shutil.copy(DEPLOY / "prometheus" / name, tmp_path / name)
    (tmp_path / "metrics-token").write_text("t" * 40)
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert "/run/secrets/metrics-token" in config
    (tmp_path / "prometheus.yml").write_text(config.replace("/run/secrets/metrics-token",
                                                            str(tmp_path / "metrics-token")))
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"],
                 ["test", "rules", "rules.test.yml"]):
        done = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
_METRIC = re.compile(r"\b(modelmeter_[a-z0-9_]+)\b")
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def exported_names(exposition: str) -> set[str]:
    """Every sample name the exposition may carry, from its TYPE lines (families without samples included)."""
    names = set()
    for name, kind in _TYPE_LINE.findall(exposition):
        names.add(name)
        names.update(name + suffix for suffix in _SUFFIXES.get(kind, ()))
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target (rows' nested panels included) and of every templating query."""
    panels = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def test_dashboards_and_rules_query_only_exported_metrics(gateway: TestClient, caller: dict[str, Any]) -> None:
    classify(gateway.post, caller["headers"], caller["model"], "warm up")
    exported = exported_names(gateway.get("/metrics", headers=ADMIN).text)
    boards = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert {b.stem for b in boards} >= {"overview", "tenants", "economics"}
    used: set[str] = set()
    for board in boards:
        for expr in dashboard_queries(json.loads(board.read_text())):
            names = set(_METRIC.findall(expr))
            assert names or expr.startswith("sum(up{"), f"{board.name}: no modelmeter metric in {expr!r}"
            used |= names
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        used |= set(_METRIC.findall(rule["expr"]))
    missing = sorted(used - exported)
    assert not missing, f"queried but not exported: {missing}"
    for needed in ("modelmeter_plan_revenue_cents", "modelmeter_tenant_revenue_cents", "modelmeter_batch_size_bucket",
                   "modelmeter_tenant_quota_utilisation_ratio", "modelmeter_stripe_outbox_pending"):
        assert needed in used


def test_grafana_provisioning_matches_the_dashboards() -> None:
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/modelmeter.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in \
        compose["services"]["grafana"]["volumes"]
    for board in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        dashboard = json.loads(board.read_text())
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert panels, board.name
        assert all(p["datasource"]["uid"] == uid for p in panels), board.name
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_shipped_scrape_sends_the_metrics_token() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "modelmeter-gateway"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics-token"}
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["prometheus"]["secrets"] == ["metrics-token"]
    assert compose["secrets"]["metrics-token"] == {"environment": "MODELMETER_METRICS_TOKEN"}
    assert "MODELMETER_METRICS_TOKEN" in compose["x-modelmeter"]["environment"]
    monitor = yaml.safe_load((DEPLOY / "k8s" / "servicemonitor.yaml").read_text())
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"] == {"name": "modelmeter-secrets", "key": "MODELMETER_METRICS_TOKEN"}
    secret = yaml.safe_load((DEPLOY / "k8s" / "secret.yaml").read_text())
    assert "MODELMETER_METRICS_TOKEN" in secret["stringData"]


def test_compose_and_kubernetes_manifests() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) >= {"gateway", "worker", "postgres", "redis", "prometheus", "grafana"}
    docs = [d for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())
            if d and d["kind"] != "Kustomization"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert kinds >= {("Deployment", "modelmeter-gateway"), ("Deployment", "modelmeter-worker"),
                     ("Service", "modelmeter-gateway"), ("HorizontalPodAutoscaler", "modelmeter-gateway"),
                     ("ConfigMap", "modelmeter-config"), ("Secret", "modelmeter-secrets")}
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "modelmeter-gateway")
    pod = gateway["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert all((DEPLOY / "k8s" / name).exists() for name in kustomization["resources"])
    cpu = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in cpu
    assert cpu.index("download.pytorch.org/whl/cpu") < cpu.index("pip install .")
    assert "FROM nvidia/cuda:" in (DEPLOY / "Dockerfile.cuda").read_text()
