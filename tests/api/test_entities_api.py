"""``POST /v1/entities`` and the Hugging Face route on a tagger: shapes, offsets, the five strategies, the task
checks both ways, metering, and refusals that bill nothing. The tagger is a tiny random full-copy
``BertForTokenClassification`` (tests/tiny_bert.py) whose head tags many tokens."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import func, select

from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway.services import Services
from tests.conftest import assert_envelope, bearer

TEXT = "José Müller of Acme Inc. met Anna in Zürich, and Anna met José."


@pytest.fixture
def tagger(make_tenant: Any, make_key: Any, register_model: Any) -> tuple[str, dict[str, str], str]:
    tenant = make_tenant()
    return tenant["id"], bearer(make_key(tenant["id"])["key"]), register_model(tenant["id"],
                                                                                 task="token-classification")


def usage_rows(services: Services, tenant_id: str) -> int:
    with services.sessions() as session:
        query = select(func.count()).select_from(UsageEvent).where(UsageEvent.tenant_id == tenant_id)
        return int(session.exec(query).one())


@pytest.mark.parametrize("strategy", ["simple", "first", "average", "max", "none"])
def test_entities_shape_offsets_and_usage(client: TestClient, tagger: Any, services: Services,
                                          strategy: str) -> None:
    tenant_id, headers, model = tagger
    response = client.post("/v1/entities", json={"model": model, "input": [TEXT, "Anna"],
                                                  "aggregation_strategy": strategy}, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["object"], body["model"], [d["index"] for d in body["data"]]) == ("list", model, [0, 1])
    found = body["data"][0]["entities"]
    assert found, "the tiny tagger's head tags many tokens: an empty answer would test nothing"
    key = "entity" if strategy == "none" else "entity_group"
    for item in found:
        assert item["word"] == TEXT[item["start"]:item["end"]]
        assert 0 <= item["start"] < item["end"] <= len(TEXT)
        assert 0.0 < item["score"] <= 1.0
        assert item[key] != "O"
        if strategy == "none":
            assert item[key][:2] in ("B-", "I-")
            assert isinstance(item["index"], int)
            assert item["index"] >= 1
        else:
            assert item[key] in ("PER", "ORG", "LOC")
    starts = [item["start"] for item in found]
    assert starts == sorted(starts)
    assert body["usage"]["prompt_tokens"] == int(response.headers["x-compute-tokens"]) > 0
    assert usage_rows(services, tenant_id) == 1  # one request, billed once, its tokens


def test_the_task_is_checked_both_ways_and_a_refusal_bills_nothing(client: TestClient, tagger: Any,
                                                                  register_model: Any, services: Services) -> None:
    tenant_id, headers, model = tagger
    classifier = register_model(tenant_id)
    wrong = client.post("/v1/classify", json={"model": model, "input": "x"}, headers=headers)
    assert_envelope(wrong, 422, code="unsupported_task")
    assert "token-classification" in wrong.json()["error"]["message"]
    other = client.post("/v1/entities", json={"model": classifier, "input": "x"}, headers=headers)
    assert_envelope(other, 422, code="unsupported_task")
    assert "text-classification" in other.json()["error"]["message"]
    bad = client.post("/v1/entities", json={"model": model, "input": "x", "aggregation_strategy": "most"},
                      headers=headers)
    assert bad.status_code == 422
    assert usage_rows(services, tenant_id) == 0


def test_models_list_shows_the_task_and_entity_types(client: TestClient, tagger: Any) -> None:
    _, headers, model = tagger
    listed = {m["id"]: m for m in client.get("/v1/models", headers=headers).json()["data"]}
    assert (listed[model]["task"], listed[model]["labels"]) == ("token-classification", ["LOC", "ORG", "PER"])


def test_hugging_face_route_answers_the_token_classification_shape(client: TestClient, tagger: Any) -> None:
    _, headers, model = tagger
    one = client.post(f"/models/{model}", json={"inputs": TEXT}, headers=headers)
    assert one.status_code == 200, one.text
    assert isinstance(one.json(), list)
    assert one.json()
    assert "entity_group" in one.json()[0]
    ours = client.post("/v1/entities", json={"model": model, "input": TEXT}, headers=headers).json()
    assert one.json() == ours["data"][0]["entities"]  # simple, the default of both
    many = client.post(f"/models/{model}", json={"inputs": [TEXT, TEXT],
                                                  "parameters": {"aggregation_strategy": "none",
                                                                 "ignore_labels": ["O", "B-PER", "I-PER"]}},
                       headers=headers).json()
    assert len(many) == 2
    assert many[0] == many[1]
    assert all(item["entity"] not in ("B-PER", "I-PER") for item in many[0])


def test_truncate_as_for_classification(client: TestClient, tagger: Any) -> None:
    _, headers, model = tagger
    long_text = "Anna " * 600
    refused = client.post("/v1/entities", json={"model": model, "input": long_text}, headers=headers)
    assert_envelope(refused, 422, code="context_length_exceeded")
    cut = client.post("/v1/entities", json={"model": model, "input": long_text, "truncate": True}, headers=headers)
    assert cut.status_code == 200
    assert all(item["end"] <= len(long_text) for item in cut.json()["data"][0]["entities"])
