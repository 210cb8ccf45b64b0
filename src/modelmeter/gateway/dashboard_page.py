"""The tenant dashboard page as one self-contained HTML document: inline CSS, charts drawn as inline SVG, no
script and nothing fetched from anywhere (it works offline). Every tenant-supplied string is escaped."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from html import escape
from importlib import resources
from string import Template

from modelmeter.billing.alerts import EventData
from modelmeter.billing.catalog import Tiers
from modelmeter.billing.invoicing import InvoicePublic
from modelmeter.gateway.dashboard import DayUsage, PageData
from modelmeter.money import amount_text, major_price_text, unit_price_text

_H, _LEFT, _BOTTOM, _TOP = 210, 58, 26, 12
FULL, HALF = 1130, 540  # chart widths in CSS pixels at the page's full width: text keeps its size


@cache
def _template() -> Template:
    return Template((resources.files("modelmeter.gateway") / "static" / "dashboard.html").read_text("utf-8"))


def compact(n: int) -> str:
    """``1234567`` → ``1.2M`` for axis labels."""
    for size, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if abs(n) >= size:
            tenths = n * 10 // size
            return f"{tenths // 10}{'.' + str(tenths % 10) if tenths % 10 and tenths < 100 else ''}{suffix}"
    return str(n)


def day(ts: int, fmt: str = "%b %d") -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(fmt)


def _nice_ceiling(peak: int) -> int:
    """The axis maximum: four ticks of 1, 2 or 5 x 10^k, at or above ``peak``."""
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale * 4 >= peak:
                return step * scale * 4
        scale *= 10


def _grid(top: int, fmt: Callable[[int], str], width: int) -> list[str]:
    plot_h = _H - _TOP - _BOTTOM
    out = []
    for i in range(5):
        y = _H - _BOTTOM - plot_h * i / 4
        out.append(f'<line x1="{_LEFT}" x2="{width - 4}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e7ec"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(top * i // 4))}</text>')
    return out


def _x_label(i: int, count: int, x: float, slot: float, every: int, start: int) -> str:
    """Every ``every``-th day's date under its bar, and the last day's, right-aligned so it is not clipped."""
    last = i == count - 1
    if not last and (i % every or i + every // 2 >= count):
        return ""
    anchor, at = ("end", x + slot * 0.7) if last else ("middle", x + slot * 0.35)
    return f'<text x="{at:.1f}" y="{_H - 8}" text-anchor="{anchor}">{day(start)}</text>'


def bar_chart(days: Sequence[DayUsage], value: Callable[[DayUsage], int], fmt: Callable[[int], str],
              *, color: str, name: str, width: int = FULL) -> str:
    """Daily bars with a gridded axis; each bar has a tooltip with its exact value."""
    values = [value(d) for d in days]
    top = _nice_ceiling(max(values, default=0))
    plot_h, slot = _H - _TOP - _BOTTOM, (width - 4 - _LEFT) / max(1, len(days))
    every = 5 if width >= FULL else 7
    parts = _grid(top, fmt, width)
    for i, (d, v) in enumerate(zip(days, values, strict=True)):
        h, x = plot_h * v / top, _LEFT + i * slot + slot * 0.15
        parts.append(f'<rect x="{x:.1f}" y="{_H - _BOTTOM - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                     f'rx="2" fill="{color}"><title>{day(d.start)}: {escape(fmt(v))}</title></rect>')
        parts.append(_x_label(i, len(days), x, slot, every, d.start))
    return (f'<svg viewBox="0 0 {width} {_H}" role="img" aria-label="{escape(name)}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>')


def _meter(used: int, cap: int | None) -> str:
    if not cap:
        return ""
    pct = min(100, used * 100 // cap)
    level = "bad" if pct >= 90 else "warn" if pct >= 75 else ""
    return f'<div class="bar {level}"><span style="width:{pct}%"></span></div>'


def _card(label: str, value: str, sub: str, meter: str = "") -> str:
    return (f'<div class="card"><div class="label">{escape(label)}</div><div class="value">{escape(value)}</div>'
            f'<div class="sub">{escape(sub)}</div>{meter}</div>')


def cards(data: PageData) -> str:
    """Upcoming invoice, spend against budget, tokens and requests against the plan's allowances (batch lines
    included), and of them the Batch API's, at the plan's batch discount (its invoice lines are apart too)."""
    cur, plan, budget = data.plan.currency, data.plan, data.tenant.monthly_budget_cents
    spend_sub = f"of {amount_text(budget, cur)} monthly budget" if budget is not None else "no budget set"
    tokens_sub = f"of {plan.included_tokens:,} included" if plan.included_tokens else "no allowance: all billed"
    requests_sub = f"of {plan.included_requests:,} included" if plan.included_requests else "no allowance: all billed"
    return "".join((
        _card("Upcoming invoice", amount_text(data.upcoming.total, cur), f"{data.period} so far · {plan.name} plan"),
        _card("Usage spend", amount_text(data.spent_cents, cur), spend_sub, _meter(data.spent_cents, budget)),
        _card("Tokens this period", f"{data.used.tokens:,}", tokens_sub,
              _meter(data.used.tokens, plan.included_tokens)),
        _card("Requests this period", f"{data.used.requests:,}", requests_sub,
              _meter(data.used.requests, plan.included_requests)),
        _card("Batch API this period", f"{data.used.batch_requests:,} lines",
              f"{data.used.batch_tokens:,} tokens · " + (f"{plan.batch_discount_percent}% batch discount"
                                                         if plan.batch_discount_percent else "no batch discount")),
    ))


def _lines_table(invoice: InvoicePublic) -> str:
    lines = invoice.lines.data
    if not lines:
        return '<div class="empty">Nothing billed yet this period.</div>'
    cur = invoice.currency
    rows = "".join(
        f'<tr><td>{escape(x.description)}</td><td class="num">{x.quantity:,}</td>'
        f'<td class="num">{escape(unit_price_text(x.unit_amount_decimal, cur))}</td>'
        f'<td class="num">{amount_text(x.amount, cur)}</td></tr>'
        for x in lines
    )
    return (f'<table><tr><th>Line</th><th class="num">Qty</th><th class="num">Unit</th><th class="num">Amount</th>'
            f'</tr>{rows}<tr class="total"><td colspan="3">Total</td>'
            f'<td class="num">{amount_text(invoice.total, cur)}</td></tr></table>')


def _invoices_table(invoices: list[InvoicePublic]) -> str:
    if not invoices:
        return '<div class="empty">No closed periods yet.</div>'
    rows = "".join(
        f'<tr><td>{escape(i.period)}</td><td>{escape(i.id or "")}</td>'
        f'<td><span class="pill {"paid" if i.paid_at else ""}">{"paid" if i.paid_at else escape(i.status)}'
        f'</span></td><td class="num">{amount_text(i.total, i.currency)}</td></tr>'
        for i in invoices
    )
    return f'<table><tr><th>Period</th><th>Invoice</th><th>Status</th><th class="num">Total</th></tr>{rows}</table>'


_SOURCES = {"granted": "Granted", "purchased": "Purchased"}


def credits_panel(data: PageData) -> str:
    """The credit balance and the newest grants: source, amount, what is left, expiry and status."""
    cur, body = data.plan.currency, data.credits
    balance = (f'<div class="balance"><span class="label">Balance</span> '
               f'<span class="value" id="credit-balance">{amount_text(body.balance_cents, cur)}</span>'
               f'<span class="sub">pays usage charges as they are incurred'
               f'{"; this plan is prepaid: usage stops when it runs out" if data.plan.prepaid else ""}</span></div>')
    grants = body.data
    if not grants:
        return balance + '<div class="empty">No credits yet.</div>'
    rows = "".join(
        f'<tr class="grant"><td>{escape(g.id)}'
        f'{"<br><small>" + escape(g.description) + "</small>" if g.description else ""}</td>'
        f'<td>{escape(_SOURCES.get(g.source, g.source))}</td>'
        f'<td class="num">{amount_text(g.amount_cents, cur)}</td>'
        f'<td class="num">{amount_text(g.remaining_cents, cur)}</td>'
        f'<td>{day(g.expires_at, "%Y-%m-%d %H:%M") + " UTC" if g.expires_at is not None else "never"}</td>'
        f'<td><span class="pill {escape(g.status)}">{escape(g.status)}</span></td></tr>'
        for g in grants
    )
    more = '<div class="empty">Older grants are not shown.</div>' if body.has_more else ""
    return (f'{balance}<table><tr><th>Grant</th><th>Source</th><th class="num">Amount</th>'
            f'<th class="num">Remaining</th><th>Expires</th><th>Status</th></tr>{rows}</table>{more}')


def _price(flat: Decimal, tiers: Tiers | None, currency: str, units: str) -> str:
    """A flat unit price, or the tiers (bounds in billable units, beyond the allowance), in the display form."""
    if tiers is None:
        return major_price_text(flat, currency)
    return f"{tiers.summary(currency)} (bounds count billable {units} of the month)"


def plan_table(data: PageData) -> str:
    """The plan's fee, allowances, unit prices and the tenant's rate limits."""
    p, t = data.plan, data.tenant
    rows = (
        ("Monthly fee", amount_text(p.base_fee_cents, p.currency)),
        ("Included tokens / requests", f"{p.included_tokens:,} / {p.included_requests:,}"),
        ("Price per 1k tokens", _price(p.price_per_1k_tokens, p.token_tiers, p.currency, "tokens")),
        ("Price per request", _price(p.price_per_request, p.request_tiers, p.currency, "requests")),
        ("Price per 1M training tokens", major_price_text(p.price_per_1m_training_tokens, p.currency)),
        ("Rate limits", f"{(t.rpm_limit or p.rpm_limit):,} requests/min · {(t.tpm_limit or p.tpm_limit):,} tokens/min"),
        ("When the allowance runs out", "requests are refused (hard limit)" if p.hard_limit else "usage is billed"),
        ("Monthly budget", amount_text(t.monthly_budget_cents, p.currency) if t.monthly_budget_cents is not None
         else "none"),
    )
    cells = "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in rows)
    return f'<dl class="plan">{cells}</dl>'


def alerts_panel(data: PageData) -> str:
    """The newest usage alerts: when, which threshold of what, and the value that crossed it."""
    if not data.alerts:
        return '<div class="empty">No alerts yet (set thresholds with PUT /v1/billing/alerts).</div>'
    cur = data.plan.currency

    def figure(d: EventData, value: int) -> str:
        return amount_text(value, cur) if d.resource == "budget" else f"{compact(value)} tokens"

    names = {"budget": "budget", "included_tokens": "included tokens"}
    rows = "".join(
        f'<tr class="alert"><td>{day(e.created, "%Y-%m-%d %H:%M")} UTC</td><td>{escape(d.period)}</td>'
        f'<td>{d.threshold_percent}% of {names.get(d.resource, "?")}</td>'
        f'<td class="num">{figure(d, d.value)}</td><td class="num">{figure(d, d.limit)}</td></tr>'
        for e in data.alerts if isinstance(d := e.data, EventData)  # usage alerts (the page loads no others)
    )
    return (f'<table id="alerts"><tr><th>When</th><th>Period</th><th>Threshold</th><th class="num">Value</th>'
            f'<th class="num">Limit</th></tr>{rows}</table>')


def render(data: PageData) -> str:
    """The whole page."""
    cur = data.plan.currency
    plan_line = (f"{data.plan.name} plan · period {data.period} · "
                 f"updated {day(data.now, '%Y-%m-%d %H:%M')} UTC")
    return _template().substitute(
        tenant=escape(data.tenant.name), plan_line=escape(plan_line), period=escape(data.period),
        cards=cards(data), plan_name=escape(data.plan.name),
        tokens_chart=bar_chart(data.days, lambda d: d.tokens, compact, color="#3b5bdb", name="Tokens per day"),
        requests_chart=bar_chart(data.days, lambda d: d.requests, compact, color="#0ca678", name="Requests per day",
                                 width=HALF),
        cost_chart=bar_chart(data.days, lambda d: d.cost_cents, lambda c: amount_text(c, cur), color="#f08c00",
                             name="Usage charges per day", width=HALF),
        plan=plan_table(data), credits=credits_panel(data), alerts=alerts_panel(data),
        upcoming=_lines_table(data.upcoming), invoices=_invoices_table(data.invoices),
        footer=escape(f"This private link expires {day(data.expires_at, '%Y-%m-%d %H:%M')} UTC. "
                      "Figures are exact to the cent; invoices are final once a period is closed."),
    )
