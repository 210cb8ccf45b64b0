"""The shared base: one frozen BERT computing, in one forward pass, rows without an adapter (the platform's
feature extraction) and rows of any number of tenants' LoRA classifiers.

The batcher hands ``forward`` one tag per row: ``None`` for the bare base, or the :class:`ResidentAdapter` the
registry resolved for that row's model (never anything from the request). The backend owns the gather: it
turns the tags into a page index per row, every wrapped linear adds the rows' low-rank updates, and each
classification row's logits come from its adapter's head, gathered from the label pages and padded to the
batch's largest label count, padding masked out.

Two ways to keep adapters resident:
- one tier (the CPU default): an adapter is written into the resident page stacks when it loads, and those
  stacks are what batches gather from;
- two tiers (CUDA by default): adapters stay in host memory (pinned) and a fixed set of device pages holds
  those that batches need, copied in on demand by the forward thread, least recently used out first.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelmeter.models.adapters.artifact import SERVED_TARGETS, AdapterError, AdapterWeights, read_adapter
from modelmeter.models.adapters.layers import AdapterContext, BatchPlan, wrap_linears
from modelmeter.models.adapters.pages import PagePool, Placement
from modelmeter.models.backends import BertBackend, Result, mean_pooled
from modelmeter.models.outputs import TOKEN_CLASSIFICATION, TokenScores

MAX_RANK = 64
# Room above the budget for adapters pinned by requests in flight while the pool is full (pages are reserved
# virtually: only pages written cost memory).
_HEADROOM = 1.25
_FIRST_LABEL_PAGES = 4096  # heads grow from here (6 MB for MiniLM), doubling as adapters arrive

OnAdapterBatch = Callable[[int, int], None]  # (distinct adapters in the batch, adapters copied to the device)


@dataclass(eq=False, slots=True)
class ResidentAdapter:
    """A loaded adapter; identity is the object (a reloaded adapter is a new one)."""

    model_id: str
    rank: int
    labels: tuple[str, ...]
    memory_bytes: int
    weights: AdapterWeights | None  # the host copy (two tiers); dropped once written to the one tier
    placement: Placement | None = None  # its pages in the one-tier resident pool
    task: str = "text-classification"  # or "token-classification": its head scores every token

    @property
    def tags_tokens(self) -> bool:
        return self.task == TOKEN_CLASSIFICATION


class DeviceTier:
    """A fixed set of device pages backed by host memory; used only from the forward thread."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._placed: OrderedDict[ResidentAdapter, Placement] = OrderedDict()
        self._retired: deque[ResidentAdapter] = deque()  # appended from the event loop, drained here
        self.copies = 0
        self.evictions = 0

    def retire(self, adapter: ResidentAdapter) -> None:
        """The host pool dropped ``adapter``: its device pages may go (thread-safe)."""
        self._retired.append(adapter)

    def place(self, adapters: Sequence[ResidentAdapter]) -> tuple[dict[ResidentAdapter, Placement], int]:
        """Device pages for every adapter of a batch (copying in those not resident); and how many were copied."""
        while self._retired:
            placement = self._placed.pop(self._retired.popleft(), None)
            if placement is not None:
                self.pool.free(placement)
        wanted = list(dict.fromkeys(adapters))
        copied = 0
        for adapter in wanted:
            if adapter in self._placed:
                self._placed.move_to_end(adapter)
            else:
                self._placed[adapter] = self._copy_in(adapter, keep=set(wanted))
                copied += 1
        self.copies += copied
        return {adapter: self._placed[adapter] for adapter in wanted}, copied

    def _copy_in(self, adapter: ResidentAdapter, keep: set[ResidentAdapter]) -> Placement:
        assert adapter.weights is not None, "a pinned adapter keeps its host copy"
        while (placement := self.pool.alloc(adapter.rank, len(adapter.labels))) is None:
            victim = next((a for a in self._placed if a not in keep), None)
            if victim is None:
                raise RuntimeError("the device's adapter pages cannot hold one batch's adapters")
            self.pool.free(self._placed.pop(victim))
            self.evictions += 1
        self.pool.write(placement, adapter.weights)
        return placement


@dataclass(frozen=True, slots=True)
class _Heads:
    rows: torch.Tensor  # [C] batch rows with an adapter
    pages: torch.Tensor  # [C * L] their label pages, padded with the zero page
    valid: torch.Tensor  # [C, L] which of the L are real labels
    adapters: list[ResidentAdapter]


