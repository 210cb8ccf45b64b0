"""Multi-adapter serving on a tiny random BERT: a row inside any mixed batch equals its model alone.

The reference for an adapter row is PEFT's own loader merging the adapter into a copy of the base
(``merge_and_unload``), so the on-disk format, the reader, the page stacks and the batched gather are all
checked against an independent implementation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from modelmeter.models.adapters.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, read_adapter
from modelmeter.models.adapters.backend import AdapterBackend, DeviceTier, ResidentAdapter
from modelmeter.models.adapters.pages import PagePool
from modelmeter.models.backends import BertBackend
from tests.tiny_bert import make_tiny_adapter, make_tiny_bert, merged_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
TEXTS = [
    "ok",
    "a rather longer sentence, with punctuation and several more tokens than the others",
    "mid length input here",
    "Ünïcödé 🙂 漢字",
    " ".join(["word"] * 60),
]
# (labels, rank): different label counts and ranks, so padding to the batch's largest of each is exercised.
SPECS = [(["neg", "pos"], 4), (["a", "b", "c"], 8), (["one", "two", "three", "four", "five"], 1), (["x", "y"], 16)]



@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("base"), "feature-extraction")


@dataclass
class Reference:
    """An adapter on disk and what its rows must give: PEFT's merged model, run alone."""

    path: Path
    labels: list[str]
    merged: Any


@pytest.fixture(scope="module")
def references(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Reference]:
    root = tmp_path_factory.mktemp("adapters")
    refs = []
    for i, (labels, rank) in enumerate(SPECS):
        path = make_tiny_adapter(root / f"a{i}", base_dir, labels, rank=rank, seed=i)
        refs.append(Reference(path, labels, merged_classifier(base_dir, path, len(labels))))
    return refs


@pytest.fixture(scope="module")
def plain(base_dir: Path) -> BertBackend:
    return BertBackend.load(base_dir, task="feature-extraction", device=CPU)


def load_backend(base_dir: Path, *, device_bytes: int | None = None, max_batch_size: int = 64) -> AdapterBackend:
    return AdapterBackend.load_base(base_dir, device=CPU, budget_bytes=64 * 1024 * 1024, device_bytes=device_bytes,
                                    max_batch_size=max_batch_size, max_labels=8)


def resident(backend: AdapterBackend, ref: Reference, name: str) -> ResidentAdapter:
    adapter = backend.read_adapter(name, ref.path)
    backend.admit(adapter)
    return adapter


def alone(ref: Reference, ids: list[int]) -> list[float]:
    with torch.inference_mode():
        logits = ref.merged(input_ids=torch.tensor([ids])).logits
    return [float(p) for p in logits.softmax(dim=-1)[0]]


def check_rows(backend: AdapterBackend, plain: BertBackend, rows: list[tuple[int | None, str]],
               refs: list[Reference], adapters: list[ResidentAdapter]) -> None:
    ids = [backend.tokenize([text], truncate=False).ids[0] for _, text in rows]
    tags = [adapters[i] if i is not None else None for i, _ in rows]
    results = backend.forward(ids, tags)
    for (which, _), row_ids, result in zip(rows, ids, results, strict=True):
        if which is None:
            assert result == pytest.approx(plain.forward([row_ids])[0], abs=1e-5)
            continue
        assert isinstance(result, dict)
        assert list(result) == refs[which].labels  # this row's own labels, in its own order
        assert list(result.values()) == pytest.approx(alone(refs[which], row_ids), abs=1e-5)


@pytest.mark.parametrize("device_bytes", [None, 1], ids=["one-tier", "two-tier"])
def test_a_mixed_batch_equals_each_model_alone(base_dir: Path, plain: BertBackend, references: list[Reference],
                                               device_bytes: int | None) -> None:
    backend = load_backend(base_dir, device_bytes=device_bytes)
    adapters = [resident(backend, ref, f"m{i}") for i, ref in enumerate(references)]
    rows = [(which, text) for which in (None, 0, 1, 2, 3) for text in TEXTS]
    random.Random(0).shuffle(rows)
    check_rows(backend, plain, rows, references, adapters)


