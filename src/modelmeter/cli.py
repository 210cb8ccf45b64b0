"""The ``modelmeter`` command: serve, worker, and admin verbs that mirror the admin API."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ValidationError

from modelmeter import clock, db
from modelmeter.errors import ModelMeterError
from modelmeter.gateway.services import Services
from modelmeter.money import amount_text, cent_text
from modelmeter.ops import tenants as ops
from modelmeter.settings import Settings, ensure_admin_token
from modelmeter.tenancy.keys import ALL_SCOPES, ApiKeyCreate, ApiKeyPublic
from modelmeter.tenancy.tenants import TenantCreate, TenantPublic, TenantUpdate


def _services() -> Services:
    from modelmeter.gateway.app import build_services, prepare_database

    settings = Settings()
    token, generated = ensure_admin_token(settings)
    if generated:
        click.echo(f"Admin token (shown once, kept in {settings.data_dir}/admin_token): {token}", err=True)
    services = build_services(settings)
    prepare_database(services)
    return services


@contextmanager
def _admin() -> Iterator[Services]:
    """The platform's services for one verb; the service functions they call own their transactions."""
    services = _services()
    try:
        yield services
    finally:
        services.engine.dispose()


def _emit(as_json: bool, payload: Any, human: Callable[[Any], str]) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, default=str))
    else:
        click.echo(human(payload))


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def _fail(exc: Exception) -> None:
    if isinstance(exc, ModelMeterError):
        raise click.ClickException(f"{exc.message} ({exc.type})")
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        raise click.ClickException(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    raise exc


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def main(verbose: bool) -> None:
    """modelmeter: a metered model-API platform for fine-tuned BERT models."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--worker/--no-worker", default=None, help="Start an in-process fine-tuning worker (default: on).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Gateway processes sharing the port; their metrics are aggregated (multiprocess mode).")
def serve(host: str, port: int, worker: bool | None, workers: int) -> None:
    """Run the gateway on embedded defaults (SQLite, local model store, the packaged base model)."""
    import uvicorn

    from modelmeter.gateway.app import create_app

    settings = Settings()
    if worker is not None:
        settings.start_worker = worker
    token, generated = ensure_admin_token(settings)
    if generated:
        click.echo(f"Admin token (shown once, kept in {settings.data_dir}/admin_token): {token}", err=True)
    if workers > 1:
        if not settings.redis_url:
            raise click.UsageError(
                "--workers > 1 needs MODELMETER_REDIS_URL: rate limits and quotas must be shared by the processes, "
                "or each would enforce its own copy."
            )
        _serve_processes(settings, host, port, workers)
        return
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level=settings.log_level)


def _serve_processes(settings: Settings, host: str, port: int, workers: int) -> None:
    """Several gateway processes on one socket, one fine-tuning worker beside them, metrics in multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``, else a fresh local temporary directory: never a volume another host shares)."""
    import inspect
    import shutil
    import tempfile

    import uvicorn

    from modelmeter.trainer import spawn_worker, stop_worker

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="modelmeter-metrics-"))
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()
    os.environ.update({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir.resolve()), "MODELMETER_START_WORKER": "false",
                       "MODELMETER_DATA_DIR": str(settings.data_dir.resolve())})
    engine = db.engine_from_settings(settings)
    db.upgrade(engine)  # once, here: the processes' own (no-op) upgrades then never race on a fresh database
    engine.dispose()
    child = spawn_worker(settings) if settings.start_worker else None
    try:
        # A process importing torch on a busy machine can take longer than uvicorn's 5 s default to answer its
        # first health check, and would be killed and restarted forever.
        supported = "timeout_worker_healthcheck" in inspect.signature(uvicorn.run).parameters
        patience: dict[str, Any] = {"timeout_worker_healthcheck": 60} if supported else {}
        uvicorn.run("modelmeter.gateway.app:create_app", factory=True, host=host, port=port, workers=workers,
                    access_log=False, log_level=settings.log_level, **patience)
    finally:
        if child is not None:
            stop_worker(child)
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@main.command()
def worker() -> None:
    """Run fine-tuning jobs, one at a time, until stopped (SIGTERM/SIGINT)."""
    from modelmeter.trainer import run_worker

    run_worker(Settings())


@main.group()
def tenant() -> None:
    """Create, list, show and update tenants."""


def _tenant_line(t: dict[str, Any]) -> str:
    return f"{t['id']}  {t['name']:<24} {t['email']:<28} plan={t['plan']:<6} status={t['status']}"


@tenant.command("create")
@click.option("--name", required=True)
@click.option("--email", required=True)
@click.option("--plan", default="free", show_default=True)
@json_option
def tenant_create(name: str, email: str, plan: str, as_json: bool) -> None:
    try:
        with _admin() as services:
            data = TenantCreate(name=name, email=email, plan=plan)
            tenant = ops.create_tenant(sessions=services.sessions, catalog=services.plans, data=data)
            payload = _dump(TenantPublic.model_validate(tenant))
    except (ModelMeterError, ValidationError) as exc:
        _fail(exc)
    _emit(as_json, payload, lambda t: f"created {_tenant_line(t)}")


@tenant.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@json_option
def tenant_list(limit: int, as_json: bool) -> None:
    with _admin() as services:
        rows, has_more = ops.list_tenants(sessions=services.sessions, limit=limit, after=None)
        data = [_dump(TenantPublic.model_validate(t)) for t in rows]
    _emit(as_json, {"object": "list", "data": data, "has_more": has_more},
          lambda p: "\n".join(_tenant_line(t) for t in p["data"]) or "no tenants")


@tenant.command("show")
@click.argument("tenant_id")
@json_option
def tenant_show(tenant_id: str, as_json: bool) -> None:
    try:
        with _admin() as services:
            payload = _dump(TenantPublic.model_validate(ops.get_tenant(sessions=services.sessions,
                                                                       tenant_id=tenant_id)))
    except ModelMeterError as exc:
        _fail(exc)
    _emit(as_json, payload, lambda t: "\n".join(f"{k:>22}: {v}" for k, v in t.items()))


@tenant.command("update")
@click.argument("tenant_id")
@click.option("--plan")
@click.option("--status", type=click.Choice(["active", "suspended"]))
@click.option("--rpm-limit", type=int)
@click.option("--tpm-limit", type=int)
@click.option("--monthly-budget-cents", type=int)
@json_option
def tenant_update(tenant_id: str, as_json: bool, **fields: Any) -> None:
    try:
        with _admin() as services:
            data = TenantUpdate(**{k: v for k, v in fields.items() if v is not None})
            row = ops.update_tenant(sessions=services.sessions, catalog=services.plans, tenant_id=tenant_id,
                                    data=data)
            payload = _dump(TenantPublic.model_validate(row))
    except (ModelMeterError, ValidationError) as exc:
        _fail(exc)
    _emit(as_json, payload, lambda t: f"updated {_tenant_line(t)}")


@main.group()
def key() -> None:
    """Create, list, revoke and roll tenant API keys."""


def _key_line(k: dict[str, Any]) -> str:
    return f"{k['id']}  {k['prefix']}…{k['last4']}  {k['name']:<16} {','.join(k['scopes']):<32} {k['status']}"


@key.command("create")
@click.argument("tenant_id")
@click.option("--name", default="default", show_default=True)
@click.option("--scope", "scopes", multiple=True, type=click.Choice(ALL_SCOPES), help="Repeatable; default all.")
@click.option("--expires-at", type=int, help="Unix seconds.")
@json_option
def key_create(tenant_id: str, name: str, scopes: tuple[str, ...], expires_at: int | None, as_json: bool) -> None:
    try:
        with _admin() as services:
            data = ApiKeyCreate(name=name, scopes=list(scopes) or None, expires_at=expires_at)  # type: ignore[arg-type]
            row, plaintext = ops.issue_key(sessions=services.sessions, tenant_id=tenant_id, data=data)
            payload = {**_dump(ApiKeyPublic.of(row, now=clock.now_s())), "key": plaintext}
    except (ModelMeterError, ValidationError) as exc:
        _fail(exc)
    _emit(as_json, payload, lambda k: f"{_key_line(k)}\nkey (shown once): {k['key']}")


@key.command("list")
@click.argument("tenant_id")
@json_option
def key_list(tenant_id: str, as_json: bool) -> None:
    try:
        with _admin() as services:
            rows, has_more = ops.list_keys(sessions=services.sessions, tenant_id=tenant_id, limit=1000, after=None)
            data = [_dump(ApiKeyPublic.of(k, now=clock.now_s())) for k in rows]
    except ModelMeterError as exc:
        _fail(exc)
    _emit(as_json, {"object": "list", "data": data, "has_more": has_more},
          lambda p: "\n".join(_key_line(k) for k in p["data"]) or "no keys")


@key.command("revoke")
@click.argument("key_id")
@json_option
def key_revoke(key_id: str, as_json: bool) -> None:
    try:
        with _admin() as services:
            row = ops.revoke_key(sessions=services.sessions, key_id=key_id)
            payload = _dump(ApiKeyPublic.of(row, now=clock.now_s()))
    except ModelMeterError as exc:
        _fail(exc)
    _emit(as_json, payload, lambda k: f"revoked {_key_line(k)}")


@key.command("roll")
@click.argument("key_id")
@click.option("--grace", "grace_s", type=click.IntRange(0, 30 * 24 * 3600), help="Seconds the old key keeps working.")
@json_option
def key_roll(key_id: str, grace_s: int | None, as_json: bool) -> None:
    try:
        with _admin() as services:
            grace = services.settings.default_key_grace_s if grace_s is None else grace_s
            row, plaintext = ops.roll_key(sessions=services.sessions, key_id=key_id, grace_s=grace)
            payload = {**_dump(ApiKeyPublic.of(row, now=clock.now_s())), "key": plaintext}
    except ModelMeterError as exc:
        _fail(exc)
    _emit(as_json, payload, lambda k: f"{_key_line(k)}\nkey (shown once): {k['key']}")


@main.command()
@json_option
def plans(as_json: bool) -> None:
    """Show the plan catalog."""
    from modelmeter.billing.catalog import PlanCatalog

    catalog = PlanCatalog.load(Settings().plans_file)
    data = [p.model_dump(mode="json") for p in catalog.all()]

    def human(payload: dict[str, Any]) -> str:
        return "\n".join(
            f"{p['id']:<6} {p['name']:<16} fee={cent_text(p['base_fee_cents'])} incl_tokens={p['included_tokens']} "
            f"per_1k={p['price_per_1k_tokens']} per_req={p['price_per_request']} rpm={p['rpm_limit']} "
            f"tpm={p['tpm_limit']} hard_limit={p['hard_limit']}"
            for p in payload["data"]
        )

    _emit(as_json, {"object": "list", "data": data, "has_more": False}, human)


@main.group()
def billing() -> None:
    """Billing operations."""


@billing.command("close")
@click.option("--period", required=True, help="The finished month to close, YYYY-MM (UTC).")
@json_option
def billing_close(period: str, as_json: bool) -> None:
    """Close a finished month into one invoice per tenant (running it again changes nothing)."""
    from modelmeter.billing.invoicing import close_period

    try:
        with _admin() as services:
            result = close_period(sessions=services.sessions, catalog=services.plans, period=period)
    except ModelMeterError as exc:
        _fail(exc)
    _emit(as_json, result.public(), lambda r: (
        f"period {r['period']} already closed ({r['invoices']} invoices)" if r["already_closed"]
        else f"closed {r['period']}: {r['invoices']} invoices"))


@billing.command("sync")
@click.option("--retry-failed", is_flag=True, help="Re-queue rows that gave up (once their cause is fixed).")
@json_option
def billing_sync(retry_failed: bool, as_json: bool) -> None:
    """Send the pending Stripe outbox rows once and apply the past-due grace period."""
    services = _services()
    try:
        if services.stripe is None:
            raise click.ClickException("Stripe is off: set MODELMETER_STRIPE_API_KEY (an sk_test_ key).")
        report = services.stripe.tick(retry_failed=retry_failed)
    finally:
        if services.stripe is not None:
            services.stripe.close()
        services.engine.dispose()
    _emit(as_json, report.public(), lambda _: report.summary())


@main.command("dashboard-link")
@click.argument("tenant_id")
@click.option("--base-url", help="The gateway's external URL (default: MODELMETER_PUBLIC_URL, else http://127.0.0.1:8000).")
@click.option("--ttl", type=click.IntRange(1, 30 * 24 * 3600), help="Seconds the link works (default: "
              "MODELMETER_DASHBOARD_LINK_TTL_S).")
@json_option
def dashboard_link(tenant_id: str, base_url: str | None, ttl: int | None, as_json: bool) -> None:
    """Print a short-lived signed link to a tenant's dashboard page."""
    from modelmeter.gateway.dashboard import issue_link

    try:
        with _admin() as services:
            ops.get_tenant(sessions=services.sessions, tenant_id=tenant_id)
            base = base_url or services.settings.public_url or "http://127.0.0.1:8000"
            payload = issue_link(services.settings, tenant_id, base, ttl_s=ttl).public()
    except ModelMeterError as exc:
        _fail(exc)
    _emit(as_json, payload, lambda p: str(p["url"]))


