"""Imports every table module so SQLModel's metadata is complete (migrations, tests)."""

from __future__ import annotations


def import_all_tables() -> None:
    import modelmeter.billing.tables
    import modelmeter.models.batches
    import modelmeter.models.finetune.tables
    import modelmeter.models.registry
    import modelmeter.tenancy.idempotency
    import modelmeter.tenancy.keys
    import modelmeter.tenancy.tenants  # noqa: F401
