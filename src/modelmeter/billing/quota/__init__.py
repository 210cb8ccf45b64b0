"""Quota reservations: hard limits and budgets per (tenant, period), in-process or shared through Redis.

The counters hold committed usage and in-flight reservations: a reservation is admitted only if committed +
reserved + amount stays within every cap, then settled with the actual amounts or released. Holds that are never
settled (a replica died mid-request) expire after ``hold_ttl_s``. Counters start from a baseline read from the
ledger the first time a key is seen; in Redis the baseline goes into the script, which initialises only if the key
is still absent, so replicas initialising together never double count. Every Redis operation is a single Lua
script, so it is atomic without locks or retries.

The package: ``values`` (Amount, Caps), ``store`` (the protocol), ``memory`` (one process), ``redis`` (shared;
its Lua lives in ``lua/*.lua``, package data, each script's arguments written at its top).
"""

from modelmeter.billing.quota.memory import InProcessQuotaStore
from modelmeter.billing.quota.redis import RedisQuotaStore
from modelmeter.billing.quota.store import Baseline, QuotaStore
from modelmeter.billing.quota.values import HOLD_TTL_S, QUOTA_TTL_S, Amount, Caps

__all__ = ["HOLD_TTL_S", "QUOTA_TTL_S", "Amount", "Baseline", "Caps", "InProcessQuotaStore", "QuotaStore",
           "RedisQuotaStore"]
