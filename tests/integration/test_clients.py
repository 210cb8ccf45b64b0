"""The `openai` and `huggingface_hub` clients, unchanged, against a running server (uvicorn on loopback)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from modelmeter.gateway.services import services_of
from tests.support.live_server import LiveServer


@pytest.fixture
def tenant(make_tenant: Any, make_key: Any) -> tuple[str, str]:
    t = make_tenant()
    return t["id"], make_key(t["id"])["key"]


def test_openai_embeddings(live_server: LiveServer, tenant: Any, register_model: Any) -> None:
    tenant_id, key = tenant
    model = register_model(tenant_id, task="feature-extraction")
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0)
    result = client.embeddings.create(model=model, input=["hello world", "a second, longer sentence"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 32
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0
    as_floats = client.embeddings.create(model=model, input="hello world", encoding_format="float")
    np.testing.assert_allclose(as_floats.data[0].embedding, result.data[0].embedding, atol=1e-6)
    models = [m.id for m in client.models.list()]
    assert model in models
    assert "all-MiniLM-L6-v2" in models


def test_openai_errors_surface_as_sdk_exceptions(live_server: LiveServer, tenant: Any) -> None:
    import openai

    _, key = tenant
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="x")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    bad = OpenAI(base_url=f"{live_server.url}/v1", api_key="mm_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="all-MiniLM-L6-v2", input="x")


def test_openai_batch_file_upload_and_content(live_server: LiveServer, tenant: Any) -> None:
    """``client.files.create(purpose="batch")`` and ``client.files.content``, unchanged."""
    import json

    import openai

    _, key = tenant
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0)
    lines = [{"custom_id": f"ticket-{i}", "method": "POST", "url": "/v1/classify",
              "body": {"model": "m", "input": f"ticket {i}"}} for i in range(3)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    created = client.files.create(file=("tickets.jsonl", data), purpose="batch")
    assert (created.purpose, created.filename) == ("batch", "tickets.jsonl")
    assert client.files.content(created.id).read() == data
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.files.create(file=("bad.jsonl", data + data), purpose="batch")  # every custom_id twice
    assert "line 4: custom_id 'ticket-0' repeats line 1" in refused.value.body["message"]  # type: ignore[index]


def test_openai_sdk_batches_round_trip(live_server: LiveServer, tenant: Any, register_model: Any) -> None:
    """``client.batches.create/retrieve/list/cancel`` and the output file, unchanged; the server's own runner
    serves the lines, and each answer equals the interactive one."""
    import json
    import time

    tenant_id, key = tenant
    model = register_model(tenant_id, task="feature-extraction")
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0)
    texts = [f"ticket {i}: the parcel arrived damaged" for i in range(6)]
    lines = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": t}}
             for i, t in enumerate(texts)]
    upload = client.files.create(file=("b.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 6, 0)
    assert batch.output_file_id is not None
    answers = {a["custom_id"]: a for a in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    for i, text in enumerate(texts):
        interactive = client.embeddings.create(model=model, input=text).data[0].embedding
        np.testing.assert_allclose(answers[f"t{i}"]["response"]["body"]["data"][0]["embedding"], interactive,
                                   atol=1e-5)
    assert batch.id in [b.id for b in client.batches.list()]
    second = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    cancelled = client.batches.cancel(second.id)
    assert cancelled.status in ("cancelling", "cancelled", "completed")  # the runner may have been quicker


def test_huggingface_inference_client(live_server: LiveServer, tenant: Any, register_model: Any) -> None:
    tenant_id, key = tenant
    classifier = register_model(tenant_id, labels=["negative", "positive"])
    embedder = register_model(tenant_id, task="feature-extraction")
    labels = InferenceClient(model=f"{live_server.url}/models/{classifier}", token=key).text_classification("great")
    assert {e.label for e in labels} == {"negative", "positive"}
    assert abs(sum(e.score for e in labels) - 1) < 1e-5
    vectors = InferenceClient(model=f"{live_server.url}/models/{embedder}", token=key).feature_extraction("great")
    assert vectors.shape == (1, 32)


def test_huggingface_token_classification(live_server: LiveServer, tenant: Any, register_model: Any) -> None:
    """``InferenceClient.token_classification`` unchanged, against a tagger: entities with offsets into the text."""
    tenant_id, key = tenant
    tagger = register_model(tenant_id, task="token-classification")
    text = "Anna Schmidt of Acme Corp flew to São Paulo."
    client = InferenceClient(model=f"{live_server.url}/models/{tagger}", token=key)
    found = client.token_classification(text)
    assert found, "the tiny tagger tags many tokens"
    for entity in found:
        assert entity.entity_group in ("PER", "ORG", "LOC")
        assert entity.word == text[entity.start:entity.end]
    tokens = client.token_classification(text, aggregation_strategy="none")  # type: ignore[arg-type]
    assert all(t.entity is not None and t.entity[:2] in ("B-", "I-") for t in tokens)


def _sdk_with_training_file(live_server: LiveServer, tenant: Any, register_model: Any,
                            pairs: int) -> tuple[OpenAI, str, Any]:
    """The SDK as the tenant, the tiny platform base, and an uploaded file of ``pairs`` good/bad rows."""
    _, key = tenant
    base = register_model(None, task="feature-extraction", model_id="tiny-base")
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0)
    lines = [f'{{"text": "good film {i}", "label": "pos"}}\n{{"text": "bad film {i}", "label": "neg"}}'
             for i in range(pairs)]
    return client, base, client.files.create(file=("train.jsonl", "\n".join(lines).encode()), purpose="fine-tune")


def test_openai_files_and_fine_tuning(live_server: LiveServer, tenant: Any, register_model: Any) -> None:
    client, base, uploaded = _sdk_with_training_file(live_server, tenant, register_model, 10)
    assert uploaded.id.startswith("file_")
    assert uploaded.purpose == "fine-tune"
    job = client.fine_tuning.jobs.create(model=base, training_file=uploaded.id, suffix="sdk", seed=3)
    assert job.status == "queued"
    assert job.training_file == uploaded.id
    fetched = client.fine_tuning.jobs.retrieve(job.id)
    assert fetched.id == job.id
    assert fetched.seed == 3
    events = client.fine_tuning.jobs.list_events(job.id)
    assert next(e.message for e in events.data) == "Files validated; job queued."
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def test_openai_sdk_creates_lora_and_full_jobs_unchanged(live_server: LiveServer, tenant: Any,
                                                         register_model: Any) -> None:
    """``training_type`` travels in the SDK's ``extra_body``; the job object echoes it (the SDK keeps extras)."""
    from modelmeter.trainer import build_worker

    _, key = tenant
    client, base, uploaded = _sdk_with_training_file(live_server, tenant, register_model, 12)
    default = client.fine_tuning.jobs.create(model=base, training_file=uploaded.id, suffix="plain")
    lora = client.fine_tuning.jobs.create(model=base, training_file=uploaded.id, suffix="lora",
                                          hyperparameters={"n_epochs": 1, "batch_size": 8},
                                          extra_body={"training_type": {"type": "lora", "rank": 4, "alpha": 8}})
    assert default.model_extra is not None
    assert default.model_extra["training_type"] == {
        "type": "lora", "rank": 8, "alpha": 16}
    assert lora.model_extra is not None
    assert lora.model_extra["training_type"] == {"type": "lora", "rank": 4, "alpha": 8}
    client.fine_tuning.jobs.cancel(default.id)
    services = services_of(live_server.app)
    assert build_worker(services.settings, engine=services.engine, show_progress=False).run_once()
    full = client.fine_tuning.jobs.create(model=base, training_file=uploaded.id, suffix="full",
                                          hyperparameters={"n_epochs": 1, "batch_size": 8},
                                          extra_body={"training_type": {"type": "full"}})
    assert full.model_extra is not None
    assert full.model_extra["training_type"] == {"type": "full"}
    assert build_worker(services.settings, engine=services.engine, show_progress=False).run_once()
    finished = {j.id: j for j in client.fine_tuning.jobs.list()}
    for job_id, kind in ((lora.id, "lora"), (full.id, "full")):
        model_id = finished[job_id].fine_tuned_model
        assert finished[job_id].status == "succeeded"
        assert model_id
        verdict = InferenceClient(model=f"{live_server.url}/models/{model_id}", token=key).text_classification("good")
        assert {e.label for e in verdict} == {"pos", "neg"}
        # (Listings may lag a new model by the registry snapshot's few seconds; a call looks it up at once.)
        listed = {m.id: m for m in client.models.list()}[model_id]
        assert listed.model_extra is not None
        assert listed.model_extra["training_type"] == kind
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.fine_tuning.jobs.create(model=base, training_file=uploaded.id,
                                       extra_body={"training_type": {"type": "lora", "rank": 65}})
    assert refused.value.body["param"] == "training_type.rank"  # type: ignore[index]