def test_a_batch_without_adapters_is_the_plain_base(base_dir: Path, plain: BertBackend) -> None:
    backend = load_backend(base_dir)
    ids = backend.tokenize(TEXTS, truncate=False).ids
    assert backend.forward(ids, [None] * len(ids)) == plain.forward(ids)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([None, 0, 1, 2, 3]), st.sampled_from(TEXTS)), min_size=1, max_size=12))
def test_no_row_ever_sees_another_adapter(base_dir: Path, plain: BertBackend, references: list[Reference],
                                          rows: list[tuple[int | None, str]]) -> None:
    """Whatever the composition and order of a batch, every row gets exactly its own model's output."""
    backend = _shared_backend(base_dir, references)
    check_rows(backend, plain, rows, references, _shared_adapters[id(backend)])


_shared: dict[Path, AdapterBackend] = {}
_shared_adapters: dict[int, list[ResidentAdapter]] = {}


def _shared_backend(base_dir: Path, refs: list[Reference]) -> AdapterBackend:
    if base_dir not in _shared:
        backend = load_backend(base_dir)
        _shared_adapters[id(backend)] = [resident(backend, ref, f"m{i}") for i, ref in enumerate(refs)]
        _shared[base_dir] = backend
    return _shared[base_dir]


def test_device_tier_swaps_adapters_in_and_out_exactly(base_dir: Path, plain: BertBackend,
                                                       references: list[Reference]) -> None:
    """A device tier with room for one batch of two adapters: four adapters take turns, outputs stay exact."""
    backend = load_backend(base_dir, device_bytes=1)
    tier = backend.device_tier = small_tier(backend, pages=25)  # 24 usable: any two of the four, never all
    adapters = [backend.read_adapter(f"m{i}", ref.path) for i, ref in enumerate(references)]
    for first, second in [(0, 1), (2, 3), (0, 2), (1, 3), (3, 0)]:
        check_rows(backend, plain, [(first, TEXTS[1]), (second, TEXTS[2])], references, adapters)
    assert tier.copies > 4
    assert tier.evictions > 0
    # An adapter the host pool released gives its device pages back at the next batch.
    free_before = tier.pool.free_pages
    backend.release(adapters[3])
    check_rows(backend, plain, [(0, TEXTS[0])], references, adapters)
    assert tier.pool.free_pages == free_before + SPECS[3][1]


def small_tier(backend: AdapterBackend, *, pages: int) -> DeviceTier:
    return DeviceTier(PagePool(backend.shapes, backend.dimensions, pages=pages, label_pages=64, device=CPU,
                               dtype=torch.float32))


def test_a_batch_larger_than_the_device_tier_is_refused(base_dir: Path, references: list[Reference]) -> None:
    backend = load_backend(base_dir, device_bytes=1)
    backend.device_tier = small_tier(backend, pages=21)  # fewer pages than two adapters of rank 16
    adapters = [backend.read_adapter(f"m{i}", references[3].path) for i in range(2)]
    ids = backend.tokenize(["a", "b"], truncate=False).ids
    with pytest.raises(RuntimeError, match="cannot hold"):
        backend.forward(ids, adapters)


def test_pages_are_handed_out_lowest_first_and_reused(base_dir: Path, references: list[Reference]) -> None:
    backend = load_backend(base_dir)
    pool = backend.resident
    assert pool is not None
    first = resident(backend, references[0], "a")  # rank 4, 2 labels
    second = resident(backend, references[2], "b")  # rank 1, 5 labels
    assert first.placement is not None
    assert second.placement is not None
    assert (first.placement.pages, second.placement.pages) == ((1, 2, 3, 4), (5,))
    assert first.weights is None  # written into the pages: no second copy is kept
    backend.release(first)
    again = resident(backend, references[1], "c")  # rank 8 reuses the four freed pages first
    assert again.placement is not None
    assert again.placement.pages[:4] == (1, 2, 3, 4)
    for stack in (*pool.a.values(), *pool.b.values()):
        assert not stack[0].any()  # the zero page stays zero
    assert not pool.head_w[0].any()
    assert pool.head_b[0] == 0


