"""``modelmeter billing simulate``: the admin API's plan simulation, as a table sorted by the change in margin."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from modelmeter.cli.output import admin_services, reports_errors
from modelmeter.money import amount_text

if TYPE_CHECKING:
    from modelmeter.billing.simulation import SimulationPublic

COLUMNS = ("tenant_id", "plan_actual", "plan_simulated", "revenue_actual_cents", "revenue_simulated_cents",
           "compute_cost_cents", "margin_actual_cents", "margin_simulated_cents", "margin_change_cents")
HEADERS = ("tenant", "plan", "sim plan", "revenue", "sim revenue", "compute", "margin", "sim margin", "change")
TOTAL = "(total)"


def _assignments(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        tenant_id, sep, plan = value.partition("=")
        if not sep or not tenant_id or not plan:
            raise click.BadParameter(f"'{value}' is not TENANT=PLAN")
        out[tenant_id] = plan
    return out


def _plans(path: Path | None) -> list[Any]:
    """A catalog-style file (``{"plans": [...]}``) or a bare list of plans; validated by the request model."""
    if path is None:
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path}: not a readable JSON file ({exc})") from None
    plans = data.get("plans") if isinstance(data, dict) else data
    if not isinstance(plans, list):
        raise click.ClickException(f'{path}: expected {{"plans": [plan, ...]}} or a list of plans')
    return plans


def _rows(simulation: SimulationPublic) -> list[dict[str, Any]]:
    """The rows in the API's order (largest gain first) and the totals, each with its change in margin."""
    totals = {"tenant_id": TOTAL, "plan_actual": "", "plan_simulated": "", **simulation.totals.model_dump()}
    rows = [*(r.model_dump() for r in simulation.data), totals]
    return [r | {"margin_change_cents": r["margin_simulated_cents"] - r["margin_actual_cents"]} for r in rows]


def _signed(cents: int, currency: str) -> str:
    return ("+" if cents > 0 else "") + amount_text(cents, currency)


def table(payload: SimulationPublic, currency: str = "usd") -> str:
    """Fixed-width text: plans as ids, money as ``$1,234.56``, the change signed; the totals last."""
    cells = [list(HEADERS)]
    for r in _rows(payload):
        money = [amount_text(r[c], currency) for c in COLUMNS[3:-1]]
        cells.append([r["tenant_id"], r["plan_actual"], r["plan_simulated"], *money,
                      _signed(r["margin_change_cents"], currency)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    return "\n".join("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip() for row in cells)


def as_csv(payload: SimulationPublic) -> str:
    """One row per tenant, then the totals; amounts in integer cents."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(payload))
    return out.getvalue()


@click.command("simulate")
@click.option("--period", required=True, help="The month to re-price, YYYY-MM (closed, or the running one).")
@click.option("--plans", "plans_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Candidate plans: JSON, {"plans": [...]} like the catalog file, or a list.')
@click.option("--assign", "assign", multiple=True, callback=_assignments, metavar="TENANT=PLAN",
              help="Put a tenant on a plan for the whole period (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.option("--csv", "as_csv_", is_flag=True, help="Print CSV (cents), the totals last.")
@reports_errors
def simulate(period: str, plans_file: Path | None, assign: dict[str, str], as_json: bool, as_csv_: bool) -> None:
    """What a period would have earned under candidate plans and assignments (as POST /admin/billing/simulate):
    revenue, compute cost and margin per tenant, sorted by the change in margin. Writes nothing."""
    from modelmeter.billing.simulation import SimulationPublic, SimulationRequest
    from modelmeter.billing.simulation import simulate as run

    if as_json and as_csv_:
        raise click.UsageError("--json and --csv exclude each other.")
    request = SimulationRequest.model_validate({"period": period, "plans": _plans(plans_file), "assign": assign})
    with admin_services() as services:
        payload = SimulationPublic.of(run(sessions=services.sessions, catalog=services.plans,
                                          settings=services.settings, period=request.period, plans=request.plans,
                                          assign=request.assign))
    if as_json:
        click.echo(json.dumps(payload.model_dump(mode="json"), indent=2))
    elif as_csv_:
        click.echo(as_csv(payload), nl=False)
    else:
        click.echo(table(payload) if payload.data else "no tenants")
