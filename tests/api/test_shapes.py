"""The public shapes: written once (``XPublic.of`` beside each table), named in OpenAPI as clients know them, and
the alert webhook documented with the model ``GET /v1/events`` answers with."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from modelmeter.billing.alerts import EventPublic
from modelmeter.shapes import Public, public_name

# Components that were named so before the shapes moved beside their tables (clients generated from the document
# know them by these names).
KNOWN = ("FileObject", "FineTuningJob", "FineTuningEvent", "Invoice", "InvoiceLine", "CreditGrant", "CreditList",
         "CreditPurchase", "Subscription", "AlertSettings", "AlertSettingsCreated", "Event", "EventDelivery",
         "BillingClose", "Simulation", "SimulationRow", "UnitEconomics", "DashboardLink", "EngineStatus",
         "Page_FineTuningJob_", "Page_Invoice_", "Page_Event_", "Page_FileObject_")


def _schema_ref(operation: dict[str, Any]) -> str:
    return str(operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"])


def test_components_keep_their_names_and_no_class_name_leaks(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert set(KNOWN) <= set(schemas)
    for cls_name, title in Public.public_names.items():
        assert cls_name not in schemas, cls_name  # FineTuningJobPublic is FineTuningJob to clients
        assert title in schemas, title
    text = repr(document)
    for cls_name in Public.public_names:
        assert f"/{cls_name}'" not in text, cls_name
        assert f"_{cls_name}_" not in text, cls_name
    assert public_name("Page_FineTuningJobPublic_") == "Page_FineTuningJob_"


def test_the_alert_webhook_is_documented_with_the_events_model(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    hook = document["webhooks"]["usage.threshold_crossed"]["post"]
    body_ref = hook["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    page = document["components"]["schemas"][_schema_ref(document["paths"]["/v1/events"]["get"]).rsplit("/", 1)[1]]
    assert body_ref == page["properties"]["data"]["items"]["$ref"] == "#/components/schemas/Event"
    assert set(hook["responses"]) == {"2XX"}  # what a receiver answers, not a route's 422
    assert "HTTPValidationError" not in document["components"]["schemas"]  # no route of ours answers FastAPI's
    # The document's Event is the model the relay serialises: the same fields, required alike.
    event = document["components"]["schemas"]["Event"]
    assert set(event["properties"]) == set(EventPublic.model_fields)
    assert set(event["required"]) == set(EventPublic.model_fields)
