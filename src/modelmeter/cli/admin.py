"""Operator verbs that mirror the admin API: each calls the same service function as its route."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

import click

from modelmeter import clock
from modelmeter.cli.output import admin_services, emit, json_option, load_services, reports_errors
from modelmeter.cli.simulation import simulate
from modelmeter.gateway.invalidation import publish_key_change, publish_tenant_change
from modelmeter.gateway.services import Services
from modelmeter.money import amount_text, major_price_text, unit_price_text
from modelmeter.ops import tenants as ops
from modelmeter.settings import Settings
from modelmeter.shapes import Page
from modelmeter.tenancy.keys import ALL_SCOPES, ApiKeyCreate, ApiKeyCreated, ApiKeyPublic
from modelmeter.tenancy.tenants import TenantCreate, TenantPublic, TenantUpdate

if TYPE_CHECKING:
    from modelmeter.billing.credits import CreditGrantPublic
    from modelmeter.billing.economics import UnitEconomics


@click.group()
def tenant() -> None:
    """Create, list, show and update tenants."""


def _tenant_line(t: TenantPublic) -> str:
    return f"{t.id}  {t.name:<24} {t.email:<28} plan={t.plan:<6} status={t.status}"


@tenant.command("create")
@click.option("--name", required=True)
@click.option("--email", required=True)
@click.option("--plan", default="free", show_default=True)
@json_option
@reports_errors
def tenant_create(name: str, email: str, plan: str, as_json: bool) -> None:
    with admin_services() as services:
        data = TenantCreate(name=name, email=email, plan=plan)
        tenant = ops.create_tenant(sessions=services.sessions, catalog=services.plans, data=data)
        payload = TenantPublic.model_validate(tenant)
    emit(as_json, payload, lambda t: f"created {_tenant_line(t)}")


@tenant.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@json_option
def tenant_list(limit: int, as_json: bool) -> None:
    with admin_services() as services:
        rows, has_more = ops.list_tenants(sessions=services.sessions, limit=limit, after=None)
        page = Page.of([TenantPublic.model_validate(t) for t in rows], has_more)
    emit(as_json, page, lambda p: "\n".join(_tenant_line(t) for t in p.data) or "no tenants")


@tenant.command("show")
@click.argument("tenant_id")
@json_option
@reports_errors
def tenant_show(tenant_id: str, as_json: bool) -> None:
    with admin_services() as services:
        payload = TenantPublic.model_validate(ops.get_tenant(sessions=services.sessions, tenant_id=tenant_id))
    emit(as_json, payload, lambda t: "\n".join(f"{k:>22}: {v}" for k, v in t.model_dump(mode="json").items()))


@tenant.command("update")
@click.argument("tenant_id")
@click.option("--plan")
@click.option("--status", type=click.Choice(["active", "suspended"]))
@click.option("--rpm-limit", type=int)
@click.option("--tpm-limit", type=int)
@click.option("--monthly-budget-cents", type=int)
@json_option
@reports_errors
def tenant_update(tenant_id: str, as_json: bool, **fields: Any) -> None:
    with admin_services() as services:
        data = TenantUpdate(**{k: v for k, v in fields.items() if v is not None})
        row = ops.update_tenant(sessions=services.sessions, catalog=services.plans, tenant_id=tenant_id,
                                data=data)
        payload = TenantPublic.model_validate(row)
        publish_tenant_change(services.settings.redis_url, tenant_id)  # every running replica, at once
    emit(as_json, payload, lambda t: f"updated {_tenant_line(t)}")


@click.group()
def key() -> None:
    """Create, list, revoke and roll tenant API keys."""


def _key_line(k: ApiKeyPublic) -> str:
    return f"{k.id}  {k.prefix}…{k.last4}  {k.name:<16} {','.join(k.scopes):<32} {k.status}"


@key.command("create")
@click.argument("tenant_id")
@click.option("--name", default="default", show_default=True)
@click.option("--scope", "scopes", multiple=True, type=click.Choice(ALL_SCOPES), help="Repeatable; default all.")
@click.option("--expires-at", type=int, help="Unix seconds.")
@json_option
@reports_errors
def key_create(tenant_id: str, name: str, scopes: tuple[str, ...], expires_at: int | None, as_json: bool) -> None:
    with admin_services() as services:
        data = ApiKeyCreate(name=name, scopes=list(scopes) or None, expires_at=expires_at)  # type: ignore[arg-type]
        row, plaintext = ops.issue_key(sessions=services.sessions, tenant_id=tenant_id, data=data)
        payload = ApiKeyCreated.of_new(row, plaintext, now=clock.now_s())
    emit(as_json, payload, lambda k: f"{_key_line(k)}\nkey (shown once): {k.key}")


@key.command("list")
@click.argument("tenant_id")
@json_option
@reports_errors
def key_list(tenant_id: str, as_json: bool) -> None:
    with admin_services() as services:
        rows, has_more = ops.list_keys(sessions=services.sessions, tenant_id=tenant_id, limit=1000, after=None)
        page = Page.of([ApiKeyPublic.of(k, now=clock.now_s()) for k in rows], has_more)
    emit(as_json, page, lambda p: "\n".join(_key_line(k) for k in p.data) or "no keys")


@key.command("revoke")
@click.argument("key_id")
@json_option
@reports_errors
def key_revoke(key_id: str, as_json: bool) -> None:
    with admin_services() as services:
        row = ops.revoke_key(sessions=services.sessions, key_id=key_id)
        payload = ApiKeyPublic.of(row, now=clock.now_s())
        publish_key_change(services.settings.redis_url, key_id)
    emit(as_json, payload, lambda k: f"revoked {_key_line(k)}")


@key.command("roll")
@click.argument("key_id")
@click.option("--grace", "grace_s", type=click.IntRange(0, 30 * 24 * 3600), help="Seconds the old key keeps working.")
@json_option
@reports_errors
def key_roll(key_id: str, grace_s: int | None, as_json: bool) -> None:
    with admin_services() as services:
        grace = services.settings.default_key_grace_s if grace_s is None else grace_s
        row, plaintext = ops.roll_key(sessions=services.sessions, key_id=key_id, grace_s=grace)
        payload = ApiKeyCreated.of_new(row, plaintext, now=clock.now_s())
        publish_key_change(services.settings.redis_url, key_id)
    emit(as_json, payload, lambda k: f"{_key_line(k)}\nkey (shown once): {k.key}")


@click.command()
@json_option
def plans(as_json: bool) -> None:
    """Show the plan catalog."""
    from modelmeter.billing.catalog import PlanCatalog, Tiers

    catalog = PlanCatalog.load(Settings().plans_file)
    data = [p.model_dump(mode="json") for p in catalog.all()]

    def price(flat: Decimal, tiers: Tiers | None, currency: str) -> str:
        return major_price_text(flat, currency) if tiers is None else f"{tiers.tiers_mode}:{len(tiers.tiers)}_tiers"

    def human(_: dict[str, Any]) -> str:
        lines = []
        for p in catalog.all():
            lines.append(
                f"{p.id:<6} {p.name:<16} fee={amount_text(p.base_fee_cents, p.currency)} "
                f"incl_tokens={p.included_tokens} per_1k={price(p.price_per_1k_tokens, p.token_tiers, p.currency)} "
                f"per_req={price(p.price_per_request, p.request_tiers, p.currency)} rpm={p.rpm_limit} "
                f"tpm={p.tpm_limit} hard_limit={p.hard_limit} batch_discount={p.batch_discount_percent}%")
            for name, tiers in (("token_tiers", p.token_tiers), ("request_tiers", p.request_tiers)):
                if tiers is not None:
                    lines.append(f"       {name}: {tiers.summary(p.currency)}")
        return "\n".join(lines)

    emit(as_json, {"object": "list", "data": data, "has_more": False}, human)


@click.group()
def billing() -> None:
    """Billing operations."""


@billing.command("close")
@click.option("--period", required=True, help="The finished month to close, YYYY-MM (UTC).")
@json_option
@reports_errors
def billing_close(period: str, as_json: bool) -> None:
    """Close a finished month into one invoice per tenant (running it again changes nothing)."""
    from modelmeter.billing.invoicing import BillingClosePublic, close_period

    with admin_services() as services:
        result = close_period(sessions=services.sessions, catalog=services.plans, period=period)
        for tenant_id in result.returned_to:  # credits given back: every running replica loads them at once
            publish_tenant_change(services.settings.redis_url, tenant_id)
    emit(as_json, BillingClosePublic.of(result), lambda r: (
        f"period {r.period} already closed ({r.invoices} invoices)" if r.already_closed
        else f"closed {r.period}: {r.invoices} invoices"))


billing.add_command(simulate)


@billing.command("sync")
@click.option("--retry-failed", is_flag=True, help="Re-queue rows that gave up (once their cause is fixed).")
@json_option
def billing_sync(retry_failed: bool, as_json: bool) -> None:
    """Send the pending Stripe outbox rows once and apply the past-due grace period."""
    from modelmeter.billing.stripe.relay import StripeSync

    services = load_services()
    try:
        if services.stripe is None:
            raise click.ClickException("Stripe is off: set MODELMETER_STRIPE_API_KEY (an sk_test_ key).")
        report = services.stripe.tick(retry_failed=retry_failed)
    finally:
        if services.stripe is not None:
            services.stripe.close()
        services.engine.dispose()
    emit(as_json, StripeSync.of(report), lambda _: report.summary())


@click.group()
def credits() -> None:
    """Grant prepaid credits and list a tenant's grants and balance."""


