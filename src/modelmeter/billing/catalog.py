"""The plan catalog: plans are data (product.md's plan object), packaged or the operator's own file."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from modelmeter.billing.tiers import TiersMode
from modelmeter.errors import InvalidRequestError
from modelmeter.money import amount_text, major_price_text, price_text, unit_micro_cents

DECIMAL_PATTERN = r"^\d{1,9}(\.\d{1,10})?$"
PriceStr = Annotated[str, StringConstraints(pattern=DECIMAL_PATTERN)]
MAX_TIER_BOUND = 2**53 - 1  # the Redis quota script prices in doubles, exact below 2^53
MAX_FLAT_CENTS = 10**9  # $10M: in micro-cents still far below 2^53


def _inexact(name: str, value: Decimal, unit: str, per_units: int) -> str:
    """The refusal of a price that is not a whole number of micro-cents per unit (one wording for every price)."""
    return (f"{name} '{value:f}' is not a whole number of micro-cents (0.000001 cent) per {unit}: use at most "
            f"{9 - len(str(per_units))} decimal places")


def _errors(title: str, found: list[tuple[tuple[int | str, ...], str, Any]]) -> ValidationError:
    """A ValidationError whose entries carry their own locations (pydantic prefixes the enclosing fields)."""
    details = [InitErrorDetails(type=PydanticCustomError("invalid_tier", message), loc=loc, input=value)
               for loc, message, value in found]
    return ValidationError.from_exception_data(title, details)


class Tier(BaseModel):
    """One price tier (Stripe's shape): billable units of the period up to ``up_to`` (null: no bound), priced at
    ``unit_amount_decimal`` each (a decimal string in the major unit), plus ``flat_amount_cents`` once reached."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    up_to: Annotated[int, Field(strict=True, ge=1, le=MAX_TIER_BOUND)] | None
    unit_amount_decimal: Annotated[Decimal, WithJsonSchema({"type": "string", "pattern": DECIMAL_PATTERN})]
    flat_amount_cents: Annotated[int, Field(strict=True, ge=0, le=MAX_FLAT_CENTS)] = 0

    @field_validator("unit_amount_decimal", mode="before")
    @classmethod
    def _decimal_string(cls, value: Any) -> Decimal:
        if not isinstance(value, str):
            raise ValueError("unit_amount_decimal is a decimal string such as \"0.0050\", never a number")
        try:
            price = Decimal(value)
        except InvalidOperation:
            raise ValueError(f"unit_amount_decimal '{value}' is not a decimal number") from None
        if not price.is_finite() or price < 0:
            raise ValueError("unit_amount_decimal must be finite and non-negative")
        if not re.fullmatch(DECIMAL_PATTERN, value):
            raise ValueError(f"unit_amount_decimal '{value}' must be plain digits with an optional decimal point, "
                             "such as \"0.0050\"")
        return price

    @field_serializer("unit_amount_decimal")
    def _price_out(self, value: Decimal) -> str:
        return price_text(value, min_places=4)


class Tiers(BaseModel):
    """A dimension priced in tiers: ``graduated`` (each tier prices the units in it) or ``volume`` (every unit at
    the price of the tier the period's total falls in). Bounds ascend; only the last is null."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    UNIT: ClassVar[str] = "unit"
    PER_UNITS: ClassVar[int] = 1

    tiers_mode: TiersMode
    # At least one tier (checked below: pydantic's min_length would also fire when a tier itself is invalid).
    tiers: Annotated[tuple[Tier, ...], Field(json_schema_extra={"minItems": 1})]

    @field_validator("tiers")
    @classmethod
    def _ordered_and_exact(cls, tiers: tuple[Tier, ...]) -> tuple[Tier, ...]:
        if not tiers:
            raise ValueError("at least one tier is needed")
        found: list[tuple[tuple[int | str, ...], str, Any]] = []
        last = len(tiers) - 1
        for i, tier in enumerate(tiers):
            name = f"tier {i + 1} of {len(tiers)}"
            previous = tiers[i - 1].up_to if i else None
            if tier.up_to is None and i != last:
                found.append(((i, "up_to"), f"{name}: only the last tier may have up_to null (no bound)", None))
            elif tier.up_to is not None and i == last:
                found.append(((i, "up_to"), f"{name}: the last tier's up_to must be null (no bound)", tier.up_to))
            elif tier.up_to is not None and previous is not None and tier.up_to <= previous:
                found.append(((i, "up_to"), f"{name}: up_to {tier.up_to} must be greater than the previous tier's "
                              f"up_to {previous}", tier.up_to))
            try:
                unit_micro_cents(tier.unit_amount_decimal, cls.PER_UNITS)
            except ValueError:
                message = _inexact("unit_amount_decimal", tier.unit_amount_decimal, cls.UNIT, cls.PER_UNITS)
                found.append(((i, "unit_amount_decimal"), f"{name}: {message}", price_text(tier.unit_amount_decimal)))
        if found:
            raise _errors(cls.__name__, found)
        return tiers

    def summary(self, currency: str) -> str:
        """The tiers for people, bounds joined by en dashes, prices in the display form (``money``):
        ``graduated: 1-1,000 at $0.01; 1,001 and above at 0.5¢ + $2.00 flat``."""
        parts, first = [], 1
        for tier in self.tiers:
            bounds = f"{first:,} and above" if tier.up_to is None else f"{first:,}\u2013{tier.up_to:,}"
            flat = f" + {amount_text(tier.flat_amount_cents, currency)} flat" if tier.flat_amount_cents else ""
            parts.append(f"{bounds} at {major_price_text(tier.unit_amount_decimal, currency)}{flat}")
            first = (tier.up_to or 0) + 1
        return f"{self.tiers_mode}: {'; '.join(parts)}"


class TokenTiers(Tiers):
    """Token tiers: ``up_to`` counts billable tokens; ``unit_amount_decimal`` is per 1k tokens."""

    UNIT: ClassVar[str] = "token"
    PER_UNITS: ClassVar[int] = 1_000


class RequestTiers(Tiers):
    """Request tiers: ``up_to`` counts billable requests; ``unit_amount_decimal`` is per request."""

    UNIT: ClassVar[str] = "request"
    PER_UNITS: ClassVar[int] = 1


TIERED_PRICES = {"token_tiers": "price_per_1k_tokens", "request_tiers": "price_per_request"}


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
    token_tiers: TokenTiers | None = None
    request_tiers: RequestTiers | None = None
    rpm_limit: Annotated[int, Field(ge=1)]
    tpm_limit: Annotated[int, Field(ge=1)]
    hard_limit: bool = False
    prepaid: bool = False  # usage must be paid from prepaid credits as it is incurred (429 when they cannot)
    # Batch API usage is priced at (100 - this)% of the request and token prices, on lines of its own.
    batch_discount_percent: Annotated[int, Field(strict=True, ge=0, le=100)] = 0

    @field_validator("price_per_1k_tokens", "price_per_request", "price_per_1m_training_tokens", mode="before")
    @classmethod
    def _price(cls, value: Any) -> Decimal:
        if not isinstance(value, str | int | Decimal) or isinstance(value, bool):
            raise ValueError("prices are decimal strings, never floats")
        try:
            price = Decimal(str(value))
        except InvalidOperation:
            raise ValueError(f"'{value}' is not a decimal number") from None
        if not price.is_finite() or price < 0:
            raise ValueError("prices must be finite and non-negative")
        return price

    @model_validator(mode="after")
    def _prices_exact(self) -> Plan:
        """Every price must be a whole number of micro-cents per unit, so pricing stays exact integers (tier
        prices are checked by their tiers); a dimension is priced flat or in tiers, never both."""
        for tiers, flat in TIERED_PRICES.items():
            if getattr(self, tiers) is not None and flat in self.model_fields_set:
                raise _errors("Plan", [((tiers,), f"a plan with {tiers} has no {flat}: set one or the other",
                                        price_text(getattr(self, flat)))])
        for price in PRICES:
            try:
                price.unit_micro(self)
            except ValueError:
                raise ValueError(_inexact(price.name, price.of(self), price.unit, price.per_units)) from None
        self._batch_prices_exact()
        return self

    def _batch_prices_exact(self) -> None:
        """The discounted batch prices must stay whole micro-cents too, so that a batch line is still exactly
        quantity x unit price; a volume-tiered dimension (every unit repriced at the period's tier) takes no
        discount, since its batch usage has no price of its own to discount (its lines price both together)."""
        keep = 100 - self.batch_discount_percent
        if keep == 100:
            return
        for tiers, price in ((self.request_tiers, REQUEST_PRICE), (self.token_tiers, TOKEN_PRICE)):
            if tiers is not None and tiers.tiers_mode == "volume":
                raise ValueError(f"batch_discount_percent must be 0 on a plan with volume {price.unit} tiers: "
                                 "volume tiers reprice every unit of the period at one tier")
            units = [price.unit_micro(self)] if tiers is None else [
                unit_micro_cents(tier.unit_amount_decimal, price.per_units) for tier in tiers.tiers]
            flats = [] if tiers is None else [tier.flat_amount_cents * 10**6 for tier in tiers.tiers]
            for micro in units + flats:
                if micro * keep % 100:
                    raise ValueError(
                        f"with batch_discount_percent {self.batch_discount_percent}, a {price.unit} price of "
                        f"{micro} micro-cents is not a whole number of micro-cents once discounted: choose a "
                        "discount or prices that divide evenly")

    @field_serializer("price_per_1k_tokens", "price_per_request", "price_per_1m_training_tokens")
    def _price_out(self, value: Decimal) -> str:
        return price_text(value, min_places=4)

    # No return annotation on purpose: pydantic then documents the output with the fields' own schema.
    @model_serializer(mode="wrap")
    def _out(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        """A tiered dimension shows its tiers and no flat price; an untiered one shows no tiers key."""
        data = handler(self)
        if isinstance(data, dict):
            for tiers, flat in TIERED_PRICES.items():
                data.pop(flat if getattr(self, tiers) is not None else tiers, None)
        return data


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


class _CatalogFile(BaseModel):
    """A catalog file: ``{"plans": [plan, ...]}``."""

    plans: list[Plan]


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
        # Validated as one document, so an error's location names the plan too: plans.2.token_tiers.tiers.1.up_to
        return cls(list(_CatalogFile.model_validate(json.loads(text)).plans))

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
