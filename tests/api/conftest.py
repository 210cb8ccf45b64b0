"""Fixtures the API tests share: a tiny platform base that tenants fine-tune, and a tenant with a key."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import bearer


@pytest.fixture
def base(register_model: Any) -> str:
    """A tiny platform feature-extraction model that tenants may fine-tune."""
    return str(register_model(None, task="feature-extraction", model_id="tiny-base"))


@pytest.fixture
def tenant(make_tenant: Any, make_key: Any) -> tuple[str, dict[str, str]]:
    """A payg tenant's id and the headers of a key of its."""
    t = make_tenant()
    return t["id"], bearer(make_key(t["id"])["key"])