def _currency(services: Services, tenant_id: str) -> str:
    plan = ops.get_tenant(sessions=services.sessions, tenant_id=tenant_id).plan
    return services.plans.get(plan).currency if plan in services.plans else "usd"


def _grant_line(g: CreditGrantPublic, currency: str) -> str:
    expires = f"expires_at={g.expires_at}" if g.expires_at is not None else "no expiry"
    return (f"{g.id}  {g.source:<9} amount={amount_text(g.amount_cents, currency):>12} "
            f"remaining={amount_text(g.remaining_cents, currency):>12} {g.status:<7} {expires}"
            f"{'  ' + g.description if g.description else ''}")


@credits.command("grant")
@click.argument("tenant_id")
@click.option("--amount-cents", required=True, type=int, help="A positive amount, in cents.")
@click.option("--description", help="What the credits are for (shown to the tenant).")
@click.option("--expires-at", type=int, help="Unix seconds, in the future; default: never.")
@json_option
@reports_errors
def credits_grant(tenant_id: str, amount_cents: int, description: str | None, expires_at: int | None,
                  as_json: bool) -> None:
    """Grant credits to a tenant, as POST /admin/tenants/{id}/credits (running gateways draw them at once with
    MODELMETER_REDIS_URL, which carries the change to them; else once their key cache refreshes)."""
    from modelmeter.billing.credits import CreditGrantCreate, grant_credits

    with admin_services() as services:
        data = CreditGrantCreate(amount_cents=amount_cents, description=description, expires_at=expires_at)
        payload = grant_credits(sessions=services.sessions, tenant_id=tenant_id, data=data)
        currency = _currency(services, tenant_id)
        publish_tenant_change(services.settings.redis_url, tenant_id)
    emit(as_json, payload, lambda g: f"granted {_grant_line(g, currency)}")


