"""Refusals come before the expensive work (issue 21): a large request takes its place in RPM before the tokenizer
reads it, and an input longer than the model could read is refused (or cut, with truncation) before it does."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from modelmeter.models import text
from tests.conftest import ADMIN, assert_envelope, bearer


class Recording:
    """A tokenizer that records the characters it is given (the work a request costs), then encodes."""

    def __init__(self, inner: Any, seen: list[int]) -> None:
        self.inner, self.seen = inner, seen

    def encode(self, value: str) -> Any:
        self.seen.append(len(value))
        return self.inner.encode(value)

    def encode_batch(self, values: list[str]) -> Any:
        self.seen.extend(len(v) for v in values)
        return self.inner.encode_batch(values)


@pytest.fixture
def tokenized(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    real = text.encoders

    def recording(tokenizer: Any, max_length: int) -> tuple[Any, Any]:
        whole, truncating = real(tokenizer, max_length)
        return Recording(whole, seen), Recording(truncating, seen)

    monkeypatch.setattr(text, "encoders", recording)
    return seen


@pytest.fixture
def tenant(client: TestClient, make_tenant: Any, make_key: Any, register_model: Any) -> dict[str, Any]:
    tenant_id = make_tenant()["id"]
    return {"id": tenant_id, "key": make_key(tenant_id)["key"], "model": register_model(tenant_id)}


def test_a_large_request_over_rpm_is_refused_before_the_tokenizer(client: TestClient, tenant: dict[str, Any],
                                                                  tokenized: list[int]) -> None:
    assert client.patch(f"/admin/tenants/{tenant['id']}", json={"rpm_limit": 1}, headers=ADMIN).status_code == 200
    headers = bearer(tenant["key"])
    assert client.post("/v1/classify", json={"model": tenant["model"], "input": "hi"}, headers=headers).status_code \
        == 200
    before = list(tokenized)
    big = ["word " * 2000] * 50  # 500,000 characters
    for _ in range(3):
        refused = client.post("/v1/classify", json={"model": tenant["model"], "input": big, "truncate": True},
                              headers=headers)
        assert_envelope(refused, 429, code="rate_limit_exceeded")
    assert tokenized == before  # the tokenizer never saw them
    assert before == [2]


def test_a_large_request_within_rpm_is_counted_once(client: TestClient, tenant: dict[str, Any]) -> None:
    assert client.patch(f"/admin/tenants/{tenant['id']}", json={"rpm_limit": 2}, headers=ADMIN).status_code == 200
    headers = bearer(tenant["key"])
    big = {"model": tenant["model"], "input": ["word " * 2000], "truncate": True}
    first = client.post("/v1/classify", json=big, headers=headers)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert client.post("/v1/classify", json=big, headers=headers).status_code == 200
    assert_envelope(client.post("/v1/classify", json=big, headers=headers), 429)


def test_an_input_longer_than_the_model_reads_is_refused_unread(client: TestClient, tenant: dict[str, Any],
                                                               tokenized: list[int]) -> None:
    limit = 512 * text.CHARS_PER_TOKEN
    long_word = "x" * (limit + 1)  # one [UNK] to the tokenizer, but never read
    refused = client.post("/v1/classify", json={"model": tenant["model"], "input": ["fine", long_word]},
                          headers=bearer(tenant["key"]))
    error = assert_envelope(refused, 422, code="context_length_exceeded")
    assert f"Input 1 has {limit + 1} characters" in error["message"]
    assert tokenized == []


def test_with_truncation_only_the_readable_prefix_is_tokenized(client: TestClient, tenant: dict[str, Any],
                                                              tokenized: list[int]) -> None:
    document = "a fine film. " * 50_000  # 650,000 characters, under the body limit
    served = client.post("/v1/classify", json={"model": tenant["model"], "input": document, "truncate": True},
                         headers=bearer(tenant["key"]))
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["prompt_tokens"] == 512  # the same answer as reading it all
    assert tokenized == [512 * text.CHARS_PER_TOKEN]
