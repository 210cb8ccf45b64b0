"""The credit draw rule (``plan_draws``), its order, and what a prepaid plan refuses outside inference."""

from __future__ import annotations

from decimal import Decimal

import pytest

from modelmeter.billing.catalog import Plan
from modelmeter.billing.drawdown import GrantBalance, draw_rank, plan_draws
from modelmeter.billing.meter import check_training_quota
from modelmeter.billing.quota import Amount
from modelmeter.errors import InsufficientQuotaError

NOW = 1_800_000_000


def grant(gid: str, micro: int, source: str = "granted", expires_at: int | None = None,
          created: int = NOW - 10) -> GrantBalance:
    return GrantBalance(gid, draw_rank(source=source, expires_at=expires_at, created=created, grant_id=gid),
                        expires_at, micro)


def test_order_granted_then_purchased_soonest_expiry_then_oldest() -> None:
    grants = [grant("p_soon", 10, "purchased", NOW + 5), grant("g_never", 10), grant("g_late", 10, expires_at=NOW + 9),
              grant("g_soon", 10, expires_at=NOW + 5), grant("g_never_old", 10, created=NOW - 99)]
    draws = plan_draws(grants, 50, now=NOW, prepaid=True)
    assert [g for g, _ in draws or ()] == ["g_soon", "g_late", "g_never_old", "g_never", "p_soon"]


def test_partial_grants_and_exact_amounts() -> None:
    assert plan_draws([grant("a", 7), grant("b", 100, expires_at=NOW + 1)], 10, now=NOW, prepaid=True) == (
        ("b", 10),)
    assert plan_draws([grant("a", 7, expires_at=NOW + 1), grant("b", 100)], 10, now=NOW, prepaid=True) == (
        ("a", 7), ("b", 3))


def test_expired_and_empty_grants_pay_nothing() -> None:
    grants = [grant("gone", 100, expires_at=NOW), grant("empty", 0), grant("ok", 5)]
    assert plan_draws(grants, 5, now=NOW, prepaid=True) == (("ok", 5),)
    assert plan_draws(grants, 6, now=NOW, prepaid=True) is None


def test_not_prepaid_draws_what_there_is_and_free_requests_draw_nothing() -> None:
    assert plan_draws([grant("a", 5)], 8, now=NOW, prepaid=False) == (("a", 5),)
    assert plan_draws([], 8, now=NOW, prepaid=False) == ()
    assert plan_draws([grant("a", 5)], 0, now=NOW, prepaid=True) == ()
    assert plan_draws([grant("a", 5)], -3, now=NOW, prepaid=True) == ()  # a volume tier repricing lower


def test_prepaid_plan_refuses_training_beyond_its_allowance() -> None:
    plan = Plan.model_validate({"id": "pp", "name": "PP", "rpm_limit": 1, "tpm_limit": 1, "prepaid": True,
                                "included_training_tokens": 1000, "price_per_1m_training_tokens": "2.00"})
    check_training_quota(plan=plan, budget_cents=None, used=Amount(), training_tokens=1000)
    with pytest.raises(InsufficientQuotaError, match="credits pay inference only"):
        check_training_quota(plan=plan, budget_cents=None, used=Amount(training_tokens=500), training_tokens=501)
    free = plan.model_copy(update={"price_per_1m_training_tokens": Decimal(0)})
    check_training_quota(plan=free, budget_cents=None, used=Amount(), training_tokens=10**9)