@credits.command("list")
@click.argument("tenant_id")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@json_option
@reports_errors
def credits_list(tenant_id: str, limit: int, as_json: bool) -> None:
    """A tenant's grants, newest first, and the balance of the live ones (per the ledger)."""
    from modelmeter.ops.credits import list_credits

    with admin_services() as services:
        payload = list_credits(sessions=services.sessions, tenant_id=tenant_id, limit=limit, after=None)
        currency = _currency(services, tenant_id)
    emit(as_json, payload, lambda p: "\n".join(
        [_grant_line(g, currency) for g in p.data]
        + [f"balance {amount_text(p.balance_cents, currency)}" + (" (more grants: raise --limit)"
                                                                   if p.has_more else "")]))


@click.command("dashboard-link")
@click.argument("tenant_id")
@click.option("--base-url", help="The gateway's external URL (default: MODELMETER_PUBLIC_URL, else http://127.0.0.1:8000).")
@click.option("--ttl", type=click.IntRange(1, 30 * 24 * 3600), help="Seconds the link works (default: "
              "MODELMETER_DASHBOARD_LINK_TTL_S).")
@json_option
@reports_errors
def dashboard_link(tenant_id: str, base_url: str | None, ttl: int | None, as_json: bool) -> None:
    """Print a short-lived signed link to a tenant's dashboard page."""
    from modelmeter.gateway.dashboard import issue_link

    with admin_services() as services:
        ops.get_tenant(sessions=services.sessions, tenant_id=tenant_id)
        base = base_url or services.settings.public_url or "http://127.0.0.1:8000"
        payload = issue_link(services.settings, tenant_id, base, ttl_s=ttl)
    emit(as_json, payload, lambda p: p.url)


def _economics_line(r: UnitEconomics) -> str:
    who = r.tenant_id or r.plan or ""
    ratio = r.margin_ratio if r.margin_ratio is not None else "-"
    cost = amount_text(r.compute_cost_cents, r.currency)
    exact = unit_price_text(r.compute_cost_cents_decimal, r.currency)  # a sub-cent cost, shown when it adds
    cost += f" ({exact})" if exact != cost else ""
    return (f"{who:<28} revenue={amount_text(r.revenue_cents, r.currency):>12} cost={cost:<28} "
            f"margin={amount_text(r.margin_cents, r.currency):>12} ratio={ratio:<7} tokens={r.tokens:,} "
            f"cpu_ms={r.cpu_compute_ms:,} gpu_ms={r.gpu_compute_ms:,}")


@click.command()
@click.option("--period", help="The month, YYYY-MM (default: the running one).")
@click.option("--group-by", type=click.Choice(["tenant", "plan"]), default="tenant", show_default=True)
@json_option
@reports_errors
def economics(period: str | None, group_by: str, as_json: bool) -> None:
    """Revenue against compute cost, and the margin, per tenant or per plan."""
    from modelmeter.billing.economics import UnitEconomics, economics_report, total

    with admin_services() as services, services.sessions() as session:
        rows = economics_report(session=session, catalog=services.plans, settings=services.settings,
                                period=period, group_by=group_by)  # type: ignore[arg-type]
    page = Page.of([UnitEconomics.of(r) for r in rows])
    summary = total(rows, rows[0].period) if rows else None
    emit(as_json, page.model_dump(mode="json", exclude_unset=True), lambda _: "\n".join(
        [_economics_line(r) for r in page.data] + ([_economics_line(UnitEconomics.of(summary))] if summary else [])
    ) or "no tenants")


COMMANDS = (tenant, key, plans, billing, credits, dashboard_link, economics)
