"""Resident adapter weights as stacked pages, the tensors every batch gathers its rows' adapters from.

A *page* is one rank component of an adapter across every served module: row ``p`` of ``a[module]`` (length
``in``) and of ``b[module]`` (length ``out``). An adapter of rank ``r`` owns ``r`` pages, anywhere in the stack,
so adapters of every rank share one pool with no padding in memory (the idea of S-LoRA's unified paging, applied
to rank components). A *label page* is one row of a classification head (``hidden`` weights and a bias); an
adapter with ``n`` labels owns ``n`` of them. Page 0 and label page 0 are zeros: a row without an adapter, and
the padding up to a batch's largest rank, gather them and add nothing.

Capacity is fixed at construction. On the CPU the stacks are allocated with ``torch.empty``, whose pages the
kernel commits only when first written, and free pages are handed out lowest first: resident memory follows the
pages in use (bounded by the adapter pool's budget), not the capacity reserved.

One owner thread per pool: the event loop for the CPU's resident pool, the forward thread for a device's.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from modelmeter.models.adapters.artifact import AdapterWeights


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an adapter's rows live in a :class:`PagePool`."""

    pages: tuple[int, ...]
    label_pages: tuple[int, ...]


class PagePool:
    """Stacks ``a[module] [pages, in]``, ``b[module] [pages, out]``, ``head_w [label_pages, hidden]``, ``head_b``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], hidden: int, *, pages: int, label_pages: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        if pages < 2 or label_pages < 2:
            raise ValueError("a page pool needs room for the zero page and at least one more")
        self.shapes = dict(shapes)
        self.device, self.dtype = device, dtype
        self.a = {name: self._stack(pages, fan_in) for name, (fan_in, _) in shapes.items()}
        self.b = {name: self._stack(pages, fan_out) for name, (_, fan_out) in shapes.items()}
        self.head_w = self._stack(label_pages, hidden)
        self.head_b = torch.zeros(label_pages, device=device, dtype=dtype)
        self._free = list(range(1, pages))  # a sorted list is a valid heap
        self._free_labels = list(range(1, label_pages))
        self.capacity, self.label_capacity = pages, label_pages

    def _stack(self, rows: int, width: int) -> torch.Tensor:
        stack = torch.empty(rows, width, device=self.device, dtype=self.dtype)
        stack[0].zero_()
        return stack

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across every served module."""
        width = sum(fan_in + fan_out for fan_in, fan_out in self.shapes.values())
        return width * self._element_size()

    @property
    def label_page_bytes(self) -> int:
        return (self.head_w.shape[1] + 1) * self._element_size()

    def _element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def bytes_for(self, rank: int, n_labels: int) -> int:
        """What an adapter of ``rank`` with ``n_labels`` labels occupies here."""
        return rank * self.page_bytes + n_labels * self.label_page_bytes

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, rank: int, n_labels: int) -> Placement | None:
        """Reserve pages for an adapter (lowest free first); ``None`` when there is not room for it."""
        if rank > len(self._free) or n_labels > len(self._free_labels):
            return None
        pages = tuple(heapq.heappop(self._free) for _ in range(rank))
        labels = tuple(heapq.heappop(self._free_labels) for _ in range(n_labels))
        return Placement(pages, labels)

    def free(self, placement: Placement) -> None:
        for page in placement.pages:
            heapq.heappush(self._free, page)
        for page in placement.label_pages:
            heapq.heappush(self._free_labels, page)

    def write(self, placement: Placement, weights: AdapterWeights) -> None:
        """Copy an adapter into its pages; a module the adapter does not update gets zeros."""
        index = torch.tensor(placement.pages, dtype=torch.long, device=self.device)
        for name in self.shapes:
            factor = weights.factors.get(name)
            if factor is None:
                self.a[name].index_fill_(0, index, 0)
                self.b[name].index_fill_(0, index, 0)
                continue
            self.a[name].index_copy_(0, index, factor[0].to(self.device, self.dtype, non_blocking=True))
            self.b[name].index_copy_(0, index, factor[1].to(self.device, self.dtype, non_blocking=True))
        labels = torch.tensor(placement.label_pages, dtype=torch.long, device=self.device)
        self.head_w.index_copy_(0, labels, weights.head[0].to(self.device, self.dtype, non_blocking=True))
        self.head_b.index_copy_(0, labels, weights.head[1].to(self.device, self.dtype, non_blocking=True))