class AdapterBackend(BertBackend):
    """A feature-extraction BERT whose linear layers also serve LoRA adapters, row by row."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._context = AdapterContext()
        self.shapes: dict[str, tuple[int, int]] = {}
        self.resident: PagePool | None = None
        self.device_tier: DeviceTier | None = None
        self.on_adapter_batch: OnAdapterBatch | None = None

    @classmethod
    def load_base(cls, path: Path, *, device: torch.device, budget_bytes: int, device_bytes: int | None,
                  max_batch_size: int, max_labels: int, targets: tuple[str, ...] = SERVED_TARGETS) -> AdapterBackend:
        """Load the base from ``path`` and wrap its linear layers. ``device_bytes`` sizes the device tier
        (``None``: one tier, the CPU's default); the budget sizes the resident pool."""
        backend = cls.load(path, task="feature-extraction", device=device)
        assert isinstance(backend, AdapterBackend)
        backend.shapes = wrap_linears(backend._model, targets, backend._context)
        backend._make_pools(budget_bytes, device_bytes, max_batch_size, max_labels)
        return backend

    def _make_pools(self, budget_bytes: int, device_bytes: int | None, max_batch_size: int, max_labels: int) -> None:
        probe = self._pool(2, 2, torch.device("cpu"))
        page_bytes, label_bytes = probe.page_bytes, probe.label_page_bytes
        if device_bytes is None:
            pages = math.ceil(_HEADROOM * budget_bytes / page_bytes) + MAX_RANK + 1
            most_labels = math.ceil(_HEADROOM * budget_bytes / label_bytes) + max_labels + 1
            self.resident = self._pool(pages, _FIRST_LABEL_PAGES, self.device, max_label_pages=most_labels)
            return
        # Two tiers: the device must hold one batch's adapters at the largest rank and label count.
        pages = max(device_bytes // page_bytes, max_batch_size * MAX_RANK + 1)
        label_pages = max(pages, max_batch_size * max_labels + 1)
        self.device_tier = DeviceTier(self._pool(pages, label_pages, self.device))

    def _pool(self, pages: int, label_pages: int, device: torch.device, max_label_pages: int | None = None) -> PagePool:
        return PagePool(self.shapes, self.dimensions, pages=pages, label_pages=label_pages, device=device,
                        dtype=self._model.dtype, max_label_pages=max_label_pages)

    # --- the adapter pool's side (loader thread, then event loop) --------------------------------------

    def read_adapter(self, model_id: str, path: Path) -> ResidentAdapter:
        """Read and check an adapter (blocking: the pool calls this from a worker thread)."""
        weights = read_adapter(path, shapes=self.shapes, hidden=self.dimensions)
        if weights.rank > MAX_RANK:
            raise AdapterError(f"rank {weights.rank} is above {MAX_RANK}")
        pool = self.resident or self._require_tier().pool
        size = pool.bytes_for(weights.rank, len(weights.labels))
        if self.device_tier is not None:  # the host copy, in the device's dtype, pinned for fast copies
            weights = weights.to(dtype=self._model.dtype, pin=self.device.type == "cuda")
        return ResidentAdapter(model_id, weights.rank, weights.labels, size, weights, task=weights.task)

    def admit(self, adapter: ResidentAdapter) -> None:
        """One tier: write the adapter into the resident pages (on the event loop, after the pool made room)."""
        if self.resident is None:
            return
        assert adapter.weights is not None
        placement = self.resident.alloc(adapter.rank, len(adapter.labels))
        if placement is None:
            raise AdapterError("the adapter pool is full of adapters in use; retry shortly")
        self.resident.write(placement, adapter.weights)
        adapter.placement, adapter.weights = placement, None

    def release(self, adapter: ResidentAdapter) -> None:
        """The pool evicted ``adapter`` (no request holds it): free what it occupies."""
        if self.resident is not None and adapter.placement is not None:
            self.resident.free(adapter.placement)
            adapter.placement = None
        if self.device_tier is not None:
            self.device_tier.retire(adapter)
        adapter.weights = None

    def _require_tier(self) -> DeviceTier:
        assert self.device_tier is not None
        return self.device_tier

    # --- the forward thread -----------------------------------------------------------------------------

    def forward(self, batch_ids: list[list[int]], tags: Sequence[object] | None = None) -> list[Result]:
        """One batch: rows tagged ``None`` get the base's sentence vector, the others their adapter's label scores."""
        if not batch_ids:
            return []
        rows: list[ResidentAdapter | None] = [t if isinstance(t, ResidentAdapter) else None for t in tags or ()]
        rows += [None] * (len(batch_ids) - len(rows))
        input_ids, mask = self._pad(batch_ids)
        with torch.inference_mode():
            plan, heads = self._plan(rows)
            self._context.plan = plan
            try:
                out = self._model(input_ids=input_ids, attention_mask=mask)
            finally:
                self._context.plan = None
            results: list[Result | None] = [None] * len(rows)
            self._embeddings(rows, out.last_hidden_state, mask, results)
            if plan is not None and heads is not None:
                classifiers, taggers = heads
                if classifiers is not None:
                    self._classify_rows(plan.pool, classifiers, out.pooler_output, results)
                if taggers is not None:
                    self._tag_rows(plan.pool, taggers, out.last_hidden_state, [len(r) for r in batch_ids], results)
        return results  # type: ignore[return-value]  # every row was filled by one of the three paths

    def _plan(self, rows: list[ResidentAdapter | None]
              ) -> tuple[BatchPlan | None, tuple[_Heads | None, _Heads | None] | None]:
        adapters = [a for a in rows if a is not None]
        if not adapters:
            return None, None
        placements, copied = self._placements(adapters)
        if self.on_adapter_batch is not None:
            self.on_adapter_batch(len(placements), copied)
        pool = self.resident or self._require_tier().pool
        rank = max(len(p.pages) for p in placements.values())
        zero = (0,) * rank
        pages = [placements[a].pages + zero[len(placements[a].pages):] if a is not None else zero for a in rows]
        plan = BatchPlan(pool, torch.tensor(pages, dtype=torch.long, device=self.device).view(-1), len(rows), rank)
        # One head stack per kind of head: classifiers read the pooled vector, taggers every token's state.
        classifiers = [a if a is not None and not a.tags_tokens else None for a in rows]
        taggers = [a if a is not None and a.tags_tokens else None for a in rows]
        return plan, (self._heads(classifiers, placements) if any(classifiers) else None,
                      self._heads(taggers, placements) if any(taggers) else None)

    def _placements(self, adapters: list[ResidentAdapter]) -> tuple[dict[ResidentAdapter, Placement], int]:
        if self.device_tier is not None:
            return self.device_tier.place(adapters)
        placed = {}
        for adapter in adapters:
            assert adapter.placement is not None, "a pinned adapter keeps its pages"
            placed[adapter] = adapter.placement
        return placed, 0

    def _heads(self, rows: list[ResidentAdapter | None], placements: dict[ResidentAdapter, Placement]) -> _Heads:
        indices = [i for i, a in enumerate(rows) if a is not None]
        adapters = [a for a in rows if a is not None]
        width = max(len(a.labels) for a in adapters)
        pages, valid = [], []
        for adapter in adapters:
            own = placements[adapter].label_pages
            pages.append(own + (0,) * (width - len(own)))
            valid.append([True] * len(own) + [False] * (width - len(own)))
        device = self.device
        return _Heads(torch.tensor(indices, dtype=torch.long, device=device),
                      torch.tensor(pages, dtype=torch.long, device=device).view(-1),
                      torch.tensor(valid, dtype=torch.bool, device=device), adapters)

    def _embeddings(self, rows: list[ResidentAdapter | None], hidden: torch.Tensor, mask: torch.Tensor,
                    results: list[Result | None]) -> None:
        plain = [i for i, a in enumerate(rows) if a is None]
        if not plain:
            return
        if len(plain) < len(rows):
            index = torch.tensor(plain, dtype=torch.long, device=self.device)
            hidden, mask = hidden.index_select(0, index), mask.index_select(0, index)
        for i, vector in zip(plain, mean_pooled(hidden, mask), strict=True):
            results[i] = vector

    def _classify_rows(self, pool: PagePool, heads: _Heads, pooled: torch.Tensor, results: list[Result | None]) -> None:
        n, width = heads.valid.shape
        features = pooled.index_select(0, heads.rows)  # [C, hidden]
        weight = pool.head_w.index_select(0, heads.pages).view(n, width, -1)  # [C, L, hidden]
        bias = pool.head_b.index_select(0, heads.pages).view(n, width)
        logits = torch.bmm(weight, features.unsqueeze(2)).squeeze(2) + bias
        probs = logits.to(torch.float32).masked_fill(~heads.valid, float("-inf")).softmax(dim=-1).cpu().tolist()
        for i, adapter, row in zip(heads.rows.tolist(), heads.adapters, probs, strict=True):
            results[i] = dict(zip(adapter.labels, row[: len(adapter.labels)], strict=True))

    def _tag_rows(self, pool: PagePool, heads: _Heads, hidden: torch.Tensor, lengths: list[int],
                  results: list[Result | None]) -> None:
        """A tagger's head on every token of its rows (``BertForTokenClassification`` reads the sequence output,
        not the pooler): ``[C, T, hidden] x [C, hidden, L]``, padding labels masked, each row cut to its length."""
        n, width = heads.valid.shape
        states = hidden.index_select(0, heads.rows)  # [C, T, hidden]
        weight = pool.head_w.index_select(0, heads.pages).view(n, width, -1)  # [C, L, hidden]
        bias = pool.head_b.index_select(0, heads.pages).view(n, 1, width)
        logits = torch.bmm(states, weight.transpose(1, 2)) + bias  # [C, T, L]
        logits = logits.to(torch.float32).masked_fill(~heads.valid.unsqueeze(1), float("-inf"))
        probs = logits.softmax(dim=-1).cpu().numpy()
        for k, (i, adapter) in enumerate(zip(heads.rows.tolist(), heads.adapters, strict=True)):
            results[i] = TokenScores(adapter.labels, probs[k, : lengths[i], : len(adapter.labels)])
