"""The plan catalog: plans are data (product.md's plan object), packaged or the operator's own file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
    model_validator,
)

from modelmeter.errors import InvalidRequestError
from modelmeter.money import price_text, unit_micro_cents

PriceStr = Annotated[str, StringConstraints(pattern=r"^\d{1,9}(\.\d{1,10})?$")]


class Plan(BaseModel):
    """One plan. Prices are decimal strings in the currency's major unit; amounts are integer cents."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    object: Literal["plan"] = "plan"
    name: str
    currency: Annotated[str, StringConstraints(pattern=r"^[a-z]{3}$")] = "usd"
    base_fee_cents: Annotated[int, Field(ge=0)] = 0
    included_tokens: Annotated[int, Field(ge=0)] = 0
    included_requests: Annotated[int, Field(ge=0)] = 0
    included_training_tokens: Annotated[int, Field(ge=0)] = 0
    price_per_1k_tokens: Decimal = Decimal("0")
    price_per_request: Decimal = Decimal("0")
    price_per_1m_training_tokens: Decimal = Decimal("0")
    rpm_limit: Annotated[int, Field(ge=1)]
    tpm_limit: Annotated[int, Field(ge=1)]
    hard_limit: bool = False
    prepaid: bool = False  # usage must be paid from prepaid credits as it is incurred (429 when they cannot)

    @field_validator("price_per_1k_tokens", "price_per_request", "price_per_1m_training_tokens", mode="before")
    @classmethod
    def _price(cls, value: Any) -> Decimal:
        if not isinstance(value, str | int | Decimal) or isinstance(value, bool):
            raise ValueError("prices are decimal strings, never floats")
        price = Decimal(str(value))
        if not price.is_finite() or price < 0:
            raise ValueError("prices must be finite and non-negative")
        return price

    @model_validator(mode="after")
    def _prices_exact(self) -> Plan:
        """Every price must be a whole number of micro-cents per unit, so pricing stays exact integers."""
        for price in PRICES:
            try:
                price.unit_micro(self)
            except ValueError:
                raise ValueError(
                    f"{price.name} '{price.of(self):f}' is not a whole number of micro-cents (0.000001 cent) per "
                    f"{price.unit}: use at most {9 - len(str(price.per_units))} decimal places"
                ) from None
        return self

    @field_serializer("price_per_1k_tokens", "price_per_request", "price_per_1m_training_tokens")
    def _price_out(self, value: Decimal) -> str:
        return price_text(value, min_places=4)


@dataclass(frozen=True)
class PlanPrice:
    """One of a plan's prices: a decimal in the currency's major unit per ``per_units`` units of ``unit``."""

    name: str  # the plan field, for messages
    unit: str
    per_units: int
    of: Callable[[Plan], Decimal]

    def unit_micro(self, plan: Plan) -> int:
        """The plan's exact price per single unit, in micro-cents (ValueError when it is not whole)."""
        return unit_micro_cents(self.of(plan), self.per_units)


REQUEST_PRICE = PlanPrice("price_per_request", "request", 1, lambda plan: plan.price_per_request)
TOKEN_PRICE = PlanPrice("price_per_1k_tokens", "token", 1_000, lambda plan: plan.price_per_1k_tokens)
TRAINING_TOKEN_PRICE = PlanPrice("price_per_1m_training_tokens", "training token", 1_000_000,
                                 lambda plan: plan.price_per_1m_training_tokens)
PRICES = (REQUEST_PRICE, TOKEN_PRICE, TRAINING_TOKEN_PRICE)


class PlanCatalog:
    """The plans by id, in catalog order."""

    def __init__(self, plans: list[Plan]) -> None:
        if not plans:
            raise ValueError("a plan catalog needs at least one plan")
        self._plans = {p.id: p for p in plans}
        if len(self._plans) != len(plans):
            raise ValueError("plan ids must be unique")

    @classmethod
    def load(cls, path: Path | None = None) -> PlanCatalog:
        """The operator's file when given, else the packaged catalog."""
        text = path.read_text() if path else (resources.files("modelmeter.billing") / "plans.json").read_text()
        raw = json.loads(text)
        return cls([Plan.model_validate(p) for p in raw["plans"]])

    def get(self, plan_id: str) -> Plan:
        try:
            return self._plans[plan_id]
        except KeyError:
            raise InvalidRequestError(
                f"Unknown plan '{plan_id}'. Known plans: {', '.join(self._plans)}.", code="unknown_plan", param="plan"
            ) from None

    def __contains__(self, plan_id: object) -> bool:
        return plan_id in self._plans

    def all(self) -> list[Plan]:
        return list(self._plans.values())
