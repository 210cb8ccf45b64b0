"""Operator billing actions shared by the admin API and the CLI."""

from __future__ import annotations

from sqlmodel import select

from modelmeter.billing import invoicing
from modelmeter.gateway.services import Services
from modelmeter.gateway.tenants import Tenant


def close_billing_period(services: Services, period: str) -> invoicing.CloseResult:
    """Close ``period`` for every tenant that existed during it."""
    invoicing.parse_period(period)
    with services.sessions() as session:
        tenants = [(t.id, t.plan, t.created) for t in session.exec(select(Tenant)).all()]
    return invoicing.close_period(sessions=services.sessions, catalog=services.plans, period=period,
                                  tenants=tenants)