def _economics_line(r: dict[str, Any]) -> str:
    who = r.get("tenant_id") or r.get("plan") or ""
    ratio = f"{r['margin_ratio']}" if r["margin_ratio"] is not None else "-"
    cost = f"{amount_text(r['compute_cost_cents'], r['currency'])} ({cent_text(r['compute_cost_cents_decimal'])})"
    return (f"{who:<28} revenue={amount_text(r['revenue_cents'], r['currency']):>12} cost={cost:<28} "
            f"margin={amount_text(r['margin_cents'], r['currency']):>12} ratio={ratio:<7} tokens={r['tokens']:,} "
            f"cpu_ms={r['cpu_compute_ms']:,} gpu_ms={r['gpu_compute_ms']:,}")


@main.command()
@click.option("--period", help="The month, YYYY-MM (default: the running one).")
@click.option("--group-by", type=click.Choice(["tenant", "plan"]), default="tenant", show_default=True)
@json_option
def economics(period: str | None, group_by: str, as_json: bool) -> None:
    """Revenue against compute cost, and the margin, per tenant or per plan."""
    from modelmeter.billing.economics import economics_report, total

    try:
        with _admin() as services, services.sessions() as session:
            rows = economics_report(session=session, catalog=services.plans, settings=services.settings,
                                    period=period, group_by=group_by)  # type: ignore[arg-type]
    except ModelMeterError as exc:
        _fail(exc)
    payload = {"object": "list", "data": [r.public() for r in rows], "has_more": False}
    summary = total(rows, rows[0].period) if rows else None
    _emit(as_json, payload, lambda p: "\n".join(
        [_economics_line(r) for r in p["data"]] + ([_economics_line(summary.public())] if summary else [])
    ) or "no tenants")


@main.group("db")
def db_group() -> None:
    """Database administration."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration."""
    settings = Settings()
    engine = db.engine_from_settings(settings)
    db.upgrade(engine)
    click.echo(f"database at revision {db.current_revision(engine)}")
    engine.dispose()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