def test_page_pool_accounting() -> None:
    pool = PagePool({"m": (3, 5)}, 4, pages=4, label_pages=3, device=CPU, dtype=torch.float32)
    assert pool.page_bytes == (3 + 5) * 4
    assert pool.label_page_bytes == (4 + 1) * 4
    assert pool.bytes_for(2, 2) == 2 * 32 + 2 * 20
    assert pool.alloc(4, 1) is None  # three usable pages only
    placement = pool.alloc(3, 2)
    assert placement is not None
    assert pool.alloc(1, 1) is None
    pool.free(placement)
    assert pool.free_pages == 3


# --- what a damaged or foreign adapter gets -----------------------------------------------------------


def _copy(ref: Reference, tmp_path: Path) -> Path:
    target = tmp_path / "adapter"
    target.mkdir()
    for f in ref.path.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def _rewrite_weights(path: Path, change: Any) -> None:
    tensors = load_file(path / ADAPTER_WEIGHTS)
    change(tensors)
    save_file(tensors, str(path / ADAPTER_WEIGHTS))


def _rewrite_config(path: Path, **fields: Any) -> None:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    (path / ADAPTER_CONFIG).write_text(json.dumps(config | fields))


def _first_a(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in tensors if "lora_A" in k)


DAMAGE: dict[str, Any] = {
    "missing weights": lambda p: (p / ADAPTER_WEIGHTS).unlink(),
    "truncated weights": lambda p: (p / ADAPTER_WEIGHTS).write_bytes((p / ADAPTER_WEIGHTS).read_bytes()[:100]),
    "garbage weights": lambda p: (p / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 64),
    "missing meta": lambda p: (p / "adapter_meta.json").unlink(),
    "bad meta": lambda p: (p / "adapter_meta.json").write_text("{not json"),
    "nan factor": lambda p: _rewrite_weights(p, lambda t: t[_first_a(t)].fill_(float("nan"))),
    "wrong shape": lambda p: _rewrite_weights(p, lambda t: t.update({_first_a(t): torch.zeros(4, 7)})),
    "unknown module": lambda p: _rewrite_weights(
        p, lambda t: t.update({"base_model.model.bert.embeddings.word_embeddings.lora_A.weight": torch.zeros(4, 32)})),
    "no head": lambda p: _rewrite_weights(p, lambda t: t.pop("base_model.model.classifier.weight")),
    "dora": lambda p: _rewrite_config(p, use_dora=True),
    "rank over 64": lambda p: _rewrite_config(p, r=65),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_adapter_is_refused_with_a_reason(base_dir: Path, references: list[Reference], tmp_path: Path,
                                                    damage: str) -> None:
    path = _copy(references[0], tmp_path)
    DAMAGE[damage](path)
    backend = load_backend(base_dir)
    with pytest.raises(AdapterError) as caught:
        read_adapter(path, shapes=backend.shapes, hidden=backend.dimensions)
    assert str(caught.value)


def test_head_stacks_grow_and_keep_what_they_hold() -> None:
    pool = PagePool({"m": (3, 5)}, 4, pages=64, label_pages=4, max_label_pages=20, device=CPU, dtype=torch.float32)
    first = pool.alloc(1, 3)
    assert first is not None
    assert pool.label_capacity == 4
    pool.head_w[list(first.label_pages)] = torch.arange(12, dtype=torch.float32).view(3, 4)
    second = pool.alloc(1, 10)  # needs more label pages than are free: the heads double (twice), up to the cap
    assert second is not None
    assert pool.label_capacity == 16
    assert pool.head_w[list(first.label_pages)].flatten().tolist() == list(range(12))
    assert not pool.head_w[0].any()
    assert set(second.label_pages).isdisjoint(first.label_pages)
    assert pool.alloc(1, 10) is None
    assert pool.label_capacity == 20
