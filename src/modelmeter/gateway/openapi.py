"""The OpenAPI document, completed with what only the running app knows.

FastAPI derives the document from the routes' models; this adds what those static models cannot say: the bearer
scheme and which operations need it, the plan ids of this deployment's catalog (a tenant's ``plan`` must be one),
and the inputs-per-request cap from the settings. Generated clients and the contract tests (schemathesis, in CI)
then know every rule a request is checked against, short of the ones that depend on stored data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from modelmeter.shapes import public_name

BEARER = "bearer"
_AUTHENTICATED = ("/v1/", "/models/", "/admin/")
_INPUT_FIELDS = {"ClassifyRequest": "input", "EmbeddingsRequest": "input", "HFRequest": "inputs"}


def install(app: FastAPI, *, plan_ids: Iterable[str], max_inputs: int) -> None:
    """Replace ``app.openapi`` with one that builds the completed document once and caches it."""
    plans = sorted(plan_ids)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes, webhooks=app.webhooks.routes)
            _name_by_title(document)
            _receiver_answers(document)
            _add_security(document)
            schemas = document.get("components", {}).get("schemas", {})
            for name in ("TenantCreate", "TenantUpdate"):
                _set_plan_enum(schemas.get(name, {}), plans)
            for name, field in _INPUT_FIELDS.items():
                _cap_inputs(schemas.get(name, {}), field, max_inputs)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _name_by_title(document: dict[str, Any]) -> None:
    """Name each component as its model's title says (``shapes.Public``): ``FineTuningJobPublic``, the class
    beside the ``FineTuningJob`` table, is ``FineTuningJob`` to clients, as it was before the class moved."""
    schemas: dict[str, Any] = document.get("components", {}).get("schemas", {})
    renamed = {key: public_name(key) for key in schemas}
    if len(set(renamed.values())) != len(renamed):
        raise RuntimeError(f"two OpenAPI components would share a name: {sorted(renamed.items())}")
    prefix = "#/components/schemas/"
    refs = {prefix + old: prefix + new for old, new in renamed.items() if old != new}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref in refs:
                node["$ref"] = refs[ref]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    document.setdefault("components", {})["schemas"] = {
        renamed[key]: schema | ({"title": public_name(schema["title"])} if "title" in schema else {})
        for key, schema in schemas.items()
    }


def _receiver_answers(document: dict[str, Any]) -> None:
    """A webhook's responses are what the tenant's receiver may answer, not FastAPI's defaults for a route (a 422
    with its validation schema): any 2xx is a delivery, anything else a retry."""
    for operations in document.get("webhooks", {}).values():
        for operation in operations.values():
            operation["responses"] = {"2XX": {"description": "Delivered. Any other answer, or none within the "
                                                             "timeout, is retried with backoff."}}
    text = repr(document.get("paths", {})) + repr(document.get("webhooks", {}))
    schemas = document.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}" not in text and unused in schemas and all(
                f"#/components/schemas/{unused}'" not in repr(v) for k, v in schemas.items() if k != unused):
            del schemas[unused]


def _add_security(document: dict[str, Any]) -> None:
    document.setdefault("components", {})["securitySchemes"] = {
        BEARER: {"type": "http", "scheme": "bearer",
                 "description": "A tenant key (`mm_…`) on /v1 and /models, the admin token on /admin."},
    }
    for path, operations in document.get("paths", {}).items():
        if path.startswith(_AUTHENTICATED):
            for operation in operations.values():
                operation["security"] = [{BEARER: []}]


def _set_plan_enum(schema: dict[str, Any], plans: list[str]) -> None:
    plan = schema.get("properties", {}).get("plan")
    if plan is not None:
        plan["enum"] = plans


def _cap_inputs(schema: dict[str, Any], field: str, max_inputs: int) -> None:
    for branch in schema.get("properties", {}).get(field, {}).get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = max_inputs

