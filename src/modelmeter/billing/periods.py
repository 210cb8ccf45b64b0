"""The billing calendar: a period is a UTC calendar month, named ``YYYY-MM``, and this is its one validator.

Every row of the ledger names its period (``period_of`` of the second it was served in, or the first open month
when that one is closed: ``ledger.default_periods``); invoices, quotas, credits, alerts and the operator's views
take periods in the same form. ``PERIOD`` is the pattern the routes state in OpenAPI and ``parse_period`` applies
it to a value that came another way, so the two cannot disagree.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime

from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection
from sqlmodel import col

from modelmeter.billing.tables import BillingState
from modelmeter.errors import InvalidRequestError

# A calendar month from 1970-01 to 2199-12: the Unix epoch's first month, and a bound that keeps every period's
# seconds well inside a 64-bit integer and a datetime.
PERIOD = r"^(19[7-9][0-9]|2[01][0-9]{2})-(0[1-9]|1[0-2])$"
_PERIOD_RE = re.compile(PERIOD)


def parse_period(period: str) -> str:
    """``period`` if it names a month (``PERIOD``); a 422 ``invalid_period`` otherwise."""
    if not _PERIOD_RE.fullmatch(period):  # fullmatch: '$' alone would take a trailing newline
        raise InvalidRequestError("period must look like YYYY-MM.", code="invalid_period", param="period")
    return period


def period_of(ts: int) -> str:
    """The calendar month (UTC) of a Unix timestamp, as ``YYYY-MM``."""
    return _month_of_day(int(ts) // 86400)


# A UTC day lies in one month. The ledger names every row's month (and the open one after a closed month):
# datetime's formatting and parsing cost ~2.5% of a saturated front's samples in bench/fronts.py's profile.
@functools.lru_cache(maxsize=1024)
def _month_of_day(day: int) -> str:
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m")


def period_bounds(period: str) -> tuple[int, int]:
    """``[start, end)`` of a ``YYYY-MM`` period in Unix seconds (UTC)."""
    start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return int(start.timestamp()), int(end.timestamp())


@functools.lru_cache(maxsize=256)
def next_period(period: str) -> str:
    """The month after ``period``."""
    return period_of(period_bounds(period)[1])


def closed_through(conn: Connection, *, lock: bool = False) -> str | None:
    """The latest closed period. ``lock`` takes the row FOR SHARE on PostgreSQL, so a concurrent close
    (which takes it FOR UPDATE) waits for this transaction and never misses its rows."""
    query = sa_select(col(BillingState.closed_through)).where(col(BillingState.id) == 1)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    return conn.execute(query).scalar()
